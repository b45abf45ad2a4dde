"""TOML configuration of the cloud and the node daemons.

Every key is documented in ``docs/configuration.md``.  Loading is strict: a
missing required key, a value of the wrong type or an unknown key (a typo) makes
``load_*`` raise ``ConfigError`` naming the file and the key, so a daemon never
starts on a configuration it misread.
"""

from __future__ import annotations

import ipaddress
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import Any, TypeVar

from cyphonic.errors import ConfigError, DecodeError
from cyphonic.wire.signaling import Endpoint, format_endpoint, parse_endpoint

T = TypeVar("T")
_REQUIRED: Any = object()

DEFAULT_DOMAIN = "cyphonic.test"
AS_PORT = 4501
NMS_PORT = 4502
TRS_PORT = 4503
NODE_PORT = 30000


class _Table:
    """A TOML table that remembers which keys were read, to report unknown ones."""

    def __init__(self, path: Path, name: str, data: Any) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: [{name}] must be a table")
        self.path, self.name, self.data = path, name, data
        self.seen: set[str] = set()

    def where(self, key: str) -> str:
        return f"{self.path}: [{self.name}] {key}"

    def get(self, key: str, typ: type[T], default: Any = _REQUIRED) -> T:
        self.seen.add(key)
        if key not in self.data:
            if default is _REQUIRED:
                raise ConfigError(f"{self.where(key)}: missing required key")
            return default  # type: ignore[no-any-return]
        value = self.data[key]
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise ConfigError(
                f"{self.where(key)}: expected {typ.__name__}, got {type(value).__name__}"
            )
        return value

    def conv(self, key: str, typ: type[Any], fn: Callable[[Any], T], default: Any = _REQUIRED) -> T:
        raw = self.get(key, typ, default)
        if raw is None:
            return None  # type: ignore[return-value]
        try:
            return fn(raw)
        except (ValueError, DecodeError, TypeError) as exc:
            raise ConfigError(f"{self.where(key)}: {exc}") from exc

    def positive(self, key: str, typ: type[T], default: Any = _REQUIRED) -> T:
        value = self.get(key, typ, default)
        if value <= 0:  # type: ignore[operator]
            raise ConfigError(f"{self.where(key)}: must be positive")
        return value

    def port(self, key: str, default: int) -> int:
        value = self.get(key, int, default)
        if not 0 < value < 65536:
            raise ConfigError(f"{self.where(key)}: port out of range")
        return value

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            raise ConfigError(f"{self.where(unknown[0])}: unknown key")


class _Doc:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with path.open("rb") as fh:
                self.data = tomllib.load(fh)
        except FileNotFoundError as exc:
            raise ConfigError(f"{path}: file not found") from exc
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
        self.tables: list[_Table] = []

    def table(self, name: str, required: bool = True) -> _Table:
        if name not in self.data and required:
            raise ConfigError(f"{self.path}: missing required table [{name}]")
        t = _Table(self.path, name, self.data.get(name, {}))
        self.tables.append(t)
        return t

    def finish(self) -> None:
        for t in self.tables:
            t.finish()
        unknown = sorted(set(self.data) - {t.name for t in self.tables})
        if unknown:
            raise ConfigError(f"{self.path}: unknown table [{unknown[0]}]")


def _endpoints(values: list[Any]) -> list[Endpoint]:
    out = []
    for v in values:
        if not isinstance(v, str):
            raise ValueError('expected a list of "ip:port" strings')
        out.append(parse_endpoint(v))
    return out


def _endpoint_strs(values: list[Any]) -> list[str]:
    return [format_endpoint(ep) for ep in _endpoints(values)]


@dataclass(frozen=True)
class CloudConfig:
    path: Path
    domain: str
    state_dir: Path
    as_enabled: bool
    as_listen: list[Endpoint]
    as_cert_lifetime_days: int
    common_key_lifetime: float
    token_ttl: float
    nms_enabled: bool
    nms_listen: list[Endpoint]
    nms_public: list[str]
    keepalive_interval: int
    direction_timeout: float
    pool4: ipaddress.IPv4Network
    pool6: ipaddress.IPv6Network
    status_socket: Path
    trs_key_file: Path | None = None
    relay_lifetime: int = 86400
    log_level: str = "info"

    @property
    def db_path(self) -> Path:
        return self.state_dir / "cyphonic.db"

    @property
    def ca_dir(self) -> Path:
        return self.state_dir / "ca"


def load_cloud_config(path: Path) -> CloudConfig:
    doc = _Doc(path)
    c = doc.table("cloud")
    a = doc.table("as", required=False)
    n = doc.table("nms", required=False)
    p = doc.table("pools")
    domain = c.conv("domain", str, _domain, DEFAULT_DOMAIN)
    nms_listen = n.conv("listen", list, _endpoints, [f"0.0.0.0:{NMS_PORT}"])
    cfg = CloudConfig(
        path=path,
        domain=domain,
        state_dir=Path(c.get("state_dir", str)),
        status_socket=Path(c.get("status_socket", str, "/run/cyphonic/cloud.sock")),
        log_level=c.conv("log_level", str, _log_level, "info"),
        as_enabled=a.get("enabled", bool, True),
        as_listen=a.conv("listen", list, _endpoints, [f"0.0.0.0:{AS_PORT}"]),
        as_cert_lifetime_days=a.positive("cert_lifetime_days", int, 365),
        common_key_lifetime=a.positive("common_key_lifetime", float, 86400.0),
        token_ttl=a.positive("token_ttl", float, 3600.0),
        nms_enabled=n.get("enabled", bool, True),
        nms_listen=nms_listen,
        nms_public=n.conv("public", list, _endpoint_strs, None)
        or [format_endpoint(ep) for ep in nms_listen if not ip_address(ep[0]).is_unspecified],
        keepalive_interval=n.conv("keepalive_interval", int, _keepalive, 20),
        direction_timeout=n.positive("direction_timeout", float, 5.0),
        trs_key_file=n.conv("trs_key_file", str, Path, None),
        relay_lifetime=n.conv("relay_lifetime", int, _relay_lifetime, 86400),
        pool4=p.conv("vip4", str, ipaddress.IPv4Network),
        pool6=p.conv("vip6", str, ipaddress.IPv6Network),
    )
    if cfg.nms_enabled and not cfg.nms_public:
        raise ConfigError(
            f"{n.where('public')}: required when [nms] listen uses wildcard addresses "
            "(the endpoints nodes are told to use)"
        )
    if cfg.pool4.num_addresses < 4:
        raise ConfigError(f"{p.where('vip4')}: pool too small")
    if cfg.pool6.num_addresses < 4:
        raise ConfigError(f"{p.where('vip6')}: pool too small")
    doc.finish()
    return cfg


@dataclass(frozen=True)
class NodeConfig:
    path: Path
    fqdn: str
    domain: str
    state_dir: Path
    port: int
    status_socket: Path
    as_host: str
    as_port: int
    ca_cert: Path
    tun_name: str
    mtu: int
    resolver_listen: list[Endpoint]
    resolver_upstream: list[Endpoint]
    resolver_ttl: int
    lookup_timeout: float
    handshake_timeout: float
    rekey_after: float
    log_level: str = "info"


def load_node_config(path: Path) -> NodeConfig:
    doc = _Doc(path)
    cfg = _node_config(doc, path)
    doc.finish()
    return cfg


@dataclass(frozen=True)
class AdapterConfig:
    """An adapter: a node config (its own identity, uplink, AS, tunnels) plus the downlink."""

    node: NodeConfig
    downlink: str
    gn_port_base: int
    lease_time: int
    refresh_interval: float
    ra_interval: float

    @property
    def path(self) -> Path:
        return self.node.path


def load_adapter_config(path: Path) -> AdapterConfig:
    doc = _Doc(path)
    node = _node_config(doc, path, status_default="/run/cyphonic/adapter.sock")
    ad = doc.table("adapter")
    cfg = AdapterConfig(
        node=node,
        downlink=ad.conv("downlink", str, _ifname),
        gn_port_base=ad.port("gn_port_base", NODE_PORT + 1),
        lease_time=ad.conv("lease_time", int, _lease_time, 3600),
        refresh_interval=ad.positive("refresh_interval", float, 60.0),
        ra_interval=ad.conv("ra_interval", float, _ra_interval, 200.0),
    )
    doc.finish()
    return cfg


def _relay_lifetime(value: int) -> int:
    if not 60 <= value <= 7 * 86400:
        raise ValueError("must be between 60 s and 7 days")
    return value


def load_identity_config(path: Path) -> NodeConfig:
    """The node part of a node or an adapter configuration (for enroll/status)."""
    doc = _Doc(path)
    if "adapter" in doc.data:
        return load_adapter_config(path).node
    return load_node_config(path)


def _ra_interval(value: float) -> float:
    if not 10.0 <= value <= 1800.0:
        raise ValueError("must be between 10 and 1800 s (RFC 4861 MaxRtrAdvInterval)")
    return value


def _lease_time(value: int) -> int:
    if not 60 <= value <= 7 * 86400:
        raise ValueError("must be between 60 s and 7 days")
    return value


def _node_config(
    doc: _Doc, path: Path, status_default: str = "/run/cyphonic/node.sock"
) -> NodeConfig:
    nd = doc.table("node")
    a = doc.table("as")
    t = doc.table("tun", required=False)
    r = doc.table("resolver", required=False)
    tn = doc.table("tunnel", required=False)
    domain = nd.conv("domain", str, _domain, DEFAULT_DOMAIN)
    fqdn = nd.get("fqdn", str).lower().rstrip(".")
    if not fqdn.endswith("." + domain):
        raise ConfigError(f"{nd.where('fqdn')}: {fqdn!r} is not under the domain {domain!r}")
    state_dir = Path(nd.get("state_dir", str))
    cfg = NodeConfig(
        path=path,
        fqdn=fqdn,
        domain=domain,
        state_dir=state_dir,
        port=nd.port("port", NODE_PORT),
        status_socket=Path(nd.get("status_socket", str, status_default)),
        log_level=nd.conv("log_level", str, _log_level, "info"),
        as_host=a.get("host", str),
        as_port=a.port("port", AS_PORT),
        ca_cert=Path(a.get("ca_cert", str, str(state_dir / "ca.crt"))),
        tun_name=t.conv("name", str, _ifname, "cyph0"),
        mtu=t.conv("mtu", int, _mtu, 1400),
        resolver_listen=r.conv("listen", list, _endpoints, ["127.0.0.1:53"]),
        resolver_upstream=r.conv("upstream", list, _endpoints, []),
        resolver_ttl=r.positive("ttl", int, 60),
        lookup_timeout=r.positive("lookup_timeout", float, 5.0),
        handshake_timeout=tn.positive("handshake_timeout", float, 5.0),
        rekey_after=tn.positive("rekey_after", float, 120.0),
    )
    return cfg


def _domain(value: str) -> str:
    d = value.lower().rstrip(".")
    labels = d.split(".")
    if len(labels) < 2 or not all(
        0 < len(lab) < 64 and lab.replace("-", "").isalnum() and lab.isascii() for lab in labels
    ):
        raise ValueError(f"{value!r} is not a valid domain name (e.g. cyphonic.example)")
    return d


def _keepalive(value: int) -> int:
    if not 1 <= value <= 300:
        raise ValueError("must be between 1 and 300 seconds (NAT bindings expire after ~30 s)")
    return value


def _ifname(value: str) -> str:
    if not 0 < len(value) < 16 or "/" in value or " " in value:
        raise ValueError(f"{value!r} is not a valid interface name (1-15 characters)")
    return value


def _mtu(value: int) -> int:
    if not 1280 <= value <= 65000:
        raise ValueError("mtu must be between 1280 and 65000 (IPv6 needs at least 1280)")
    return value


def _log_level(value: str) -> str:
    if value.lower() not in ("debug", "info", "warning", "error"):
        raise ValueError("log_level must be debug, info, warning or error")
    return value.lower()
