"""Per-peer state of a node: identity, path, keys and counters (plain data)."""

from __future__ import annotations

import asyncio
import ipaddress
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from cyphonic.dataplane.session import Initiator, Keypair
from cyphonic.wire.signaling import Endpoint, Path, Reason, Role, format_endpoint

MAX_QUEUED = 32


@dataclass
class Peer:
    fqdn: str
    vip4: str
    vip6: str
    static_pub: bytes  # the peer's X25519 key, taken from its verified certificate
    session_id: bytes
    psk: bytes  # the Tunnel Key from NMS
    role: Role
    path: Path
    reason: Reason
    endpoints: tuple[Endpoint, ...]
    endpoint: Endpoint | None = None
    current: Keypair | None = None
    previous: Keypair | None = None
    next: Keypair | None = None  # responder side, until the initiator's first data confirms it
    initiator: Initiator | None = None
    handshake_started: float = 0.0
    handshake_sent: float = 0.0  # perf_counter of the latest Tunnel Request (for the figure)
    handshake_attempt: int = 0
    last_init_timestamp: bytes | None = None
    last_handshake: float | None = None  # wall clock, for status
    handshakes: int = 0
    # TRS relay (RELAYED path, or the fallback of a PUNCHED one)
    relay_endpoint: Endpoint | None = None
    relay_key: bytes | None = None
    relay_side: int = 0
    relay_session: bytes = b""
    relayed: bool = False  # sending through the TRS now
    relay_bound: bool = False
    last_bind_ack: float = 0.0
    relay_ts: int = 0  # last RELAY_BIND timestamp (ms), strictly increasing
    next_bind_at: float = 0.0
    bind_attempt: int = 0
    next_probe_at: float = 0.0
    relayed_since: float | None = None  # monotonic, when the relay took over
    fallback_ms: float | None = None  # handshake start -> relay took over
    optimised_ms: float | None = None  # relay took over -> direct path found
    prev_session: bytes | None = None
    last_tx: float = 0.0  # monotonic; any datagram, keepalives included
    last_rx_data: float = 0.0  # monotonic; last non-empty packet received
    unanswered_since: float = 0.0  # first data packet sent since we last heard from the peer
    rx_bytes: int = 0
    tx_bytes: int = 0
    rx_packets: int = 0
    tx_packets: int = 0
    route_selection_ms: float | None = None
    tunnel_establishment_ms: float | None = None
    queue: deque[bytes] = field(default_factory=lambda: deque(maxlen=MAX_QUEUED))
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def vip4_packed(self) -> bytes:
        return ipaddress.IPv4Address(self.vip4).packed

    @property
    def vip6_packed(self) -> bytes:
        return ipaddress.IPv6Address(self.vip6).packed

    def keypairs(self) -> list[Keypair]:
        return [kp for kp in (self.current, self.next, self.previous) if kp is not None]

    def status(self) -> dict[str, Any]:
        return {
            "fqdn": self.fqdn,
            "vip4": self.vip4,
            "vip6": self.vip6,
            "path": self.path.name.lower(),
            "reason": self.reason.name.lower(),
            "role": self.role.name.lower(),
            "endpoint": (
                format_endpoint(self.relay_endpoint)
                if self.relayed and self.relay_endpoint
                else format_endpoint(self.endpoint)
                if self.endpoint
                else None
            ),
            "relay": format_endpoint(self.relay_endpoint) if self.relay_endpoint else None,
            "relay_bound": self.relay_bound,
            "fallback_ms": self.fallback_ms,
            "optimised_ms": self.optimised_ms,
            "established": self.current is not None,
            "rx_bytes": self.rx_bytes,
            "tx_bytes": self.tx_bytes,
            "rx_packets": self.rx_packets,
            "tx_packets": self.tx_packets,
            "last_handshake": self.last_handshake,
            "handshakes": self.handshakes,
            "route_selection_ms": self.route_selection_ms,
            "tunnel_establishment_ms": self.tunnel_establishment_ms,
        }
