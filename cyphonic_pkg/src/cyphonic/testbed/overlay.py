"""A whole CYPHONIC system in network namespaces: cloud + nodes on "the Internet".

Shared by the e2e tests, ``make lab`` and ``bench/``.  Everything it creates
is named with its prefix and lives under ``workdir``; addresses are
documentation ranges that exist only inside the namespaces.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cyphonic.testbed.topology import Topology

DOMAIN = "cyphonic.test"
INET_V4 = "198.51.100.0/24"
INET_V6 = "2001:db8:100::/64"
CLOUD_V4 = "198.51.100.10"
CLOUD_V6 = "2001:db8:100::10"
UPSTREAM_RECORDS = {"www.example.test": "198.51.100.80", "v6.example.test": "2001:db8:100::80"}


def cyphonic_cmd() -> list[str]:
    """How to run the CLI from the current interpreter (works inside a venv)."""
    return [sys.executable, "-m", "cyphonic.cli"]


@dataclass
class NodeSpec:
    name: str
    v4: str | None
    v6: str | None
    extra: str = ""  # appended to node.toml (e.g. a [tunnel] table)
    lan: str | None = None  # a RouterSpec's name: the node sits behind that NAPT router

    @property
    def fqdn(self) -> str:
        return f"{self.name}.{DOMAIN}"


@dataclass
class RouterSpec:
    """A NAPT router (nftables masquerade) between "the Internet" and a LAN."""

    name: str
    wan_v4: str | None
    wan_v6: str | None
    lan_v4: str | None = None  # LAN subnet, the router takes its first host address
    lan_v6: str | None = None


@dataclass
class GeneralNodeSpec:
    """An unmodified host on an adapter's downlink: only a fixed MAC, no addresses."""

    name: str
    mac: str

    @property
    def fqdn(self) -> str:
        return f"{self.name}.{DOMAIN}"


@dataclass
class AdapterSpec:
    name: str
    v4: str | None
    v6: str | None
    general_nodes: Sequence[GeneralNodeSpec] = ()
    lan: str | None = None  # behind this RouterSpec's NAPT

    @property
    def fqdn(self) -> str:
        return f"{self.name}.{DOMAIN}"


@dataclass
class OverlayLab:
    prefix: str
    workdir: Path
    nodes: Sequence[NodeSpec] = ()
    routers: Sequence[RouterSpec] = ()
    adapters: Sequence[AdapterSpec] = ()
    log: Callable[[str], None] = field(default=lambda _m: None)
    replace_stale: bool = False
    trs: bool = False  # run a TRS on the cloud host (and give NMS the TRS key)
    topo: Topology = field(init=False)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.topo = Topology(prefix=self.prefix, replace_stale=self.replace_stale)

    # -- building ---------------------------------------------------------------------

    def build(self) -> None:
        t0 = time.monotonic()
        if self.workdir.exists():
            shutil.rmtree(self.workdir)
        self.workdir.mkdir(parents=True)
        inet = self.topo.add_segment("inet", v4=INET_V4, v6=INET_V6)
        self.topo.add_host("cloud", inet, v4=CLOUD_V4, v6=CLOUD_V6)
        for r in self.routers:
            lan = self.topo.add_segment(f"l{r.name}", v4=r.lan_v4, v6=r.lan_v6)
            self.topo.add_router(
                r.name,
                wan=inet,
                wan_v4=r.wan_v4,
                wan_v6=r.wan_v6,
                lan=lan,
                lan_v4=lan.addr4(1) if r.lan_v4 else None,
                lan_v6=lan.addr6(1) if r.lan_v6 else None,
            )
        for n in self.nodes:
            seg = self.topo.segment(f"l{n.lan}") if n.lan else inet
            self.topo.add_host(n.name, seg, v4=n.v4, v6=n.v6)
        for ad in self.adapters:
            seg = self.topo.segment(f"l{ad.lan}") if ad.lan else inet
            self.topo.add_host(ad.name, seg, v4=ad.v4, v6=ad.v6)
            down = self.topo.add_segment(f"d{ad.name}")
            self.topo.connect(ad.name, down)
            for g in ad.general_nodes:
                self.topo.add_host(g.name, down, mac=g.mac, autoconf=True)
        self.log(f"topology up in {time.monotonic() - t0:.2f} s")
        self._write_cloud_config()
        self.cli("cloud", "ca", "init", "--config", str(self.cloud_config))
        self.start_upstream_dns()
        self.start_cloud()
        if self.trs:
            self.start_trs()
        for n in self.nodes:
            self.enroll(n)
            self.start_node(n)
        for ad in self.adapters:
            self.enroll_adapter(ad)
            self.start_adapter(ad)
        for n in self.nodes:
            self.wait_registered(n.name)
        for ad in self.adapters:
            self.wait_registered(ad.name, timeout=60)
        self.log(f"system up in {time.monotonic() - t0:.2f} s")

    @property
    def cloud_config(self) -> Path:
        return self.workdir / "cloud" / "cloud.toml"

    @property
    def trs_key(self) -> Path:
        return self.workdir / "cloud" / "trs.key"

    def start_trs(self) -> None:
        self._spawn(
            "cloud",
            "trs",
            [*cyphonic_cmd(), "trs", "--config", str(self.workdir / "cloud" / "trs.toml")],
        )

        def registered() -> bool:
            if not self.status_socket("cloud").exists():
                return False
            nms = self.status("cloud").get("nms", {})
            return bool(nms.get("trs", {}).get("instances"))

        self.wait(registered, 20, "TRS registered with NMS")

    def node_config(self, name: str) -> Path:
        return self.workdir / name / "node.toml"

    def status_socket(self, name: str) -> Path:
        return self.workdir / name / "status.sock"

    def _write_cloud_config(self) -> None:
        d = self.workdir / "cloud"
        d.mkdir()
        trs = f'trs_key_file = "{self.trs_key}"' if self.trs else ""
        self.cloud_config.write_text(
            f"""[cloud]
domain = "{DOMAIN}"
state_dir = "{d / "state"}"
status_socket = "{self.status_socket("cloud")}"
log_level = "info"

[as]
listen = ["0.0.0.0:4501", "[::]:4501"]
common_key_lifetime = 3600

[nms]
listen = ["0.0.0.0:4502", "[::]:4502"]
public = ["{CLOUD_V4}:4502", "[{CLOUD_V6}]:4502"]
keepalive_interval = 5

{trs}
[pools]
vip4 = "10.64.0.0/16"
vip6 = "fd43:5950::/64"
"""
        )
        if self.trs:
            self.cli("cloud", "trs-key", "--output", str(self.trs_key))
            (d / "trs.toml").write_text(
                f"""[trs]
listen = ["0.0.0.0:4503", "[::]:4503"]
public = ["{CLOUD_V4}:4503", "[{CLOUD_V6}]:4503"]
nms = ["{CLOUD_V4}:4502"]
key_file = "{self.trs_key}"
status_socket = "{self.status_socket("trs")}"
"""
            )

    def _write_node_config(self, n: NodeSpec) -> None:
        d = self.workdir / n.name
        d.mkdir(exist_ok=True)
        as_host = CLOUD_V4 if n.v4 else CLOUD_V6
        self.node_config(n.name).write_text(
            f"""[node]
fqdn = "{n.fqdn}"
domain = "{DOMAIN}"
state_dir = "{d / "state"}"
status_socket = "{self.status_socket(n.name)}"
log_level = "info"

[as]
host = "{as_host}"
ca_cert = "{self.workdir / "cloud" / "state" / "ca" / "ca.crt"}"

[tun]
name = "cyph0"

[resolver]
listen = ["127.0.0.1:53", "[::1]:53"]
upstream = ["{CLOUD_V4 if n.v4 else "[" + CLOUD_V6 + "]"}:53"]
{n.extra}"""
        )

    # -- processes --------------------------------------------------------------------

    def cli(self, host: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.topo.run(host, [*cyphonic_cmd(), *args], check=check, timeout=60)

    def _spawn(self, host: str, name: str, args: list[str]) -> None:
        logf = (self.workdir / f"{name}.log").open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.procs[name] = self.topo.popen(
            host, args, stdout=logf, stderr=subprocess.STDOUT, env=env
        )

    def start_upstream_dns(self) -> None:
        recs = [f"--record={k}={v}" for k, v in UPSTREAM_RECORDS.items()]
        self._spawn(
            "cloud",
            "upstream-dns",
            [
                sys.executable,
                "-m",
                "cyphonic.testbed.upstream_dns",
                "--listen",
                f"{CLOUD_V4}:53",
                "--listen",
                f"[{CLOUD_V6}]:53",
                *recs,
            ],
        )

    def start_cloud(self) -> None:
        self._spawn(
            "cloud", "cloud", [*cyphonic_cmd(), "cloud", "--config", str(self.cloud_config)]
        )
        self.wait(lambda: self.status_socket("cloud").exists(), 20, "cloud status socket")

    def stop(self, name: str) -> None:
        p = self.procs.pop(name, None)
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def enroll(self, n: NodeSpec) -> None:
        self._write_node_config(n)
        token = self.cli(
            "cloud", "token", "create", "--config", str(self.cloud_config), "--fqdn", n.fqdn
        ).stdout.strip()
        self.cli(n.name, "enroll", "--config", str(self.node_config(n.name)), f"--token={token}")
        self.topo.set_resolver(n.name, "127.0.0.1")

    def downlink(self, ad: AdapterSpec) -> str:
        return self.topo.host(ad.name).interface(f"d{ad.name}").ifname

    def enroll_adapter(self, ad: AdapterSpec) -> None:
        for g in ad.general_nodes:
            self.cli(
                "cloud",
                "general-node",
                "add",
                "--config",
                str(self.cloud_config),
                "--mac",
                g.mac,
                "--fqdn",
                g.fqdn,
                "--adapter",
                ad.fqdn,
            )
        self.enroll(
            NodeSpec(
                ad.name,
                ad.v4,
                ad.v6,
                extra=f'[adapter]\ndownlink = "{self.downlink(ad)}"\n'
                "ra_interval = 10\nrefresh_interval = 5\n",
            )
        )

    def start_adapter(self, ad: AdapterSpec) -> None:
        self._spawn(
            ad.name,
            ad.name,
            [*cyphonic_cmd(), "adapter", "--config", str(self.node_config(ad.name))],
        )

    def start_node(self, n: NodeSpec) -> None:
        self._spawn(
            n.name, n.name, [*cyphonic_cmd(), "node", "--config", str(self.node_config(n.name))]
        )

    def status(self, name: str) -> dict[str, Any]:
        host = "cloud" if name == "trs" else name  # the TRS runs on the cloud host
        out = self.cli(host, "status", "--json", "--socket", str(self.status_socket(name)))
        data: dict[str, Any] = json.loads(out.stdout)
        return data

    def wait_registered(self, name: str, timeout: float = 30) -> dict[str, Any]:
        result: dict[str, Any] = {}

        def ok() -> bool:
            nonlocal result
            if not self.status_socket(name).exists():
                return False
            try:
                result = self.status(name)
            except subprocess.CalledProcessError:
                return False
            return bool(result.get("registered"))

        self.wait(ok, timeout, f"{name} registered")
        return result

    def wait(self, pred: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited ({p.returncode}); log:\n{self.tail(name)}")
            if pred():
                return
            time.sleep(0.1)
        raise TimeoutError(f"timed out waiting for {what}")

    def tail(self, name: str, lines: int = 40) -> str:
        p = self.workdir / f"{name}.log"
        if not p.exists():
            return "(no log)"
        return "\n".join(p.read_text(errors="replace").splitlines()[-lines:])

    def destroy(self) -> None:
        for name in list(self.procs):
            self.stop(name)
        self.topo.destroy()
