"""Router Advertisements: exact flags and options, schedule, solicitations, withdrawal, fuzzing.

RAs are dissected with scapy (an independent decoder) as well as with our own parser.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    ICMPv6ND_NS,
    ICMPv6ND_RA,
    ICMPv6ND_RS,
    ICMPv6NDOptDNSSL,
    ICMPv6NDOptMTU,
    ICMPv6NDOptPrefixInfo,
    ICMPv6NDOptRDNSS,
    ICMPv6NDOptSrcLLAddr,
    IPv6,
)
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from cyphonic.adapter.gn import AdapterAddressing
from cyphonic.adapter.nd_proxy import Icmpv6Frame, build_icmpv6_frame
from cyphonic.adapter.router_advertisement import (
    MAX_INITIAL_RTR_ADVERT_INTERVAL,
    MAX_RA_DELAY_TIME,
    MIN_DELAY_BETWEEN_RAS,
    UNICAST_BURST,
    RaSender,
    RouterAdvertisement,
    RouterSolicitation,
    decode_domain_names,
    encode_domain_names,
)
from cyphonic.errors import ConfigError, DecodeError

ADAPTER_MAC = "02:cd:00:00:00:01"
ROUTER_LL = "fe80::cd:1"
GN_MAC, GN_LL = "02:cd:00:00:00:11", "fe80::cd:11"
ADDRESSING = AdapterAddressing(
    downlink_mac=ADAPTER_MAC,
    pool4=ipaddress.IPv4Network("10.77.0.0/24"),
    pool6=ipaddress.IPv6Network("fd43:5950::/64"),
    router4=ipaddress.IPv4Address("10.77.0.1"),
    router6_ll=ipaddress.IPv6Address(ROUTER_LL),
    dns6=ipaddress.IPv6Address("fd43:5950::1"),
    domain="cyphonic.test",
)


def sender(**kwargs: object) -> RaSender:
    kwargs.setdefault("rng", random.Random(7))
    return RaSender(ADDRESSING, **kwargs)  # type: ignore[arg-type]


def rs(
    *,
    src: str = GN_LL,
    eth_src: str = GN_MAC,
    eth_dst: str = "33:33:00:00:00:02",
    dst: str = "ff02::2",
    sllao: str | None = "eth",
    hlim: int = 255,
    code: int = 0,
) -> bytes:
    pkt = Ether(src=eth_src, dst=eth_dst) / IPv6(src=src, dst=dst, hlim=hlim)
    pkt /= ICMPv6ND_RS(code=code)
    if sllao is not None:
        pkt /= ICMPv6NDOptSrcLLAddr(lladdr=eth_src if sllao == "eth" else sllao)
    return bytes(pkt)


def parse_ra(frame: bytes) -> tuple[Icmpv6Frame, RouterAdvertisement]:
    pkt = Icmpv6Frame.parse(frame)
    assert pkt is not None and pkt.checksum_ok()
    return pkt, RouterAdvertisement.parse(pkt.message)


# --------------------------------------------------------------------------------------------
# Contents


def test_exact_bytes_of_the_default_advertisement() -> None:
    frame = sender().periodic(0.0)[0]
    ra = Ether(frame)
    cksum = ra[ICMPv6ND_RA].cksum
    expected = "".join(
        [
            "333300000001",  # all-nodes multicast MAC (RFC 2464 §7)
            "02cd00000001",  # the adapter's MAC
            "86dd",
            "60000000",
            "0068",  # payload length 104
            "3a",  # ICMPv6
            "ff",  # hop limit 255 (RFC 4861 §6.1.2)
            "fe800000000000000000000000cd0001",  # router6_ll
            "ff020000000000000000000000000001",  # ff02::1
            # RFC 4861 §4.2
            "86",  # type 134
            "00",  # code 0
            f"{cksum:04x}",
            "40",  # Cur Hop Limit 64
            "c0",  # M=1 O=1 H=0 Prf=00 (medium)
            "0000",  # Router Lifetime 0: not a default router
            "00000000",  # Reachable Time unspecified
            "00000000",  # Retrans Timer unspecified
            # §4.6.1 Source Link-Layer Address
            "0101",
            "02cd00000001",
            # §4.6.2 Prefix Information
            "0304",
            "40",  # /64
            "80",  # L=1 A=0
            "00278d00",  # valid 2592000 s (AdvValidLifetime default)
            "00093a80",  # preferred 604800 s (AdvPreferredLifetime default)
            "00000000",
            "fd435950000000000000000000000000",
            # RFC 8106 §5.1 RDNSS
            "1903",
            "0000",
            "00000708",  # 1800 s = 3 x MaxRtrAdvInterval
            "fd435950000000000000000000000001",
            # RFC 8106 §5.2 DNSSL: "cyphonic.test" as labels, zero-padded to 8 octets
            "1f03",
            "0000",
            "00000708",
            "08" + b"cyphonic".hex() + "04" + b"test".hex() + "00",  # 15 octets of names
            "00",  # padding: 2 + 6 + 15 + 1 = 24 octets, option length 3
        ]
    )
    assert frame.hex() == expected
    del ra[ICMPv6ND_RA].cksum
    assert Ether(bytes(ra))[ICMPv6ND_RA].cksum == cksum  # scapy computes the same checksum


def test_scapy_reads_the_flags_and_options() -> None:
    ra = Ether(sender(mtu=1420).periodic(0.0)[0])
    assert ra[IPv6].src == ROUTER_LL and ra[IPv6].dst == "ff02::1" and ra[IPv6].hlim == 255
    adv = ra[ICMPv6ND_RA]
    assert (adv.chlim, adv.M, adv.O, adv.H, adv.prf, adv.routerlifetime) == (64, 1, 1, 0, 0, 0)
    assert ra[ICMPv6NDOptSrcLLAddr].lladdr == ADAPTER_MAC
    assert ra[ICMPv6NDOptMTU].mtu == 1420
    pio = ra[ICMPv6NDOptPrefixInfo]
    assert (pio.prefix, pio.prefixlen, pio.L, pio.A) == ("fd43:5950::", 64, 1, 0)
    assert ra[ICMPv6NDOptRDNSS].dns == ["fd43:5950::1"]
    assert ra[ICMPv6NDOptDNSSL].searchlist == ["cyphonic.test."]


def test_our_parser_round_trips_the_advertisement() -> None:
    s = sender(mtu=1400, router_lifetime=1800)
    _, ra = parse_ra(s.periodic(0.0)[0])
    assert ra == s.advertisement
    assert ra.router_lifetime == 1800 and ra.mtu == 1400
    assert RouterAdvertisement.parse(ra.pack()) == ra


def test_domain_name_encoding() -> None:
    assert encode_domain_names(["cyphonic.test."]) == b"\x08cyphonic\x04test\x00"
    assert decode_domain_names(b"\x08cyphonic\x04test\x00\x00\x00") == ("cyphonic.test",)
    assert decode_domain_names(b"\x01a\x00\x01b\x00") == ("a", "b")
    for bad in (b"\x08cyph", b"\x01a\x00\x05", b"\x40" + b"a" * 64 + b"\x00"):
        with pytest.raises(DecodeError):
            decode_domain_names(bad)
    with pytest.raises(ValueError):
        encode_domain_names(["a..b"])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"interval": (200.0, 1801.0)},
        {"interval": (2.0, 600.0)},
        {"interval": (500.0, 600.0)},
        {"router_lifetime": 100},
        {"router_lifetime": 9001},
        {"mtu": 1279},
        {"prefix_valid_lifetime": 10, "prefix_preferred_lifetime": 20},
    ],
)
def test_bad_configuration_is_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        sender(**kwargs)


# --------------------------------------------------------------------------------------------
# Unsolicited schedule (§6.2.4)


def test_periodic_schedule_starts_fast_then_uses_the_interval() -> None:
    s = sender(interval=(200.0, 600.0))
    assert s.deadline == float("-inf")
    times = []
    now = 0.0
    for _ in range(8):
        frames = s.periodic(now)
        assert len(frames) == 1
        assert Ether(frames[0])[IPv6].dst == "ff02::1"
        times.append(now)
        assert s.periodic(now) == []  # nothing more at the same instant
        assert s.periodic(s.deadline - 0.001) == []
        now = s.deadline
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(g <= MAX_INITIAL_RTR_ADVERT_INTERVAL for g in gaps[:2])  # first 3 RAs
    assert all(200.0 <= g <= 600.0 for g in gaps[2:])
    assert s.stats.unsolicited == 8


# --------------------------------------------------------------------------------------------
# Solicitations (§6.2.6)


def test_rs_is_answered_at_once_with_a_unicast_ra() -> None:
    s = sender()
    s.periodic(0.0)
    out = s.handle(rs(), 10.0)
    assert len(out) == 1
    ra = Ether(out[0])
    assert ra[Ether].dst == GN_MAC and ra[Ether].src == ADAPTER_MAC
    assert ra[IPv6].dst == GN_LL and ra[IPv6].src == ROUTER_LL and ra[IPv6].hlim == 255
    _, parsed = parse_ra(out[0])
    assert parsed == s.advertisement
    assert s.stats.solicited_unicast == 1 and s.stats.solicitations == 1


def test_rs_without_sllao_is_answered_to_the_ethernet_source() -> None:
    s = sender()
    out = s.handle(rs(sllao=None), 1.0)
    assert Ether(out[0])[Ether].dst == GN_MAC


def test_rs_answers_are_rate_limited_per_host() -> None:
    s = sender()
    s.periodic(0.0)
    assert len(s.handle(rs(), 5.0)) == 1
    assert s.handle(rs(), 6.0) == []  # within MIN_DELAY_BETWEEN_RAS: a delayed multicast
    assert s.stats.rate_limited == 1
    assert 6.0 <= s.deadline <= 6.0 + MAX_RA_DELAY_TIME
    assert s.handle(rs(src="fe80::cd:12", eth_src="02:cd:00:00:00:12"), 6.0) != []
    assert len(s.handle(rs(), 5.0 + MIN_DELAY_BETWEEN_RAS)) == 1


def test_rs_answers_are_rate_limited_overall() -> None:
    s = sender()
    s.periodic(0.0)
    answered = sum(len(s.handle(rs(src=f"fe80::{i:x}"), 50.0)) for i in range(1, 100))
    assert answered == UNICAST_BURST
    assert s.stats.rate_limited == 99 - UNICAST_BURST
    assert len(s.handle(rs(src="fe80::1:1"), 51.0)) == 1  # a new second


def test_rs_from_unspecified_gets_one_delayed_multicast_ra() -> None:
    s = sender()
    s.periodic(0.0)  # the first RA at t=0; the next unsolicited one is <= 16 s later
    assert s.handle(rs(src="::", sllao=None), 1.0) == []
    # §6.2.6: no sooner than MIN_DELAY_BETWEEN_RAS after the last multicast RA, plus the delay
    assert MIN_DELAY_BETWEEN_RAS <= s.deadline <= MIN_DELAY_BETWEEN_RAS + MAX_RA_DELAY_TIME
    due = s.deadline
    assert s.handle(rs(src="::", sllao=None), 1.2) == []
    assert s.deadline == due  # several solicitations share one answer
    frames = s.periodic(due)
    assert len(frames) == 1 and Ether(frames[0])[IPv6].dst == "ff02::1"
    assert s.stats.solicited_multicast == 1
    assert s.deadline >= due + 3.0  # the unsolicited timer was reset


def test_rs_from_unspecified_long_after_the_last_ra_waits_at_most_the_delay() -> None:
    s = sender(interval=(1000.0, 1800.0))
    now = 0.0
    for _ in range(3):  # the initial RAs; the next unsolicited one is >= 1000 s away
        s.periodic(now)
        now = s.deadline if s.deadline - now <= MAX_INITIAL_RTR_ADVERT_INTERVAL else now
    assert s.deadline - now >= 1000.0
    s.handle(rs(src="::", sllao=None), now + 10.0)
    assert now + 10.0 <= s.deadline <= now + 10.0 + MAX_RA_DELAY_TIME


def test_strict_mode_answers_only_with_delayed_multicast() -> None:
    s = sender(solicited_unicast=False)
    s.periodic(0.0)
    assert s.handle(rs(), 5.0) == []
    assert 5.0 <= s.deadline <= 5.0 + MAX_RA_DELAY_TIME
    assert len(s.periodic(s.deadline)) == 1


def fix_checksum(frame: bytes) -> bytes:
    pkt = Icmpv6Frame.parse(frame)
    assert pkt is not None
    return pkt.pack()


MALFORMED = {
    "hop limit 64": rs(hlim=64),
    "code 1": rs(code=1),
    "bad checksum": rs()[:56] + b"\x00\x01" + rs()[58:],
    "unspecified source with sllao": rs(src="::"),
    "option length 0": fix_checksum(
        bytes(
            Ether(src=GN_MAC, dst="33:33:00:00:00:02")
            / IPv6(src=GN_LL, dst="ff02::2", hlim=255)
            / ICMPv6ND_RS()
            / Raw(b"\x01\x00" + bytes(6))
        )
    ),
    "short": build_icmpv6_frame(
        bytes.fromhex("333300000002"),
        bytes.fromhex("02cd00000011"),
        ipaddress.IPv6Address(GN_LL).packed,
        ipaddress.IPv6Address("ff02::2").packed,
        bytes((133, 0, 0, 0, 0, 0)),
    ),
    "truncated": rs()[:-3],
}


@pytest.mark.parametrize("frame", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_rs_is_dropped_and_counted(frame: bytes) -> None:
    s = sender()
    s.periodic(0.0)
    deadline = s.deadline
    assert s.handle(frame, 5.0) == []
    assert s.stats.malformed == 1 and s.stats.solicitations == 0
    assert s.deadline == deadline


@pytest.mark.parametrize(
    "frame",
    [
        rs(eth_src=ADAPTER_MAC),  # our own, seen by AF_PACKET
        rs(eth_dst="02:cd:00:00:00:12", dst="fe80::cd:12"),  # unicast to someone else
        bytes(Ether(src=GN_MAC) / IPv6(src=GN_LL, dst="ff02::2") / ICMPv6EchoRequest()),
        bytes(Ether(src=GN_MAC) / IPv6(src=GN_LL, dst="ff02::1:ff00:1", hlim=255) / ICMPv6ND_NS()),
        b"",
    ],
    ids=["own", "other-host", "echo", "ns", "empty"],
)
def test_other_frames_are_not_answered(frame: bytes) -> None:
    s = sender()
    assert s.handle(frame, 1.0) == []
    assert s.stats.solicitations == 0 and s.stats.malformed == 0


# --------------------------------------------------------------------------------------------
# Withdrawal (§6.2.5)


def test_withdraw_sends_zero_lifetimes_then_silence() -> None:
    s = sender(mtu=1420)
    s.periodic(0.0)
    frames = s.withdraw()
    assert len(frames) == 1
    pkt, ra = parse_ra(frames[0])
    assert pkt.ip_dst == ipaddress.IPv6Address("ff02::1").packed
    assert ra.router_lifetime == 0
    assert [(p.valid_lifetime, p.preferred_lifetime, p.on_link) for p in ra.prefixes] == [
        (0, 0, True)
    ]
    assert ra.rdnss_lifetime == 0 and ra.dnssl_lifetime == 0
    assert ra.managed and ra.other and ra.mtu == 1420
    scapy_ra = Ether(frames[0])
    assert scapy_ra[ICMPv6NDOptPrefixInfo].validlifetime == 0
    assert s.periodic(1e6) == [] and s.handle(rs(), 10.0) == []
    assert s.deadline == float("inf")


# --------------------------------------------------------------------------------------------
# Fuzzing

FUZZ = sender()
FUZZ.periodic(0.0)
VALID = [rs(), rs(sllao=None), rs(src="::", sllao=None), rs(src="fd43:5950::11")]


def check_outcome(out: list[bytes]) -> None:
    assert isinstance(out, list) and len(out) <= 1
    for frame in out:
        _, ra = parse_ra(frame)
        assert ra == FUZZ.advertisement


@given(st.binary(max_size=160), st.floats(0, 1e6))
@settings(max_examples=1500, deadline=None)
def test_fuzz_random_frames_never_raise(frame: bytes, now: float) -> None:
    check_outcome(FUZZ.handle(frame, now))
    FUZZ.periodic(now)
    assert FUZZ.stats.internal_error == 0


@given(
    st.sampled_from(VALID),
    st.lists(st.tuples(st.integers(0, 80), st.integers(0, 255)), min_size=1, max_size=6),
    st.integers(0, 80),
    st.booleans(),
    st.floats(0, 1e6),
)
@settings(max_examples=2000, deadline=None)
def test_fuzz_mutated_solicitations_never_raise(
    base: bytes, flips: list[tuple[int, int]], cut: int, fix: bool, now: float
) -> None:
    frame = bytearray(base)
    for pos, value in flips:
        if pos < len(frame):
            frame[pos] = value
    data = bytes(frame[: max(cut, 1)]) if cut < len(frame) else bytes(frame)
    if fix:
        try:
            parsed = Icmpv6Frame.parse(data)
        except DecodeError:
            parsed = None
        if parsed is not None:
            data = parsed.pack()
    check_outcome(FUZZ.handle(data, now))
    assert FUZZ.stats.internal_error == 0


@given(st.binary(max_size=120))
@settings(max_examples=500, deadline=None)
def test_fuzz_ra_parser_raises_only_decode_error(message: bytes) -> None:
    with contextlib.suppress(DecodeError):
        RouterAdvertisement.parse(bytes((134, 0)) + message)
    with contextlib.suppress(DecodeError):
        RouterSolicitation.parse(bytes((133, 0)) + message)
