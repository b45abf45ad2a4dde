"""The ``cyphonic`` command line.

Sub-commands: ``ca init``, ``cloud``, ``token create``, ``enroll``, ``node``,
``status [--json]``, ``check-config``.  Every user error is one line on stderr
and exit status 1 (2 for usage errors); never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from cyphonic import __version__
from cyphonic.config import load_cloud_config, load_node_config
from cyphonic.errors import ConfigError, CyphonicError
from cyphonic.status import query_status

log = logging.getLogger("cyphonic")

DEFAULT_CLOUD_CONFIG = "/etc/cyphonic/cloud.toml"
DEFAULT_NODE_CONFIG = "/etc/cyphonic/node.toml"


def setup_logging(level: str) -> None:
    if os.environ.get("JOURNAL_STREAM"):
        fmt = "%(levelname)s %(name)s: %(message)s"  # the journal adds time and unit
    else:
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=getattr(logging, level.upper()), format=fmt, stream=sys.stderr)


async def _run_until_signal(
    start: Callable[[], Awaitable[Any]], stop: Callable[[], Awaitable[Any]]
) -> None:
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    try:
        await start()
        await done.wait()
        log.info("stopping")
    finally:
        await stop()


# -- cloud side -------------------------------------------------------------------------


def cmd_ca_init(args: argparse.Namespace) -> int:
    from cyphonic.pki.ca import init_ca

    cfg = load_cloud_config(Path(args.config))
    ca = init_ca(cfg.ca_dir, cfg.domain, time.time())
    print(f"created CYPHONIC CA for {cfg.domain} in {cfg.ca_dir}")
    print(f"install {cfg.ca_dir / 'ca.crt'} on every node before enrollment")
    del ca
    return 0


def cmd_token_create(args: argparse.Namespace) -> int:
    from cyphonic.pki.ca import validate_fqdn
    from cyphonic.pki.tokens import create_token
    from cyphonic.store.sqlite import SQLiteStore

    cfg = load_cloud_config(Path(args.config))
    fqdn = validate_fqdn(args.fqdn, cfg.domain)
    ttl = args.ttl if args.ttl is not None else cfg.token_ttl
    if ttl <= 0:
        raise ConfigError("--ttl must be positive")
    with SQLiteStore(cfg.db_path) as store:
        token = create_token(store, fqdn, ttl, time.time())
    if args.json:
        print(json.dumps({"fqdn": fqdn, "token": token, "expires_in": ttl}))
    else:
        print(token)
    return 0


def cmd_gn_add(args: argparse.Namespace) -> int:
    from cyphonic.admin import add_general_node, general_node_to_json
    from cyphonic.store.sqlite import SQLiteStore

    cfg = load_cloud_config(Path(args.config))
    with SQLiteStore(cfg.db_path) as store:
        rec = add_general_node(
            store,
            cfg.domain,
            cfg.pool4,
            cfg.pool6,
            mac=args.mac,
            fqdn=args.fqdn,
            adapter_fqdn=args.adapter,
            vip4=args.vip4,
            vip6=args.vip6,
            now=time.time(),
        )
    if args.json:
        print(json.dumps(general_node_to_json(rec)))
    else:
        print(f"{rec.mac}  {rec.fqdn}  {rec.vip4}  {rec.vip6}  via {rec.adapter_fqdn}")
    return 0


def cmd_gn_remove(args: argparse.Namespace) -> int:
    from cyphonic.admin import remove_general_node
    from cyphonic.store.sqlite import SQLiteStore

    cfg = load_cloud_config(Path(args.config))
    with SQLiteStore(cfg.db_path) as store:
        removed = remove_general_node(store, args.node)
    if not removed:
        raise CyphonicError(f"no general node {args.node!r}")
    print(f"removed {args.node}")
    return 0


def cmd_gn_list(args: argparse.Namespace) -> int:
    from cyphonic.admin import general_node_to_json, list_general_nodes
    from cyphonic.store.sqlite import SQLiteStore

    cfg = load_cloud_config(Path(args.config))
    with SQLiteStore(cfg.db_path) as store:
        recs = list_general_nodes(store, args.adapter)
    if args.json:
        print(json.dumps([general_node_to_json(r) for r in recs], indent=2))
    else:
        for r in recs:
            print(f"{r.mac}  {r.fqdn}  {r.vip4}  {r.vip6}  via {r.adapter_fqdn}")
    return 0


def cmd_cloud(args: argparse.Namespace) -> int:
    from cyphonic.cloud import Cloud

    cfg = load_cloud_config(Path(args.config))
    setup_logging(args.log_level or cfg.log_level)
    cloud = Cloud(cfg)
    asyncio.run(_run_until_signal(cloud.start, cloud.stop))
    return 0


def cmd_trs(args: argparse.Namespace) -> int:
    from cyphonic.trs.config import load_trs_config
    from cyphonic.trs.server import TrsServer

    cfg = load_trs_config(Path(args.config))
    setup_logging(args.log_level or cfg.log_level)
    server = TrsServer.from_config(cfg)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.stop()))
        await server.run(cfg.status_socket)

    asyncio.run(run())
    return 0


def cmd_trs_key(args: argparse.Namespace) -> int:
    path = Path(args.output)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise CyphonicError(f"{path} exists; refusing to overwrite a TRS key") from exc
    except OSError as exc:
        raise CyphonicError(f"cannot create {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "w") as fh:
        fh.write(os.urandom(32).hex() + "\n")
    print(f"wrote a new TRS key to {path}; install it on NMS ([nms] trs_key_file) and every TRS")
    return 0


# -- node side --------------------------------------------------------------------------


def cmd_enroll(args: argparse.Namespace) -> int:
    from cyphonic.auth.client import enroll
    from cyphonic.config import load_identity_config

    cfg = load_identity_config(Path(args.config))
    token = args.token
    if token == "-":  # noqa: S105 - "read from stdin", not a password
        token = sys.stdin.readline().strip()
    if not token:
        raise ConfigError("--token is empty")
    cert = asyncio.run(
        enroll(cfg.as_host, cfg.as_port, cfg.ca_cert, token, cfg.fqdn, cfg.state_dir, cfg.domain)
    )
    print(f"enrolled {cfg.fqdn}: certificate {cert}")
    return 0


def cmd_node(args: argparse.Namespace) -> int:
    from cyphonic.node.daemon import NodeDaemon
    from cyphonic.status import StatusServer

    cfg = load_node_config(Path(args.config))
    setup_logging(args.log_level or cfg.log_level)
    daemon = NodeDaemon(cfg)
    status = StatusServer(cfg.status_socket, daemon.status)

    async def start() -> None:
        await status.start()  # first: `cyphonic status` works while AS/NMS are unreachable
        await daemon.start()

    async def stop() -> None:
        await status.stop()
        await daemon.stop()

    asyncio.run(_run_until_signal(start, stop))
    return 0


def cmd_adapter(args: argparse.Namespace) -> int:
    from cyphonic.adapter.daemon import AdapterDaemon
    from cyphonic.config import load_adapter_config
    from cyphonic.status import StatusServer

    cfg = load_adapter_config(Path(args.config))
    setup_logging(args.log_level or cfg.node.log_level)
    daemon = AdapterDaemon(cfg)
    status = StatusServer(cfg.node.status_socket, daemon.status)

    async def start() -> None:
        await status.start()
        await daemon.start()

    async def stop() -> None:
        await status.stop()
        await daemon.stop()

    asyncio.run(_run_until_signal(start, stop))
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    path = Path(args.config)
    if args.kind == "cloud":
        load_cloud_config(path)
    elif args.kind == "adapter":
        from cyphonic.config import load_adapter_config

        load_adapter_config(path)
    elif args.kind == "trs":
        from cyphonic.trs.config import load_trs_config

        load_trs_config(path)
    else:
        load_node_config(path)
    print(f"{path}: ok ({args.kind})")
    return 0


# -- status -----------------------------------------------------------------------------


def _socket_for(args: argparse.Namespace) -> Path:
    if args.socket:
        return Path(args.socket)
    if args.config:
        path = Path(args.config)
        from cyphonic.config import load_identity_config

        try:
            return load_identity_config(path).status_socket
        except ConfigError:
            return load_cloud_config(path).status_socket
    for candidate in (
        "/run/cyphonic/node.sock",
        "/run/cyphonic/adapter.sock",
        "/run/cyphonic/cloud.sock",
        "/run/cyphonic/trs.sock",
    ):
        if Path(candidate).exists():
            return Path(candidate)
    return Path("/run/cyphonic/node.sock")


def cmd_status(args: argparse.Namespace) -> int:
    data = query_status(_socket_for(args))
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
        return 0
    print(format_status(data))
    return 0


def format_status(data: dict[str, Any]) -> str:
    lines = []
    if data.get("role") == "trs":
        lines.append(
            f"trs  listen {', '.join(data.get('listen', []))}  "
            f"sessions {data.get('counters', {}).get('sessions')}"
        )
        for k, v in sorted(data.get("counters", {}).items()):
            lines.append(f"  {k}: {v}")
        return "\n".join(lines)
    if data.get("role") == "adapter":
        lines.append(
            f"adapter {data.get('fqdn')}  downlink {data.get('downlink')}  "
            f"general nodes {len(data.get('general_nodes', []))}"
        )
        for g in data.get("general_nodes", []):
            reg = "registered" if g.get("registered") else "NOT registered"
            lease = "lease4" if g.get("lease4") else "no lease4"
            lease6 = "lease6" if g.get("lease6") else "no lease6"
            lines.append(
                f"  {g['mac']}  {g['fqdn']}  {g['vip4']}  {g['vip6']}  {reg}  "
                f"{lease} {lease6}  peers {len(g.get('peers', []))}"
            )
        if data.get("filter"):
            lines.append(
                "  spoofed frames dropped: "
                + ", ".join(f"{k}={v}" for k, v in sorted(data["filter"].items()))
            )
        return "\n".join(lines)
    if data.get("role") == "cloud":
        lines.append(
            f"cloud  domain {data.get('domain')}  nodes {data.get('nodes')}  "
            f"registered {data.get('registrations')}"
        )
        for k, v in sorted(data.get("nms", {}).items()):
            if k == "trs" and isinstance(v, dict):
                for t in v.get("instances", []):
                    lines.append(
                        f"  trs {t['trs_id']}: {', '.join(t['endpoints'])}  "
                        f"sessions {t['active_sessions']}/{t['capacity']}"
                    )
            else:
                lines.append(f"  nms.{k}: {v}")
        return "\n".join(lines)
    reg = "registered" if data.get("registered") else "NOT registered"
    lines.append(f"{data.get('fqdn')}  {data.get('vip4')}  {data.get('vip6')}  {reg}")
    for k, v in sorted(data.get("observed", {}).items()):
        lines.append(f"  NMS sees us (IPv{k}) as {v}")
    peers = data.get("peers", [])
    if not peers:
        lines.append("  no peers")
    for p in peers:
        hs = p.get("last_handshake")
        ago = f"{time.time() - hs:.0f}s ago" if hs else "never"
        lines.append(
            f"  peer {p['fqdn']}  {p['vip4']} {p['vip6']}  path {p['path']} ({p['reason']})"
            f"  endpoint {p['endpoint']}  rx {p['rx_bytes']} B  tx {p['tx_bytes']} B"
            f"  handshake {ago}"
        )
    drops = {
        k: v
        for k, v in data.get("counters", {}).items()
        if isinstance(v, int) and v and k != "punches"  # punches are expected, not drops
    }
    if drops:
        lines.append("  dropped: " + ", ".join(f"{k}={v}" for k, v in sorted(drops.items())))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cyphonic", description="CYPHONIC overlay network")
    p.add_argument("--version", action="version", version=f"cyphonic {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    ca = sub.add_parser("ca", help="certificate authority").add_subparsers(
        dest="ca_cmd", required=True
    )
    ca_init = ca.add_parser("init", help="create the root CA (once, on the cloud host)")
    ca_init.add_argument("--config", default=DEFAULT_CLOUD_CONFIG)
    ca_init.set_defaults(func=cmd_ca_init)

    cloud = sub.add_parser("cloud", help="run AS and NMS")
    cloud.add_argument("--config", default=DEFAULT_CLOUD_CONFIG)
    cloud.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    cloud.set_defaults(func=cmd_cloud)

    tok = sub.add_parser("token", help="enrollment tokens").add_subparsers(
        dest="tok_cmd", required=True
    )
    tc = tok.add_parser("create", help="issue a one-time enrollment token bound to an FQDN")
    tc.add_argument("--config", default=DEFAULT_CLOUD_CONFIG)
    tc.add_argument("--fqdn", required=True)
    tc.add_argument("--ttl", type=float, help="seconds until the token expires")
    tc.add_argument("--json", action="store_true")
    tc.set_defaults(func=cmd_token_create)

    trs = sub.add_parser("trs", help="run a TRS (tunnel relay server)")
    trs.add_argument("--config", default="/etc/cyphonic/trs.toml")
    trs.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    trs.set_defaults(func=cmd_trs)
    tk = sub.add_parser("trs-key", help="create the key shared by NMS and the TRS instances")
    tk.add_argument("--output", required=True)
    tk.set_defaults(func=cmd_trs_key)

    gn = sub.add_parser("general-node", help="general nodes behind adapters (cloud host)")
    gns = gn.add_subparsers(dest="gn_cmd", required=True)
    ga = gns.add_parser("add", help="add (or confirm) a general node record")
    ga.add_argument("--config", default=DEFAULT_CLOUD_CONFIG)
    ga.add_argument("--mac", required=True)
    ga.add_argument("--fqdn", required=True)
    ga.add_argument("--adapter", required=True, help="FQDN of the owning adapter")
    ga.add_argument("--vip4", help="default: allocated from the pool")
    ga.add_argument("--vip6", help="default: allocated from the pool")
    ga.add_argument("--json", action="store_true")
    ga.set_defaults(func=cmd_gn_add)
    gr = gns.add_parser("remove", help="remove a general node (by MAC or FQDN)")
    gr.add_argument("--config", default=DEFAULT_CLOUD_CONFIG)
    gr.add_argument("node")
    gr.set_defaults(func=cmd_gn_remove)
    gl = gns.add_parser("list", help="list general nodes")
    gl.add_argument("--config", default=DEFAULT_CLOUD_CONFIG)
    gl.add_argument("--adapter", help="only this adapter's")
    gl.add_argument("--json", action="store_true")
    gl.set_defaults(func=cmd_gn_list)

    en = sub.add_parser("enroll", help="generate keys locally and get a certificate from AS")
    en.add_argument("--config", default=DEFAULT_NODE_CONFIG)
    en.add_argument("--token", required=True, help="the token, or - to read it from stdin")
    en.set_defaults(func=cmd_enroll)

    node = sub.add_parser("node", help="run the node daemon")
    node.add_argument("--config", default=DEFAULT_NODE_CONFIG)
    node.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    node.set_defaults(func=cmd_node)

    ad = sub.add_parser("adapter", help="run the adapter daemon (general nodes on a downlink)")
    ad.add_argument("--config", default="/etc/cyphonic/adapter.toml")
    ad.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    ad.set_defaults(func=cmd_adapter)

    st = sub.add_parser("status", help="show a running daemon's state")
    st.add_argument("--json", action="store_true", help="machine-readable (stable keys)")
    st.add_argument("--socket", help="status socket path")
    st.add_argument("--config", help="read the status socket path from this config")
    st.set_defaults(func=cmd_status)

    cc = sub.add_parser("check-config", help="validate a configuration file and exit")
    cc.add_argument("--config", required=True)
    cc.add_argument("--kind", choices=["node", "cloud", "adapter", "trs"], default="node")
    cc.set_defaults(func=cmd_check_config)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc: int = args.func(args)
        return rc
    except CyphonicError as exc:
        print(f"cyphonic: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        with contextlib.suppress(Exception):
            logging.shutdown()


if __name__ == "__main__":
    sys.exit(main())
