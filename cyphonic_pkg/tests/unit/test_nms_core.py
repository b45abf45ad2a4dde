"""NMS protocol core driven without sockets: registration, route direction, faults."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

import pytest

from cyphonic.crypto.channel import SignalingChannel
from cyphonic.nms.core import NmsCore, Outgoing
from cyphonic.store.base import CommonKey
from cyphonic.store.sqlite import SQLiteStore
from cyphonic.wire import signaling as sig
from cyphonic.wire.signaling import Direction, ErrorCode

NOW = 1_800_000_000.0


class Node:
    def __init__(self, store: SQLiteStore, name: str, n: int, key_id: int) -> None:
        self.fqdn = f"{name}.cyphonic.test"
        rec = store.upsert_node(
            fqdn=self.fqdn,
            vip4=IPv4Address(f"10.64.0.{n}"),
            vip6=IPv6Address(f"fd43::{n}"),
            cert_der=b"cert-" + name.encode(),
            cert_serial=n,
            x25519_public=bytes([n]) * 32,
            enrolled_at=NOW,
        )
        self.node_id = rec.node_id
        key = bytes([n]) * 32
        store.put_common_key(CommonKey(key_id, rec.node_id, key, NOW + 3600))
        self.ch = SignalingChannel(key_id, key, Direction.TO_NMS)
        self.addr = (f"198.51.100.{n}", 30000)
        self.txid = 100

    def send(self, msg: sig.Message) -> bytes:
        return self.ch.seal(msg.pack())

    def read(self, out: list[Outgoing]) -> list[sig.Message]:
        got = []
        for o in out:
            if o.addr == self.addr:
                got.append(sig.parse_message(self.ch.open(o.data)))
        return got


@pytest.fixture
def env() -> tuple[SQLiteStore, NmsCore, Node, Node]:
    store = SQLiteStore(":memory:")
    core = NmsCore(store, "cyphonic.test", direction_timeout=2.0)
    a, b = Node(store, "a", 20, 1001), Node(store, "b", 30, 1002)
    return store, core, a, b


def register(core: NmsCore, n: Node, now: float = NOW) -> sig.RegistrationAck:
    out = core.handle(n.send(sig.Registration(1, (n.addr[0],), 30000)), n.addr, now)
    (ack,) = n.read(out)
    assert isinstance(ack, sig.RegistrationAck)
    return ack


def test_registration_reports_observed_and_vips(
    env: tuple[SQLiteStore, NmsCore, Node, Node],
) -> None:
    store, core, a, _ = env
    ack = register(core, a)
    assert ack.observed == a.addr and ack.vip4 == "10.64.0.20"
    reg = store.get_registration(a.node_id)
    assert reg is not None and reg.observed == ("198.51.100.20:30000",) and reg.key_id == 1001


def test_route_direction_flow(env: tuple[SQLiteStore, NmsCore, Node, Node]) -> None:
    _, core, a, b = env
    register(core, a)
    register(core, b)
    out = core.handle(a.send(sig.DirectionRequest(7, b.fqdn)), a.addr, NOW)
    assert a.read(out) == []  # nothing for the MN until the CN confirms
    (to_cn,) = b.read(out)
    assert isinstance(to_cn, sig.RouteDirection)
    assert to_cn.role == sig.Role.RESPONDER and to_cn.peer_fqdn == a.fqdn
    assert to_cn.endpoints == (a.addr,) and to_cn.peer_cert == b"cert-a"
    # a retransmitted Direction Request while pending is ignored
    assert core.handle(a.send(sig.DirectionRequest(7, b.fqdn)), a.addr, NOW) == []
    out = core.handle(b.send(sig.Confirmation(to_cn.txid, to_cn.session_id)), b.addr, NOW)
    (to_mn,) = a.read(out)
    assert isinstance(to_mn, sig.RouteDirection) and to_mn.txid == 7
    assert to_mn.role == sig.Role.INITIATOR and to_mn.peer_fqdn == b.fqdn
    assert to_mn.tunnel_key == to_cn.tunnel_key and to_mn.session_id == to_cn.session_id
    assert to_mn.endpoints == (b.addr,) and to_mn.path == sig.Path.DIRECT
    # retransmitted request after the answer: the same answer again (idempotent)
    (again,) = a.read(core.handle(a.send(sig.DirectionRequest(7, b.fqdn)), a.addr, NOW))
    assert again == to_mn
    # a duplicate confirmation changes nothing
    assert core.handle(b.send(sig.Confirmation(to_cn.txid, to_cn.session_id)), b.addr, NOW) == []


def test_route_direction_retransmitted_then_peer_unreachable(
    env: tuple[SQLiteStore, NmsCore, Node, Node],
) -> None:
    _, core, a, b = env
    register(core, a)
    register(core, b)
    core.handle(a.send(sig.DirectionRequest(7, b.fqdn)), a.addr, NOW)
    resent = [m for t in (0.3, 0.9, 1.9) for m in b.read(core.tick(NOW + t))]
    assert len(resent) == 3 and all(isinstance(m, sig.RouteDirection) for m in resent)
    (err,) = a.read(core.tick(NOW + 2.5))
    assert isinstance(err, sig.Error) and err.code == ErrorCode.PEER_UNREACHABLE


@pytest.mark.parametrize(
    ("fqdn", "code"),
    [
        ("nosuch.cyphonic.test", ErrorCode.UNKNOWN_FQDN),
        ("x.example.org", ErrorCode.NOT_AUTHORIZED),
        ("a.cyphonic.test", ErrorCode.BAD_REQUEST),
        ("b.cyphonic.test", ErrorCode.NOT_REGISTERED),  # b never registered
    ],
)
def test_direction_errors(
    env: tuple[SQLiteStore, NmsCore, Node, Node], fqdn: str, code: ErrorCode
) -> None:
    _, core, a, _ = env
    register(core, a)
    (err,) = a.read(core.handle(a.send(sig.DirectionRequest(9, fqdn)), a.addr, NOW))
    assert isinstance(err, sig.Error) and err.code == code


def test_unregistered_mn_is_refused(env: tuple[SQLiteStore, NmsCore, Node, Node]) -> None:
    _, core, a, b = env
    register(core, b)
    (err,) = a.read(core.handle(a.send(sig.DirectionRequest(9, b.fqdn)), a.addr, NOW))
    assert isinstance(err, sig.Error) and err.code == ErrorCode.NOT_REGISTERED


def test_bad_datagrams_dropped_and_counted(env: tuple[SQLiteStore, NmsCore, Node, Node]) -> None:
    _, core, a, _ = env
    good = a.send(sig.Registration(1, (a.addr[0],), 30000))
    tampered = bytearray(good)
    tampered[-1] ^= 1
    unknown = bytearray(good)
    unknown[4:8] = (4242).to_bytes(4, "big")
    for data in (b"", b"\x01", bytes(tampered), bytes(unknown), b"\x01" + b"\0" * 40):
        assert core.handle(data, a.addr, NOW) == []
    assert core.handle(good, a.addr, NOW) != []
    assert core.handle(good, a.addr, NOW) == []  # replay
    c = core.counters
    assert c.malformed == 2 and c.auth_failed == 1 and c.unknown_key == 2 and c.replayed == 1


def test_expired_key_told_to_log_in_again(env: tuple[SQLiteStore, NmsCore, Node, Node]) -> None:
    _, core, a, _ = env
    (err,) = a.read(core.handle(a.send(sig.KeepAlive(3)), a.addr, NOW + 7200))
    assert isinstance(err, sig.Error) and err.code == ErrorCode.UNKNOWN_KEY


def test_restart_keeps_registrations_and_refuses_old_datagrams(
    env: tuple[SQLiteStore, NmsCore, Node, Node],
) -> None:
    store, core, a, b = env
    register(core, a)
    register(core, b)
    old = a.send(sig.KeepAlive(5))
    core.handle(old, a.addr, NOW)
    core.flush_marks(NOW)
    restarted = NmsCore(store, "cyphonic.test")
    assert restarted.handle(old, a.addr, NOW + 1) == []
    assert restarted.counters.replayed == 1
    out = restarted.handle(a.send(sig.DirectionRequest(8, b.fqdn)), a.addr, NOW + 1)
    (to_cn,) = b.read(out)
    assert isinstance(to_cn, sig.RouteDirection)


def test_keepalive_from_new_address_updates_observed(
    env: tuple[SQLiteStore, NmsCore, Node, Node],
) -> None:
    store, core, a, _ = env
    register(core, a)
    moved = ("203.0.113.7", 41234)
    out = core.handle(a.send(sig.KeepAlive(4)), moved, NOW + 1)
    (ack,) = [sig.parse_message(a.ch.open(o.data)) for o in out if o.addr == moved]
    assert isinstance(ack, sig.KeepAliveAck) and ack.observed == moved
    reg = store.get_registration(a.node_id)
    assert reg is not None and "203.0.113.7:41234" in reg.observed


def test_direction_by_vip(env: tuple[SQLiteStore, NmsCore, Node, Node]) -> None:
    _, core, a, b = env
    register(core, a)
    register(core, b)
    out = core.handle(a.send(sig.DirectionRequest(7, vip="fd43::30")), a.addr, NOW)
    (to_cn,) = b.read(out)
    assert isinstance(to_cn, sig.RouteDirection) and to_cn.peer_fqdn == a.fqdn
    out = core.handle(a.send(sig.DirectionRequest(8, vip="10.64.0.99")), a.addr, NOW)
    (err,) = a.read(out)
    assert isinstance(err, sig.Error) and err.code == ErrorCode.UNKNOWN_FQDN
