"""TRS protocol core: relayed sessions and control with NMS (no sockets, no clocks).

Driven like the NMS core: ``handle(datagram, src, now)`` and ``tick(now)`` return the
datagrams to send; ``trs/server.py`` only moves bytes.  The TRS relays tunnels between
NAPT-NAPT and IPv4-IPv6 peers (DESIGN.md §1, §2.3) without being able to read them:

1. NMS sends a RELAY_REQUEST (session id, relay key, lifetime) over the control channel; the
   TRS opens the session and answers RELAY_RESPONSE with its public endpoints.
2. Each node sends RELAY_BIND (MAC'd with the relay key) from its tunnel socket; the TRS
   learns that side's NAT-mapped endpoint from the datagram's source and answers
   RELAY_BIND_ACK.  Binds repeat every 15 s, which also holds the node's NAT binding, and a
   node that moved simply binds again from its new address.
3. RELAY_DATA from one side's bound endpoint goes unchanged to the other side's endpoint,
   whatever the address families.  The payload is the nodes' Noise handshake or Data packet;
   the TRS never parses, logs or keeps it, and holds no key that could decrypt it.

Sessions end after ``idle_timeout`` without binds or data, or at the absolute expiry NMS set.
A restarted TRS knows no session: data is dropped (``unknown_session``) until NMS asks again.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cyphonic.crypto.channel import SignalingChannel
from cyphonic.errors import CryptoError, DecodeError, ReplayError
from cyphonic.wire import relay
from cyphonic.wire import signaling as sig
from cyphonic.wire.signaling import Direction, Endpoint, format_endpoint

log = logging.getLogger(__name__)

HELLO_INTERVAL: Final = 5.0
DEFAULT_IDLE_TIMEOUT: Final = 120.0
DEFAULT_MAX_SESSIONS: Final = 10000
DEBUG_LOG_INTERVAL: Final = 10.0  # per source, for dropped datagrams
_DEBUG_SOURCES: Final = 1024

_SIGNALING_PREFIX: Final = bytes([sig.SIGNALING_TYPE])
_CONTROL_PREFIX: Final = bytes([relay.TRS_CONTROL])


def control_key(trs_key: bytes, trs_id: int) -> bytes:
    """The AEAD base key of one TRS's control channel.

    ``HKDF-SHA256(trs_key, salt="", info="cyphonic trs v1 control" || trs_id u32)``: every
    TRS sharing the cluster's TRS key gets its own key (counters of two TRSs never share
    an AES-GCM key), and the key is never the one a signaling channel uses.
    """
    info = b"cyphonic trs v1 control" + struct.pack("!I", trs_id)
    return HKDF(hashes.SHA256(), 32, salt=None, info=info).derive(trs_key)


class ControlChannel:
    """The AEAD envelope of NMS <-> TRS control, for one ``trs_id``.

    It is :class:`SignalingChannel` (HKDF directional keys, AES-256-GCM, counter nonce,
    replay window) under :func:`control_key`, with the first byte 8 (TRS_CONTROL) on the
    wire instead of 1, so that NMS can tell control from signaling on one socket.  The
    associated data is the header as the signaling channel sees it (first byte 1); a
    datagram whose first byte is not 8 never reaches :meth:`open`.

    The TRS is the channel's "node" side (``local=TO_NMS``), NMS the "NMS" side.  The send
    counter never falls below the wall clock in microseconds, so a restarted sender
    continues above every counter it used before, as NMS does for signaling.
    """

    def __init__(self, trs_id: int, trs_key: bytes, local: Direction) -> None:
        self.trs_id = trs_id
        self.channel = SignalingChannel(trs_id, control_key(trs_key, trs_id), local, 0)

    def seal(self, msg: relay.ControlMessage, now: float) -> bytes:
        ch = self.channel
        ch.send_counter = max(ch.send_counter, int(now * 1e6))
        return _CONTROL_PREFIX + ch.seal(msg.pack())[1:]

    def open(self, datagram: bytes, header: relay.ControlHeader) -> relay.ControlMessage:
        """Authenticate, decrypt and decode; CryptoError, ReplayError or DecodeError."""
        sh = sig.Header(header.direction, header.key_id, header.counter)
        return relay.parse_control(self.channel.open(_SIGNALING_PREFIX + datagram[1:], sh))


@dataclass(frozen=True)
class Outgoing:
    data: bytes
    addr: Endpoint


@dataclass
class _Session:
    session_id: bytes
    relay_key: bytes
    lifetime: int
    expires_at: float  # absolute, from NMS's lifetime
    last_active: float
    created: float
    endpoints: list[Endpoint | None] = field(default_factory=lambda: [None, None])
    last_bind: list[int] = field(default_factory=lambda: [-1, -1])  # timestamp_ms per side
    packets: int = 0
    bytes: int = 0

    def __repr__(self) -> str:  # never print the key
        return f"_Session({self.session_id.hex()}, endpoints={self.endpoints})"


COUNTERS: Final = (
    "relayed_packets",
    "relayed_bytes",
    "unknown_session",
    "wrong_source",
    "no_peer",  # data from a bound side while the other side has not bound yet
    "bad_mac",
    "replayed_bind",
    "binds",
    "malformed",
    "sessions",  # open now
    "sessions_created",
    "sessions_refused",
    "expired",
    "control_received",
    "control_rejected",  # from a source that is not a configured NMS
    "control_auth_failed",
    "control_replayed",
)


class RelayCore:
    """One TRS: ``trs_id``, the cluster's 32-byte TRS ``key``, the endpoints nodes use.

    ``nms`` lists the NMS control endpoints: hellos go there, and control datagrams are
    accepted from there only (each with its own replay window, so several NMS instances
    can share the TRS).
    """

    def __init__(
        self,
        trs_id: int,
        key: bytes,
        public_endpoints: Sequence[Endpoint],
        *,
        nms: Sequence[Endpoint] = (),
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        hello_interval: float = HELLO_INTERVAL,
    ) -> None:
        if len(key) != relay.KEY_LEN:
            raise CryptoError("TRS key must be 32 bytes")
        if not 0 < trs_id <= 0xFFFFFFFF:
            raise ValueError("trs_id must be a positive u32")
        self.trs_id = trs_id
        self.public_endpoints = tuple(public_endpoints)
        self.nms = tuple(nms)
        self.idle_timeout = idle_timeout
        self.max_sessions = max_sessions
        self.hello_interval = hello_interval
        self._key = key
        self._tx = ControlChannel(trs_id, key, Direction.TO_NMS)
        self._rx: dict[Endpoint, ControlChannel] = {}
        self.sessions: dict[bytes, _Session] = {}
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.nms_last_ack: dict[Endpoint, float] = {}
        self._next_hello = 0.0
        self._txid = 0
        self._debug_seen: dict[Endpoint, float] = {}

    # -- entry points -----------------------------------------------------------------

    def handle(self, data: bytes, src: Endpoint, now: float) -> list[Outgoing]:
        if not data:
            return self._drop("malformed", src, now)
        ptype = data[0]
        if ptype == relay.RELAY_DATA:
            return self._data(data, src, now)
        if ptype == relay.RELAY_BIND:
            return self._bind(data, src, now)
        if ptype == relay.TRS_CONTROL:
            return self._control(data, src, now)
        return self._drop("malformed", src, now)

    def tick(self, now: float) -> list[Outgoing]:
        for sid, s in list(self.sessions.items()):
            if self._expired(s, now):
                self._expire(sid, s)
        if now < self._next_hello:
            return []
        self._next_hello = now + self.hello_interval
        hello = relay.TrsHello(
            self._next_txid(),
            trs_id=self.trs_id,
            endpoints=self.public_endpoints,
            active_sessions=len(self.sessions),
            capacity=self.max_sessions,
        )
        return [Outgoing(self._tx.seal(hello, now), addr) for addr in self.nms]

    def status(self, now: float) -> dict[str, Any]:
        """What ``cyphonic status`` shows: no keys, no payload."""
        return {
            "trs_id": self.trs_id,
            "public": [format_endpoint(ep) for ep in self.public_endpoints],
            "capacity": self.max_sessions,
            "nms": [
                {
                    "endpoint": format_endpoint(ep),
                    "last_ack_age": (
                        round(now - self.nms_last_ack[ep], 1) if ep in self.nms_last_ack else None
                    ),
                }
                for ep in self.nms
            ],
            "counters": dict(self.counters),
            "sessions": [
                {
                    "session_id": s.session_id.hex(),
                    "mn": _fmt(s.endpoints[relay.Side.MN]),
                    "cn": _fmt(s.endpoints[relay.Side.CN]),
                    "packets": s.packets,
                    "bytes": s.bytes,
                    "idle": round(now - s.last_active, 1),
                    "expires_in": round(s.expires_at - now, 1),
                }
                for s in self.sessions.values()
            ],
        }

    # -- data plane -------------------------------------------------------------------

    def _data(self, data: bytes, src: Endpoint, now: float) -> list[Outgoing]:
        try:
            sid = relay.data_session_id(data)
        except DecodeError:
            return self._drop("malformed", src, now)
        s = self.sessions.get(sid)
        if s is None:
            return self._drop("unknown_session", src, now)
        if self._expired(s, now):
            self._expire(sid, s)
            return self._drop("unknown_session", src, now)
        mn, cn = s.endpoints
        if src == mn:
            dst = cn
        elif src == cn:
            dst = mn
        else:
            return self._drop("wrong_source", src, now)
        if dst is None:
            return self._drop("no_peer", src, now)
        s.last_active = now
        s.packets += 1
        s.bytes += len(data)
        c = self.counters
        c["relayed_packets"] += 1
        c["relayed_bytes"] += len(data)
        return [Outgoing(data, dst)]

    def _bind(self, data: bytes, src: Endpoint, now: float) -> list[Outgoing]:
        try:
            bind = relay.RelayBind.parse(data)
        except DecodeError:
            return self._drop("malformed", src, now)
        s = self.sessions.get(bind.session_id)
        if s is not None and self._expired(s, now):
            self._expire(bind.session_id, s)
            s = None
        if s is None:
            return self._drop("unknown_session", src, now)
        if not bind.verify(s.relay_key):
            return self._drop("bad_mac", src, now)
        side = bind.side
        if bind.timestamp_ms <= s.last_bind[side]:
            return self._drop("replayed_bind", src, now)
        if s.endpoints[1 - side] == src:
            return self._drop("wrong_source", src, now)  # both sides at one endpoint: a loop
        s.last_bind[side] = bind.timestamp_ms
        s.last_active = now
        self.counters["binds"] += 1
        if s.endpoints[side] != src:
            log.info(
                "relay session %s: %s bound at %s%s",
                s.session_id.hex(),
                side.name,
                format_endpoint(src),
                "" if s.endpoints[side] is None else f" (was {_fmt(s.endpoints[side])})",
            )
            s.endpoints[side] = src
        return [Outgoing(relay.RelayBindAck.answer(s.relay_key, bind).pack(), src)]

    def _expired(self, s: _Session, now: float) -> bool:
        return now >= s.expires_at or now - s.last_active >= self.idle_timeout

    def _expire(self, sid: bytes, s: _Session) -> None:
        del self.sessions[sid]
        self.counters["expired"] += 1
        self.counters["sessions"] = len(self.sessions)
        log.info(
            "relay session %s closed after %d packets, %d bytes", sid.hex(), s.packets, s.bytes
        )

    # -- control ----------------------------------------------------------------------

    def _control(self, data: bytes, src: Endpoint, now: float) -> list[Outgoing]:
        self.counters["control_received"] += 1
        try:
            header = relay.ControlHeader.parse(data)
        except DecodeError:
            return self._drop("malformed", src, now)
        if src not in self.nms:
            return self._drop("control_rejected", src, now)
        if header.key_id != self.trs_id or header.direction is not Direction.TO_NODE:
            return self._drop("control_auth_failed", src, now)
        rx = self._rx.get(src)
        if rx is None:
            rx = self._rx[src] = ControlChannel(self.trs_id, self._key, Direction.TO_NMS)
        try:
            msg = rx.open(data, header)
        except ReplayError:
            return self._drop("control_replayed", src, now)
        except CryptoError:
            return self._drop("control_auth_failed", src, now)
        except DecodeError:
            return self._drop("malformed", src, now)
        if isinstance(msg, relay.TrsHelloAck):
            self.nms_last_ack[src] = now
            return []
        if isinstance(msg, relay.RelayRequest):
            return [Outgoing(self._tx.seal(self._relay_request(msg, now), now), src)]
        return self._drop("malformed", src, now)

    def _relay_request(self, req: relay.RelayRequest, now: float) -> relay.RelayResponse:
        """Open (or renew) a session; the same request always gets the same answer."""
        sid = req.session_id
        s = self.sessions.get(sid)
        if s is not None and self._expired(s, now):
            self._expire(sid, s)
            s = None
        refused = relay.RelayResponse(req.txid, session_id=sid, ok=0)
        if s is not None:
            if s.relay_key != req.relay_key:
                log.warning("relay request %s: session exists with another key", sid.hex())
                return refused
            if req.lifetime > 0:
                s.expires_at = max(s.expires_at, now + req.lifetime)  # renewal
        elif req.lifetime == 0 or len(self.sessions) >= self.max_sessions:
            self.counters["sessions_refused"] += 1
            log.warning(
                "relay request %s refused (%s)",
                sid.hex(),
                "zero lifetime" if req.lifetime == 0 else "at capacity",
            )
            return refused
        else:
            self.sessions[sid] = _Session(
                sid, req.relay_key, req.lifetime, now + req.lifetime, now, now
            )
            self.counters["sessions_created"] += 1
            self.counters["sessions"] = len(self.sessions)
            log.info("relay session %s opened for %d s", sid.hex(), req.lifetime)
        return relay.RelayResponse(req.txid, session_id=sid, ok=1, endpoints=self.public_endpoints)

    # -- helpers ----------------------------------------------------------------------

    def _next_txid(self) -> int:
        self._txid = (self._txid + 1) & 0xFFFFFFFF
        return self._txid

    def _drop(self, reason: str, src: Endpoint, now: float) -> list[Outgoing]:
        """Count a dropped datagram; log it at debug at most every 10 s per source."""
        self.counters[reason] += 1
        if log.isEnabledFor(logging.DEBUG):
            last = self._debug_seen.get(src)
            if last is None or now - last >= DEBUG_LOG_INTERVAL:
                if len(self._debug_seen) >= _DEBUG_SOURCES:
                    self._debug_seen.clear()
                self._debug_seen[src] = now
                log.debug("dropped a datagram from %s: %s", format_endpoint(src), reason)
        return []


def _fmt(ep: Endpoint | None) -> str | None:
    return None if ep is None else format_endpoint(ep)
