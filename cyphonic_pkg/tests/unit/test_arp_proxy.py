"""ARP proxy core (RFC 826 / RFC 1027 / RFC 5227) and the shared GN table it decides with.

Requests are built with scapy and replies dissected with it.
"""

from __future__ import annotations

import logging
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.l2 import ARP, Dot1Q, Ether

from cyphonic.adapter.arp_proxy import COUNTER_NAMES, ArpProxy
from cyphonic.adapter.gn import (
    AdapterAddressing,
    GeneralNode,
    GnTable,
    LogThrottle,
    link_local_from_mac,
    normalize_mac,
)
from cyphonic.errors import ConfigError

ADAPTER_MAC = "02:aa:00:00:00:01"
GN1 = GeneralNode(
    "02:00:00:00:00:10", "gn1.cyphonic.test", IPv4Address("10.64.0.10"), IPv6Address("fd00:64::10")
)
GN2 = GeneralNode(
    "02:00:00:00:00:11", "gn2.cyphonic.test", IPv4Address("10.64.0.11"), IPv6Address("fd00:64::11")
)
STRANGER = "02:00:00:00:00:99"
BCAST = "ff:ff:ff:ff:ff:ff"
PEER = "10.64.0.99"


@pytest.fixture
def addressing() -> AdapterAddressing:
    return AdapterAddressing.from_pools(
        ADAPTER_MAC, "10.64.0.0/16", "fd00:64::/64", "cyphonic.test"
    )


@pytest.fixture
def table() -> GnTable:
    return GnTable([GN1, GN2])


@pytest.fixture
def proxy(table: GnTable, addressing: AdapterAddressing) -> ArpProxy:
    return ArpProxy(table, addressing)


def who_has(
    target: str,
    *,
    mac: str = GN1.mac,
    sender_ip: str = "10.64.0.10",
    sha: str | None = None,
    eth_dst: str = BCAST,
    op: int = 1,
) -> bytes:
    return bytes(
        Ether(src=mac, dst=eth_dst)
        / ARP(op=op, hwsrc=sha or mac, psrc=sender_ip, hwdst="00:00:00:00:00:00", pdst=target)
    )


def answered(proxy: ArpProxy, frame: bytes) -> Any:
    out = proxy.handle(frame, 0.0)
    assert len(out) == 1, proxy.counters
    return Ether(out[0])


# --------------------------------------------------------------------------------------------
# What is answered


def test_answers_peer_vip_with_adapter_mac(proxy: ArpProxy) -> None:
    out = proxy.handle(who_has(PEER), 0.0)
    assert len(out) == 1 and len(out[0]) == 60  # padded to the Ethernet minimum (RFC 894)
    pkt = Ether(out[0])
    assert (pkt.src, pkt.dst) == (ADAPTER_MAC, GN1.mac)
    arp = pkt[ARP]
    assert arp.op == 2  # is-at (RFC 826)
    assert (arp.hwsrc, arp.psrc) == (ADAPTER_MAC, PEER)
    assert (arp.hwdst, arp.pdst) == (GN1.mac, "10.64.0.10")
    assert proxy.counters["answered_peer"] == 1 and proxy.counters["requests"] == 1


def test_answers_router4(proxy: ArpProxy) -> None:
    arp = answered(proxy, who_has("10.64.0.1"))[ARP]
    assert (arp.hwsrc, arp.psrc) == (ADAPTER_MAC, "10.64.0.1")
    assert proxy.counters["answered_router"] == 1


def test_router4_can_be_left_to_the_kernel(table: GnTable, addressing: AdapterAddressing) -> None:
    proxy = ArpProxy(table, addressing, answer_router4=False)
    assert proxy.handle(who_has("10.64.0.1"), 0.0) == []
    assert proxy.counters["router_left_to_kernel"] == 1
    assert len(proxy.handle(who_has(PEER), 0.0)) == 1


def test_unicast_request_to_adapter_is_answered(proxy: ArpProxy) -> None:
    """Linux re-validates a neighbour entry with a unicast request (NUD PROBE state)."""
    assert answered(proxy, who_has(PEER, eth_dst=ADAPTER_MAC))[ARP].psrc == PEER


@pytest.mark.parametrize(
    ("frame", "counter"),
    [
        (who_has("10.64.0.11"), "gn_target"),  # another GN answers for itself
        (who_has("10.64.0.10", sender_ip="10.64.0.10"), "gratuitous"),  # RFC 5227 §2.3
        (who_has("10.64.0.10", sender_ip="0.0.0.0"), "probes"),  # RFC 5227 §2.1.1
        (who_has(PEER, sender_ip="0.0.0.0"), "probes"),
        (who_has(PEER, mac=STRANGER, sender_ip="10.64.0.50"), "unknown_mac"),
        (who_has("10.64.0.1", mac=STRANGER, sender_ip="10.64.0.50"), "unknown_mac"),
        (who_has(PEER, sender_ip="10.64.0.77"), "wrong_sender_ip"),
        (who_has(PEER, sha=GN2.mac), "mac_mismatch"),
        (who_has(PEER, mac=STRANGER, sha=GN1.mac), "mac_mismatch"),
        (who_has("192.0.2.1"), "outside_pool"),
        (who_has("10.64.255.255"), "special_target"),
        (who_has("10.64.0.0"), "special_target"),
        (who_has(PEER, eth_dst="02:bb:00:00:00:02"), "not_for_us"),
        (who_has("10.64.0.10", op=2), "replies"),
        (who_has(PEER, op=3), "unsupported"),  # RARP request (RFC 903)
        (who_has(PEER)[:14] + b"\x00\x06" + who_has(PEER)[16:], "unsupported"),  # IEEE 802
        (bytes(Ether(src=GN1.mac, dst=BCAST, type=0x0800) / (b"\x45" * 40)), "not_arp"),
        (
            bytes(
                Ether(src=GN1.mac, dst=BCAST) / Dot1Q(vlan=5) / ARP(psrc="10.64.0.10", pdst=PEER)
            ),
            "not_arp",
        ),
        (who_has(PEER)[:41], "malformed"),
        (b"", "not_arp"),
    ],
    ids=[
        "gn-target",
        "gratuitous",
        "probe-own",
        "probe-peer",
        "unknown",
        "unknown-router",
        "wrong-ip",
        "sha-spoof",
        "stranger-spoof",
        "outside",
        "broadcast",
        "network",
        "other-mac",
        "reply",
        "rarp",
        "hwtype",
        "ipv4",
        "vlan",
        "truncated",
        "empty",
    ],
)
def test_not_answered(proxy: ArpProxy, frame: bytes, counter: str) -> None:
    assert proxy.handle(frame, 0.0) == []
    assert proxy.counters[counter] == 1
    assert proxy.counters["internal_errors"] == 0


def test_table_replacement_takes_effect(proxy: ArpProxy, table: GnTable) -> None:
    assert len(proxy.handle(who_has(PEER), 0.0)) == 1
    table.replace(
        [
            GN1,
            GN2,
            GeneralNode(
                "02:00:00:00:00:12",
                "gn3.cyphonic.test",
                IPv4Address(PEER),
                IPv6Address("fd00:64::12"),
            ),
        ]
    )
    assert proxy.handle(who_has(PEER), 1.0) == []
    assert proxy.counters["gn_target"] == 1
    table.replace([GN2])
    assert proxy.handle(who_has(PEER), 2.0) == []
    assert proxy.counters["unknown_mac"] == 1


def test_unknown_mac_logging_is_rate_limited(
    proxy: ArpProxy, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="cyphonic.adapter.arp_proxy"):
        for i in range(10):
            proxy.handle(who_has(PEER, mac=STRANGER, sender_ip="10.64.0.50"), float(i))
    assert proxy.counters["unknown_mac"] == 10
    assert len([r for r in caplog.records if STRANGER in r.getMessage()]) == 1


def test_latency_is_measured(proxy: ArpProxy) -> None:
    assert proxy.latency_summary() == {"count": 0}
    frame = who_has(PEER)
    for _ in range(200):
        proxy.handle(frame, 0.0)
    proxy.handle(who_has("10.64.0.11"), 0.0)  # not answered: not a latency sample
    summary = proxy.latency_summary()
    assert summary["count"] == 200
    assert 0 < summary["p50_us"] <= summary["p99_us"] <= summary["max_us"]
    assert summary["p50_us"] < 1000  # the paper's ARP processing took 320 µs on a Pi 4


def test_counters_have_stable_names(proxy: ArpProxy) -> None:
    assert tuple(proxy.counters) == COUNTER_NAMES


FUZZ = settings(
    max_examples=3000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@FUZZ
@given(st.binary(max_size=100))
def test_fuzz_random_bytes(proxy: ArpProxy, data: bytes) -> None:
    out = proxy.handle(data, 0.0)
    assert proxy.counters["internal_errors"] == 0
    for frame in out:  # whatever is answered is a well-formed reply from the adapter
        assert Ether(frame)[ARP].hwsrc == ADAPTER_MAC


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 59), st.integers(0, 255)), max_size=6), st.integers(0, 60))
def test_fuzz_mutated_requests(proxy: ArpProxy, flips: list[tuple[int, int]], cut: int) -> None:
    frame = bytearray(who_has(PEER).ljust(60, b"\0"))
    for pos, value in flips:
        frame[pos] = value
    out = proxy.handle(bytes(frame[:cut]), 0.0)
    assert proxy.counters["internal_errors"] == 0
    for reply in out:
        pkt = Ether(reply)
        assert pkt[ARP].op == 2 and pkt.src == ADAPTER_MAC
        # Only ever to a registered GN, from its own VIP, for a pool address that is no GN's.
        assert pkt.dst in (GN1.mac, GN2.mac)
        target = IPv4Address(pkt[ARP].psrc)
        assert target in IPv4Network("10.64.0.0/16") and target not in (GN1.vip4, GN2.vip4)


# --------------------------------------------------------------------------------------------
# The shared GN table and addressing plan (cyphonic.adapter.gn)


def test_is_peer_vip4(addressing: AdapterAddressing, table: GnTable) -> None:
    assert addressing.is_peer_vip4(IPv4Address(PEER), table)
    assert addressing.is_peer_vip4(PEER, table) and addressing.is_peer_vip4(
        bytes((10, 64, 0, 99)), table
    )
    for addr in (
        "10.64.0.10",
        "10.64.0.11",
        "10.64.0.1",
        "10.64.0.0",
        "10.64.255.255",
        "10.65.0.1",
        "not an address",
    ):
        assert not addressing.is_peer_vip4(addr, table), addr


def test_is_peer_vip6(addressing: AdapterAddressing, table: GnTable) -> None:
    assert addressing.is_peer_vip6("fd00:64::99", table)
    for addr in ("fd00:64::10", "fd00:64::", "fd00:64::1", "fd00:65::99", "fe80::1"):
        assert not addressing.is_peer_vip6(addr, table), addr


def test_addressing_from_pools(addressing: AdapterAddressing) -> None:
    assert addressing.router4 == IPv4Address("10.64.0.1")
    assert addressing.dns6 == IPv6Address("fd00:64::1")
    assert addressing.router6_ll == IPv6Address("fe80::aa:ff:fe00:1")  # RFC 4291 appendix A
    assert addressing.pool6 == IPv6Network("fd00:64::/64")
    assert addressing.downlink_mac_bytes == bytes.fromhex("02aa00000001")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"router4": IPv4Address("10.65.0.1")},
        {"router4": IPv4Address("10.64.0.0")},
        {"dns6": IPv6Address("fd00:65::1")},
        {"router6_ll": IPv6Address("fd00:64::1")},
        {"downlink_mac": "01:00:5e:00:00:01"},
        {"domain": "bad domain"},
        {"pool4": IPv4Network("10.64.0.0/31")},
    ],
)
def test_addressing_is_validated(addressing: AdapterAddressing, kwargs: dict[str, Any]) -> None:
    fields = {
        "downlink_mac": addressing.downlink_mac,
        "pool4": addressing.pool4,
        "pool6": addressing.pool6,
        "router4": addressing.router4,
        "router6_ll": addressing.router6_ll,
        "dns6": addressing.dns6,
        "domain": "cyphonic.test",
    }
    with pytest.raises(ConfigError):
        AdapterAddressing(**{**fields, **kwargs})


def test_table_lookups(table: GnTable) -> None:
    assert table.by_mac("02:00:00:00:00:10") is GN1
    assert table.by_mac("02-00-00-00-00-10".upper()) is GN1
    assert table.by_mac(bytes.fromhex("020000000011")) is GN2
    assert table.by_mac("garbage") is None and table.by_mac(b"\x01") is None
    assert table.by_vip4("10.64.0.11") is GN2 and table.by_vip4(IPv4Address("10.64.0.10")) is GN1
    assert table.by_vip4(bytes((10, 64, 0, 10))) is GN1 and table.by_vip4("nope") is None
    assert table.by_vip6("fd00:64::11") is GN2 and table.by_vip6(IPv6Address("fd00:64::12")) is None
    assert table.all() == (GN1, GN2) and len(table) == 2


def test_table_rejects_duplicates_and_stays_unchanged(table: GnTable) -> None:
    generation = table.generation
    clash = GeneralNode(
        "02:00:00:00:00:12", "gn3.cyphonic.test", GN1.vip4, IPv6Address("fd00:64::12")
    )
    with pytest.raises(ConfigError, match=r"VIPv4 10\.64\.0\.10"):
        table.replace([GN1, clash])
    with pytest.raises(ConfigError, match="MAC"):
        table.replace([GN1, GN1])
    with pytest.raises(ConfigError, match="FQDN"):
        table.replace(
            [
                GN1,
                GeneralNode(
                    "02:00:00:00:00:13",
                    "GN1.cyphonic.test.",
                    IPv4Address("10.64.0.13"),
                    IPv6Address("fd00::13"),
                ),
            ]
        )
    assert table.all() == (GN1, GN2) and table.generation == generation


def test_general_node_normalises_and_validates() -> None:
    node = GeneralNode(
        "02-00-00-00-00-AB",
        "Host.Cyphonic.Test.",
        "10.64.0.20",  # type: ignore[arg-type]
        "fd00::20",
    )  # type: ignore[arg-type]
    assert node.mac == "02:00:00:00:00:ab" and node.fqdn == "host.cyphonic.test"
    assert node.vip4 == IPv4Address("10.64.0.20") and node.vip6 == IPv6Address("fd00::20")
    for bad in ("01:00:00:00:00:01", "00:00:00:00:00:00", "02:00:00:00:00", "02:00:00:00:00:zz"):
        with pytest.raises(ConfigError):
            GeneralNode(bad, "a.test", GN1.vip4, GN1.vip6)
    with pytest.raises(ConfigError):
        GeneralNode(GN1.mac, "bad name!", GN1.vip4, GN1.vip6)
    with pytest.raises(ConfigError):
        GeneralNode(GN1.mac, "a.test", "10.64.0.300", GN1.vip6)  # type: ignore[arg-type]


def test_mac_helpers() -> None:
    assert normalize_mac(bytes.fromhex("02aabbccddee")) == "02:aa:bb:cc:dd:ee"
    assert link_local_from_mac("00:11:22:33:44:55") == IPv6Address("fe80::211:22ff:fe33:4455")


def test_log_throttle() -> None:
    throttle = LogThrottle(10.0, max_keys=2)
    assert throttle.allow("a", 0.0)
    assert not throttle.allow("a", 5.0) and not throttle.allow("a", 6.0)
    assert throttle.allow("a", 10.0) and throttle.suppressed("a") == 2
    assert throttle.suppressed("a") == 0
    assert throttle.allow("b", 11.0) and throttle.allow("c", 11.0)  # evicts "a"
    assert throttle.allow("a", 12.0)
