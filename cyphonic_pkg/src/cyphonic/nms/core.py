"""NMS protocol core: registration, keepalive and route direction (no sockets).

Driven like aioquic's connection: ``handle(datagram, src, now)`` and
``tick(now)`` return the datagrams to send; the asyncio glue in
``nms/server.py`` only moves bytes.  State that must survive a restart
(registrations, replay high-water marks) lives in the ``Store``.

Route direction (DESIGN.md §2.3)::

    MN --Direction Request--> NMS --Route Direction--> CN
    MN <--Route Direction---- NMS <--Confirmation----- CN

The Route Direction to the CN is retransmitted with backoff until the CN
confirms or ``direction_timeout`` passes (then the MN gets PEER_UNREACHABLE).
Requests are idempotent: a retransmitted Direction Request (same key and txid)
while the direction is pending is ignored, and once answered the cached answer
is sent again.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from cyphonic.crypto.channel import SignalingChannel
from cyphonic.errors import CryptoError, DecodeError
from cyphonic.nms.route_selection import NodeView, NoPath, RouteSelector
from cyphonic.nms.trs_registry import RelayResult, TrsInstance, TrsRegistry
from cyphonic.store.base import Registration, Store
from cyphonic.wire import signaling as sig
from cyphonic.wire.signaling import Endpoint, ErrorCode, format_endpoint

log = logging.getLogger(__name__)

RETRANSMIT = (0.25, 0.5, 1.0, 1.0, 2.0)
ANSWER_CACHE = 4096
MARK_FLUSH_INTERVAL = 10.0
RELAY_WAIT = 1.0  # how long a punched direction waits for its fallback relay session


@dataclass(frozen=True)
class Outgoing:
    data: bytes
    addr: Endpoint


@dataclass
class _Pending:
    session_id: bytes
    mn_key: int
    mn_txid: int
    mn_addr: Endpoint
    cn_key: int
    cn_addrs: tuple[Endpoint, ...]
    to_cn: sig.RouteDirection
    to_mn: sig.RouteDirection
    started: float
    attempt: int = 0
    next_at: float = 0.0
    awaiting_relay: bool = False  # waiting for the TRS to open the relay session
    relay_required: bool = False  # RELAYED (no fallback): no relay, no path
    mn_family: int = 4
    cn_family: int = 4
    relay_key: bytes = b""


@dataclass
class NmsCounters:
    received: int = 0
    malformed: int = 0
    unknown_key: int = 0
    auth_failed: int = 0
    replayed: int = 0
    registrations: int = 0
    keepalives: int = 0
    directions: int = 0
    direction_errors: int = 0


class NmsCore:
    def __init__(
        self,
        store: Store,
        domain: str,
        *,
        selector: RouteSelector | None = None,
        keepalive_interval: int = 20,
        direction_timeout: float = 5.0,
        random: Callable[[int], bytes] = os.urandom,
        registry: TrsRegistry | None = None,
        relay_lifetime: int = 86400,
    ) -> None:
        self.registry = registry
        self.relay_lifetime = relay_lifetime
        self.relay_trs: dict[bytes, TrsInstance] = {}
        self.store = store
        self.domain = domain
        self.selector = selector or RouteSelector()
        self.keepalive_interval = keepalive_interval
        self.direction_timeout = direction_timeout
        self.random = random
        self.channels: dict[int, SignalingChannel] = {}
        self.key_node: dict[int, int] = {}
        self.key_expiry: dict[int, float] = {}
        self.pending: dict[bytes, _Pending] = {}
        self.pending_by_request: dict[tuple[int, int], bytes] = {}
        self.answers: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self.counters = NmsCounters()
        self._txid = int.from_bytes(random(4), "big")
        self._dirty_marks: set[int] = set()
        self._last_flush = 0.0
        self.last_seen: dict[int, float] = {}
        self.started = time.time()

    # -- entry points -----------------------------------------------------------------

    def handle(self, data: bytes, src: Endpoint, now: float) -> list[Outgoing]:
        self.counters.received += 1
        try:
            header = sig.Header.parse(data)
        except DecodeError:
            self.counters.malformed += 1
            return []
        channel = self._channel(header.key_id, now)
        if channel is None:
            self.counters.unknown_key += 1
            return []
        try:
            plain = channel.open(data, header)
        except CryptoError as exc:
            if "replayed" in str(exc):
                self.counters.replayed += 1
            else:
                self.counters.auth_failed += 1
            return []
        self._dirty_marks.add(header.key_id)
        try:
            msg = sig.parse_message(plain)
        except DecodeError:
            self.counters.malformed += 1
            return []
        if self.key_expiry[header.key_id] < now:
            return self._reply(
                channel,
                src,
                sig.Error(
                    msg.txid, ErrorCode.UNKNOWN_KEY, "common key expired: log in to AS again"
                ),
            )
        node_id = self.key_node[header.key_id]
        self.last_seen[node_id] = now
        if isinstance(msg, sig.Registration):
            return self._registration(channel, node_id, msg, src, now)
        if isinstance(msg, sig.KeepAlive):
            return self._keepalive(channel, node_id, msg, src, now)
        if isinstance(msg, sig.DirectionRequest):
            return self._direction_request(channel, node_id, msg, src, now)
        if isinstance(msg, sig.Confirmation):
            return self._confirmation(node_id, msg, now)
        self.counters.malformed += 1
        return []

    def tick(self, now: float) -> list[Outgoing]:
        out: list[Outgoing] = []
        for sid, p in list(self.pending.items()):
            if now - p.started >= self.direction_timeout:
                self._drop_pending(sid)
                self.counters.direction_errors += 1
                err = sig.Error(
                    p.mn_txid,
                    ErrorCode.PEER_UNREACHABLE,
                    "peer did not confirm the route direction",
                ).pack()
                out += self._answer(p.mn_key, p.mn_txid, err, p.mn_addr)
            elif p.awaiting_relay:
                if not p.relay_required and now - p.started >= RELAY_WAIT:
                    # the relay is only the fallback of a punch: do not let a silent TRS
                    # cost the direction; punch without it
                    p.awaiting_relay = False
                    self.relay_trs.pop(sid, None)
                    out += self._send_to_cn(p, now)
            elif now >= p.next_at:
                out += self._send_to_cn(p, now)
        if self._dirty_marks and now - self._last_flush >= MARK_FLUSH_INTERVAL:
            self.flush_marks(now)
        return out

    def flush_marks(self, now: float) -> None:
        """Persist replay high-water marks so a restarted NMS refuses old datagrams."""
        marks = {k: self.channels[k].high_counter for k in self._dirty_marks if k in self.channels}
        if marks:
            self.store.update_key_counters(marks)
        self._dirty_marks.clear()
        self._last_flush = now

    # -- helpers ----------------------------------------------------------------------

    def _channel(self, key_id: int, now: float) -> SignalingChannel | None:
        ch = self.channels.get(key_id)
        if ch is not None:
            return ch
        ck = self.store.get_common_key(key_id)
        if ck is None:
            return None
        ch = SignalingChannel(key_id, ck.key, sig.Direction.TO_NODE, first_counter=0)
        # A restarted NMS continues above every counter it ever used or accepted.
        ch.set_floor(ck.high_counter)
        ch.send_counter = int(now * 1e6)  # wall clock (µs): above anything sent before a restart
        self.channels[key_id] = ch
        self.key_node[key_id] = ck.node_id
        self.key_expiry[key_id] = ck.expires_at
        return ch

    def _next_txid(self) -> int:
        self._txid = (self._txid + 1) & 0xFFFFFFFF
        return self._txid

    def _reply(self, channel: SignalingChannel, dst: Endpoint, msg: sig.Message) -> list[Outgoing]:
        return [Outgoing(channel.seal(msg.pack()), dst)]

    def _answer(self, key_id: int, txid: int, plain: bytes, dst: Endpoint) -> list[Outgoing]:
        """Send an answer and remember it, so a retransmitted request gets it again."""
        self.answers[(key_id, txid)] = plain
        while len(self.answers) > ANSWER_CACHE:
            self.answers.popitem(last=False)
        ch = self.channels.get(key_id)
        return [Outgoing(ch.seal(plain), dst)] if ch else []

    def _offline(self, reg: Registration, now: float) -> bool:
        """No keepalive for three intervals (a restarted NMS counts from its start)."""
        seen = self.last_seen.get(reg.node_id, max(reg.last_seen, self.started))
        return now - seen > 3 * self.keepalive_interval

    def _view(self, reg: Registration) -> NodeView:
        return NodeView.from_strings(reg.node_id, reg.addresses, reg.port, reg.observed)

    def _update_observed(
        self, reg: Registration, src: Endpoint, key_id: int, now: float, *, force: bool = False
    ) -> Registration:
        family = 6 if ":" in src[0] else 4
        view = self._view(reg)
        changed = view.observed.get(family) != src or reg.key_id != key_id
        observed = (
            *tuple(
                format_endpoint(ep) for fam, ep in sorted(view.observed.items()) if fam != family
            ),
            format_endpoint(src),
        )
        reg = Registration(
            node_id=reg.node_id,
            addresses=reg.addresses,
            port=reg.port,
            observed=observed,
            registered_at=reg.registered_at,
            last_seen=now,
            key_id=key_id,
        )
        if changed or force:
            self.store.save_registration(reg)
        return reg

    # -- messages ---------------------------------------------------------------------

    def _registration(
        self, ch: SignalingChannel, node_id: int, msg: sig.Registration, src: Endpoint, now: float
    ) -> list[Outgoing]:
        node = self.store.get_node(node_id)
        if node is None:
            return self._reply(
                ch, src, sig.Error(msg.txid, ErrorCode.NOT_AUTHORIZED, "node unknown")
            )
        old = self.store.get_registration(node_id)
        observed = old.observed if old and old.addresses == msg.addresses else ()
        reg = Registration(
            node_id=node_id,
            addresses=tuple(msg.addresses),
            port=msg.port,
            observed=observed,
            registered_at=now,
            last_seen=now,
            key_id=ch.key_id,
        )
        self._update_observed(reg, src, ch.key_id, now, force=True)
        self.counters.registrations += 1
        log.info("registered %s from %s", node.fqdn, format_endpoint(src))
        return self._reply(
            ch,
            src,
            sig.RegistrationAck(
                msg.txid, src, str(node.vip4), str(node.vip6), self.keepalive_interval
            ),
        )

    def _keepalive(
        self, ch: SignalingChannel, node_id: int, msg: sig.KeepAlive, src: Endpoint, now: float
    ) -> list[Outgoing]:
        reg = self.store.get_registration(node_id)
        if reg is None:
            return self._reply(
                ch, src, sig.Error(msg.txid, ErrorCode.NOT_REGISTERED, "register first")
            )
        self._update_observed(reg, src, ch.key_id, now)
        self.counters.keepalives += 1
        return self._reply(ch, src, sig.KeepAliveAck(msg.txid, src))

    def _error(
        self, ch: SignalingChannel, msg: sig.Message, src: Endpoint, code: ErrorCode, text: str
    ) -> list[Outgoing]:
        self.counters.direction_errors += 1
        return self._answer(ch.key_id, msg.txid, sig.Error(msg.txid, code, text).pack(), src)

    def _direction_request(
        self,
        ch: SignalingChannel,
        node_id: int,
        msg: sig.DirectionRequest,
        src: Endpoint,
        now: float,
    ) -> list[Outgoing]:
        request = (ch.key_id, msg.txid)
        if request in self.pending_by_request:
            return []  # in progress; the answer follows the CN's confirmation
        cached = self.answers.get(request)
        if cached is not None:
            return [Outgoing(ch.seal(cached), src)]
        if msg.vip is not None:
            fqdn = msg.vip
            cn_node = self.store.get_node_by_vip(msg.vip)
        else:
            fqdn = (msg.fqdn or "").lower().rstrip(".")
            if not fqdn.endswith("." + self.domain):
                return self._error(
                    ch, msg, src, ErrorCode.NOT_AUTHORIZED, f"{fqdn} is outside {self.domain}"
                )
            cn_node = self.store.get_node_by_fqdn(fqdn)
        mn_reg = self.store.get_registration(node_id)
        mn_node = self.store.get_node(node_id)
        if mn_reg is None or mn_node is None:
            return self._error(ch, msg, src, ErrorCode.NOT_REGISTERED, "register first")
        if cn_node is None:
            return self._error(ch, msg, src, ErrorCode.UNKNOWN_FQDN, f"unknown peer {fqdn}")
        fqdn = cn_node.fqdn
        if cn_node.node_id == node_id:
            return self._error(
                ch, msg, src, ErrorCode.BAD_REQUEST, "a node cannot direct to itself"
            )
        cn_reg = self.store.get_registration(cn_node.node_id)
        if cn_reg is None or self._offline(cn_reg, now):
            return self._error(ch, msg, src, ErrorCode.NOT_REGISTERED, f"{fqdn} is not online")
        cn_ch = self._channel(cn_reg.key_id, now)
        if cn_ch is None or self.key_expiry[cn_reg.key_id] < now:
            return self._error(ch, msg, src, ErrorCode.NOT_REGISTERED, f"{fqdn} is not online")
        mn_reg = self._update_observed(mn_reg, src, ch.key_id, now)
        try:
            decision = self.selector.select(
                self._view(mn_reg),
                self._view(cn_reg),
                relay_available=self.registry is not None and bool(self.registry.alive(now)),
            )
        except NoPath as exc:
            return self._error(ch, msg, src, exc.code, str(exc))
        session_id = self.random(8)
        tunnel_key = self.random(32)
        relay_req: tuple[TrsInstance, int, int] | None = None
        if self.registry is not None and (
            decision.path == sig.Path.RELAYED or decision.reason == sig.Reason.BOTH_BEHIND_NAPT
        ):
            # the TRS must be reachable from both: one family of each node
            mn_fam = self._family_for(mn_reg, now)
            cn_fam = self._family_for(cn_reg, now)
            inst = self.registry.pick(now, families={mn_fam, cn_fam})
            if inst is not None:
                relay_req = (inst, mn_fam, cn_fam)
            elif decision.path == sig.Path.RELAYED:
                return self._error(ch, msg, src, ErrorCode.NO_PATH, "no relay (TRS) available")
        common = {
            "session_id": session_id,
            "tunnel_key": tunnel_key,
            "path": decision.path,
            "reason": decision.reason,
        }
        to_cn = sig.RouteDirection(
            self._next_txid(),
            peer_fqdn=mn_node.fqdn,
            peer_vip4=str(mn_node.vip4),
            peer_vip6=str(mn_node.vip6),
            endpoints=decision.mn_endpoints,
            peer_cert=mn_node.cert_der,
            role=sig.Role.RESPONDER,
            **common,  # type: ignore[arg-type]
        )
        to_mn = sig.RouteDirection(
            msg.txid,
            peer_fqdn=cn_node.fqdn,
            peer_vip4=str(cn_node.vip4),
            peer_vip6=str(cn_node.vip6),
            endpoints=decision.cn_endpoints,
            peer_cert=cn_node.cert_der,
            role=sig.Role.INITIATOR,
            **common,  # type: ignore[arg-type]
        )
        cn_addrs = tuple(self._view(cn_reg).observed.values())
        p = _Pending(
            session_id,
            ch.key_id,
            msg.txid,
            src,
            cn_reg.key_id,
            cn_addrs,
            to_cn,
            to_mn,
            now,
        )
        self.pending[session_id] = p
        self.pending_by_request[request] = session_id
        log.info(
            "direction %s -> %s: %s (%s)",
            mn_node.fqdn,
            cn_node.fqdn,
            decision.path.name,
            decision.reason.name,
        )
        if relay_req is not None and self.registry is not None:
            inst, p.mn_family, p.cn_family = relay_req
            p.awaiting_relay = True
            p.relay_required = decision.path == sig.Path.RELAYED
            p.next_at = now + self.direction_timeout  # the registry reports a timeout first
            self.relay_trs[session_id] = inst
            p.relay_key = self.random(32)  # authenticates RELAY_BIND; not the tunnel key
            reqs = self.registry.request_relay(
                inst, session_id, p.relay_key, self.relay_lifetime, now
            )
            return [Outgoing(o.data, o.addr) for o in reqs]
        return self._send_to_cn(p, now)

    def _family_for(self, reg: Registration, now: float) -> int:
        """The family a node reaches the TRS in: IPv4 when it has it (NAPT'd or not)."""
        fams = set(self._view(reg).observed)
        return 4 if 4 in fams else 6

    def relay_results(self, results: list[RelayResult], now: float) -> list[Outgoing]:
        """The TRS answered (or not): send the Route Direction to the CN, or give up."""
        out: list[Outgoing] = []
        for r in results:
            p = self.pending.get(r.session_id)
            inst = self.relay_trs.pop(r.session_id, None)
            if p is None or not p.awaiting_relay:
                continue
            p.awaiting_relay = False
            by_family = {ipaddress.ip_address(e[0]).version: e for e in r.endpoints}
            if r.ok and p.mn_family in by_family and p.cn_family in by_family:
                p.to_cn = sig.replace(
                    p.to_cn,
                    relay_endpoint=by_family[p.cn_family],
                    relay_key=p.relay_key,
                    relay_side=1,
                )
                p.to_mn = sig.replace(
                    p.to_mn,
                    relay_endpoint=by_family[p.mn_family],
                    relay_key=p.relay_key,
                    relay_side=0,
                )
            elif p.relay_required:
                self._drop_pending(r.session_id)
                self.counters.direction_errors += 1
                err = sig.Error(
                    p.mn_txid,
                    ErrorCode.NO_PATH,
                    f"relay (TRS) refused: {r.error or 'no endpoints'}",
                ).pack()
                out += self._answer(p.mn_key, p.mn_txid, err, p.mn_addr)
                continue
            log.info(
                "relay session on TRS %s: %s",
                inst.trs_id if inst else "?",
                "ok" if r.ok else r.error,
            )
            out += self._send_to_cn(p, now)
        return out

    def _send_to_cn(self, p: _Pending, now: float) -> list[Outgoing]:
        ch = self.channels.get(p.cn_key)
        if ch is None:
            return []
        p.next_at = now + RETRANSMIT[min(p.attempt, len(RETRANSMIT) - 1)]
        p.attempt += 1
        plain = p.to_cn.pack()
        return [Outgoing(ch.seal(plain), addr) for addr in p.cn_addrs]

    def _drop_pending(self, session_id: bytes) -> _Pending | None:
        p = self.pending.pop(session_id, None)
        if p is not None:
            self.pending_by_request.pop((p.mn_key, p.mn_txid), None)
        return p

    def _confirmation(self, node_id: int, msg: sig.Confirmation, now: float) -> list[Outgoing]:
        p = self.pending.get(msg.session_id)
        if p is None or self.key_node.get(p.cn_key) != node_id:
            return []  # a duplicate confirmation, or not the CN of this session
        self._drop_pending(msg.session_id)
        self.counters.directions += 1
        return self._answer(p.mn_key, p.mn_txid, p.to_mn.pack(), p.mn_addr)
