"""TRS core driven without sockets: sessions, binds, relaying, drops, expiry, control."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import pytest

from cyphonic.trs.core import ControlChannel, Outgoing, RelayCore
from cyphonic.wire import relay
from cyphonic.wire.relay import Side
from cyphonic.wire.signaling import Direction, Endpoint

NOW = 1_800_000_000.0
TRS_KEY = bytes(range(32))
TRS_ID = 7
NMS: Endpoint = ("192.0.2.1", 4502)
PUBLIC: tuple[Endpoint, ...] = (("192.0.2.10", 4503), ("2001:db8::10", 4503))
SID = b"\x11" * 8
RELAY_KEY = b"\x22" * 32
# Side A (the MN) behind an IPv4 NAPT, side B (the CN) on IPv6 only.
A: Endpoint = ("203.0.113.5", 41000)
B: Endpoint = ("2001:db8:b::5", 30000)
MARKER = b"SECRET-PAYLOAD-7f3a9c"  # must never show up in logs or state


class FakeNms:
    def __init__(self, key: bytes = TRS_KEY, trs_id: int = TRS_ID) -> None:
        self.ch = ControlChannel(trs_id, key, Direction.TO_NODE)
        self.txid = 0

    def request(
        self, sid: bytes = SID, key: bytes = RELAY_KEY, lifetime: int = 3600, now: float = NOW
    ) -> bytes:
        self.txid += 1
        msg = relay.RelayRequest(self.txid, session_id=sid, relay_key=key, lifetime=lifetime)
        return self.ch.seal(msg, now)

    def read(self, out: list[Outgoing]) -> list[relay.ControlMessage]:
        got = []
        for o in out:
            assert o.addr == NMS
            header = relay.ControlHeader.parse(o.data)
            got.append(self.ch.open(o.data, header))
        return got


def bind(side: Side, ts: int, key: bytes = RELAY_KEY, sid: bytes = SID) -> bytes:
    return relay.RelayBind.create(key, side, sid, ts).pack()


def data(payload: bytes = MARKER, sid: bytes = SID) -> bytes:
    return relay.RelayData.wrap(sid, b"\x04\x00\x00\x00" + payload)


@pytest.fixture
def core() -> RelayCore:
    return RelayCore(TRS_ID, TRS_KEY, PUBLIC, nms=[NMS], idle_timeout=120.0, max_sessions=4)


def open_session(core: RelayCore, nms: FakeNms | None = None, **kw: Any) -> relay.RelayResponse:
    nms = nms or FakeNms()
    (resp,) = nms.read(core.handle(nms.request(**kw), NMS, kw.get("now", NOW)))
    assert isinstance(resp, relay.RelayResponse)
    return resp


def bound(core: RelayCore, now: float = NOW) -> None:
    open_session(core, now=now)
    assert core.handle(bind(Side.MN, 1000), A, now)[0].addr == A
    assert core.handle(bind(Side.CN, 1000), B, now)[0].addr == B


def test_relay_request_opens_a_session(core: RelayCore) -> None:
    resp = open_session(core)
    assert resp.ok == 1 and resp.session_id == SID and resp.endpoints == PUBLIC
    assert core.counters["sessions"] == 1 and SID in core.sessions


def test_relay_request_is_idempotent(core: RelayCore) -> None:
    nms = FakeNms()
    first = open_session(core, nms)
    again = open_session(core, nms)
    assert (first.ok, first.endpoints) == (again.ok, again.endpoints)
    assert core.counters["sessions_created"] == 1
    other_key = open_session(core, nms, key=b"\x33" * 32)
    assert other_key.ok == 0  # same session id, another key: refused, session unchanged
    assert core.sessions[SID].relay_key == RELAY_KEY


def test_refused_at_capacity_or_zero_lifetime(core: RelayCore) -> None:
    nms = FakeNms()
    for i in range(4):
        assert open_session(core, nms, sid=bytes([i]) * 8).ok == 1
    assert open_session(core, nms, sid=b"\x09" * 8).ok == 0
    assert open_session(core, nms, sid=b"\x00" * 8).ok == 1  # existing one still answers
    fresh = RelayCore(TRS_ID, TRS_KEY, PUBLIC, nms=[NMS])
    assert open_session(fresh, FakeNms(), lifetime=0).ok == 0
    assert core.counters["sessions_refused"] == 1


def test_bind_learns_nat_mapped_endpoint_and_acks(core: RelayCore) -> None:
    open_session(core)
    (out,) = core.handle(bind(Side.MN, 1000), A, NOW)
    assert out.addr == A
    ack = relay.RelayBindAck.parse(out.data)
    assert ack.verify(RELAY_KEY) and ack.side is Side.MN and ack.timestamp_ms == 1000
    assert core.sessions[SID].endpoints == [A, None]
    # the node moved (new NAT mapping): a newer bind from the new source re-points it
    moved: Endpoint = ("198.51.100.77", 52000)
    (out,) = core.handle(bind(Side.MN, 2000), moved, NOW + 15)
    assert out.addr == moved and core.sessions[SID].endpoints[Side.MN] == moved
    assert core.counters["binds"] == 2


def test_data_forwarded_unchanged_both_ways_across_families(core: RelayCore) -> None:
    bound(core)
    pkt = data()
    assert core.handle(pkt, A, NOW + 1) == [Outgoing(pkt, B)]  # v4 side -> v6 side
    back = data(b"reply")
    assert core.handle(back, B, NOW + 2) == [Outgoing(back, A)]  # v6 side -> v4 side
    assert core.counters["relayed_packets"] == 2
    assert core.counters["relayed_bytes"] == len(pkt) + len(back)


def test_data_follows_a_rebinding(core: RelayCore) -> None:
    bound(core)
    moved: Endpoint = ("198.51.100.77", 52000)
    core.handle(bind(Side.MN, 2000), moved, NOW + 1)
    assert core.handle(data(), A, NOW + 2) == []  # the old mapping is no longer the MN
    assert core.counters["wrong_source"] == 1
    assert core.handle(data(), moved, NOW + 2)[0].addr == B
    assert core.handle(data(), B, NOW + 3)[0].addr == moved


def test_unknown_session_dropped_and_counted(core: RelayCore) -> None:
    bound(core)
    assert core.handle(data(sid=b"\x99" * 8), A, NOW) == []
    assert core.handle(bind(Side.MN, 5000, sid=b"\x99" * 8), A, NOW) == []
    assert core.counters["unknown_session"] == 2


def test_wrong_source_dropped_and_counted(core: RelayCore) -> None:
    bound(core)
    stranger: Endpoint = ("203.0.113.5", 41001)  # same address, other port
    assert core.handle(data(), stranger, NOW) == []
    assert core.counters["wrong_source"] == 1 and core.counters["relayed_packets"] == 0


def test_data_before_the_peer_bound_is_dropped(core: RelayCore) -> None:
    open_session(core)
    core.handle(bind(Side.MN, 1000), A, NOW)
    assert core.handle(data(), A, NOW) == []
    assert core.counters["no_peer"] == 1


def test_bad_mac_dropped_and_counted(core: RelayCore) -> None:
    open_session(core)
    assert core.handle(bind(Side.MN, 1000, key=b"\x44" * 32), A, NOW) == []
    tampered = bytearray(bind(Side.MN, 1000))
    tampered[-1] ^= 1
    assert core.handle(bytes(tampered), A, NOW) == []
    assert core.counters["bad_mac"] == 2 and core.sessions[SID].endpoints == [None, None]


def test_replayed_bind_dropped_and_counted(core: RelayCore) -> None:
    open_session(core)
    first = bind(Side.MN, 1000)
    core.handle(first, A, NOW)
    attacker: Endpoint = ("192.0.2.66", 6666)
    assert core.handle(first, attacker, NOW + 1) == []  # same timestamp: replay
    assert core.handle(bind(Side.MN, 999), attacker, NOW + 1) == []  # older: replay
    assert core.counters["replayed_bind"] == 2
    assert core.sessions[SID].endpoints[Side.MN] == A
    # the other side has its own timestamps
    assert core.handle(bind(Side.CN, 5), B, NOW + 1) != []


def test_a_side_cannot_bind_at_the_other_sides_endpoint(core: RelayCore) -> None:
    open_session(core)
    core.handle(bind(Side.MN, 1000), A, NOW)
    assert core.handle(bind(Side.CN, 1000), A, NOW) == []  # would loop packets back to A
    assert core.counters["wrong_source"] == 1


def test_malformed_dropped_and_counted(core: RelayCore) -> None:
    for raw in (b"", b"\x07", b"\x05" + b"\0" * 10, b"\x04" + b"\0" * 40, b"\x08\x00"):
        assert core.handle(raw, A, NOW) == []
    assert core.counters["malformed"] == 5


def test_idle_sessions_expire(core: RelayCore) -> None:
    bound(core)
    core.handle(data(), A, NOW + 100)  # activity keeps it alive
    core.tick(NOW + 200)
    assert SID in core.sessions
    core.tick(NOW + 100 + 120)
    assert SID not in core.sessions
    assert core.counters["expired"] == 1 and core.counters["sessions"] == 0
    assert core.handle(data(), A, NOW + 221) == []
    assert core.counters["unknown_session"] == 1


def test_idle_expiry_applies_before_the_next_tick(core: RelayCore) -> None:
    bound(core)
    assert core.handle(data(), A, NOW + 121) == []
    assert core.counters["unknown_session"] == 1 and core.counters["expired"] == 1


def test_absolute_lifetime_from_nms(core: RelayCore) -> None:
    open_session(core, lifetime=30)
    core.handle(bind(Side.MN, 1), A, NOW)
    core.handle(bind(Side.CN, 1), B, NOW)
    for t in range(1, 30, 5):
        assert core.handle(data(), A, NOW + t) != []
    assert core.handle(data(), A, NOW + 30) == []
    assert SID not in core.sessions


def test_renewal_extends_the_lifetime(core: RelayCore) -> None:
    nms = FakeNms()
    open_session(core, nms, lifetime=30)
    open_session(core, nms, lifetime=100, now=NOW + 20)
    assert core.sessions[SID].expires_at == NOW + 120


def test_restart_forgets_sessions(core: RelayCore) -> None:
    bound(core)
    restarted = RelayCore(TRS_ID, TRS_KEY, PUBLIC, nms=[NMS])
    assert restarted.handle(data(), A, NOW + 1) == []
    assert restarted.handle(bind(Side.MN, 2000), A, NOW + 1) == []
    assert restarted.counters["unknown_session"] == 2
    # NMS asks again; a restarted NMS-facing counter continues above the old ones
    assert open_session(restarted, FakeNms(), now=NOW + 2).ok == 1


def test_hello_every_interval_to_every_nms() -> None:
    nms2: Endpoint = ("2001:db8::1", 4502)
    core = RelayCore(TRS_ID, TRS_KEY, PUBLIC, nms=[NMS, nms2], max_sessions=50)
    out = core.tick(NOW)
    assert [o.addr for o in out] == [NMS, nms2]
    header = relay.ControlHeader.parse(out[0].data)
    assert header.key_id == TRS_ID and header.direction is Direction.TO_NMS
    hello = FakeNms().read(out[:1])[0]
    assert isinstance(hello, relay.TrsHello)
    assert (hello.trs_id, hello.endpoints, hello.active_sessions, hello.capacity) == (
        TRS_ID,
        PUBLIC,
        0,
        50,
    )
    assert core.tick(NOW + 4.9) == []
    assert len(core.tick(NOW + 5.0)) == 2


def test_hello_ack_is_recorded(core: RelayCore) -> None:
    nms = FakeNms()
    core.handle(nms.ch.seal(relay.TrsHelloAck(1), NOW), NMS, NOW)
    assert core.nms_last_ack == {NMS: NOW}
    assert core.status(NOW + 3)["nms"][0]["last_ack_age"] == 3.0


def test_forged_or_replayed_control_is_rejected(core: RelayCore) -> None:
    wrong_key = FakeNms(key=b"\x55" * 32)
    assert core.handle(wrong_key.request(), NMS, NOW) == []
    assert core.counters["control_auth_failed"] == 1
    other_trs = FakeNms(trs_id=8)
    assert core.handle(other_trs.request(), NMS, NOW) == []
    assert core.counters["control_auth_failed"] == 2
    nms = FakeNms()
    req = nms.request()
    assert core.handle(req, ("192.0.2.99", 4502), NOW) == []  # not a configured NMS
    assert core.counters["control_rejected"] == 1
    assert core.handle(req, NMS, NOW) != []
    assert core.handle(req, NMS, NOW) == []
    assert core.counters["control_replayed"] == 1
    assert core.sessions == {SID: core.sessions[SID]}


def test_payload_never_logged_nor_stored(core: RelayCore, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    bound(core)
    pkt = data()
    core.handle(pkt, A, NOW + 1)
    core.handle(pkt, ("192.0.2.66", 1), NOW + 1)  # wrong source: logged at debug
    core.handle(data(sid=b"\x77" * 8), A, NOW + 2)  # unknown session
    core.handle(pkt, A, NOW + 500)  # expired
    core.tick(NOW + 600)
    assert caplog.records  # something was logged ...
    text = caplog.text + repr([r.args for r in caplog.records])
    assert MARKER.decode() not in text and MARKER.hex() not in text  # ... but never the payload
    assert not _contains(core, MARKER, set())
    assert MARKER.decode() not in repr(core.status(NOW + 600))


def _contains(obj: object, needle: bytes, seen: set[int]) -> bool:
    """Does any bytes-like value reachable from ``obj`` contain ``needle``?"""
    if id(obj) in seen:
        return False
    seen.add(id(obj))
    if isinstance(obj, bytes | bytearray | memoryview):
        return needle in bytes(obj)
    if isinstance(obj, str):
        return needle.decode() in obj
    if isinstance(obj, dict):
        return any(_contains(k, needle, seen) or _contains(v, needle, seen) for k, v in obj.items())
    if isinstance(obj, list | tuple | set | frozenset):
        return any(_contains(v, needle, seen) for v in obj)
    if dataclasses.is_dataclass(obj) or hasattr(obj, "__dict__"):
        fields = getattr(obj, "__dict__", {})
        return any(_contains(v, needle, seen) for v in fields.values())
    return False
