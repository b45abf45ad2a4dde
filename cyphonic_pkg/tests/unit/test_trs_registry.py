"""NMS-side TRS registry driven without sockets, against real TRS cores."""

from __future__ import annotations

import pytest

from cyphonic.errors import CryptoError
from cyphonic.nms.trs_registry import RelayResult, TrsRegistry
from cyphonic.trs.core import ControlChannel, Outgoing, RelayCore
from cyphonic.wire import relay
from cyphonic.wire.signaling import Direction, Endpoint

NOW = 1_800_000_000.0
KEY = bytes(range(32))
NMS: Endpoint = ("192.0.2.1", 4502)
SID = b"\x11" * 8
RELAY_KEY = b"\x22" * 32


class Trs:
    """A TRS core at ``control`` (its socket address as NMS sees it)."""

    def __init__(self, trs_id: int, capacity: int = 100, v6: bool = True) -> None:
        self.control: Endpoint = (f"192.0.2.{trs_id}", 4503)
        public: list[Endpoint] = [self.control]
        if v6:
            public.append((f"2001:db8::{trs_id}", 4503))
        self.core = RelayCore(trs_id, KEY, public, nms=[NMS], max_sessions=capacity)

    def hello(self, reg: TrsRegistry, now: float) -> list[Outgoing]:
        self.core._next_hello = 0.0
        (out,) = self.core.tick(now)
        answers, results = reg.handle(out.data, self.control, now)
        assert results == []
        return answers

    def deliver(self, out: list[Outgoing], now: float) -> list[Outgoing]:
        """Hand the registry's datagrams for this TRS to its core."""
        replies = []
        for o in out:
            if o.addr == self.control:
                replies += self.core.handle(o.data, NMS, now)
        return replies


def roundtrip(reg: TrsRegistry, trs: Trs, out: list[Outgoing], now: float) -> list[RelayResult]:
    results: list[RelayResult] = []
    for reply in trs.deliver(out, now):
        answers, res = reg.handle(reply.data, trs.control, now)
        assert answers == []
        results += res
    return results


@pytest.fixture
def reg() -> TrsRegistry:
    return TrsRegistry(KEY)


def test_hello_registers_and_is_acked(reg: TrsRegistry) -> None:
    trs = Trs(3)
    answers = trs.hello(reg, NOW)
    assert [a.addr for a in answers] == [trs.control]
    assert trs.deliver(answers, NOW) == []
    assert trs.core.nms_last_ack == {NMS: NOW}
    inst = reg.instances[3]
    assert inst.control == trs.control
    assert inst.endpoints == (("192.0.2.3", 4503), ("2001:db8::3", 4503))
    assert (inst.active_sessions, inst.capacity, inst.last_seen) == (0, 100, NOW)
    assert inst.endpoint_for(6) == ("2001:db8::3", 4503)
    assert reg.status(NOW)["instances"][0]["trs_id"] == 3


def test_pick_least_loaded_ties_to_lowest_id(reg: TrsRegistry) -> None:
    assert reg.pick(NOW) is None
    a, b, c = Trs(5, capacity=100), Trs(4, capacity=100), Trs(6, capacity=10)
    for t in (a, b, c):
        t.hello(reg, NOW)
    picked = reg.pick(NOW)
    assert picked is not None and picked.trs_id == 4  # all empty: lowest id
    reg.instances[4].active_sessions = 20  # 0.2
    reg.instances[5].active_sessions = 10  # 0.1
    reg.instances[6].active_sessions = 1  # 0.1, but higher id
    picked = reg.pick(NOW)
    assert picked is not None and picked.trs_id == 5
    reg.instances[5].active_sessions = 100  # full: never picked
    picked = reg.pick(NOW)
    assert picked is not None and picked.trs_id == 6


def test_pick_by_address_family(reg: TrsRegistry) -> None:
    Trs(3, v6=False).hello(reg, NOW)
    Trs(9).hello(reg, NOW)
    picked = reg.pick(NOW, families=(4, 6))
    assert picked is not None and picked.trs_id == 9
    picked = reg.pick(NOW, families=(4,))
    assert picked is not None and picked.trs_id == 3


def test_requests_spread_before_the_next_hello(reg: TrsRegistry) -> None:
    a, b = Trs(1), Trs(2)
    a.hello(reg, NOW)
    b.hello(reg, NOW)
    chosen = []
    for i in range(4):
        t = reg.pick(NOW)
        assert t is not None
        chosen.append(t.trs_id)
        reg.request_relay(t, bytes([i]) * 8, RELAY_KEY, 600, NOW)
    assert chosen == [1, 2, 1, 2]


def test_silent_trs_is_forgotten(reg: TrsRegistry) -> None:
    a, b = Trs(1), Trs(2)
    a.hello(reg, NOW)
    b.hello(reg, NOW + 10)
    assert [t.trs_id for t in reg.alive(NOW + 14)] == [1, 2]
    picked = reg.pick(NOW + 15)
    assert picked is not None and picked.trs_id == 2
    reg.tick(NOW + 15)
    assert list(reg.instances) == [2]
    a.hello(reg, NOW + 16)  # back again
    assert sorted(reg.instances) == [1, 2]


def test_request_response(reg: TrsRegistry) -> None:
    trs = Trs(3)
    trs.hello(reg, NOW)
    inst = reg.pick(NOW)
    assert inst is not None
    out = reg.request_relay(inst, SID, RELAY_KEY, 600, NOW)
    assert [o.addr for o in out] == [trs.control]
    (result,) = roundtrip(reg, trs, out, NOW + 0.01)
    assert result == RelayResult(SID, 3, True, (("192.0.2.3", 4503), ("2001:db8::3", 4503)))
    assert reg.pending == {} and SID in trs.core.sessions
    assert trs.core.sessions[SID].relay_key == RELAY_KEY


def test_retransmits_with_backoff_then_duplicates_ignored(reg: TrsRegistry) -> None:
    trs = Trs(3)
    trs.hello(reg, NOW)
    inst = reg.instances[3]
    first = reg.request_relay(inst, SID, RELAY_KEY, 600, NOW)
    assert reg.request_relay(inst, SID, RELAY_KEY, 600, NOW) == []  # already pending
    sent = {0.0: first}
    for t in (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 1.75, 2.0, 3.0, 3.75, 4.0):
        out, results = reg.tick(NOW + t)
        assert results == []
        if out:
            sent[t] = out
    assert sorted(sent) == [0.0, 0.25, 0.75, 1.75, 3.75]  # +0.25, +0.5, +1, +2
    # every copy reaches the TRS; the first answer wins, the rest are duplicates
    answered: list[RelayResult] = []
    for out in sent.values():
        answered += roundtrip(reg, trs, out, NOW + 4.1)
    assert [r.ok for r in answered] == [True]
    assert reg.counters["duplicates"] == len(sent) - 1
    assert trs.core.counters["sessions_created"] == 1


def test_failure_after_deadline(reg: TrsRegistry) -> None:
    trs = Trs(3)
    trs.hello(reg, NOW)
    reg.request_relay(reg.instances[3], SID, RELAY_KEY, 600, NOW)
    out, results = reg.tick(NOW + 4.9)
    assert results == []
    out, results = reg.tick(NOW + 5.0)
    assert out == [] and results == [RelayResult(SID, 3, False, error="timeout")]
    assert reg.pending == {}
    assert reg.tick(NOW + 6) == ([], [])  # reported once


def test_refusal_is_reported(reg: TrsRegistry) -> None:
    trs = Trs(3, capacity=1)
    trs.hello(reg, NOW)
    inst = reg.instances[3]
    assert roundtrip(reg, trs, reg.request_relay(inst, SID, RELAY_KEY, 600, NOW), NOW)[0].ok
    (result,) = roundtrip(reg, trs, reg.request_relay(inst, b"\x12" * 8, RELAY_KEY, 600, NOW), NOW)
    assert result == RelayResult(b"\x12" * 8, 3, False, error="refused")


def test_forged_control_datagrams_rejected(reg: TrsRegistry) -> None:
    trs = Trs(3)
    trs.hello(reg, NOW)
    inst = reg.instances[3]
    reg.request_relay(inst, SID, RELAY_KEY, 600, NOW)
    txid = reg.pending[SID].txid
    forged_response = relay.RelayResponse(txid, session_id=SID, endpoints=(("6.6.6.6", 1),))
    # sealed with a wrong key
    bad = ControlChannel(3, b"\x66" * 32, Direction.TO_NMS)
    assert reg.handle(bad.seal(forged_response, NOW + 1), trs.control, NOW + 1) == ([], [])
    # a hello claiming another id than the channel's key id
    other = ControlChannel(4, b"\x66" * 32, Direction.TO_NMS)
    fake_hello = relay.TrsHello(1, trs_id=4, endpoints=(("6.6.6.6", 1),), capacity=1000)
    assert reg.handle(other.seal(fake_hello, NOW), ("6.6.6.6", 1), NOW) == ([], [])
    assert reg.counters["auth_failed"] == 2
    # a datagram in the NMS -> TRS direction, or truncated, or plain garbage
    mine = ControlChannel(3, KEY, Direction.TO_NODE).seal(forged_response, NOW)
    assert reg.handle(mine, trs.control, NOW) == ([], [])
    assert reg.handle(b"\x08" + b"\0" * 10, trs.control, NOW) == ([], [])
    assert reg.handle(b"\x01" + b"\0" * 40, trs.control, NOW) == ([], [])
    assert reg.counters["malformed"] == 3
    # a replayed hello
    trs.core._next_hello = 0.0
    (hello,) = trs.core.tick(NOW + 1)
    assert reg.handle(hello.data, trs.control, NOW + 1)[0] != []
    assert reg.handle(hello.data, trs.control, NOW + 1) == ([], [])
    assert reg.counters["replayed"] == 1
    assert SID in reg.pending and list(reg.instances) == [3]


def test_hello_with_mismatched_trs_id_is_ignored(reg: TrsRegistry) -> None:
    ch = ControlChannel(3, KEY, Direction.TO_NMS)
    hello = relay.TrsHello(1, trs_id=4, endpoints=(("192.0.2.4", 4503),), capacity=10)
    assert reg.handle(ch.seal(hello, NOW), ("192.0.2.3", 4503), NOW) == ([], [])
    assert reg.instances == {} and reg.counters["malformed"] == 1


def test_old_hello_replayed_after_the_trs_was_forgotten(reg: TrsRegistry) -> None:
    trs = Trs(3)
    trs.core._next_hello = 0.0
    (hello,) = trs.core.tick(NOW)
    reg.handle(hello.data, trs.control, NOW)
    reg.tick(NOW + 60)
    assert reg.instances == {}
    assert reg.handle(hello.data, trs.control, NOW + 60) == ([], [])
    assert reg.instances == {} and reg.counters["replayed"] == 1


def test_wrong_key_length_refused() -> None:
    with pytest.raises(CryptoError, match="32 bytes"):
        TrsRegistry(b"short")
