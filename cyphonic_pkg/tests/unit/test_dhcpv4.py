"""DHCPv4 server core (RFC 2131/2132): every message type and client state, with crafted frames.

Requests are built with scapy and replies dissected with it, so scapy's DHCP codec checks ours.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, ICMPv6ND_NS, ICMPv6ND_RS, IPv6, IPv6ExtHdrHopByHop
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

from cyphonic.adapter.dhcpv4 import (
    COUNTER_NAMES,
    Dhcp4Message,
    Dhcp4Server,
    MessageType,
    Option,
    build_udp4_frame,
    encode_domain_search,
    inet_checksum,
    pack_options,
    parse_options,
    parse_udp4_frame,
)
from cyphonic.adapter.gn import AdapterAddressing, GeneralNode, GnTable
from cyphonic.adapter.leases import LeaseStore
from cyphonic.adapter.packet_io import (
    BPF_B,
    BPF_JEQ,
    BPF_JMP,
    BPF_LD,
    BPF_LDX,
    BPF_RET,
    SKF_AD_PKTTYPE,
    BpfInsn,
    PacketType,
    assemble,
    ethertype_filter,
    ipv6_filter,
    udp4_dst_port_filter,
)
from cyphonic.errors import ConfigError, CyphonicError, DecodeError

ADAPTER_MAC = "02:aa:00:00:00:01"
GN1 = GeneralNode(
    "02:00:00:00:00:10", "gn1.cyphonic.test", IPv4Address("10.64.0.10"), IPv6Address("fd00:64::10")
)
GN2 = GeneralNode(
    "02:00:00:00:00:11", "gn2.cyphonic.test", IPv4Address("10.64.0.11"), IPv6Address("fd00:64::11")
)
STRANGER = "02:00:00:00:00:99"
BCAST = "ff:ff:ff:ff:ff:ff"
ROUTER = "10.64.0.1"
NOW = 1_700_000_000.0


@pytest.fixture
def addressing() -> AdapterAddressing:
    return AdapterAddressing.from_pools(
        ADAPTER_MAC, "10.64.0.0/16", "fd00:64::/64", "cyphonic.test"
    )


@pytest.fixture
def table() -> GnTable:
    return GnTable([GN1, GN2])


@pytest.fixture
def lease_path(tmp_path: Path) -> Path:
    return tmp_path / "leases.json"


@pytest.fixture
def make_server(
    table: GnTable, addressing: AdapterAddressing, lease_path: Path
) -> Callable[..., Dhcp4Server]:
    def make(**kwargs: Any) -> Dhcp4Server:
        return Dhcp4Server(table, addressing, LeaseStore(lease_path), **kwargs)

    return make


@pytest.fixture
def server(make_server: Callable[..., Dhcp4Server]) -> Dhcp4Server:
    return make_server()


def request_frame(
    mtype: str,
    *,
    mac: str = GN1.mac,
    chaddr: str | None = None,
    xid: int = 0x1234,
    ciaddr: str = "0.0.0.0",
    giaddr: str = "0.0.0.0",
    flags: int = 0,
    ip_src: str = "0.0.0.0",
    ip_dst: str = "255.255.255.255",
    eth_dst: str = BCAST,
    options: list[Any] | None = None,
) -> bytes:
    """A client's DHCP frame, built by scapy (RFC 2131 §4.4 defaults: broadcast, port 68->67)."""
    chaddr_bytes = bytes.fromhex((chaddr or mac).replace(":", ""))
    opts = [("message-type", mtype), *(options or []), "end"]
    pkt = (
        Ether(src=mac, dst=eth_dst)
        / IP(src=ip_src, dst=ip_dst)
        / UDP(sport=68, dport=67)
        / BOOTP(chaddr=chaddr_bytes, xid=xid, ciaddr=ciaddr, giaddr=giaddr, flags=flags)
        / DHCP(options=opts)
    )
    return bytes(pkt)


def one(frames: list[bytes]) -> Any:
    assert len(frames) == 1, frames
    pkt = Ether(frames[0])
    assert DHCP in pkt, pkt.summary()
    return pkt


def options_of(pkt: Any) -> dict[Any, Any]:
    return {
        o[0]: (o[1] if len(o) == 2 else o[1:]) for o in pkt[DHCP].options if isinstance(o, tuple)
    }


def option_codes(frame: bytes) -> list[int]:
    msg = Dhcp4Message.parse(parse_udp4_frame(frame).payload)  # type: ignore[union-attr]
    return [code for code, _ in msg.options]


def assert_checksums_valid(frame: bytes) -> None:
    pkt = Ether(frame)
    ip_sum, udp_sum = pkt[IP].chksum, pkt[UDP].chksum
    del pkt[IP].chksum
    del pkt[UDP].chksum
    again = Ether(bytes(pkt))
    assert (again[IP].chksum, again[UDP].chksum) == (ip_sum, udp_sum)


# --------------------------------------------------------------------------------------------
# DISCOVER -> OFFER (RFC 2131 §4.3.1)


def test_discover_gets_offer_with_all_options(server: Dhcp4Server) -> None:
    frames = server.handle(
        request_frame("discover", options=[("param_req_list", [1, 3, 6, 15])]), NOW
    )
    pkt = one(frames)
    assert pkt[Ether].src == ADAPTER_MAC
    assert pkt[Ether].dst == GN1.mac  # no broadcast flag: unicast to chaddr/yiaddr (§4.1)
    assert (pkt[IP].src, pkt[IP].dst) == (ROUTER, "10.64.0.10")
    assert (pkt[UDP].sport, pkt[UDP].dport) == (67, 68)
    bootp = pkt[BOOTP]
    assert bootp.op == 2 and bootp.xid == 0x1234
    assert bootp.yiaddr == "10.64.0.10" and bootp.ciaddr == "0.0.0.0" and bootp.giaddr == "0.0.0.0"
    assert bootp.chaddr[:6] == GN1.mac_bytes
    opts = options_of(pkt)
    assert opts["message-type"] == MessageType.OFFER
    assert opts["server_id"] == ROUTER
    assert opts["subnet_mask"] == "255.255.0.0"
    assert opts["router"] == ROUTER
    assert opts["name_server"] == ROUTER
    assert opts["domain"] == b"cyphonic.test"
    assert opts["lease_time"] == 3600
    assert opts["renewal_time"] == 1800  # T1 = 0.5 lease (§4.4.5)
    assert opts["rebinding_time"] == 3150  # T2 = 0.875 lease
    assert len(pkt[UDP].payload) >= 300  # RFC 1542 §2.1 minimum BOOTP size
    assert_checksums_valid(frames[0])
    assert server.counters["discover"] == 1 and server.counters["offer"] == 1


def test_offer_follows_parameter_request_list_order(server: Dhcp4Server) -> None:
    frames = server.handle(
        request_frame("discover", options=[("param_req_list", [6, 15, 3, 1])]), NOW
    )
    codes = option_codes(frames[0])
    assert codes[:2] == [Option.MESSAGE_TYPE, Option.SERVER_ID]
    assert codes[2:6] == [6, 15, 3, 1]  # RFC 2132 §9.8
    assert set(codes[6:]) == {51, 58, 59}


def test_requested_extras_are_supplied(make_server: Callable[..., Dhcp4Server]) -> None:
    server = make_server(mtu=1400)
    frames = server.handle(
        request_frame("discover", options=[("param_req_list", [1, 28, 119, 26])]), NOW
    )
    opts = options_of(one(frames))
    assert opts["broadcast_address"] == "10.64.255.255"
    assert opts["interface-mtu"] == 1400
    assert opts[119] == b"\x08cyphonic\x04test\x00"  # RFC 3397 §2 encoding


def test_extras_only_when_requested(make_server: Callable[..., Dhcp4Server]) -> None:
    server = make_server(mtu=1400)
    codes = option_codes(server.handle(request_frame("discover"), NOW)[0])
    assert not {26, 28, 119} & set(codes)
    assert {1, 3, 6, 15, 51, 54, 58, 59} <= set(codes)


def test_no_mtu_option_unless_configured(server: Dhcp4Server) -> None:
    frames = server.handle(request_frame("discover", options=[("param_req_list", [26])]), NOW)
    assert 26 not in option_codes(frames[0])


def test_broadcast_flag_gets_broadcast_reply(server: Dhcp4Server) -> None:
    pkt = one(server.handle(request_frame("discover", flags=0x8000), NOW))
    assert pkt[Ether].dst == BCAST and pkt[IP].dst == "255.255.255.255"
    assert pkt[BOOTP].flags == 0x8000


def test_client_identifier_is_echoed(server: Dhcp4Server) -> None:
    cid = b"\xff\x00\x00\x00\x01\x00\x01\x02\x03"  # RFC 4361 style (IAID + DUID)
    pkt = one(server.handle(request_frame("discover", options=[("client_id", cid)]), NOW))
    assert options_of(pkt)["client_id"] == cid  # RFC 6842 §3


def test_offer_fits_the_minimum_options_field(server: Dhcp4Server) -> None:
    cid = b"\x00" + b"x" * 250
    frames = server.handle(
        request_frame("discover", options=[("client_id", cid), ("param_req_list", [119, 28])]),
        NOW,
    )
    codes = option_codes(frames[0])
    assert 119 not in codes and 28 not in codes  # the requested extras gave way
    assert {1, 3, 6, 51, 54, 61} <= set(codes)  # the configuration and the echo did not


# --------------------------------------------------------------------------------------------
# REQUEST (RFC 2131 §4.3.2)


def selecting(ip: str = "10.64.0.10", server_id: str = ROUTER, **kw: Any) -> bytes:
    return request_frame(
        "request", options=[("server_id", server_id), ("requested_addr", ip)], **kw
    )


def test_selecting_request_gets_ack_and_lease_is_stored(server: Dhcp4Server) -> None:
    pkt = one(server.handle(selecting(), NOW))
    opts = options_of(pkt)
    assert opts["message-type"] == MessageType.ACK
    assert pkt[BOOTP].yiaddr == "10.64.0.10"
    assert opts["lease_time"] == 3600 and opts["subnet_mask"] == "255.255.0.0"
    record = server.leases.get("dhcp4", GN1.mac)
    assert record is not None
    assert record["state"] == "bound" and record["vip4"] == "10.64.0.10"
    assert record["expires"] == NOW + 3600 and record["fqdn"] == GN1.fqdn
    assert server.lease_state(GN1.mac, NOW) == "bound"
    assert server.lease_state(GN1.mac, NOW + 3601) == "expired"
    assert server.counters["request_selecting"] == 1


def test_selecting_wrong_address_gets_nak(server: Dhcp4Server) -> None:
    pkt = one(server.handle(selecting("10.64.0.77"), NOW))
    opts = options_of(pkt)
    assert opts["message-type"] == MessageType.NAK
    assert pkt[Ether].dst == BCAST and pkt[IP].dst == "255.255.255.255"  # §4.1: NAK broadcast
    assert pkt[BOOTP].yiaddr == "0.0.0.0"
    assert "lease_time" not in opts and "subnet_mask" not in opts  # table 3: MUST NOT
    assert opts["server_id"] == ROUTER and b"not your address" in opts["error_message"]
    assert server.leases.get("dhcp4", GN1.mac) is None
    assert server.counters["nak"] == 1


def test_selecting_another_server_is_silence(server: Dhcp4Server) -> None:
    assert server.handle(selecting(server_id="10.64.0.2"), NOW) == []
    assert server.counters["other_server"] == 1 and server.counters["nak"] == 0


def test_init_reboot(server: Dhcp4Server) -> None:
    ok = one(
        server.handle(request_frame("request", options=[("requested_addr", "10.64.0.10")]), NOW)
    )
    assert options_of(ok)["message-type"] == MessageType.ACK
    bad = one(
        server.handle(request_frame("request", options=[("requested_addr", "192.0.2.5")]), NOW)
    )
    assert options_of(bad)["message-type"] == MessageType.NAK
    assert server.counters["request_init_reboot"] == 2


def test_renewing_is_unicast_to_ciaddr(server: Dhcp4Server) -> None:
    server.handle(selecting(), NOW)
    frame = request_frame(
        "request", ciaddr="10.64.0.10", ip_src="10.64.0.10", ip_dst=ROUTER, eth_dst=ADAPTER_MAC
    )
    pkt = one(server.handle(frame, NOW + 1800))
    assert options_of(pkt)["message-type"] == MessageType.ACK
    assert (pkt[Ether].dst, pkt[IP].dst) == (GN1.mac, "10.64.0.10")
    assert pkt[BOOTP].ciaddr == "10.64.0.10" and pkt[BOOTP].yiaddr == "10.64.0.10"
    assert server.leases.get("dhcp4", GN1.mac)["expires"] == NOW + 1800 + 3600  # type: ignore[index]
    assert server.counters["request_renewing"] == 1


def test_rebinding_is_broadcast_request(server: Dhcp4Server) -> None:
    frame = request_frame("request", ciaddr="10.64.0.10", ip_src="10.64.0.10")
    pkt = one(server.handle(frame, NOW))
    assert options_of(pkt)["message-type"] == MessageType.ACK
    assert pkt[IP].dst == "10.64.0.10"
    assert server.counters["request_rebinding"] == 1


def test_renewing_without_a_stored_lease_is_acked(server: Dhcp4Server) -> None:
    """The VIP is the GN's reservation: a lost store must not make GNs drop their address."""
    assert server.leases.get("dhcp4", GN1.mac) is None
    frame = request_frame("request", ciaddr="10.64.0.10", ip_dst=ROUTER, eth_dst=ADAPTER_MAC)
    assert options_of(one(server.handle(frame, NOW)))["message-type"] == MessageType.ACK


def test_renewing_wrong_address_gets_nak(server: Dhcp4Server) -> None:
    frame = request_frame(
        "request", ciaddr="10.64.0.50", ip_src="10.64.0.50", ip_dst=ROUTER, eth_dst=ADAPTER_MAC
    )
    pkt = one(server.handle(frame, NOW))
    assert options_of(pkt)["message-type"] == MessageType.NAK
    assert pkt[IP].dst == "255.255.255.255" and pkt[BOOTP].ciaddr == "0.0.0.0"


def test_request_in_no_state_is_malformed(server: Dhcp4Server) -> None:
    assert server.handle(request_frame("request"), NOW) == []
    assert server.counters["malformed"] == 1


def test_vip_changed_by_as_naks_the_old_address(server: Dhcp4Server, table: GnTable) -> None:
    server.handle(selecting(), NOW)
    moved = GeneralNode(GN1.mac, GN1.fqdn, IPv4Address("10.64.1.10"), GN1.vip6)
    table.replace([moved, GN2])
    renew = request_frame("request", ciaddr="10.64.0.10", ip_dst=ROUTER, eth_dst=ADAPTER_MAC)
    assert options_of(one(server.handle(renew, NOW + 10)))["message-type"] == MessageType.NAK
    offer = one(server.handle(request_frame("discover"), NOW + 11))
    assert offer[BOOTP].yiaddr == "10.64.1.10"


# --------------------------------------------------------------------------------------------
# DECLINE, RELEASE, INFORM (RFC 2131 §4.3.3-4.3.5)


def test_decline_holds_the_vip_down_then_offers_again(
    make_server: Callable[..., Dhcp4Server], caplog: pytest.LogCaptureFixture
) -> None:
    server = make_server(decline_holddown=60.0)
    decline = request_frame(
        "decline", options=[("server_id", ROUTER), ("requested_addr", "10.64.0.10")]
    )
    with caplog.at_level(logging.ERROR, logger="cyphonic.adapter.dhcpv4"):
        assert server.handle(decline, NOW) == []  # §4.3.3: no answer
    assert "DECLINED" in caplog.text and "10.64.0.10" in caplog.text
    record = server.leases.get("dhcp4", GN1.mac)
    assert record is not None and record["state"] == "declined" and record["declines"] == 1
    assert server.lease_state(GN1.mac, NOW) == "declined"
    assert server.handle(request_frame("discover"), NOW + 10) == []
    assert server.counters["declined_holddown"] == 1
    nak = one(server.handle(selecting(), NOW + 20))
    assert options_of(nak)["message-type"] == MessageType.NAK
    offer = one(server.handle(request_frame("discover"), NOW + 61))
    assert options_of(offer)["message-type"] == MessageType.OFFER
    ack = one(server.handle(selecting(), NOW + 62))
    assert options_of(ack)["message-type"] == MessageType.ACK
    assert server.leases.get("dhcp4", GN1.mac)["declines"] == 1  # type: ignore[index]


def test_decline_of_another_address_is_ignored(server: Dhcp4Server) -> None:
    decline = request_frame("decline", options=[("requested_addr", "10.64.0.11")])
    assert server.handle(decline, NOW) == []
    assert server.counters["ignored"] == 1 and server.leases.get("dhcp4", GN1.mac) is None


def test_release_keeps_the_address_reserved(server: Dhcp4Server) -> None:
    server.handle(selecting(), NOW)
    release = request_frame(
        "release",
        ciaddr="10.64.0.10",
        ip_src="10.64.0.10",
        ip_dst=ROUTER,
        eth_dst=ADAPTER_MAC,
        options=[("server_id", ROUTER)],
    )
    assert server.handle(release, NOW + 5) == []  # §4.3.4: no answer
    record = server.leases.get("dhcp4", GN1.mac)
    assert record is not None and record["state"] == "released" and record["vip4"] == "10.64.0.10"
    assert server.lease_state(GN1.mac, NOW + 5) == "released"
    offer = one(server.handle(request_frame("discover"), NOW + 6))
    assert offer[BOOTP].yiaddr == "10.64.0.10"


def test_release_of_another_address_is_ignored(server: Dhcp4Server) -> None:
    release = request_frame("release", ciaddr="10.64.0.11", ip_dst=ROUTER, eth_dst=ADAPTER_MAC)
    assert server.handle(release, NOW) == []
    assert server.counters["ignored"] == 1


def test_release_for_another_server_is_ignored(server: Dhcp4Server) -> None:
    server.handle(selecting(), NOW)
    release = request_frame("release", ciaddr="10.64.0.10", options=[("server_id", "10.64.0.2")])
    assert server.handle(release, NOW) == []
    assert server.counters["other_server"] == 1 and server.lease_state(GN1.mac, NOW) == "bound"


def test_inform_gets_ack_without_lease(server: Dhcp4Server) -> None:
    frame = request_frame(
        "inform",
        ciaddr="10.64.0.10",
        ip_src="10.64.0.10",
        ip_dst=ROUTER,
        eth_dst=ADAPTER_MAC,
        options=[("param_req_list", [1, 3, 6, 15, 51])],
    )
    pkt = one(server.handle(frame, NOW))
    opts = options_of(pkt)
    assert opts["message-type"] == MessageType.ACK
    assert pkt[BOOTP].yiaddr == "0.0.0.0" and pkt[BOOTP].ciaddr == "10.64.0.10"  # table 3
    assert (pkt[Ether].dst, pkt[IP].dst) == (GN1.mac, "10.64.0.10")  # §4.3.5: to ciaddr
    assert not {"lease_time", "renewal_time", "rebinding_time"} & opts.keys()
    assert opts["router"] == ROUTER and opts["domain"] == b"cyphonic.test"
    assert server.leases.get("dhcp4", GN1.mac) is None


def test_inform_from_a_foreign_address_is_ignored(server: Dhcp4Server) -> None:
    frame = request_frame("inform", ciaddr="10.64.0.200", ip_dst=ROUTER, eth_dst=ADAPTER_MAC)
    assert server.handle(frame, NOW) == []
    assert server.counters["ignored"] == 1


# --------------------------------------------------------------------------------------------
# Rapid Commit (RFC 4039)


def test_rapid_commit(server: Dhcp4Server) -> None:
    pkt = one(server.handle(request_frame("discover", options=[("rapid_commit", b"")]), NOW))
    opts = options_of(pkt)
    assert opts["message-type"] == MessageType.ACK and "rapid_commit" in opts
    assert server.lease_state(GN1.mac, NOW) == "bound"
    assert server.counters["rapid_commit"] == 1


def test_rapid_commit_disabled(make_server: Callable[..., Dhcp4Server]) -> None:
    server = make_server(rapid_commit=False)
    pkt = one(server.handle(request_frame("discover", options=[("rapid_commit", b"")]), NOW))
    assert options_of(pkt)["message-type"] == MessageType.OFFER
    assert "rapid_commit" not in options_of(pkt)


# --------------------------------------------------------------------------------------------
# Who gets an answer


def test_unknown_mac_gets_nothing_and_is_logged_rate_limited(
    server: Dhcp4Server, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="cyphonic.adapter.dhcpv4"):
        for i in range(5):
            assert server.handle(request_frame("discover", mac=STRANGER), NOW + i) == []
    assert server.counters["unknown_mac"] == 5
    assert sum(STRANGER in r.getMessage() for r in caplog.records) == 1
    with caplog.at_level(logging.INFO, logger="cyphonic.adapter.dhcpv4"):
        server.handle(request_frame("discover", mac=STRANGER), NOW + 61)
    assert "and 4 more" in caplog.records[-1].getMessage()


def test_chaddr_must_be_the_source_mac(server: Dhcp4Server) -> None:
    # GN2 asks for GN1's lease by writing GN1's MAC into chaddr.
    assert server.handle(request_frame("discover", mac=GN2.mac, chaddr=GN1.mac), NOW) == []
    assert server.handle(selecting(mac=GN2.mac, chaddr=GN1.mac), NOW) == []
    release = request_frame("release", mac=GN2.mac, chaddr=GN1.mac, ciaddr="10.64.0.10")
    assert server.handle(release, NOW) == []
    # An unknown host spoofing a known chaddr fares no better.
    assert server.handle(request_frame("discover", mac=STRANGER, chaddr=GN1.mac), NOW) == []
    assert server.counters["chaddr_mismatch"] == 4
    assert server.counters["offer"] == server.counters["ack"] == 0


def test_each_gn_gets_its_own_vip(server: Dhcp4Server) -> None:
    assert one(server.handle(request_frame("discover", mac=GN2.mac), NOW))[BOOTP].yiaddr == (
        "10.64.0.11"
    )
    nak = one(server.handle(selecting("10.64.0.10", mac=GN2.mac), NOW))
    assert options_of(nak)["message-type"] == MessageType.NAK


def test_relayed_messages_are_dropped(server: Dhcp4Server) -> None:
    assert server.handle(request_frame("discover", giaddr="10.1.2.3"), NOW) == []
    assert server.counters["relayed"] == 1


def test_gn_with_a_vip_outside_the_pool_is_not_served(
    addressing: AdapterAddressing, lease_path: Path
) -> None:
    odd = GeneralNode(GN1.mac, GN1.fqdn, IPv4Address("192.0.2.10"), GN1.vip6)
    server = Dhcp4Server(GnTable([odd]), addressing, LeaseStore(lease_path))
    assert server.handle(request_frame("discover"), NOW) == []
    assert server.counters["bad_vip"] == 1


@pytest.mark.parametrize(
    ("frame", "counter"),
    [
        (
            bytes(Ether(src=GN1.mac, dst=BCAST) / ARP(psrc="10.64.0.10", pdst="10.64.0.1")),
            "not_dhcp",
        ),
        (
            bytes(
                Ether(src=GN1.mac, dst=BCAST)
                / IP(dst="255.255.255.255")
                / UDP(sport=67, dport=68)
                / BOOTP(op=2, chaddr=GN1.mac_bytes)
                / DHCP(options=[("message-type", "offer"), "end"])
            ),
            "not_dhcp",
        ),
        (
            bytes(
                Ether(src=GN1.mac, dst=BCAST)
                / IP(dst="255.255.255.255")
                / UDP(sport=68, dport=67)
                / BOOTP(chaddr=GN1.mac_bytes, options=bytes(64))
            ),
            "not_dhcp",
        ),  # RFC 951 BOOTP
        (
            bytes(
                Ether(src=GN1.mac, dst=BCAST)
                / IP(dst="255.255.255.255")
                / UDP(sport=68, dport=67)
                / BOOTP(op=2, chaddr=GN1.mac_bytes)
                / DHCP(options=["end"])
            ),
            "not_dhcp",
        ),
        (request_frame("discover", eth_dst="02:bb:00:00:00:02"), "not_for_us"),
        (request_frame("discover", ip_dst="10.64.0.2", eth_dst=ADAPTER_MAC), "not_for_us"),
        (request_frame("offer"), "unsupported"),
        (
            bytes(
                Ether(src=GN1.mac, dst=BCAST)
                / IP(dst="255.255.255.255")
                / UDP(sport=68, dport=67)
                / BOOTP(chaddr=GN1.mac_bytes)
                / DHCP(options=[("message-type", 10), "end"])
            ),
            "unsupported",
        ),  # DHCPLEASEQUERY (RFC 4388)
    ],
    ids=[
        "arp",
        "bootreply",
        "bootp",
        "bootp-request-no-type",
        "other-mac",
        "other-ip",
        "offer",
        "leasequery",
    ],
)
def test_ignored_frames(server: Dhcp4Server, frame: bytes, counter: str) -> None:
    assert server.handle(frame, NOW) == []
    assert server.counters[counter] == 1
    assert server.counters["internal_errors"] == 0


# --------------------------------------------------------------------------------------------
# Malformed input


def corrupt_ip_checksum(frame: bytes) -> bytes:
    return frame[:24] + bytes((frame[24] ^ 0xFF,)) + frame[25:]


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\x00" * 13,
        request_frame("discover")[:20],
        corrupt_ip_checksum(request_frame("discover")),
        request_frame("discover")[: 14 + 20 + 4],  # UDP header cut
        request_frame("discover")[: 14 + 28 + 200],  # BOOTP cut (IP total length too long)
    ],
    ids=["empty", "short-eth", "short-ip", "ip-checksum", "short-udp", "short-bootp"],
)
def test_malformed_frames_are_dropped(server: Dhcp4Server, frame: bytes) -> None:
    assert server.handle(frame, NOW) == []
    assert server.counters["malformed"] == 1 and server.counters["internal_errors"] == 0


def test_malformed_options_are_dropped(server: Dhcp4Server) -> None:
    good = request_frame("discover")
    bootp_at = 14 + 20 + 8
    payload = good[bootp_at:]
    header = payload[:240]
    variants = [
        header + b"\x35\x01\x01",  # no end option (RFC 2132 §3.2)
        header + b"\x35\x01\x01\x37\x09\x01\xff",  # option runs past the field
        header + b"\x35\x02\x01\x01\xff",  # message type of length 2
        header + b"\x35\x01\x01\x32\x03\x0a\x40\x00\xff",  # requested IP of length 3
        header + b"\x35\x01\x01\x34\x01\x07\xff",  # overload value 7
        header + b"\x35\x01\x01\x3d\x01\x01\xff",  # client identifier of length 1
        header + b"\x35",  # option code without length
    ]
    ip = IP(bytes(Ether(good)[IP]))
    for payload_variant in variants:
        frame = bytes(
            Ether(src=GN1.mac, dst=BCAST)
            / IP(src=ip.src, dst=ip.dst)
            / UDP(sport=68, dport=67)
            / Raw(payload_variant)
        )
        assert server.handle(frame, NOW) == []
    assert server.counters["malformed"] == len(variants)
    assert server.counters["internal_errors"] == 0


def test_wrong_hardware_type_is_malformed(server: Dhcp4Server) -> None:
    frame = bytes(
        Ether(src=GN1.mac, dst=BCAST)
        / IP(dst="255.255.255.255")
        / UDP(sport=68, dport=67)
        / BOOTP(htype=6, chaddr=GN1.mac_bytes)
        / DHCP(options=[("message-type", "discover"), "end"])
    )
    assert server.handle(frame, NOW) == []
    assert server.counters["malformed"] == 1


def test_every_truncation_of_every_message_is_handled(server: Dhcp4Server) -> None:
    frames = [
        request_frame("discover", options=[("param_req_list", [1, 3, 6]), ("client_id", b"\1ab")]),
        selecting(),
        request_frame("request", ciaddr="10.64.0.10", ip_dst=ROUTER, eth_dst=ADAPTER_MAC),
        request_frame("decline", options=[("requested_addr", "10.64.0.10")]),
        request_frame("release", ciaddr="10.64.0.10"),
        request_frame("inform", ciaddr="10.64.0.10"),
    ]
    for frame in frames:
        for cut in range(len(frame)):
            server.handle(frame[:cut], NOW)
    assert server.counters["internal_errors"] == 0


FUZZ = settings(
    max_examples=3000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@FUZZ
@given(st.binary(max_size=700))
def test_fuzz_random_bytes(server: Dhcp4Server, data: bytes) -> None:
    assert isinstance(server.handle(data, NOW), list)
    assert server.counters["internal_errors"] == 0


_SEEDS = [
    request_frame(
        "discover",
        options=[("param_req_list", [1, 3, 6, 15, 119]), ("client_id", b"\x01" + GN1.mac_bytes)],
    ),
    selecting(),
    request_frame("request", ciaddr="10.64.0.10", ip_dst=ROUTER, eth_dst=ADAPTER_MAC),
    request_frame("inform", ciaddr="10.64.0.10", ip_dst=ROUTER, eth_dst=ADAPTER_MAC),
    request_frame("decline", options=[("requested_addr", "10.64.0.10")]),
]


@FUZZ
@given(
    st.sampled_from(_SEEDS),
    st.lists(st.tuples(st.integers(0, 600), st.integers(0, 255)), max_size=8),
    st.integers(0, 700),
)
def test_fuzz_mutated_requests(
    server: Dhcp4Server, seed: bytes, flips: list[tuple[int, int]], cut: int
) -> None:
    frame = bytearray(seed)
    for pos, value in flips:
        if pos < len(frame):
            frame[pos] = value
    assert isinstance(server.handle(bytes(frame[:cut]), NOW), list)
    assert server.counters["internal_errors"] == 0


@FUZZ
@given(st.binary(max_size=400), st.sampled_from(["discover", "request", "inform", "release"]))
def test_fuzz_options_field(server: Dhcp4Server, options: bytes, mtype: str) -> None:
    """Valid Ethernet/IPv4/UDP/BOOTP headers and cookie, arbitrary options bytes (with valid
    IP/UDP framing so the option parser itself is what gets exercised)."""
    header = bytes(BOOTP(chaddr=GN1.mac_bytes, xid=1, ciaddr="10.64.0.10"))[:236] + b"c\x82Sc"
    code = {"discover": 1, "request": 3, "release": 7, "inform": 8}[mtype]
    payload = header + bytes((53, 1, code)) + options
    frame = build_udp4_frame(b"\xff" * 6, GN1.mac_bytes, bytes(4), b"\xff" * 4, 68, 67, payload)
    assert isinstance(server.handle(frame, NOW), list)
    assert server.counters["internal_errors"] == 0


# --------------------------------------------------------------------------------------------
# Persistence


def test_leases_survive_a_restart(
    table: GnTable, addressing: AdapterAddressing, lease_path: Path
) -> None:
    first = Dhcp4Server(table, addressing, LeaseStore(lease_path), decline_holddown=100)
    first.handle(selecting(), NOW)
    first.handle(
        request_frame("decline", mac=GN2.mac, options=[("requested_addr", "10.64.0.11")]), NOW
    )
    second = Dhcp4Server(table, addressing, LeaseStore(lease_path), decline_holddown=100)
    assert second.lease_state(GN1.mac, NOW + 1) == "bound"
    assert second.leases.get("dhcp4", GN1.mac) == first.leases.get("dhcp4", GN1.mac)
    assert second.handle(request_frame("discover", mac=GN2.mac), NOW + 50) == []  # held down
    assert second.counters["declined_holddown"] == 1
    assert len(second.handle(request_frame("discover", mac=GN2.mac), NOW + 101)) == 1


def test_store_failure_still_acks(server: Dhcp4Server, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("cyphonic.adapter.leases.os.replace", fail)
    pkt = one(server.handle(selecting(), NOW))
    assert options_of(pkt)["message-type"] == MessageType.ACK
    assert server.counters["store_errors"] == 1


# --------------------------------------------------------------------------------------------
# Codec details


def test_inet_checksum_rfc1071_example() -> None:
    # RFC 1071 §3: the words 0001 f203 f4f5 f6f7 sum to ddf2 (one's complement): checksum 220d.
    assert inet_checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D
    assert inet_checksum(b"") == 0xFFFF
    assert inet_checksum(b"\xff\xff") == 0x0000


def test_options_rfc3396_concatenation_and_split() -> None:
    index: dict[int, bytes] = {}
    parse_options(
        bytes((61, 3)) + b"abc" + bytes((12, 1)) + b"h" + bytes((61, 2)) + b"de" + b"\xff",
        index,
        need_end=True,
    )
    assert index == {61: b"abcde", 12: b"h"}
    long = bytes(range(256)) + b"tail"
    packed = pack_options([(61, long)])
    assert packed[0:2] == b"\x3d\xff" and packed[257:259] == bytes((61, len(long) - 255))
    again: dict[int, bytes] = {}
    parse_options(packed, again, need_end=False)
    assert again == {61: long}
    assert pack_options([(80, b"")]) == b"\x50\x00"


def test_option_overload_is_followed() -> None:
    """RFC 2131 §4.1: with option 52 = 3, options continue in 'file', then in 'sname'."""
    file = bytes((50, 4)) + IPv4Address("10.64.0.10").packed + b"\xff"
    sname = bytes((54, 4)) + IPv4Address(ROUTER).packed + b"\xff"
    bootp = bytes(BOOTP(chaddr=GN1.mac_bytes, xid=9, sname=sname, file=file))[:236]
    payload = bootp + b"c\x82Sc" + bytes((53, 1, 3, 52, 1, 3, 255))
    msg = Dhcp4Message.parse(payload)
    assert msg.address_option(Option.REQUESTED_IP) == IPv4Address("10.64.0.10")
    assert msg.address_option(Option.SERVER_ID) == IPv4Address(ROUTER)
    assert msg.file == b"" and msg.sname == b""


def test_overloaded_request_is_served(server: Dhcp4Server) -> None:
    file = (
        bytes((50, 4))
        + IPv4Address("10.64.0.10").packed
        + bytes((54, 4))
        + bytes(IPv4Address(ROUTER).packed)
        + b"\xff"
    )
    bootp = bytes(BOOTP(chaddr=GN1.mac_bytes, xid=9, file=file))[:236]
    payload = bootp + b"c\x82Sc" + bytes((53, 1, 3, 52, 1, 1, 255))
    frame = bytes(
        Ether(src=GN1.mac, dst=BCAST)
        / IP(src="0.0.0.0", dst="255.255.255.255")
        / UDP(sport=68, dport=67)
        / Raw(payload)
    )
    assert options_of(one(server.handle(frame, NOW)))["message-type"] == MessageType.ACK


def test_message_round_trip_against_scapy() -> None:
    msg = Dhcp4Message(
        op=1,
        xid=0xDEADBEEF,
        chaddr=GN1.mac_bytes,
        flags=0x8000,
        secs=3,
        ciaddr=IPv4Address("10.64.0.10"),
        options=(
            (53, b"\x03"),
            (50, IPv4Address("10.64.0.10").packed),
            (55, bytes((1, 3, 6))),
            (12, b"gn1"),
        ),
    )
    raw = msg.pack()
    assert len(raw) == 300
    pkt = BOOTP(raw)
    assert pkt.xid == 0xDEADBEEF and pkt.flags == 0x8000 and pkt.secs == 3
    assert pkt.ciaddr == "10.64.0.10"
    assert options_of(pkt)["requested_addr"] == "10.64.0.10"
    assert Dhcp4Message.parse(raw) == msg


def test_parse_udp4_frame_against_scapy() -> None:
    frame = build_udp4_frame(
        GN1.mac_bytes,
        bytes.fromhex("02aa00000001"),
        bytes((10, 64, 0, 1)),
        bytes((10, 64, 0, 10)),
        67,
        68,
        b"hello",
        ident=7,
    )
    assert_checksums_valid(frame)
    pkt = Ether(frame)
    assert pkt[IP].id == 7 and pkt[UDP].load == b"hello"
    dgram = parse_udp4_frame(frame)
    assert dgram is not None and dgram.payload == b"hello" and dgram.dport == 68
    # IP options are skipped; a fragment is not a datagram; padding after it is ignored.
    with_opts = bytes(Ether() / IP(options=b"\x01\x01\x01\x00") / UDP(dport=67) / b"x")
    assert parse_udp4_frame(with_opts + b"\0" * 10).payload == b"x"  # type: ignore[union-attr]
    frag = bytes(Ether() / IP(flags="MF") / UDP(dport=67) / b"x")
    assert parse_udp4_frame(frag) is None
    bad_udp_len = bytearray(bytes(Ether() / IP() / UDP(dport=67) / b"xyz"))
    struct.pack_into("!H", bad_udp_len, 14 + 20 + 4, 200)
    with pytest.raises(DecodeError):
        parse_udp4_frame(bytes(bad_udp_len))


def test_domain_search_encoding() -> None:
    assert encode_domain_search(["eng.apple.com"]) == b"\x03eng\x05apple\x03com\x00"
    with pytest.raises(ValueError, match="bad label"):
        encode_domain_search(["a..b"])


def test_bad_configuration_is_refused(
    table: GnTable, addressing: AdapterAddressing, lease_path: Path
) -> None:
    with pytest.raises(CyphonicError, match="lease_time"):
        Dhcp4Server(table, addressing, LeaseStore(lease_path), lease_time=0)
    with pytest.raises(CyphonicError, match="mtu"):
        Dhcp4Server(table, addressing, LeaseStore(lease_path), mtu=67)
    with pytest.raises(ConfigError, match="bad domain"):
        Dhcp4Server(table, addressing, LeaseStore(lease_path), domain="a..b")


def test_counters_have_stable_names(server: Dhcp4Server) -> None:
    assert tuple(server.counters) == COUNTER_NAMES


# --------------------------------------------------------------------------------------------
# The kernel filter of the I/O edge, run through a small classic-BPF interpreter


def run_bpf(program: list[BpfInsn], frame: bytes, pkttype: int = PacketType.HOST) -> int:
    a = x = pc = 0
    sizes = {0x00: 4, 0x08: 2, 0x10: 1}
    while True:
        code, jt, jf, k = program[pc]
        pc += 1
        cls = code & 0x07
        if cls == BPF_LD:
            if k == SKF_AD_PKTTYPE:
                a = pkttype
                continue
            size, mode = sizes[code & 0x18], code & 0xE0
            offset = k if mode == 0x20 else x + k
            if offset + size > len(frame):
                return 0
            a = int.from_bytes(frame[offset : offset + size], "big")
        elif cls == BPF_LDX:
            assert code == BPF_LDX | BPF_B | 0xA0
            if k >= len(frame):
                return 0
            x = (frame[k] & 0x0F) * 4
        elif cls == BPF_JMP:
            taken = a == k if code & 0xF0 == BPF_JEQ else bool(a & k)
            pc += jt if taken else jf
        elif cls == BPF_RET:
            return k
        else:
            raise AssertionError(f"unexpected BPF code {code:#x}")


def test_udp4_port_filter() -> None:
    program = udp4_dst_port_filter(67)
    assert program[-2][0] == BPF_RET and program[-1] == (BPF_RET, 0, 0, 0)
    discover = request_frame("discover")
    assert run_bpf(program, discover) > 0
    assert run_bpf(program, discover, PacketType.BROADCAST) > 0
    assert run_bpf(program, discover, PacketType.OUTGOING) == 0
    assert run_bpf(program, discover, PacketType.OTHERHOST) == 0
    with_opts = bytes(Ether() / IP(options=b"\x01\x01\x01\x00") / UDP(dport=67) / b"x")
    assert run_bpf(program, with_opts) > 0
    assert run_bpf(program, bytes(Ether() / IP() / UDP(dport=68))) == 0
    assert run_bpf(program, bytes(Ether() / IP(flags="MF") / UDP(dport=67))) == 0
    assert run_bpf(program, bytes(Ether() / IP(frag=100) / UDP(dport=67))) == 0
    assert run_bpf(program, bytes(Ether() / ARP())) == 0
    assert run_bpf(program, discover[:20]) == 0


def test_ethertype_filter() -> None:
    program = ethertype_filter([0x0806, 0x86DD])
    assert run_bpf(program, bytes(Ether() / ARP())) > 0
    assert run_bpf(program, bytes(Ether() / IPv6())) > 0
    assert run_bpf(program, bytes(Ether() / IP())) == 0
    assert run_bpf(program, bytes(Ether() / ARP()), PacketType.OUTGOING) == 0
    assert (
        run_bpf(
            ethertype_filter([0x0806], accept_otherhost=True),
            bytes(Ether() / ARP()),
            PacketType.OTHERHOST,
        )
        > 0
    )


def test_ipv6_filter() -> None:
    program = ipv6_filter((133, 135), (547,))
    ns = bytes(Ether() / IPv6(dst="ff02::1:ff00:10") / ICMPv6ND_NS(tgt="fd00::10"))
    rs = bytes(Ether() / IPv6(dst="ff02::2") / ICMPv6ND_RS())
    dhcp6 = bytes(Ether() / IPv6(dst="ff02::1:2") / UDP(sport=546, dport=547))
    assert run_bpf(program, ns, PacketType.MULTICAST) > 0
    assert run_bpf(program, rs) > 0 and run_bpf(program, dhcp6) > 0
    assert run_bpf(program, ns, PacketType.OUTGOING) == 0
    assert run_bpf(program, bytes(Ether() / IPv6() / ICMPv6EchoRequest())) == 0  # GN data
    assert run_bpf(program, bytes(Ether() / IPv6() / UDP(dport=53))) == 0
    assert run_bpf(program, bytes(Ether() / IPv6() / IPv6ExtHdrHopByHop() / ICMPv6ND_RS())) == 0
    assert run_bpf(program, bytes(Ether() / IP() / UDP(dport=547))) == 0
    assert run_bpf(ipv6_filter((135,)), dhcp6) == 0
    assert run_bpf(ipv6_filter((), (547,)), ns) == 0 and run_bpf(ipv6_filter((), (547,)), dhcp6)
    with pytest.raises(ValueError, match="needs"):
        ipv6_filter()


def test_assemble_labels() -> None:
    with pytest.raises(ValueError, match="twice"):
        assemble(["x", "x"])
    with pytest.raises(ValueError, match="out of range"):
        assemble([(BPF_JMP | BPF_JEQ, "accept", 0, 1)] + [(BPF_LD, 0, 0, 0)] * 300)
