"""TOML configuration of the TRS daemon, and the TRS key file.

Strict like ``cyphonic.config``: a missing required key, a value of the wrong type or an
unknown key raises ``ConfigError`` naming the file and the key.  Example (every key is
optional except ``nms`` and ``key_file``; ``public`` is required when ``listen`` has a
wildcard address)::

    [trs]
    listen = ["0.0.0.0:4503", "[::]:4503"]     # one UDP socket each (IPv4 and IPv6)
    public = ["203.0.113.10:4503", "[2001:db8::10]:4503"]   # what nodes are told to use
    nms = ["203.0.113.1:4502"]                  # hellos go there; control only from there
    key_file = "/etc/cyphonic/trs.key"          # shared with NMS
    trs_id = 1                                  # default: derived from the public endpoints
    idle_timeout = 120                          # seconds without binds or data
    max_sessions = 10000
    status_socket = "/run/cyphonic/trs.sock"
    log_level = "info"

The key file holds the 32-byte TRS key as 64 hexadecimal digits (surrounding whitespace and
a final newline are ignored), e.g. made with ``openssl rand -hex 32 > trs.key``; NMS reads
the same file.  It should be readable by the daemon only (mode 0600).
"""

from __future__ import annotations

import hashlib
import logging
import stat
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path

from cyphonic.config import TRS_PORT, _Doc, _endpoints, _log_level
from cyphonic.errors import ConfigError
from cyphonic.trs.core import DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_SESSIONS
from cyphonic.wire.signaling import Endpoint, format_endpoint

log = logging.getLogger(__name__)

KEY_LEN = 32


@dataclass(frozen=True)
class TrsConfig:
    path: Path
    listen: list[Endpoint]
    public: list[Endpoint]
    nms: list[Endpoint]
    key_file: Path
    trs_id: int
    idle_timeout: float
    max_sessions: int
    status_socket: Path
    log_level: str = "info"


def derive_trs_id(public: list[Endpoint]) -> int:
    """A stable id from the public endpoints: first 31 bits of their SHA-256, never 0."""
    text = ",".join(sorted(format_endpoint(ep) for ep in public))
    digest = hashlib.sha256(b"cyphonic trs id " + text.encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF or 1


def load_trs_config(path: Path) -> TrsConfig:
    doc = _Doc(path)
    t = doc.table("trs")
    listen = t.conv("listen", list, _endpoints, [f"0.0.0.0:{TRS_PORT}", f"[::]:{TRS_PORT}"])
    if not listen:
        raise ConfigError(f"{t.where('listen')}: at least one address")
    wildcard = any(ip_address(host).is_unspecified for host, _ in listen)
    public: list[Endpoint] | None = t.conv("public", list, _endpoints, None)
    if public is None:
        if wildcard:
            raise ConfigError(
                f"{t.where('public')}: required when listen uses wildcard addresses "
                "(the endpoints nodes are told to use)"
            )
        public = list(listen)
    if not public:
        raise ConfigError(f"{t.where('public')}: at least one endpoint")
    for host, _ in public:
        if ip_address(host).is_unspecified:
            raise ConfigError(f"{t.where('public')}: {host} is not an address nodes can reach")
    nms = t.conv("nms", list, _endpoints)
    if not nms:
        raise ConfigError(f"{t.where('nms')}: at least one NMS endpoint")
    trs_id = t.get("trs_id", int, None)
    if trs_id is None:
        trs_id = derive_trs_id(public)
    elif not 0 < trs_id <= 0xFFFFFFFF:
        raise ConfigError(f"{t.where('trs_id')}: must be between 1 and 4294967295")
    cfg = TrsConfig(
        path=path,
        listen=listen,
        public=public,
        nms=nms,
        key_file=Path(t.get("key_file", str)),
        trs_id=trs_id,
        idle_timeout=t.positive("idle_timeout", float, DEFAULT_IDLE_TIMEOUT),
        max_sessions=t.positive("max_sessions", int, DEFAULT_MAX_SESSIONS),
        status_socket=Path(t.get("status_socket", str, "/run/cyphonic/trs.sock")),
        log_level=t.conv("log_level", str, _log_level, "info"),
    )
    doc.finish()
    return cfg


def load_trs_key(path: Path) -> bytes:
    """Read the 32-byte TRS key (64 hex digits); ``ConfigError`` naming the file otherwise."""
    try:
        text = path.read_text(encoding="ascii")
        mode = path.stat().st_mode
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: TRS key file not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the TRS key file: {exc}") from exc
    try:
        key = bytes.fromhex(text.strip())
    except ValueError as exc:
        raise ConfigError(f"{path}: TRS key must be {2 * KEY_LEN} hexadecimal digits") from exc
    if len(key) != KEY_LEN:
        raise ConfigError(f"{path}: TRS key must be {2 * KEY_LEN} hexadecimal digits")
    if mode & stat.S_IROTH:
        log.warning("%s: the TRS key file is readable by everyone (chmod 600 it)", path)
    return key
