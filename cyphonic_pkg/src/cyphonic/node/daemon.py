"""The node daemon: AS login, NMS registration, resolver, tunnels, data plane.

Data path (nebula-style direction split):

* inside  (TUN -> UDP): read an IP packet, find the peer by destination VIP,
  encrypt with the peer's current End Key, send to the peer's endpoint;
* outside (UDP -> TUN): dispatch on the first byte (signaling, Tunnel Request,
  Tunnel Response, data), decrypt, check the inner source is the peer's VIP,
  write to the TUN.

Both sides drain their file descriptor non-blockingly on each wake-up.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from cyphonic.auth.client import login
from cyphonic.config import NodeConfig
from cyphonic.crypto.channel import SignalingChannel
from cyphonic.dataplane.session import (
    Initiator,
    Keypair,
    SessionPolicy,
    generate_index,
    respond,
)
from cyphonic.dataplane.tun import LinuxTun, TunDevice
from cyphonic.errors import (
    ConfigError,
    CryptoError,
    CyphonicError,
    DecodeError,
    RequestTimeout,
    SignalingError,
)
from cyphonic.netlink import LinuxNetlink, Netlink
from cyphonic.node.netmon import AddressMonitor
from cyphonic.node.peers import Peer
from cyphonic.node.resolver import CyphonicResolver, LookupResult, LookupStatus
from cyphonic.node.signaling import SignalingClient, cancel, is_fatal
from cyphonic.pki.ca import load_ca_certificate, verify_node_certificate
from cyphonic.pki.node_keys import load_node_keys
from cyphonic.wire import signaling as sig
from cyphonic.wire.relay import RelayBind, RelayBindAck, RelayData, Side
from cyphonic.wire.signaling import Endpoint, ErrorCode, Path, Reason, Role, format_endpoint
from cyphonic.wire.tunnel import PacketType

log = logging.getLogger(__name__)

DRAIN = 64
HANDSHAKE_RETRY = (0.2, 0.4, 0.8, 1.6)
TIMER = 0.5
VIP_RETRY = 2.0  # at most one direction-by-VIP request per unknown VIP per 2 s
KEEPALIVE_AFTER = 10.0  # passive keepalive: answer received data within this (WireGuard)
DEAD_AFTER = 15.0  # sent data but heard nothing for this long: set the tunnel up again
PUNCH_TIMEOUT = 1.0  # no Tunnel Response over the punched path in this time: use the TRS
PROBE_INTERVAL = 2.0  # relayed: try the direct path again this often (route optimisation)
BIND_RETRY = (0.25, 0.5, 1.0, 2.0)
HANDOVER_CHECK = 2.0  # after a move, a peer silent for this long gets a new route direction
NAT_KEEPALIVE = 20.0  # a NAPT on the path: keep its UDP mapping (~30 s timeout) alive
SOCKBUF = 4 * 1024 * 1024


@dataclass(frozen=True)
class GeneralNodeMode:
    """How an adapter runs a general node's identity: the downlink it serves and the
    policy-routing table (and rule priority) that steers the GN's packets into its TUN."""

    downlink: str
    table: int


@dataclass
class Counters:
    malformed: int = 0
    unknown_index: int = 0
    auth_failed: int = 0
    replayed: int = 0
    spoofed: int = 0
    no_route: int = 0
    handshake_failed: int = 0
    tun_errors: int = 0
    send_errors: int = 0
    punches: int = 0
    relay_dropped: int = 0


class NodeDaemon:
    def __init__(
        self,
        cfg: NodeConfig,
        *,
        netlink: Netlink | None = None,
        tun_factory: Callable[[str], TunDevice] = LinuxTun,
        general_node: GeneralNodeMode | None = None,
    ) -> None:
        """``general_node``: run on an adapter as one general node's identity (its own
        keys, sockets and TUN; the adapter owns the resolver and the downlink)."""
        self.cfg = cfg
        self.gn = general_node
        self.netlink = netlink or LinuxNetlink()
        self.tun_factory = tun_factory
        self.keys = load_node_keys(cfg.state_dir)
        self.ca_cert: x509.Certificate = load_ca_certificate(cfg.ca_cert)
        cert = cfg.state_dir / "node.crt"
        if not cert.exists():
            raise ConfigError(
                f"{cfg.path}: [node] state_dir: no certificate at {cert}; "
                "run `cyphonic enroll` first"
            )
        self.counters = Counters()
        # WireGuard's timings, scaled by the configured rekey interval
        self.policy = SessionPolicy(
            rekey_after_time=cfg.rekey_after, reject_after_time=cfg.rekey_after * 1.5
        )
        self.peers: dict[str, Peer] = {}
        self.by_vip: dict[bytes, Peer] = {}
        self.by_session: dict[bytes, tuple[Peer, bytes]] = {}  # session id -> (peer, psk)
        self.by_index: dict[int, tuple[Peer, Keypair]] = {}
        self.pending_index: dict[int, Peer] = {}
        self.lookups: dict[str, asyncio.Task[Peer]] = {}
        self.vip_backoff: dict[str, float] = {}
        self.by_relay: dict[bytes, Peer] = {}
        self.vip_waiting: dict[bytes, bytes] = {}
        self.socks: dict[int, socket.socket] = {}
        self.tun: TunDevice | None = None
        self.login_result: Any = None
        self.client: SignalingClient | None = None
        self.registered = False
        self.observed: dict[int, Endpoint] = {}
        self.started = time.time()
        self.resolver: CyphonicResolver | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._reg_lock = asyncio.Lock()
        self.monitor: AddressMonitor | None = None
        self._move_task: asyncio.Task[None] | None = None
        self._move_again = False
        self.moves = 0
        self.last_move_ms: float | None = None
        self.vip4 = ""
        self.vip6 = ""
        self.vip4_packed = b""
        self.vip6_packed = b""
        self.nms: list[Endpoint] = []
        self.addresses: tuple[str, ...] = ()
        self.keepalive_interval = 20
        self.pool4 = ipaddress.IPv4Network("0.0.0.0/32")
        self.pool6 = ipaddress.IPv6Network("::/128")

    # -- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        await self._login(forever=True)
        lr = self.login_result
        self.tun = self.tun_factory(self.cfg.tun_name)
        # pyroute2's synchronous IPRoute runs its own loop: keep it off ours
        if self.gn is None:
            await asyncio.to_thread(
                self.netlink.configure_tun,
                self.tun.name,
                self.cfg.mtu,
                self.vip4,
                ipaddress.IPv4Network(lr.vip4_pool),
                self.vip6,
                ipaddress.IPv6Network(lr.vip6_pool),
            )
        else:
            await asyncio.to_thread(
                self.netlink.configure_gn_tun,
                self.tun.name,
                self.cfg.mtu,
                self.gn.downlink,
                self.vip4,
                ipaddress.IPv4Network(lr.vip4_pool),
                self.vip6,
                ipaddress.IPv6Network(lr.vip6_pool),
                self.gn.table,
            )
        self._open_sockets()
        loop = asyncio.get_running_loop()
        loop.add_reader(self.tun.fileno(), self._tun_readable)
        if self.cfg.resolver_listen:
            self.resolver = CyphonicResolver(
                self.cfg.domain,
                self._lookup,
                self.cfg.resolver_upstream,
                ttl=self.cfg.resolver_ttl,
                lookup_timeout=self.cfg.lookup_timeout,
            )
            await self.resolver.start(self.cfg.resolver_listen)
        self.pool4 = ipaddress.IPv4Network(lr.vip4_pool)
        self.pool6 = ipaddress.IPv6Network(lr.vip6_pool)
        self.monitor = AddressMonitor(asyncio.get_running_loop(), self._addresses_changed)
        try:
            self.monitor.start()
        except OSError as exc:  # no netlink: the keepalive loop still notices moves
            log.warning("netlink monitor unavailable (%s); moves noticed at keepalive time", exc)
            self.monitor = None
        self._tasks = [
            asyncio.create_task(self._keepalive_loop()),
            asyncio.create_task(self._timer_loop()),
        ]
        log.info("node %s up: VIPs %s %s on %s", self.cfg.fqdn, self.vip4, self.vip6, self.tun.name)

    async def stop(self) -> None:
        if self.monitor is not None:
            self.monitor.stop()
        for t in self._tasks:
            await cancel(t)
        for lookup in list(self.lookups.values()):
            lookup.cancel()
        if self.resolver:
            await self.resolver.stop()
        loop = asyncio.get_running_loop()
        for s in self.socks.values():
            loop.remove_reader(s.fileno())
            s.close()
        if self.tun:
            loop.remove_reader(self.tun.fileno())
            self.tun.close()

    async def _login(self, forever: bool) -> None:
        delay = 1.0
        while True:
            try:
                lr = await login(
                    self.cfg.as_host,
                    self.cfg.as_port,
                    self.cfg.ca_cert,
                    self.cfg.state_dir,
                    self.cfg.fqdn,
                    self.cfg.domain,
                )
                break
            except CyphonicError as exc:
                if not forever:
                    raise
                log.warning("login to AS failed (retrying in %.0f s): %s", delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        self.login_result = lr
        self.vip4, self.vip6 = str(lr.vip4), str(lr.vip6)
        self.vip4_packed = ipaddress.IPv4Address(self.vip4).packed
        self.vip6_packed = ipaddress.IPv6Address(self.vip6).packed
        channel = SignalingChannel(lr.key_id, lr.common_key, sig.Direction.TO_NMS)
        if self.client is None:
            self.client = SignalingClient(channel, self._send, self._on_push)
        else:
            self.client.channel = channel
        self.nms = [sig.parse_endpoint(e) for e in lr.nms_endpoints]
        log.info("logged in to AS as %s (node %d)", lr.fqdn, lr.node_id)

    def _open_sockets(self) -> None:
        loop = asyncio.get_running_loop()
        for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            s = socket.socket(family, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                s.setsockopt(socket.SOL_SOCKET, opt, SOCKBUF)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind((host, self.cfg.port))
            except OSError as exc:
                s.close()
                if family == socket.AF_INET6 and exc.errno == 97:
                    continue  # no IPv6 on this host
                raise CyphonicError(
                    f"cannot bind udp port {self.cfg.port}: {exc.strerror}"
                ) from exc
            s.setblocking(False)
            fam = 6 if family == socket.AF_INET6 else 4
            self.socks[fam] = s
            loop.add_reader(s.fileno(), self._sock_readable, s)

    def _send(self, data: bytes, dst: Endpoint) -> None:
        s = self.socks.get(6 if ":" in dst[0] else 4)
        if s is None:
            self.counters.send_errors += 1
            return
        try:
            s.sendto(data, dst)
        except OSError:
            self.counters.send_errors += 1

    # -- NMS signaling ----------------------------------------------------------------

    def _nms_targets(self) -> list[Endpoint]:
        """NMS endpoints in the families this host has a real address (and a socket) in."""
        families = {6 if ":" in a else 4 for a in self.addresses}
        return [
            ep
            for ep in self.nms
            if (fam := 6 if ":" in ep[0] else 4) in self.socks and fam in families
        ]

    async def _real_addresses(self) -> tuple[str, ...]:
        exclude = {self.cfg.tun_name} | ({self.gn.downlink} if self.gn else set())
        addrs = await asyncio.to_thread(self.netlink.real_addresses, exclude)
        return tuple(sorted(addrs))

    async def _register(self) -> None:
        """Register over every address family NMS and this node share."""
        async with self._reg_lock:
            await self._register_locked()

    async def _register_locked(self) -> None:
        assert self.client is not None
        attempts = 0
        while True:
            addrs = await self._real_addresses()
            self.addresses = addrs
            ok = False
            for target in self._nms_targets():
                msg = sig.Registration(self.client.next_txid(), addrs, self.cfg.port)
                try:
                    ack = await self.client.request(msg, target, timeout=5.0)
                except SignalingError as exc:
                    if is_fatal(exc):
                        await self._login(forever=True)
                    log.warning("registration refused by %s: %s", format_endpoint(target), exc)
                    continue
                except RequestTimeout as exc:
                    log.warning("registration: %s", exc)
                    continue
                assert isinstance(ack, sig.RegistrationAck)
                fam = 6 if ":" in target[0] else 4
                self.observed[fam] = ack.observed
                self.keepalive_interval = ack.keepalive_interval
                ok = True
            if ok:
                self.registered = True
                self.addresses = addrs
                log.info(
                    "registered with NMS (observed %s)",
                    ", ".join(format_endpoint(e) for e in self.observed.values()),
                )
                return
            self.registered = False
            attempts += 1
            if attempts % 3 == 0:
                # NMS may no longer know our key (database reset): get a fresh one
                await self._login(forever=True)
            await asyncio.sleep(2.0)

    async def _keepalive_loop(self) -> None:
        assert self.client is not None
        await self._register()
        failures = 0
        while True:
            # after a lost keepalive, try again soon: 3 lost rounds mean NMS lost us
            await asyncio.sleep(self.keepalive_interval if not failures else 1.0)
            lr = self.login_result
            try:
                if lr.key_expires_at - time.time() < 60:
                    raise SignalingError(ErrorCode.UNKNOWN_KEY, "common key about to expire")
                if await self._real_addresses() != self.addresses:
                    await self._register()
                    continue
                targets = self._nms_targets()
                answers = await asyncio.gather(
                    *(
                        self.client.request(sig.KeepAlive(self.client.next_txid()), t, timeout=3.0)
                        for t in targets
                    ),
                    return_exceptions=True,
                )
                answered = 0
                for target, ack in zip(targets, answers, strict=True):
                    if isinstance(ack, sig.KeepAliveAck):
                        self.observed[6 if ":" in target[0] else 4] = ack.observed
                        answered += 1
                    elif isinstance(ack, BaseException) and not isinstance(ack, RequestTimeout):
                        raise ack  # an NMS error (e.g. unknown key), or a bug
                if targets and not answered:  # one family down is not NMS down
                    raise RequestTimeout("no NMS endpoint answered the keepalive")
                failures = 0
            except SignalingError as exc:
                log.info("NMS: %s; logging in again", exc)
                await self._login(forever=True)
                await self._register()
            except RequestTimeout as exc:
                failures += 1
                log.warning("keepalive: %s", exc)
                if failures >= 3:
                    self.registered = False
                    await self._login(forever=True)
                    await self._register()
                    failures = 0

    # -- mobility -----------------------------------------------------------------------

    def _addresses_changed(self) -> None:
        """Netlink saw an address event (debounced): handle it, one move at a time."""
        if self._move_task is not None and not self._move_task.done():
            self._move_again = True
            return
        self._move_task = asyncio.create_task(self._handle_move())

    async def _handle_move(self) -> None:
        while True:
            self._move_again = False
            new = await self._real_addresses()
            if not new:
                # between leaving one network and joining the next (break before make):
                # nothing to register with yet; the next address event brings us back
                self.addresses = new
            elif new != self.addresses and (self.registered or not self.addresses):
                await self._moved(new)
            if not self._move_again:
                return

    async def _moved(self, new: tuple[str, ...]) -> None:
        t0 = time.perf_counter()
        log.info(
            "real addresses changed: %s -> %s",
            ", ".join(self.addresses) or "none",
            ", ".join(new) or "none",
        )
        self.moves += 1
        await self._register()
        families = {6 if ":" in a else 4 for a in self.addresses}
        now = time.monotonic()
        for peer in list(self.peers.values()):
            if peer.current is None and peer.initiator is None:
                continue
            ep = peer.relay_endpoint if peer.relayed else peer.endpoint
            if peer.relayed and ep is not None and (6 if ":" in ep[0] else 4) in families:
                # the TRS learns our new address from a fresh bind; data follows it
                peer.relay_bound = False
                peer.bind_attempt = 0
                self._send_bind(peer, now)
                self._send_packet(peer, b"")
                peer.unanswered_since = now - DEAD_AFTER + HANDOVER_CHECK
                continue
            if (
                ep is None
                or (6 if ":" in ep[0] else 4) not in families
                or (peer.path == Path.LOCAL)
            ):
                # the old path cannot work from here: a new route direction and handshake
                self._establish_task(fqdn=peer.fqdn)
            else:
                # authenticated path update: the peer roams to our new address on receipt;
                # without an answer soon, ask NMS for a new path
                self._send_packet(peer, b"")
                peer.unanswered_since = now - DEAD_AFTER + HANDOVER_CHECK
        self.last_move_ms = (time.perf_counter() - t0) * 1000

    def _on_push(self, msg: sig.Message, src: Endpoint) -> sig.Message | None:
        """A Route Direction to this node as CN: prepare the peer, then confirm."""
        if not isinstance(msg, sig.RouteDirection) or msg.role != Role.RESPONDER:
            return None  # e.g. a late answer to a request that already timed out
        try:
            peer = self._install_peer(msg)
        except CyphonicError as exc:
            log.warning("route direction for %s refused: %s", msg.peer_fqdn, exc)
            return None
        if peer.path == Path.PUNCHED:
            # open our NAPT mapping toward the MN before NMS tells it to start: its
            # Tunnel Request then arrives as an answer to traffic we sent
            for ep in msg.endpoints:
                self._send(bytes([PacketType.PUNCH]) + msg.session_id, ep)
        return sig.Confirmation(msg.txid, msg.session_id)

    def _install_peer(self, rd: sig.RouteDirection) -> Peer:
        ident = verify_node_certificate(self.ca_cert, rd.peer_cert, time.time(), rd.peer_fqdn)
        if ident.fqdn != rd.peer_fqdn or rd.peer_vip4 == self.vip4 or rd.peer_vip6 == self.vip6:
            raise CryptoError("route direction does not match the peer certificate")
        peer = self.peers.get(rd.peer_fqdn)
        if peer is not None and peer.session_id == rd.session_id:
            return peer  # retransmitted Route Direction
        if peer is None:
            peer = Peer(
                fqdn=rd.peer_fqdn,
                vip4=rd.peer_vip4,
                vip6=rd.peer_vip6,
                static_pub=ident.x25519_public,
                session_id=rd.session_id,
                psk=rd.tunnel_key,
                role=Role(rd.role),
                path=Path(rd.path),
                reason=Reason(rd.reason),
                endpoints=rd.endpoints,
            )
            self.peers[peer.fqdn] = peer
        else:
            # a new session for a known peer (both sides asked at once, a restart, a
            # move): update in place, so handshakes in flight and the tunnel that works
            # stay attached to the one Peer object until the new handshake replaces it
            for packed in (peer.vip4_packed, peer.vip6_packed):
                self.by_vip.pop(packed, None)
            peer.vip4, peer.vip6 = rd.peer_vip4, rd.peer_vip6
            peer.static_pub, peer.session_id, peer.psk = (
                ident.x25519_public,
                rd.session_id,
                rd.tunnel_key,
            )
            peer.role, peer.path, peer.reason = Role(rd.role), Path(rd.path), Reason(rd.reason)
            peer.endpoints = rd.endpoints
        peer.endpoint = rd.endpoints[0] if rd.endpoints else None
        if rd.relay_key is not None and rd.relay_endpoint is not None:
            if peer.relay_session:
                self.by_relay.pop(peer.relay_session, None)
            peer.relay_endpoint, peer.relay_key = rd.relay_endpoint, rd.relay_key
            peer.relay_side, peer.relay_session = rd.relay_side or 0, rd.session_id
            peer.relay_bound, peer.bind_attempt = False, 0
            self.by_relay[rd.session_id] = peer
            peer.relayed = rd.path == Path.RELAYED
            peer.relayed_since = time.monotonic() if peer.relayed else None
            self._send_bind(peer, time.monotonic())  # the TRS learns our (NAT-mapped) endpoint
        else:
            # no relay for this session: forget the previous one (the TRS lets it idle out)
            if peer.relay_session:
                self.by_relay.pop(peer.relay_session, None)
            peer.relay_endpoint, peer.relay_key, peer.relay_session = None, None, b""
            peer.relayed = peer.relay_bound = False
        if rd.path == Path.RELAYED and rd.relay_key is None:
            raise CryptoError("relayed route direction without relay information")
        # the previous session stays valid for Tunnel Requests already on their way;
        # the one before it is forgotten
        if peer.prev_session is not None and peer.prev_session != rd.session_id:
            self.by_session.pop(peer.prev_session, None)
        peer.prev_session = peer.session_id if peer.session_id != rd.session_id else None
        self.by_session[rd.session_id] = (peer, rd.tunnel_key)
        self.by_vip[peer.vip4_packed] = peer
        self.by_vip[peer.vip6_packed] = peer
        for packed in (peer.vip4_packed, peer.vip6_packed):
            waiting = self.vip_waiting.pop(packed, None)
            if waiting is not None:
                peer.queue.append(waiting)
        return peer

    # -- resolver hook: route selection + tunnel establishment --------------------------

    async def _lookup(self, fqdn: str, want: int) -> LookupResult:
        fqdn = fqdn.lower().rstrip(".")
        if fqdn == self.cfg.fqdn:
            return LookupResult(LookupStatus.OK, (self.vip4 if want == 4 else self.vip6,))
        peer = self.peers.get(fqdn)
        if peer is None or peer.current is None:
            task = self._establish_task(fqdn)
            try:
                peer = await asyncio.shield(task)
            except SignalingError as exc:
                if exc.code in (ErrorCode.UNKNOWN_FQDN, ErrorCode.NOT_AUTHORIZED):
                    return LookupResult(LookupStatus.NXDOMAIN, ())
                log.warning("route selection for %s failed: %s", fqdn, exc)
                return LookupResult(LookupStatus.SERVFAIL, ())
            except (CyphonicError, TimeoutError) as exc:
                log.warning("tunnel to %s not established: %s", fqdn, exc)
                return LookupResult(LookupStatus.SERVFAIL, ())
        return LookupResult(LookupStatus.OK, (peer.vip4 if want == 4 else peer.vip6,))

    def _establish_task(
        self, fqdn: str | None = None, vip: str | None = None
    ) -> asyncio.Task[Peer]:
        """The running route selection + handshake for this peer, started if none runs."""
        key = fqdn or vip or ""
        task = self.lookups.get(key)
        if task is None:
            task = asyncio.create_task(self._establish(fqdn, vip))
            self.lookups[key] = task
            task.add_done_callback(self._lookup_done)
        return task

    def _lookup_done(self, task: asyncio.Task[Peer]) -> None:
        for fqdn, t in list(self.lookups.items()):
            if t is task:
                del self.lookups[fqdn]
        if not task.cancelled():
            task.exception()  # retrieved: the waiting resolver queries report it

    async def _establish(self, fqdn: str | None, vip: str | None = None) -> Peer:
        assert self.client is not None
        targets = self._nms_targets()
        if not targets or not self.registered:
            raise CyphonicError("not registered with NMS")
        t0 = time.perf_counter()
        rd = await self.client.request(
            sig.DirectionRequest(self.client.next_txid(), fqdn=fqdn, vip=vip),
            targets[0],
            timeout=self.cfg.lookup_timeout,
        )
        if not isinstance(rd, sig.RouteDirection):
            raise CyphonicError(f"unexpected answer {type(rd).__name__} from NMS")
        route_ms = (time.perf_counter() - t0) * 1000
        peer = self._install_peer(rd)
        peer.route_selection_ms = route_ms
        if peer.current is None or peer.role == Role.INITIATOR:
            peer.ready.clear()
            if peer.initiator is not None:
                # a handshake of the previous session (a rekey, a retry) is still pending:
                # this is a new session, so start afresh -- otherwise the new attempt would
                # inherit the old one's start time and be abandoned at once
                self.pending_index.pop(peer.initiator.local_index, None)
                peer.initiator = None
            self._start_handshake(peer, time.monotonic())
            await asyncio.wait_for(peer.ready.wait(), self.cfg.handshake_timeout)
        return peer

    # -- Tunnel Request / Tunnel Response (Noise IKpsk2) --------------------------------

    def _send_to_peer(self, peer: Peer, datagram: bytes) -> None:
        """Directly to the peer's endpoint, or wrapped in RELAY_DATA to the TRS."""
        if peer.relayed and peer.relay_endpoint is not None:
            self._send(RelayData.wrap(peer.relay_session, datagram), peer.relay_endpoint)
        elif peer.endpoint is not None:
            self._send(datagram, peer.endpoint)

    def _send_bind(self, peer: Peer, now: float) -> None:
        if peer.relay_key is None or peer.relay_endpoint is None:
            return
        peer.relay_ts = max(peer.relay_ts + 1, int(time.time() * 1000))
        bind = RelayBind.create(
            peer.relay_key, Side(peer.relay_side), peer.relay_session, peer.relay_ts
        )
        self._send(bind.pack(), peer.relay_endpoint)
        if peer.relay_bound and now - peer.last_bind_ack > 35.0:
            peer.relay_bound = False  # two refreshes without an answer (e.g. a TRS restart)
        delay = 15.0 if peer.relay_bound else BIND_RETRY[min(peer.bind_attempt, 3)]
        peer.bind_attempt += 1
        peer.next_bind_at = now + delay

    def _switch_to_relay(self, peer: Peer, now: float) -> None:
        """Hole punching did not answer in time: carry the tunnel through the TRS."""
        peer.relayed = True
        peer.path, peer.reason = Path.RELAYED, Reason.PUNCH_FAILED
        peer.relayed_since = now
        peer.fallback_ms = (now - peer.handshake_started) * 1000
        peer.next_probe_at = now + PROBE_INTERVAL
        log.info(
            "no direct path to %s after %.0f ms: relaying through TRS %s",
            peer.fqdn,
            peer.fallback_ms,
            format_endpoint(peer.relay_endpoint or ("?", 0)),
        )

    def _start_handshake(self, peer: Peer, now: float) -> None:
        if peer.endpoint is None and not peer.relayed:
            return
        if peer.initiator is not None:
            self.pending_index.pop(peer.initiator.local_index, None)
        else:
            peer.handshake_started = now
            peer.handshake_attempt = 0
        index = generate_index(self.by_index.keys() | self.pending_index.keys())
        peer.initiator = Initiator(
            self.keys.x25519_key,
            peer.static_pub,
            peer.psk,
            peer.session_id,
            index,
            now,
            policy=self.policy,
        )
        peer.handshake_sent = time.perf_counter()
        self.pending_index[index] = peer
        self._send_to_peer(peer, peer.initiator.create_init())

    def _handshake_init(
        self, data: bytes, src: Endpoint, now: float, relay: bytes | None = None
    ) -> None:
        def lookup(session_id: bytes) -> tuple[bytes, bytes, bytes | None] | None:
            entry = self.by_session.get(session_id)
            if entry is None:
                return None
            p, psk = entry
            return (psk, p.static_pub, p.last_init_timestamp)

        index = generate_index(self.by_index.keys() | self.pending_index.keys())
        try:
            resp, kp, _static, timestamp = respond(
                data, self.keys.x25519_key, lookup, index, now, policy=self.policy
            )
        except (CryptoError, DecodeError) as exc:
            self.counters.handshake_failed += 1
            log.debug("tunnel request from %s refused: %s", format_endpoint(src), exc)
            return
        peer = self.by_session[data[8:16]][0]
        peer.last_init_timestamp = timestamp
        if peer.next is not None:
            self.by_index.pop(peer.next.local_index, None)
        peer.next = kp
        self.by_index[index] = (peer, kp)
        if relay is not None:
            if not peer.relayed:  # the MN gave up on the direct path
                peer.relayed, peer.relayed_since = True, now
                if peer.path == Path.PUNCHED:
                    peer.path, peer.reason = Path.RELAYED, Reason.PUNCH_FAILED
                peer.next_probe_at = now + PROBE_INTERVAL
            self._send(RelayData.wrap(relay, resp), src)
        else:
            self._to_direct(peer, src, now)
            self._send(resp, src)

    def _handshake_resp(
        self, data: bytes, src: Endpoint, now: float, relay: bytes | None = None
    ) -> None:
        try:
            receiver = int.from_bytes(data[8:12], "big")
        except (IndexError, ValueError):
            self.counters.malformed += 1
            return
        peer = self.pending_index.get(receiver)
        if peer is None or peer.initiator is None:
            self.counters.unknown_index += 1
            return
        try:
            kp = peer.initiator.consume_response(data, now)
        except (CryptoError, DecodeError) as exc:
            self.counters.handshake_failed += 1
            log.debug("tunnel response from %s refused: %s", format_endpoint(src), exc)
            return
        if peer.tunnel_establishment_ms is None:
            peer.tunnel_establishment_ms = (time.perf_counter() - peer.handshake_sent) * 1000
        del self.pending_index[receiver]
        peer.initiator = None
        if relay is None:
            self._to_direct(peer, src, now)
        self._promote(peer, kp)
        # confirm the keys to the responder at once (an empty data packet)
        self._send_packet(peer, b"")

    def _promote(self, peer: Peer, kp: Keypair) -> None:
        if peer.previous is not None and peer.previous is not kp:
            self.by_index.pop(peer.previous.local_index, None)
        peer.previous = peer.current
        peer.current = kp
        if peer.next is kp:
            peer.next = None
        self.by_index[kp.local_index] = (peer, kp)
        peer.last_handshake = time.time()
        peer.handshakes += 1
        peer.ready.set()
        while peer.queue:
            self._send_packet(peer, peer.queue.popleft())

    # -- data plane ---------------------------------------------------------------------

    def _send_packet(self, peer: Peer, packet: bytes) -> None:
        kp = peer.current
        now = time.monotonic()
        reachable = peer.endpoint is not None or peer.relayed
        if kp is None or not reachable or kp.expired(now):
            peer.queue.append(packet)
            if peer.initiator is None and reachable:
                self._start_handshake(peer, time.monotonic())
            return
        try:
            data = kp.encrypt(packet, now)
        except CryptoError:
            peer.queue.append(packet)
            self._start_handshake(peer, time.monotonic())
            return
        self._send_to_peer(peer, data)
        peer.last_tx = now
        if packet:
            peer.tx_bytes += len(packet)
            peer.tx_packets += 1
            if not peer.unanswered_since:
                peer.unanswered_since = now

    def _tun_readable(self) -> None:
        assert self.tun is not None
        for _ in range(DRAIN):
            try:
                pkt = self.tun.read()
            except OSError:
                self.counters.tun_errors += 1
                return
            if pkt is None:
                return
            version = pkt[0] >> 4 if pkt else 0
            if version == 4:
                dst = pkt[16:20]
            elif version == 6:
                dst = pkt[24:40]
            else:
                continue
            peer = self.by_vip.get(dst)
            if peer is None:
                self._unknown_vip(dst, pkt)
                continue
            self._send_packet(peer, pkt)

    def _unknown_vip(self, dst: bytes, pkt: bytes) -> None:
        """A packet for a VIP without a tunnel (e.g. after a restart): ask NMS by VIP."""
        self.counters.no_route += 1
        addr = ipaddress.ip_address(dst)
        if addr not in (self.pool4 if addr.version == 4 else self.pool6):
            return
        key = str(addr)
        now = time.monotonic()
        if self.vip_backoff.get(key, 0.0) > now:
            return
        self.vip_backoff[key] = now + VIP_RETRY
        self.vip_waiting[dst] = pkt  # sent once the tunnel is up (the latest packet only)
        self._establish_task(vip=key)

    def _sock_readable(self, s: socket.socket) -> None:
        now = time.monotonic()
        for _ in range(DRAIN):
            try:
                data, addr = s.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.counters.send_errors += 1  # ICMP errors surface here (ECONNREFUSED)
                continue
            src = (addr[0], addr[1])
            if not data:
                self.counters.malformed += 1
                continue
            kind = data[0]
            try:
                if kind == PacketType.DATA:
                    self._data(data, src, now)
                elif kind == PacketType.SIGNALING:
                    if self.client is not None:
                        self.client.datagram_received(data, src)
                elif kind == PacketType.HANDSHAKE_INIT:
                    self._handshake_init(data, src, now)
                elif kind == PacketType.HANDSHAKE_RESP:
                    self._handshake_resp(data, src, now)
                elif kind == PacketType.RELAY_DATA:
                    self._relay_data(data, src, now)
                elif kind == PacketType.RELAY_BIND_ACK:
                    self._bind_ack(data, src, now)
                elif kind == PacketType.PUNCH:
                    self.counters.punches += 1
                else:
                    self.counters.malformed += 1
            except Exception:  # a bug must never take the node down
                self.counters.malformed += 1
                log.exception("unexpected error handling a datagram from %s", format_endpoint(src))

    def _to_direct(self, peer: Peer, src: Endpoint, now: float) -> None:
        """Authenticated traffic arrived straight from the peer: use that path."""
        if peer.relayed:
            peer.relayed = False
            peer.path = Path.PUNCHED
            if peer.relayed_since is not None:
                peer.optimised_ms = (now - peer.relayed_since) * 1000
            log.info(
                "direct path to %s found at %s: leaving the relay", peer.fqdn, format_endpoint(src)
            )
        elif peer.endpoint != src:
            log.info("peer %s moved to %s", peer.fqdn, format_endpoint(src))
        peer.endpoint = src  # roaming: authenticated data from a new address

    def _relay_data(self, data: bytes, src: Endpoint, now: float) -> None:
        if len(data) < 13:
            self.counters.malformed += 1
            return
        session = data[4:12]
        peer = self.by_relay.get(session)
        if peer is None or src != peer.relay_endpoint:
            self.counters.relay_dropped += 1
            return
        inner = data[12:]
        kind = inner[0]
        if kind == PacketType.DATA:
            self._data(inner, src, now, relay=session)
        elif kind == PacketType.HANDSHAKE_INIT:
            self._handshake_init(inner, src, now, relay=session)
        elif kind == PacketType.HANDSHAKE_RESP:
            self._handshake_resp(inner, src, now, relay=session)
        else:
            self.counters.malformed += 1

    def _bind_ack(self, data: bytes, src: Endpoint, now: float) -> None:
        try:
            ack = RelayBindAck.parse(data)
        except DecodeError:
            self.counters.malformed += 1
            return
        peer = self.by_relay.get(ack.session_id)
        if (
            peer is None
            or peer.relay_key is None
            or src != peer.relay_endpoint
            or not (ack.verify(peer.relay_key))
        ):
            self.counters.relay_dropped += 1
            return
        if not peer.relay_bound:
            log.info("relay session for %s bound at TRS %s", peer.fqdn, format_endpoint(src))
        peer.relay_bound = True
        peer.last_bind_ack = now
        peer.bind_attempt = 0
        peer.next_bind_at = now + 15.0

    def _data(self, data: bytes, src: Endpoint, now: float, relay: bytes | None = None) -> None:
        if len(data) < 32:
            self.counters.malformed += 1
            return
        entry = self.by_index.get(int.from_bytes(data[4:8], "big"))
        if entry is None:
            self.counters.unknown_index += 1
            return
        peer, kp = entry
        try:
            pkt = kp.decrypt(data, now)
        except CryptoError as exc:
            if "replay" in type(exc).__name__.lower() or "replay" in str(exc):
                self.counters.replayed += 1
            else:
                self.counters.auth_failed += 1
            return
        if kp is peer.next:
            self._promote(peer, kp)
        peer.unanswered_since = 0.0
        if relay is None and (peer.relayed or peer.endpoint != src):
            self._to_direct(peer, src, now)
        if not pkt:
            return  # keepalive
        version = pkt[0] >> 4
        if version == 4:
            ok = pkt[12:16] == peer.vip4_packed and pkt[16:20] == self.vip4_packed
        elif version == 6:
            ok = pkt[8:24] == peer.vip6_packed and pkt[24:40] == self.vip6_packed
        else:
            ok = False
        if not ok:
            self.counters.spoofed += 1
            return
        peer.rx_bytes += len(pkt)
        peer.rx_packets += 1
        peer.last_rx_data = now
        assert self.tun is not None
        try:
            self.tun.write(pkt)
        except CyphonicError:
            self.counters.tun_errors += 1

    # -- timers -------------------------------------------------------------------------

    async def _timer_loop(self) -> None:
        while True:
            await asyncio.sleep(TIMER)
            now = time.monotonic()
            for peer in list(self.peers.values()):
                self._peer_timers(peer, now)

    def _peer_timers(self, peer: Peer, now: float) -> None:
        if (
            peer.relay_key is not None
            and now >= peer.next_bind_at
            and (peer.relayed or peer.initiator is not None or not peer.relay_bound)
        ):
            # holds the TRS session and our NAT mapping to it while the relay is (or may
            # soon be) in use; once direct, the TRS session idles out
            self._send_bind(peer, now)
        if peer.initiator is not None:
            elapsed = now - peer.handshake_started
            if (
                peer.relay_key is not None
                and not peer.relayed
                and peer.path == Path.PUNCHED
                and elapsed >= PUNCH_TIMEOUT
            ):
                self._switch_to_relay(peer, now)
                self._start_handshake(peer, now)
                return
            if elapsed > self.cfg.handshake_timeout:
                self.pending_index.pop(peer.initiator.local_index, None)
                peer.initiator = None
                log.warning("tunnel handshake with %s timed out; asking NMS again", peer.fqdn)
                # the peer may have restarted and forgotten the session: a fresh route
                # direction gives both sides a new one (at most one such request at a time)
                if peer.fqdn not in self.lookups:
                    peer.queue.clear()
                    self._establish_task(fqdn=peer.fqdn)
                return
            n = peer.handshake_attempt + 1
            due = sum(HANDSHAKE_RETRY[:n]) + HANDSHAKE_RETRY[-1] * max(0, n - len(HANDSHAKE_RETRY))
            if elapsed >= due:
                peer.handshake_attempt += 1
                self._start_handshake(peer, now)
            return
        if peer.unanswered_since and now - peer.unanswered_since >= DEAD_AFTER:
            # we send, nothing comes back (the peer restarted and lost its keys, or its
            # address changed): ask NMS for a fresh route direction and handshake
            log.info(
                "no answer from %s for %.0f s: setting the tunnel up again",
                peer.fqdn,
                now - peer.unanswered_since,
            )
            peer.unanswered_since = 0.0
            self._establish_task(fqdn=peer.fqdn)
            return
        kp = peer.current
        if kp is None:
            return
        if peer.relayed and peer.endpoints and now >= peer.next_probe_at:
            # route optimisation: keep trying the direct path; the first authenticated
            # packet that gets through moves both sides off the relay
            peer.next_probe_at = now + PROBE_INTERVAL
            probe = kp.encrypt(b"", now)
            for ep in peer.endpoints:
                self._send(probe, ep)
        if peer.last_rx_data > peer.last_tx and now - peer.last_rx_data >= KEEPALIVE_AFTER:
            self._send_packet(peer, b"")  # passive keepalive: "still here"
        elif peer.reason != Reason.COMMON_FAMILY_PUBLIC and now - peer.last_tx >= NAT_KEEPALIVE:
            self._send_packet(peer, b"")  # hold the NAPT mappings on the path open
        if kp.needs_rekey(now):
            self._start_handshake(peer, now)
        for old in (peer.previous,):
            if old is not None and old.expired(now):
                self.by_index.pop(old.local_index, None)
                peer.previous = None
        if kp.expired(now):
            self.by_index.pop(kp.local_index, None)
            peer.current = None
            peer.ready.clear()

    # -- status -------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        lr = self.login_result
        return {
            "role": "node",
            "fqdn": self.cfg.fqdn,
            "node_id": lr.node_id if lr else None,
            "vip4": self.vip4,
            "vip6": self.vip6,
            "registered": self.registered,
            "nms": [format_endpoint(e) for e in self.nms],
            "observed": {str(k): format_endpoint(v) for k, v in self.observed.items()},
            "tun": self.tun.name if self.tun else None,
            "addresses": list(self.addresses),
            "moves": self.moves,
            "last_move_ms": self.last_move_ms,
            "uptime": round(time.time() - self.started, 1),
            "peers": [p.status() for p in self.peers.values()],
            "counters": {
                **vars(self.counters),
                "signaling": dict(self.client.counters) if self.client else {},
                "resolver": dict(self.resolver.counters) if self.resolver else {},
            },
            "pid": os.getpid(),
        }
