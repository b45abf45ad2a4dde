"""NMS side of the TRS control channel: which relays exist, and Relay Requests (pure).

TRS instances announce themselves with TRS_HELLO every 5 s on NMS's UDP socket; a datagram
whose first byte is 8 (TRS_CONTROL) goes to :meth:`TrsRegistry.handle`, one whose first byte
is 1 (SIGNALING) to the NMS core.  A TRS silent for ``forget_after`` (15 s) is forgotten.

Route selection asks :meth:`TrsRegistry.pick` for the least loaded TRS, then
:meth:`request_relay` sends the RELAY_REQUEST, retransmitted by :meth:`tick` after 0.25, 0.5,
1 and 2 s (then every 2 s) until the RELAY_RESPONSE arrives or ``request_timeout`` passes;
either way exactly one :class:`RelayResult` per request comes out of ``handle``/``tick``.
Duplicate responses (to retransmissions) are ignored.

All TRSs share one 32-byte TRS key; each control channel uses a key derived from it and the
TRS's ``trs_id`` (``trs.core.control_key``).
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass
from ipaddress import ip_address
from typing import Any, Final

from cyphonic.errors import CryptoError, DecodeError, ReplayError
from cyphonic.trs.core import ControlChannel, Outgoing
from cyphonic.wire import relay
from cyphonic.wire.signaling import Direction, Endpoint, format_endpoint

log = logging.getLogger(__name__)

RETRANSMIT: Final = (0.25, 0.5, 1.0, 2.0)
FORGET_AFTER: Final = 15.0
REQUEST_TIMEOUT: Final = 5.0
MAX_TRS: Final = 1024


@dataclass
class TrsInstance:
    """One TRS as NMS last heard of it."""

    trs_id: int
    control: Endpoint  # where its hellos come from: where requests go
    endpoints: tuple[Endpoint, ...]  # where nodes reach it
    active_sessions: int
    capacity: int
    last_seen: float

    @property
    def load(self) -> float:
        return self.active_sessions / self.capacity if self.capacity else float("inf")

    def families(self) -> set[int]:
        return {ip_address(host).version for host, _ in self.endpoints}

    def endpoint_for(self, family: int) -> Endpoint | None:
        """The endpoint a node of this address family uses (4 or 6), if any."""
        for ep in self.endpoints:
            if ip_address(ep[0]).version == family:
                return ep
        return None


@dataclass(frozen=True)
class RelayResult:
    """The outcome of one Relay Request."""

    session_id: bytes
    trs_id: int
    ok: bool
    endpoints: tuple[Endpoint, ...] = ()
    error: str = ""  # "refused" or "timeout" when not ok


@dataclass
class _Pending:
    trs_id: int
    control: Endpoint
    txid: int
    plain: relay.RelayRequest
    started: float
    next_at: float
    attempt: int = 0


class TrsRegistry:
    def __init__(
        self,
        key: bytes,
        *,
        forget_after: float = FORGET_AFTER,
        request_timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        if len(key) != relay.KEY_LEN:
            raise CryptoError("TRS key must be 32 bytes")
        self._key = key
        self.forget_after = forget_after
        self.request_timeout = request_timeout
        self.instances: dict[int, TrsInstance] = {}
        self.channels: dict[int, ControlChannel] = {}
        self.pending: dict[bytes, _Pending] = {}
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "received",
                "malformed",
                "auth_failed",
                "replayed",
                "hellos",
                "requests",
                "relayed_ok",
                "refused",
                "timeouts",
                "duplicates",
            ),
            0,
        )
        self._txid = 0

    # -- choosing a relay -------------------------------------------------------------

    def alive(self, now: float) -> list[TrsInstance]:
        return [t for t in self.instances.values() if now - t.last_seen < self.forget_after]

    def pick(self, now: float, families: Collection[int] = ()) -> TrsInstance | None:
        """The least loaded live TRS with room (and endpoints in every one of ``families``).

        Load is active sessions / capacity; ties go to the lowest ``trs_id``.
        """
        fams = set(families)
        candidates = [
            t for t in self.alive(now) if t.active_sessions < t.capacity and fams <= t.families()
        ]
        if not candidates:
            return None
        return min(candidates, key=lambda t: (t.load, t.trs_id))

    # -- requests ---------------------------------------------------------------------

    def request_relay(
        self, trs: TrsInstance, session_id: bytes, relay_key: bytes, lifetime: int, now: float
    ) -> list[Outgoing]:
        """Ask ``trs`` to open ``session_id``; the answer comes out of ``handle``/``tick``.

        Asking again for a session already pending sends nothing new.
        """
        if session_id in self.pending:
            return []
        req = relay.RelayRequest(
            self._next_txid(), session_id=session_id, relay_key=relay_key, lifetime=lifetime
        )
        p = _Pending(trs.trs_id, trs.control, req.txid, req, now, now)
        self.pending[session_id] = p
        self.counters["requests"] += 1
        trs.active_sessions += 1  # until its next hello: spread a burst of requests
        return self._send(p, now)

    def _send(self, p: _Pending, now: float) -> list[Outgoing]:
        p.next_at = now + RETRANSMIT[min(p.attempt, len(RETRANSMIT) - 1)]
        p.attempt += 1
        ch = self._channel(p.trs_id)
        return [Outgoing(ch.seal(p.plain, now), p.control)]

    # -- entry points -----------------------------------------------------------------

    def handle(
        self, data: bytes, src: Endpoint, now: float
    ) -> tuple[list[Outgoing], list[RelayResult]]:
        self.counters["received"] += 1
        try:
            header = relay.ControlHeader.parse(data)
        except DecodeError:
            self.counters["malformed"] += 1
            return [], []
        if header.direction is not Direction.TO_NMS:
            self.counters["malformed"] += 1
            return [], []
        known = self.channels.get(header.key_id)
        ch = known or ControlChannel(header.key_id, self._key, Direction.TO_NODE)
        try:
            msg = ch.open(data, header)
        except ReplayError:
            self.counters["replayed"] += 1
            return [], []
        except CryptoError:
            self.counters["auth_failed"] += 1
            return [], []
        except DecodeError:
            self.counters["malformed"] += 1
            return [], []
        if known is None:
            self._add_channel(header.key_id, ch)
        if isinstance(msg, relay.TrsHello):
            return self._hello(ch, header.key_id, msg, src, now), []
        if isinstance(msg, relay.RelayResponse):
            return [], self._response(header.key_id, msg)
        self.counters["malformed"] += 1
        return [], []

    def tick(self, now: float) -> tuple[list[Outgoing], list[RelayResult]]:
        out: list[Outgoing] = []
        results: list[RelayResult] = []
        for sid, p in list(self.pending.items()):
            if now - p.started >= self.request_timeout:
                del self.pending[sid]
                self.counters["timeouts"] += 1
                log.warning("TRS %d did not answer relay request %s", p.trs_id, sid.hex())
                results.append(RelayResult(sid, p.trs_id, False, error="timeout"))
            elif now >= p.next_at:
                out += self._send(p, now)
        self._forget(now)
        return out, results

    def status(self, now: float) -> dict[str, Any]:
        return {
            "instances": [
                {
                    "trs_id": t.trs_id,
                    "control": format_endpoint(t.control),
                    "endpoints": [format_endpoint(ep) for ep in t.endpoints],
                    "active_sessions": t.active_sessions,
                    "capacity": t.capacity,
                    "last_seen_age": round(now - t.last_seen, 1),
                }
                for t in sorted(self.instances.values(), key=lambda t: t.trs_id)
            ],
            "pending_requests": len(self.pending),
            "counters": dict(self.counters),
        }

    # -- messages ---------------------------------------------------------------------

    def _hello(
        self, ch: ControlChannel, key_id: int, msg: relay.TrsHello, src: Endpoint, now: float
    ) -> list[Outgoing]:
        if msg.trs_id != key_id:
            self.counters["malformed"] += 1
            return []
        self.counters["hellos"] += 1
        old = self.instances.get(key_id)
        if old is None or old.control != src or old.endpoints != msg.endpoints:
            log.info(
                "TRS %d at %s: relays at %s (%d/%d sessions)",
                key_id,
                format_endpoint(src),
                ", ".join(format_endpoint(ep) for ep in msg.endpoints) or "-",
                msg.active_sessions,
                msg.capacity,
            )
        self.instances[key_id] = TrsInstance(
            key_id, src, tuple(msg.endpoints), msg.active_sessions, msg.capacity, now
        )
        return [Outgoing(ch.seal(relay.TrsHelloAck(msg.txid), now), src)]

    def _response(self, key_id: int, msg: relay.RelayResponse) -> list[RelayResult]:
        p = self.pending.get(msg.session_id)
        if p is None or p.trs_id != key_id or p.txid != msg.txid:
            self.counters["duplicates"] += 1  # an answer to a retransmission, or stray
            return []
        del self.pending[msg.session_id]
        if not msg.ok:
            self.counters["refused"] += 1
            log.warning("TRS %d refused relay session %s", key_id, msg.session_id.hex())
            return [RelayResult(msg.session_id, key_id, False, error="refused")]
        self.counters["relayed_ok"] += 1
        return [RelayResult(msg.session_id, key_id, True, tuple(msg.endpoints))]

    # -- helpers ----------------------------------------------------------------------

    def _channel(self, trs_id: int) -> ControlChannel:
        ch = self.channels.get(trs_id)
        if ch is None:
            ch = ControlChannel(trs_id, self._key, Direction.TO_NODE)
            self._add_channel(trs_id, ch)
        return ch

    def _add_channel(self, trs_id: int, ch: ControlChannel) -> None:
        """Channels (and their replay windows) outlive a forgotten TRS, so an old hello
        replayed later is still refused; only channels of absent TRSs make room."""
        if len(self.channels) >= MAX_TRS:
            busy = set(self.instances) | {p.trs_id for p in self.pending.values()}
            for old in [k for k in self.channels if k not in busy]:
                del self.channels[old]
        self.channels[trs_id] = ch

    def _forget(self, now: float) -> None:
        for trs_id, t in list(self.instances.items()):
            if now - t.last_seen >= self.forget_after:
                del self.instances[trs_id]
                log.info("TRS %d silent for %.0f s: forgotten", trs_id, now - t.last_seen)

    def _next_txid(self) -> int:
        self._txid = (self._txid + 1) & 0xFFFFFFFF
        return self._txid
