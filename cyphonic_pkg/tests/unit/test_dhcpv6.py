"""DHCPv6 server: every message type of RFC 8415 §18.3, the identifier rules of §16, leases that
survive a restart, identity by MAC whatever the DUID, codec checks and fuzzing.

Client messages are built with scapy (an independent encoder) and answers dissected with it, so
the hand-written codec of :mod:`cyphonic.adapter.dhcpv6` is checked against another
implementation; the Advertise is also checked byte for byte against a vector written out by hand
from RFC 8415 §8, §21.2-21.8 and RFC 3646 §3-4.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from scapy.compat import raw
from scapy.layers.dhcp6 import (
    DHCP6,
    DUID_EN,
    DUID_LL,
    DUID_LLT,
    DUID_UUID,
    DHCP6_Advertise,
    DHCP6_Confirm,
    DHCP6_Decline,
    DHCP6_InfoRequest,
    DHCP6_Rebind,
    DHCP6_RelayForward,
    DHCP6_Release,
    DHCP6_Renew,
    DHCP6_Reply,
    DHCP6_Request,
    DHCP6_Solicit,
    DHCP6OptClientId,
    DHCP6OptDNSDomains,
    DHCP6OptDNSServers,
    DHCP6OptElapsedTime,
    DHCP6OptIA_NA,
    DHCP6OptIA_PD,
    DHCP6OptIA_TA,
    DHCP6OptIAAddress,
    DHCP6OptIAPrefix,
    DHCP6OptOptReq,
    DHCP6OptPref,
    DHCP6OptRapidCommit,
    DHCP6OptServerId,
    DHCP6OptStatusCode,
)
from scapy.layers.inet import UDP
from scapy.layers.inet6 import IPv6, in6_chksum
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Packet

from cyphonic.adapter.dhcpv6 import (
    LEASE_KIND,
    Dhcp6Frame,
    Dhcp6Message,
    Dhcp6Server,
    IaNa,
    MessageType,
    OptionCode,
    StatusCode,
    build_udp_frame,
    duid_ll,
    duid_type_name,
    pack_option,
    parse_options,
    parse_status,
    udp_checksum,
)
from cyphonic.adapter.gn import AdapterAddressing, GeneralNode, GnTable
from cyphonic.adapter.leases import LeaseStore, LeaseStoreError
from cyphonic.errors import ConfigError, DecodeError

# --------------------------------------------------------------------------------------------
# The downlink: an adapter, two GNs and a stranger.

ADAPTER_MAC = "02:c6:00:00:00:01"
ROUTER_LL = "fe80::c6:1"
DNS6 = "fd43:5950::1"
DOMAIN = "cyphonic.test"
GN1_MAC, GN1_VIP, GN1_LL = "02:c6:00:00:00:11", "fd43:5950::11", "fe80::c6:11"
GN2_MAC, GN2_VIP, GN2_LL = "02:c6:00:00:00:12", "fd43:5950::12", "fe80::c6:12"
STRANGER_MAC, STRANGER_LL = "02:c6:00:00:00:66", "fe80::c6:66"
ALL_SERVERS, ALL_SERVERS_MAC = "ff02::1:2", "33:33:00:01:00:02"
NOW = 1_700_000_000.0

ADDRESSING = AdapterAddressing(
    downlink_mac=ADAPTER_MAC,
    pool4=ipaddress.IPv4Network("10.77.0.0/24"),
    pool6=ipaddress.IPv6Network("fd43:5950::/64"),
    router4=ipaddress.IPv4Address("10.77.0.1"),
    router6_ll=ipaddress.IPv6Address(ROUTER_LL),
    dns6=ipaddress.IPv6Address(DNS6),
    domain=DOMAIN,
)
SERVER_DUID = bytes.fromhex("00030001 02c600000001")  # RFC 8415 §11.4 DUID-LL, hw type 1


def gn(mac: str, vip6: str) -> GeneralNode:
    n = int(mac[-2:], 16)
    vip4 = ipaddress.IPv4Address(f"10.77.0.{n}")
    return GeneralNode(mac, f"gn{n}.{DOMAIN}", vip4, ipaddress.IPv6Address(vip6))


def table() -> GnTable:
    return GnTable([gn(GN1_MAC, GN1_VIP), gn(GN2_MAC, GN2_VIP)])


class MemoryLeases:
    """In-memory fake of :class:`~cyphonic.adapter.leases.LeaseStore` (get/put by kind, key)."""

    def __init__(self, fail: bool = False) -> None:
        self.records: dict[tuple[str, str], dict[str, Any]] = {}
        self.fail = fail
        self.puts = 0

    def get(self, kind: str, key: str) -> dict[str, Any] | None:
        record = self.records.get((kind, key))
        return None if record is None else dict(record)

    def put(self, kind: str, key: str, record: dict[str, Any]) -> None:
        self.puts += 1
        if self.fail:
            raise LeaseStoreError("disk full (test)")
        self.records[(kind, key)] = dict(record)


def server(leases: Any = None, **kwargs: Any) -> Dhcp6Server:
    return Dhcp6Server(
        table(), ADDRESSING, leases if leases is not None else MemoryLeases(), **kwargs
    )


# --------------------------------------------------------------------------------------------
# Client messages (scapy) and answers.

LLT = DUID_LLT(timeval=0x2B2B2B2B, lladdr=GN1_MAC)
CLIENT_DUID = raw(LLT)
OTHER_SERVER_DUID = raw(DUID_LL(lladdr="02:99:00:00:00:01"))
TRID = 0x0A0B0C


def client_id(duid: Packet = LLT) -> Packet:
    return DHCP6OptClientId(duid=duid)


def ia_na(iaid: int = 0x11, *addrs: str) -> Packet:
    return DHCP6OptIA_NA(
        iaid=iaid,
        T1=0,
        T2=0,
        ianaopts=[DHCP6OptIAAddress(addr=a, preflft=0, validlft=0) for a in addrs],
    )


def oro() -> Packet:
    return DHCP6OptOptReq(reqopts=[23, 24])


def msg(kind: type[Packet], *options: Packet, trid: int = TRID) -> Packet:
    out: Packet = kind(trid=trid)
    for opt in options:
        out = out / opt
    return out


def frame(
    message: Packet | bytes,
    *,
    mac: str = GN1_MAC,
    src: str = GN1_LL,
    dst: str = ALL_SERVERS,
    eth_dst: str | None = None,
    sport: int = 546,
) -> bytes:
    if eth_dst is None:
        eth_dst = ALL_SERVERS_MAC if dst == ALL_SERVERS else ADAPTER_MAC
    return raw(
        Ether(src=mac, dst=eth_dst)
        / IPv6(src=src, dst=dst, hlim=1)
        / UDP(sport=sport, dport=547)
        / message
    )


def solicit(*extra: Packet, duid: Packet = LLT, iaid: int = 0x11) -> Packet:
    return msg(DHCP6_Solicit, client_id(duid), ia_na(iaid), oro(), DHCP6OptElapsedTime(), *extra)


def request(*extra: Packet, duid: Packet = LLT, server_id: bytes = SERVER_DUID) -> Packet:
    return msg(
        DHCP6_Request,
        client_id(duid),
        DHCP6OptServerId(duid=DUID_LL(server_id)),
        ia_na(0x11, GN1_VIP),
        oro(),
        DHCP6OptElapsedTime(),
        *extra,
    )


def with_server(kind: type[Packet], *options: Packet, server_id: bytes = SERVER_DUID) -> Packet:
    return msg(kind, client_id(), DHCP6OptServerId(duid=DUID_LL(server_id)), *options)


def one(srv: Dhcp6Server, data: bytes, now: float = NOW) -> Dhcp6Message | None:
    """The answer to ``data`` parsed with our codec (checked by scapy too), or None."""
    out = srv.handle(data, now)
    assert len(out) <= 1
    if not out:
        return None
    check_framing(out[0], data)
    pkt = Ether(out[0])
    assert DHCP6 in pkt or DHCP6_Advertise in pkt or DHCP6_Reply in pkt
    return Dhcp6Message.parse(raw(pkt[UDP].payload))


def check_framing(answer: bytes, question: bytes) -> None:
    """RFC 8415 §18.3.10: unicast to the client's source address and MAC, from the adapter's
    link-local address; UDP 547 -> 546 (§7.2) with a checksum scapy agrees with."""
    q, a = Ether(question), Ether(answer)
    assert a.dst == q.src and a.src == ADAPTER_MAC and a.type == 0x86DD
    assert a[IPv6].src == ROUTER_LL and a[IPv6].dst == q[IPv6].src
    assert a[IPv6].nh == 17 and a[IPv6].hlim == 64 and a[IPv6].plen == len(a[IPv6].payload)
    assert (a[UDP].sport, a[UDP].dport) == (547, 546)
    assert a[UDP].len == len(raw(a[UDP]))
    zeroed = raw(a[UDP])[:6] + b"\x00\x00" + raw(a[UDP])[8:]
    assert a[UDP].chksum == in6_chksum(17, a[IPv6], zeroed)  # type: ignore[no-untyped-call]


def opts(m: Dhcp6Message) -> list[int]:
    return [code for code, _ in m.options]


def status(m: Dhcp6Message) -> tuple[int, str] | None:
    data = m.get(OptionCode.STATUS_CODE)
    return None if data is None else parse_status(data)


def ias(m: Dhcp6Message) -> list[IaNa]:
    return [IaNa.parse(d) for c, d in m.options if c == OptionCode.IA_NA]


def vip_ia(m: Dhcp6Message, iaid: int = 0x11, vip: str = GN1_VIP) -> None:
    """The IA_NA of the answer carries exactly the VIPv6 with the configured lifetimes."""
    (ia,) = ias(m)
    assert (ia.iaid, ia.t1, ia.t2, ia.status) == (iaid, 1800, 2880, None)
    assert [(str(a.address), a.preferred, a.valid) for a in ia.addresses] == [(vip, 3600, 7200)]


DNS_OPTION = (OptionCode.DNS_SERVERS, ipaddress.IPv6Address(DNS6).packed)
DOMAIN_OPTION = (OptionCode.DOMAIN_LIST, b"\x08cyphonic\x04test\x00")


def config_options(m: Dhcp6Message) -> None:
    """RFC 3646 §3 (DNS servers) and §4 (domain list, RFC 1035 §3.1 uncompressed) present."""
    assert DNS_OPTION in m.options and DOMAIN_OPTION in m.options


# --------------------------------------------------------------------------------------------
# Solicit / Advertise (§18.3.1)


def test_advertise_exact_bytes() -> None:
    """Solicit -> Advertise, byte for byte (RFC 8415 §8, §21.2-21.8; RFC 3646 §3-4)."""
    srv = server()
    out = srv.handle(frame(solicit()), NOW)
    assert len(out) == 1
    payload = Ether(out[0])[UDP].payload
    expected = bytes.fromhex(
        " ".join(
            [
                "02 0a0b0c",  # §8: msg-type ADVERTISE, transaction-id echoed
                "0002 000a 00030001 02c600000001",  # §21.3 Server Identifier: DUID-LL (§11.4)
                "0001 000e " + CLIENT_DUID.hex(),  # §21.2 Client Identifier, echoed
                "0007 0001 ff",  # §21.8 Preference 255
                "0003 0028 00000011 00000708 00000b40",  # §21.4 IA_NA: IAID, T1 1800, T2 2880
                "0005 0018 fd435950000000000000000000000011",  # §21.6 IA Address: the VIPv6,
                "00000e10 00001c20",  # preferred 3600, valid 7200
                "0017 0010 fd435950000000000000000000000001",  # RFC 3646 §3 DNS servers
                "0018 000f 08 63797068 6f6e6963 04 74657374 00",  # RFC 3646 §4 "cyphonic.test"
            ]
        )
    )
    assert raw(payload) == expected
    check_framing(out[0], frame(solicit()))
    assert srv.stats.rx_solicit == 1 and srv.stats.tx_advertise == 1


def test_advertise_dissected_by_scapy() -> None:
    out = server().handle(frame(solicit()), NOW)
    pkt = Ether(out[0])
    adv = pkt[DHCP6_Advertise]
    assert adv.trid == TRID
    assert raw(adv[DHCP6OptServerId].duid) == SERVER_DUID
    assert raw(adv[DHCP6OptClientId].duid) == CLIENT_DUID
    assert adv[DHCP6OptPref].prefval == 255
    assert adv[DHCP6OptIA_NA].iaid == 0x11
    assert adv[DHCP6OptIAAddress].addr == GN1_VIP
    assert adv[DHCP6OptDNSServers].dnsservers == [DNS6]
    assert adv[DHCP6OptDNSDomains].dnsdomains == ["cyphonic.test."]


def test_solicit_commits_nothing() -> None:
    leases = MemoryLeases()
    server(leases).handle(frame(solicit()), NOW)
    assert leases.puts == 0


def test_solicit_with_rapid_commit_gets_a_committing_reply() -> None:
    """§18.3.1 + §21.14: Reply with Rapid Commit, lease bound at once."""
    leases = MemoryLeases()
    srv = server(leases)
    m = one(srv, frame(solicit(DHCP6OptRapidCommit())))
    assert m is not None and m.msg_type == MessageType.REPLY and m.transaction_id == TRID
    assert opts(m)[:3] == [OptionCode.SERVERID, OptionCode.CLIENTID, OptionCode.RAPID_COMMIT]
    assert not m.has(OptionCode.PREFERENCE)
    vip_ia(m)
    config_options(m)
    record = leases.records[(LEASE_KIND, GN1_MAC)]
    assert record["state"] == "bound" and record["vip6"] == GN1_VIP
    assert record["expires"] == NOW + 7200 and srv.stats.tx_reply == 1


def test_rapid_commit_can_be_disabled() -> None:
    m = one(server(rapid_commit=False), frame(solicit(DHCP6OptRapidCommit())))
    assert m is not None and m.msg_type == MessageType.ADVERTISE
    assert not m.has(OptionCode.RAPID_COMMIT)


def test_solicit_without_any_ia_gets_only_noaddrsavail() -> None:
    """§18.3.1: nothing to offer -> Advertise with only a NoAddrsAvail status."""
    m = one(server(), frame(msg(DHCP6_Solicit, client_id(), oro())))
    assert m is not None and m.msg_type == MessageType.ADVERTISE
    assert opts(m) == [OptionCode.SERVERID, OptionCode.CLIENTID, OptionCode.STATUS_CODE]
    assert status(m) is not None and status(m)[0] == StatusCode.NO_ADDRS_AVAIL  # type: ignore[index]


def test_ia_ta_ia_pd_and_a_second_ia_na_are_refused_inside_the_ia() -> None:
    """One VIPv6 per GN: the first IA_NA gets it; a second IA_NA NoAddrsAvail, IA_TA
    NoAddrsAvail (§21.5), IA_PD NoPrefixAvail (§21.21)."""
    m = one(
        server(),
        frame(
            msg(
                DHCP6_Solicit,
                client_id(),
                ia_na(1),
                ia_na(2),
                DHCP6OptIA_TA(iaid=3),
                DHCP6OptIA_PD(iaid=4, iapdopt=[DHCP6OptIAPrefix(prefix="2001:db8::", plen=56)]),
            )
        ),
    )
    assert m is not None
    first, second = ias(m)
    assert first.iaid == 1 and [str(a.address) for a in first.addresses] == [GN1_VIP]
    assert second.iaid == 2 and not second.addresses
    assert second.status is not None and second.status[0] == StatusCode.NO_ADDRS_AVAIL
    pkt = DHCP6_Advertise(m.pack())
    assert pkt[DHCP6OptIA_TA].iaid == 3
    assert pkt[DHCP6OptIA_TA][DHCP6OptStatusCode].statuscode == StatusCode.NO_ADDRS_AVAIL
    assert pkt[DHCP6OptIA_PD].iaid == 4
    assert pkt[DHCP6OptIA_PD][DHCP6OptStatusCode].statuscode == StatusCode.NO_PREFIX_AVAIL


def test_the_ia_bound_before_keeps_the_address() -> None:
    leases = MemoryLeases()
    srv = server(leases)
    one(srv, frame(request()))
    m = one(srv, frame(msg(DHCP6_Solicit, client_id(), ia_na(7), ia_na(0x11))))
    assert m is not None
    by_iaid = {ia.iaid: ia for ia in ias(m)}
    assert by_iaid[0x11].addresses and not by_iaid[7].addresses


# --------------------------------------------------------------------------------------------
# Request, Renew, Rebind (§18.3.2, §18.3.4, §18.3.5)


def test_request_reply_and_lease_record() -> None:
    leases = MemoryLeases()
    m = one(server(leases), frame(request()))
    assert m is not None and m.msg_type == MessageType.REPLY and m.transaction_id == TRID
    assert opts(m) == [
        OptionCode.SERVERID,
        OptionCode.CLIENTID,
        OptionCode.IA_NA,
        OptionCode.DNS_SERVERS,
        OptionCode.DOMAIN_LIST,
    ]
    assert m.get(OptionCode.CLIENTID) == CLIENT_DUID
    vip_ia(m)
    config_options(m)
    assert leases.records[(LEASE_KIND, GN1_MAC)] == {
        "mac": GN1_MAC,
        "fqdn": f"gn17.{DOMAIN}",
        "vip6": GN1_VIP,
        "state": "bound",
        "duid": CLIENT_DUID.hex(),
        "duid_type": "LLT",
        "iaid": 0x11,
        "bound_at": NOW,
        "expires": NOW + 7200,
        "updated": NOW,
    }


def test_request_ignores_address_hints() -> None:
    """§18.3.2: the server assigns what it assigns; a hinted address is not the VIPv6."""
    m = one(
        server(),
        frame(with_server(DHCP6_Request, ia_na(0x11, "fd43:5950::99"))),
    )
    assert m is not None
    vip_ia(m)


def test_renew_extends_the_binding_and_expires_foreign_addresses() -> None:
    leases = MemoryLeases()
    srv = server(leases)
    one(srv, frame(request()))
    later = NOW + 1800
    m = one(
        srv,
        frame(with_server(DHCP6_Renew, ia_na(0x11, GN1_VIP, "fd43:5950::99"), oro())),
        later,
    )
    assert m is not None and m.msg_type == MessageType.REPLY
    (ia,) = ias(m)
    assert [(str(a.address), a.preferred, a.valid) for a in ia.addresses] == [
        (GN1_VIP, 3600, 7200),
        ("fd43:5950::99", 0, 0),  # §18.3.4: not appropriate for the link -> lifetimes 0
    ]
    config_options(m)
    record = leases.records[(LEASE_KIND, GN1_MAC)]
    assert record["bound_at"] == NOW and record["expires"] == later + 7200
    assert srv.stats.rx_renew == 1 and srv.stats.binding_recreated == 0


def test_rebind_reply() -> None:
    leases = MemoryLeases()
    srv = server(leases)
    one(srv, frame(request()))
    m = one(srv, frame(msg(DHCP6_Rebind, client_id(), ia_na(0x11, GN1_VIP), oro())), NOW + 3000)
    assert m is not None and m.msg_type == MessageType.REPLY
    vip_ia(m)
    config_options(m)
    assert leases.records[(LEASE_KIND, GN1_MAC)]["expires"] == NOW + 3000 + 7200


def test_renew_without_a_lease_record_creates_the_binding_again() -> None:
    """§18.3.4: the server MAY create a new binding; the VIPv6 is fixed, so it does."""
    leases = MemoryLeases()
    srv = server(leases)
    m = one(srv, frame(with_server(DHCP6_Renew, ia_na(0x11, GN1_VIP))))
    assert m is not None
    vip_ia(m)
    assert srv.stats.binding_recreated == 1
    assert leases.records[(LEASE_KIND, GN1_MAC)]["state"] == "bound"


def test_a_changed_vip_moves_the_client_over() -> None:
    """AS gave the GN a new VIPv6: Renew returns it and the old one with lifetimes 0."""
    leases = MemoryLeases()
    tbl = table()
    srv = Dhcp6Server(tbl, ADDRESSING, leases)
    one(srv, frame(request()))
    tbl.replace([gn(GN1_MAC, "fd43:5950::21"), gn(GN2_MAC, GN2_VIP)])
    m = one(srv, frame(with_server(DHCP6_Renew, ia_na(0x11, GN1_VIP))))
    assert m is not None
    (ia,) = ias(m)
    assert [(str(a.address), a.valid) for a in ia.addresses] == [
        ("fd43:5950::21", 7200),
        (GN1_VIP, 0),
    ]


# --------------------------------------------------------------------------------------------
# Release, Decline (§18.3.7, §18.3.8)


def test_release_keeps_the_address_reserved() -> None:
    leases = MemoryLeases()
    srv = server(leases)
    one(srv, frame(request()))
    m = one(srv, frame(with_server(DHCP6_Release, ia_na(0x11, GN1_VIP))), NOW + 10)
    assert m is not None and m.msg_type == MessageType.REPLY
    assert opts(m) == [OptionCode.SERVERID, OptionCode.CLIENTID, OptionCode.STATUS_CODE]
    assert status(m) == (StatusCode.SUCCESS, "release received")
    record = leases.records[(LEASE_KIND, GN1_MAC)]
    assert record["state"] == "released" and record["expires"] == NOW + 10
    # reserved: the same MAC gets the same address again, with a fresh binding
    again = one(srv, frame(request()), NOW + 20)
    assert again is not None
    vip_ia(again)
    assert leases.records[(LEASE_KIND, GN1_MAC)]["state"] == "bound"


def test_release_is_idempotent() -> None:
    srv = server()
    one(srv, frame(request()))
    release = frame(with_server(DHCP6_Release, ia_na(0x11, GN1_VIP)))
    one(srv, release)
    m = one(srv, release)  # a retransmission: still Success, no NoBinding
    assert m is not None and opts(m) == [
        OptionCode.SERVERID,
        OptionCode.CLIENTID,
        OptionCode.STATUS_CODE,
    ]


def test_release_of_an_unknown_ia_gets_nobinding() -> None:
    """§18.3.7: Success overall, NoBinding inside each IA with no binding."""
    m = one(server(), frame(with_server(DHCP6_Release, ia_na(0x42, GN1_VIP))))
    assert m is not None and status(m) == (StatusCode.SUCCESS, "release received")
    (ia,) = ias(m)
    assert ia.iaid == 0x42 and ia.status is not None and ia.status[0] == StatusCode.NO_BINDING


def test_decline_is_logged_loudly(caplog: pytest.LogCaptureFixture) -> None:
    leases = MemoryLeases()
    srv = server(leases)
    one(srv, frame(request()))
    with caplog.at_level(logging.ERROR, logger="cyphonic.adapter.dhcpv6"):
        m = one(srv, frame(with_server(DHCP6_Decline, ia_na(0x11, GN1_VIP))))
    assert m is not None and status(m) == (StatusCode.SUCCESS, "decline received")
    assert not ias(m)
    assert srv.stats.declined == 1
    assert leases.records[(LEASE_KIND, GN1_MAC)]["state"] == "declined"
    (rec,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "DECLINED" in rec.getMessage() and GN1_VIP in rec.getMessage()
    assert GN1_MAC in rec.getMessage()
    # the fixed VIPv6 is still the one offered
    adv = one(srv, frame(solicit()))
    assert adv is not None
    vip_ia(adv)


def test_decline_without_a_binding_is_still_on_file(caplog: pytest.LogCaptureFixture) -> None:
    """§18.3.8: NoBinding inside the IA, but the decline itself is recorded and logged."""
    leases = MemoryLeases()
    srv = server(leases)
    with caplog.at_level(logging.ERROR, logger="cyphonic.adapter.dhcpv6"):
        m = one(srv, frame(with_server(DHCP6_Decline, ia_na(0x42, GN1_VIP))))
    assert m is not None and status(m) == (StatusCode.SUCCESS, "decline received")
    (ia,) = ias(m)
    assert ia.status is not None and ia.status[0] == StatusCode.NO_BINDING
    record = leases.records[(LEASE_KIND, GN1_MAC)]
    assert record["state"] == "declined" and record["iaid"] == 0x42
    assert srv.stats.declined == 1 and "DECLINED" in caplog.text


# --------------------------------------------------------------------------------------------
# Confirm (§18.3.3), Information-request (§18.3.6)


def test_confirm_of_the_vip_is_success() -> None:
    m = one(server(), frame(msg(DHCP6_Confirm, client_id(), ia_na(0x11, GN1_VIP))))
    assert m is not None and m.msg_type == MessageType.REPLY
    assert opts(m) == [OptionCode.SERVERID, OptionCode.CLIENTID, OptionCode.STATUS_CODE]
    assert status(m) == (StatusCode.SUCCESS, "addresses are on-link")


@pytest.mark.parametrize("address", ["2001:db8::11", GN2_VIP, "fd43:5950::99"])
def test_confirm_of_another_address_is_notonlink(address: str) -> None:
    m = one(server(), frame(msg(DHCP6_Confirm, client_id(), ia_na(0x11, GN1_VIP, address))))
    assert m is not None and status(m) is not None
    assert status(m)[0] == StatusCode.NOT_ON_LINK  # type: ignore[index]


def test_confirm_without_addresses_gets_no_reply() -> None:
    srv = server()
    assert srv.handle(frame(msg(DHCP6_Confirm, client_id(), ia_na(0x11))), NOW) == []
    assert srv.stats.no_reply == 1


def test_information_request_gives_dns_and_domain_only() -> None:
    m = one(server(), frame(msg(DHCP6_InfoRequest, client_id(), oro(), DHCP6OptElapsedTime())))
    assert m is not None and m.msg_type == MessageType.REPLY
    assert m.options == (
        (OptionCode.SERVERID, SERVER_DUID),
        (OptionCode.CLIENTID, CLIENT_DUID),
        DNS_OPTION,
        DOMAIN_OPTION,
    )


def test_information_request_without_client_id_is_answered_without_one() -> None:
    m = one(server(), frame(msg(DHCP6_InfoRequest, oro())))
    assert m is not None
    assert m.options == ((OptionCode.SERVERID, SERVER_DUID), DNS_OPTION, DOMAIN_OPTION)


def test_information_request_with_our_server_id_is_answered() -> None:
    m = one(server(), frame(with_server(DHCP6_InfoRequest, oro())))
    assert m is not None


@pytest.mark.parametrize(
    "message",
    [
        msg(DHCP6_InfoRequest, client_id(), ia_na(1)),  # §16.12: no IA option allowed
        with_server(DHCP6_InfoRequest, server_id=OTHER_SERVER_DUID),
    ],
    ids=["with-ia", "other-server"],
)
def test_information_request_that_is_not_ours_is_dropped(message: Packet) -> None:
    assert server().handle(frame(message), NOW) == []


# --------------------------------------------------------------------------------------------
# §16: identifiers


SERVER_ID_CASES = [
    # (message type, server id: "ours" / "other" / None, answered?, counter if dropped)
    (DHCP6_Solicit, None, True, None),
    (DHCP6_Solicit, "ours", False, "malformed"),  # §16.2: MUST discard with a Server ID
    (DHCP6_Solicit, "other", False, "malformed"),
    (DHCP6_Request, "ours", True, None),
    (DHCP6_Request, None, False, "malformed"),  # §16.4: MUST include one
    (DHCP6_Request, "other", False, "wrong_server"),  # ... that matches ours
    (DHCP6_Confirm, None, True, None),
    (DHCP6_Confirm, "ours", False, "malformed"),  # §16.5
    (DHCP6_Renew, "ours", True, None),
    (DHCP6_Renew, None, False, "malformed"),  # §16.6
    (DHCP6_Renew, "other", False, "wrong_server"),
    (DHCP6_Rebind, None, True, None),
    (DHCP6_Rebind, "ours", False, "malformed"),  # §16.7
    (DHCP6_Decline, "ours", True, None),
    (DHCP6_Decline, None, False, "malformed"),  # §16.8
    (DHCP6_Decline, "other", False, "wrong_server"),
    (DHCP6_Release, "ours", True, None),
    (DHCP6_Release, None, False, "malformed"),  # §16.9
    (DHCP6_Release, "other", False, "wrong_server"),
    (DHCP6_InfoRequest, None, True, None),
    (DHCP6_InfoRequest, "ours", True, None),  # §16.12: allowed if it is ours
    (DHCP6_InfoRequest, "other", False, "wrong_server"),
]


@pytest.mark.parametrize(("kind", "sid", "answered", "counter"), SERVER_ID_CASES)
def test_server_identifier_rules(
    kind: type[Packet], sid: str | None, answered: bool, counter: str | None
) -> None:
    options: list[Packet] = [client_id(), ia_na(0x11, GN1_VIP)]
    if kind is DHCP6_InfoRequest:
        options = [client_id()]
    if sid is not None:
        duid = SERVER_DUID if sid == "ours" else OTHER_SERVER_DUID
        options.append(DHCP6OptServerId(duid=DUID_LL(duid)))
    srv = server()
    out = srv.handle(frame(msg(kind, *options)), NOW)
    assert bool(out) is answered
    if counter is not None:
        assert srv.stats.as_dict()[counter] == 1


@pytest.mark.parametrize(
    "kind",
    [
        DHCP6_Solicit,
        DHCP6_Request,
        DHCP6_Confirm,
        DHCP6_Renew,
        DHCP6_Rebind,
        DHCP6_Release,
        DHCP6_Decline,
    ],
)
def test_client_identifier_is_required(kind: type[Packet]) -> None:
    options: list[Packet] = [ia_na(0x11, GN1_VIP)]
    if kind in (DHCP6_Request, DHCP6_Renew, DHCP6_Release, DHCP6_Decline):
        options.append(DHCP6OptServerId(duid=DUID_LL(SERVER_DUID)))
    srv = server()
    assert srv.handle(frame(msg(kind, *options)), NOW) == []
    assert srv.stats.malformed == 1


ALL_CLIENT_MESSAGES = [
    solicit(),
    request(),
    msg(DHCP6_Confirm, client_id(), ia_na(0x11, GN1_VIP)),
    with_server(DHCP6_Renew, ia_na(0x11, GN1_VIP)),
    msg(DHCP6_Rebind, client_id(), ia_na(0x11, GN1_VIP)),
    with_server(DHCP6_Release, ia_na(0x11, GN1_VIP)),
    with_server(DHCP6_Decline, ia_na(0x11, GN1_VIP)),
    msg(DHCP6_InfoRequest, client_id(), oro()),
]
MESSAGE_IDS = ["solicit", "request", "confirm", "renew", "rebind", "release", "decline", "info"]


@pytest.mark.parametrize("message", ALL_CLIENT_MESSAGES, ids=MESSAGE_IDS)
def test_every_message_type_is_answered_for_a_gn(message: Packet) -> None:
    m = one(server(), frame(message))
    assert m is not None and m.transaction_id == TRID
    assert m.get(OptionCode.SERVERID) == SERVER_DUID


@pytest.mark.parametrize("message", ALL_CLIENT_MESSAGES, ids=MESSAGE_IDS)
def test_unknown_mac_gets_nothing(message: Packet, caplog: pytest.LogCaptureFixture) -> None:
    leases = MemoryLeases()
    srv = server(leases)
    with caplog.at_level(logging.INFO, logger="cyphonic.adapter.dhcpv6"):
        for i in range(3):
            assert srv.handle(frame(message, mac=STRANGER_MAC, src=STRANGER_LL), NOW + i) == []
    assert srv.stats.unknown_mac == 3 and leases.puts == 0
    assert srv.stats.tx_advertise == srv.stats.tx_reply == 0
    logged = [r for r in caplog.records if "no general node" in r.getMessage()]
    assert len(logged) == 1 and STRANGER_MAC in logged[0].getMessage()  # rate-limited


# --------------------------------------------------------------------------------------------
# Identity: the frame's MAC, whatever the DUID


DUIDS = {
    "LLT": DUID_LLT(timeval=12345, lladdr=GN1_MAC),
    "LL": DUID_LL(lladdr="02:aa:bb:cc:dd:ee"),  # even naming another MAC
    "EN": DUID_EN(enterprisenum=32473, id=b"\x01\x02\x03\x04\x05"),
    "UUID": DUID_UUID(uuid="12345678-1234-5678-1234-567812345678"),
}


@pytest.mark.parametrize("kind", list(DUIDS))
@pytest.mark.parametrize(
    ("mac", "src", "vip"), [(GN1_MAC, GN1_LL, GN1_VIP), (GN2_MAC, GN2_LL, GN2_VIP)]
)
def test_every_duid_type_maps_to_the_mac_of_the_frame(
    kind: str, mac: str, src: str, vip: str
) -> None:
    leases = MemoryLeases()
    srv = server(leases)
    duid = DUIDS[kind]
    adv = one(srv, frame(solicit(duid=duid), mac=mac, src=src))
    assert adv is not None
    vip_ia(adv, vip=vip)
    rep = one(srv, frame(request(duid=duid), mac=mac, src=src))
    assert rep is not None and rep.get(OptionCode.CLIENTID) == raw(duid)
    vip_ia(rep, vip=vip)
    record = leases.records[(LEASE_KIND, mac)]
    assert record["duid_type"] == kind and record["duid"] == raw(duid).hex()
    assert duid_type_name(raw(duid)) == kind


def test_same_duid_from_two_macs_gives_two_addresses() -> None:
    srv = server()
    one_ = one(srv, frame(solicit(), mac=GN1_MAC, src=GN1_LL))
    two = one(srv, frame(solicit(), mac=GN2_MAC, src=GN2_LL))
    assert one_ is not None and two is not None
    vip_ia(one_, vip=GN1_VIP)
    vip_ia(two, vip=GN2_VIP)


def test_unknown_duid_type_is_accepted_opaquely() -> None:
    duid = b"\x00\x09" + b"opaque"
    data = bytes.fromhex("01 0a0b0c") + pack_option(1, duid) + pack_option(3, bytes(12))
    m = one(server(), frame(data))
    assert m is not None and m.get(OptionCode.CLIENTID) == duid
    assert duid_type_name(duid) == "type-9"


# --------------------------------------------------------------------------------------------
# Restart: the lease file carries the bindings


def test_restart_with_the_same_lease_file(tmp_path: Path) -> None:
    path = tmp_path / "leases.json"
    first = server(LeaseStore(path))
    rep = one(first, frame(request()))
    assert rep is not None
    # a new process: new server, store re-read from disk
    renew = frame(with_server(DHCP6_Renew, ia_na(0x11, GN1_VIP)))
    second = server(LeaseStore(path))
    m = one(second, renew, NOW + 1800)
    assert m is not None
    vip_ia(m)
    assert second.stats.binding_recreated == 0
    third = server(LeaseStore(path))
    m = one(third, frame(msg(DHCP6_Rebind, client_id(), ia_na(0x11, GN1_VIP))), NOW + 3000)
    assert m is not None
    vip_ia(m)
    assert third.stats.binding_recreated == 0
    assert LeaseStore(path).get(LEASE_KIND, GN1_MAC)["expires"] == NOW + 3000 + 7200  # type: ignore[index]
    # Release after a restart: the binding is known, so no NoBinding
    fourth = server(LeaseStore(path))
    m = one(fourth, frame(with_server(DHCP6_Release, ia_na(0x11, GN1_VIP))), NOW + 3100)
    assert m is not None and not ias(m) and status(m) == (StatusCode.SUCCESS, "release received")
    assert LeaseStore(path).get(LEASE_KIND, GN1_MAC)["state"] == "released"  # type: ignore[index]
    # bound again, restart, Decline
    one(server(LeaseStore(path)), frame(request()), NOW + 3200)
    fifth = server(LeaseStore(path))
    m = one(fifth, frame(with_server(DHCP6_Decline, ia_na(0x11, GN1_VIP))), NOW + 3300)
    assert m is not None and not ias(m) and status(m) == (StatusCode.SUCCESS, "decline received")
    record = LeaseStore(path).get(LEASE_KIND, GN1_MAC)
    assert record is not None and record["state"] == "declined"
    assert record["duid"] == CLIENT_DUID.hex() and record["iaid"] == 0x11


def test_without_the_lease_file_release_gets_nobinding(tmp_path: Path) -> None:
    one(server(LeaseStore(tmp_path / "a.json")), frame(request()))
    m = one(
        server(LeaseStore(tmp_path / "b.json")),
        frame(with_server(DHCP6_Release, ia_na(0x11, GN1_VIP))),
    )
    assert m is not None
    (ia,) = ias(m)
    assert ia.status is not None and ia.status[0] == StatusCode.NO_BINDING


def test_a_failing_lease_store_still_answers(caplog: pytest.LogCaptureFixture) -> None:
    srv = server(MemoryLeases(fail=True))
    with caplog.at_level(logging.ERROR, logger="cyphonic.adapter.dhcpv6"):
        m = one(srv, frame(request()))
    assert m is not None
    vip_ia(m)
    assert srv.stats.lease_store_errors == 1
    assert any("not saved" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------------------------
# Framing: what is not for us


def test_unicast_request_gets_usemulticast() -> None:
    """§18.4: no Server Unicast option was sent, so unicast -> UseMulticast and nothing else."""
    srv = server()
    m = one(srv, frame(request(), dst=ROUTER_LL))
    assert m is not None and m.msg_type == MessageType.REPLY
    assert opts(m) == [OptionCode.SERVERID, OptionCode.CLIENTID, OptionCode.STATUS_CODE]
    assert status(m) == (StatusCode.USE_MULTICAST, "use multicast")
    assert srv.stats.unicast == 1


def test_unicast_solicit_is_dropped() -> None:
    srv = server()
    assert srv.handle(frame(solicit(), dst=ROUTER_LL), NOW) == []
    assert srv.stats.unicast == 1


@pytest.mark.parametrize(
    ("data", "counter"),
    [
        (frame(solicit(), eth_dst="02:c6:00:00:00:99", dst=ROUTER_LL), "not_for_us"),
        (frame(solicit(), dst="fe80::c6:99"), "not_for_us"),
        (frame(solicit(), eth_dst=ADAPTER_MAC), "not_for_us"),  # ff02::1:2 on a unicast MAC
        (frame(solicit(), dst="ff05::1:3", eth_dst="33:33:00:01:00:03"), "not_for_us"),
        (frame(solicit(), mac=ADAPTER_MAC), "own_frame"),
        (frame(solicit(), src="fd43:5950::11"), "not_link_local"),
        (frame(solicit(), mac="03:c6:00:00:00:11"), "malformed"),  # multicast source MAC
        (frame(msg(DHCP6_Advertise, client_id())), "unsupported"),
        (frame(msg(DHCP6_Reply, client_id())), "unsupported"),
        (frame(DHCP6_RelayForward(linkaddr="::", peeraddr=GN1_LL)), "unsupported"),
        (
            raw(Ether(src=GN1_MAC, dst=ALL_SERVERS_MAC) / Dot1Q(vlan=5) / IPv6() / UDP(dport=547)),
            "ignored",
        ),
        (
            raw(
                Ether(src=GN1_MAC, dst=ALL_SERVERS_MAC)
                / IPv6(src=GN1_LL, dst=ALL_SERVERS)
                / UDP(dport=53)
            ),
            "ignored",
        ),
        (b"", "ignored"),
    ],
    ids=[
        "other-unicast-mac",
        "other-unicast-ip",
        "multicast-ip-unicast-mac",
        "all-servers-site",
        "own-frame",
        "global-source",
        "multicast-source-mac",
        "advertise",
        "reply",
        "relay-forward",
        "vlan",
        "other-port",
        "empty",
    ],
)
def test_frames_not_for_us_are_dropped_and_counted(data: bytes, counter: str) -> None:
    srv = server()
    assert srv.handle(data, NOW) == []
    assert srv.stats.as_dict()[counter] == 1
    assert srv.stats.internal_error == 0


def bad_checksum(data: bytes) -> bytes:
    return data[:60] + bytes((data[60] ^ 0xFF,)) + data[61:]


def zero_checksum(data: bytes) -> bytes:
    return data[:60] + b"\x00\x00" + data[62:]


def plen(data: bytes, value: int) -> bytes:
    return data[:18] + value.to_bytes(2, "big") + data[20:]


GOOD = frame(solicit())


@pytest.mark.parametrize(
    "data",
    [
        bad_checksum(GOOD),
        zero_checksum(GOOD),
        plen(GOOD, len(GOOD) - 54 + 1),  # runs past the frame
        plen(GOOD, 7),  # shorter than a UDP header
        GOOD[:14] + b"\x50" + GOOD[15:],  # IP version 5
        GOOD[:-1],  # truncated: lengths disagree
    ],
    ids=["bad-checksum", "zero-checksum", "plen-overrun", "plen-short", "version", "truncated"],
)
def test_broken_framing_is_malformed(data: bytes) -> None:
    srv = server()
    assert srv.handle(data, NOW) == []
    assert srv.stats.malformed == 1


def with_partial_checksum(data: bytes) -> bytes:
    """``data`` as a veth hands it over with UDP checksum offload pending: the field holds the
    folded pseudo-header sum (RFC 8200 §8.1) instead of the checksum."""
    plen = int.from_bytes(data[18:20], "big")
    pseudo = data[22:38] + data[38:54] + plen.to_bytes(4, "big") + b"\x00\x00\x00\x11"
    total = sum(int.from_bytes(pseudo[i : i + 2], "big") for i in range(0, len(pseudo), 2))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return data[:60] + total.to_bytes(2, "big") + data[62:]


def test_checksum_left_to_offload_is_accepted() -> None:
    """The vector seen on the e2e veth: a 118-byte Solicit from fe80::c7:ff:fe00:11 to ff02::1:2
    arrived with checksum field 0xfdaf, the pseudo-header sum.  It is answered and counted."""
    oro4 = DHCP6OptOptReq(reqopts=[23, 24, 39, 82])
    data = frame(msg(DHCP6_Solicit, client_id(), ia_na(0x11), DHCP6OptElapsedTime(), oro4),
                 src="fe80::c7:ff:fe00:11")  # fmt: skip
    partial = with_partial_checksum(data)
    assert len(partial) == 118 and partial[60:62] == b"\xfd\xaf"
    srv = server()
    m = one(srv, partial)
    assert m is not None and srv.stats.checksum_partial == 1 and srv.stats.malformed == 0
    # any other wrong value is still a bad checksum
    assert srv.handle(partial[:60] + b"\xfd\xb0" + partial[62:], NOW) == []
    assert srv.stats.malformed == 1


def test_ethernet_padding_is_tolerated() -> None:
    assert one(server(), GOOD + bytes(20)) is not None


def test_hop_limit_and_source_port_of_the_client_do_not_matter() -> None:
    assert one(server(), frame(solicit(), sport=40000)) is not None


# --------------------------------------------------------------------------------------------
# Codec


def test_udp_checksum_matches_scapy() -> None:
    pkt = Ether(GOOD)
    src, dst = ipaddress.IPv6Address(GN1_LL).packed, ipaddress.IPv6Address(ALL_SERVERS).packed
    segment = raw(pkt[UDP])[:6] + b"\x00\x00" + raw(pkt[UDP])[8:]
    assert udp_checksum(src, dst, segment) == pkt[UDP].chksum


def test_build_udp_frame_matches_scapy() -> None:
    payload = b"\x07\x01\x02\x03" + pack_option(2, SERVER_DUID)
    ours = build_udp_frame(
        bytes.fromhex("02c600000011"),
        bytes.fromhex("02c600000001"),
        ipaddress.IPv6Address(ROUTER_LL).packed,
        ipaddress.IPv6Address(GN1_LL).packed,
        547,
        546,
        payload,
    )
    theirs = raw(
        Ether(dst=GN1_MAC, src=ADAPTER_MAC)
        / IPv6(src=ROUTER_LL, dst=GN1_LL, hlim=64)
        / UDP(sport=547, dport=546)
        / payload
    )
    assert ours == theirs


@pytest.mark.parametrize("message", ALL_CLIENT_MESSAGES, ids=MESSAGE_IDS)
def test_parse_of_scapy_messages_round_trips(message: Packet) -> None:
    data = raw(message)
    parsed = Dhcp6Message.parse(data)
    assert parsed.pack() == data
    assert parsed.msg_type == message.msgtype and parsed.transaction_id == TRID
    assert parsed.get(OptionCode.CLIENTID) == CLIENT_DUID


def test_parsed_ia_na_matches_scapy() -> None:
    data = raw(msg(DHCP6_Renew, client_id(), ia_na(0x11, GN1_VIP, GN2_VIP)))
    (ia,) = Dhcp6Message.parse(data).ia_na
    assert ia.iaid == 0x11
    assert [str(a.address) for a in ia.addresses] == [GN1_VIP, GN2_VIP]
    assert IaNa.parse(ia.pack()[4:]) == ia


def test_requested_options() -> None:
    assert Dhcp6Message.parse(raw(solicit())).requested == (23, 24)


def test_duid_ll() -> None:
    assert duid_ll(bytes.fromhex("02c600000001")) == SERVER_DUID
    assert raw(DUID_LL(lladdr=ADAPTER_MAC)) == SERVER_DUID


def base(*options: bytes, msg_type: int = 1) -> bytes:
    return bytes((msg_type,)) + b"\x0a\x0b\x0c" + b"".join(options)


CID = pack_option(1, CLIENT_DUID)


@pytest.mark.parametrize(
    "data",
    [
        b"\x01\x00\x00",  # shorter than the header (§8)
        base(b"\x00\x01\x00"),  # truncated option header
        base(b"\x00\x01\x00\x10" + bytes(4)),  # option data runs past the end
        base(CID, CID),  # Client Identifier twice
        base(pack_option(1, b"\x00\x01")),  # DUID of 2 bytes (§11.1: 3..130)
        base(pack_option(1, bytes(131))),  # DUID of 131 bytes
        base(CID, pack_option(6, b"\x00\x17\x00")),  # ORO of odd length (§21.7)
        base(CID, pack_option(8, b"\x00")),  # Elapsed Time of 1 byte (§21.9)
        base(CID, pack_option(14, b"\x00")),  # Rapid Commit with data (§21.14)
        base(CID, pack_option(7, b"")),  # Preference without data (§21.8)
        base(CID, pack_option(3, bytes(11))),  # IA_NA shorter than 12 (§21.4)
        base(CID, pack_option(3, bytes(12) + pack_option(5, bytes(23)))),  # IAADDR < 24 (§21.6)
        base(CID, pack_option(3, bytes(12) + b"\x00\x05\x00")),  # IA_NA sub-options overrun
        base(CID, pack_option(3, bytes(12)), pack_option(3, bytes(12))),  # IAID twice (§12)
        base(CID, pack_option(4, bytes(3))),  # IA_TA shorter than 4 (§21.5)
        base(CID, pack_option(25, bytes(12) + pack_option(26, bytes(24)))),  # IAPREFIX < 25
        base(CID, pack_option(13, b"\x00")),  # Status Code < 2 bytes (§21.13)
        base(CID, pack_option(13, b"\x00\x00\xff")),  # Status message not UTF-8
    ],
)
def test_malformed_messages_raise_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        Dhcp6Message.parse(data)
    srv = server()
    assert srv.handle(frame(data), NOW) == []
    assert srv.stats.malformed == 1 and srv.stats.internal_error == 0


def test_relay_messages_are_not_parsed() -> None:
    """Relay-forward/-reply have another header (§9); relays are not supported."""
    for msg_type in (12, 13):
        with pytest.raises(DecodeError, match="relay"):
            Dhcp6Message.parse(base(CID, msg_type=msg_type))


def test_parse_options_round_trip() -> None:
    data = pack_option(1, b"abc") + pack_option(0xFFFF) + pack_option(24, bytes(300))
    assert parse_options(data) == ((1, b"abc"), (0xFFFF, b""), (24, bytes(300)))
    with pytest.raises(ValueError, match="too long"):
        pack_option(1, bytes(0x10000))


def test_dhcp6frame_of_other_traffic_is_none() -> None:
    assert Dhcp6Frame.parse(b"\x00" * 100) is None
    parsed = Dhcp6Frame.parse(GOOD)
    assert parsed is not None and parsed.sport == 546 and parsed.payload == raw(solicit())


# --------------------------------------------------------------------------------------------
# Configuration


@pytest.mark.parametrize(
    "kwargs",
    [
        {"preferred": 0},
        {"preferred": 100, "valid": 50},
        {"t1": 100, "t2": 50},
        {"preferred": 100, "t1": 10, "t2": 200},
        {"preference": 256},
        {"server_duid": b"\x00\x03"},
    ],
)
def test_bad_configuration_is_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        server(**kwargs)


def test_custom_timers_and_duid() -> None:
    srv = server(preferred=100, valid=200, t1=10, t2=20, server_duid=OTHER_SERVER_DUID)
    m = one(srv, frame(msg(DHCP6_Solicit, client_id(), ia_na(1))))
    assert m is not None and m.get(OptionCode.SERVERID) == OTHER_SERVER_DUID
    (ia,) = ias(m)
    assert (ia.t1, ia.t2, ia.addresses[0].preferred, ia.addresses[0].valid) == (10, 20, 100, 200)


# --------------------------------------------------------------------------------------------
# Fuzzing: never raise, never an internal error


def check_never_raises(srv: Dhcp6Server, data: bytes) -> None:
    before = srv.stats.as_dict()
    out = srv.handle(data, NOW)
    assert isinstance(out, list) and len(out) <= 1
    assert srv.stats.internal_error == 0
    for answer in out:
        Dhcp6Message.parse(answer[62:])  # what we send parses with our codec ...
        assert Ether(answer)[UDP].sport == 547  # ... and with scapy's
    changed = [k for k, v in srv.stats.as_dict().items() if v != before[k]]
    event("answered" if out else f"dropped: {','.join(sorted(changed))}")


FUZZ_SERVER = server()


# An Ethernet + IPv6 header to ff02::1:2 with next header UDP, and the UDP destination port 547:
# random bytes after it get as far as the length and checksum checks.
UDP_PREFIX = GOOD[:56] + b"\x02\x23"


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400), st.booleans())
def test_fuzz_random_frames(data: bytes, prefixed: bool) -> None:
    check_never_raises(FUZZ_SERVER, UDP_PREFIX + data if prefixed else data)


def wrap(payload: bytes, mac: str = GN1_MAC) -> bytes:
    """``payload`` in a correct frame from ``mac`` to ff02::1:2 (checksum right)."""
    return build_udp_frame(
        bytes.fromhex("333300010002"),
        bytes.fromhex(mac.replace(":", "")),
        ipaddress.IPv6Address(GN1_LL).packed,
        ipaddress.IPv6Address(ALL_SERVERS).packed,
        546,
        547,
        payload,
    )


FIXED_SIZE = {7: 1, 8: 2, 14: 0}
RARELY = st.sampled_from([False] * 9 + [True])  # (st.integers would favour its bounds)
VERY_RARELY = st.sampled_from([False] * 39 + [True])
CODES = st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, 13, 14, 23, 24, 25, 26, 39, 0xFFFF])


@st.composite
def options(draw: st.DrawFn) -> bytes:
    out = pack_option(1, CLIENT_DUID) if draw(st.booleans()) else b""
    for _ in range(draw(st.integers(0, 6))):
        code = draw(CODES)
        if code == 1 and not draw(RARELY):
            data = draw(st.sampled_from([raw(d) for d in DUIDS.values()]))
        elif code == 2 and not draw(RARELY):
            data = SERVER_DUID
        elif code in (3, 4, 25) and not draw(RARELY):
            size = 4 if code == 4 else 12
            head = draw(st.binary(min_size=size, max_size=size))
            sub = b""
            for _ in range(draw(st.integers(0, 3))):
                addr = draw(st.sampled_from([GN1_VIP, GN2_VIP, "::", "ff02::1"]))
                life = draw(st.binary(min_size=8, max_size=8))
                sub += pack_option(
                    draw(st.sampled_from([5, 13, 26])),
                    ipaddress.IPv6Address(addr).packed + life + draw(st.binary(max_size=8)),
                )
            data = head + sub
        elif code in FIXED_SIZE and not draw(RARELY):
            data = draw(st.binary(min_size=FIXED_SIZE[code], max_size=FIXED_SIZE[code]))
        elif code == 6 and not draw(RARELY):
            data = b"".join(c.to_bytes(2, "big") for c in draw(st.lists(st.integers(0, 99))))
        elif code == 13 and not draw(RARELY):
            data = draw(st.binary(min_size=2, max_size=2)) + draw(st.text(max_size=9)).encode()
        else:
            data = draw(st.binary(max_size=40))
        if draw(VERY_RARELY):  # now and then a lying length
            out += code.to_bytes(2, "big") + draw(st.integers(0, 0xFFFF)).to_bytes(2, "big") + data
        else:
            out += pack_option(code, data)
    return out


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([1, 3, 4, 5, 6, 8, 9, 11] * 3 + [0, 2, 7, 10, 12, 13, 255]),
    st.binary(min_size=3, max_size=3),
    options(),
    st.sampled_from([GN1_MAC, GN2_MAC, STRANGER_MAC]),
)
def test_fuzz_structured_messages(msg_type: int, trid: bytes, body: bytes, mac: str) -> None:
    check_never_raises(FUZZ_SERVER, wrap(bytes((msg_type,)) + trid + body, mac))


SEEDS = [frame(m) for m in ALL_CLIENT_MESSAGES] + [frame(solicit(DHCP6OptRapidCommit()))]


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(SEEDS),
    st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=6),
    st.integers(0, 400),
    st.booleans(),
)
def test_fuzz_mutated_client_frames(
    seed: bytes, flips: list[tuple[int, int]], cut: int, fix_checksum: bool
) -> None:
    data = bytearray(seed)
    for pos, value in flips:
        if pos < len(data):
            data[pos] = value
    data = data[: max(cut, 14)] if cut < len(data) else data
    if fix_checksum and len(data) > 62:
        # rewrap the (mutated) DHCPv6 payload so that it passes the checksum and gets parsed
        check_never_raises(FUZZ_SERVER, wrap(bytes(data[62:])))
    else:
        check_never_raises(FUZZ_SERVER, bytes(data))


# --------------------------------------------------------------------------------------------
# Cost


def test_handle_latency_is_well_under_a_millisecond() -> None:
    srv = server()
    sol, req = frame(solicit()), frame(request())
    n = 2000
    start = time.perf_counter()
    for _ in range(n):
        srv.handle(sol, NOW)
    solicit_us = (time.perf_counter() - start) / n * 1e6
    start = time.perf_counter()
    for _ in range(n):
        srv.handle(req, NOW)
    request_us = (time.perf_counter() - start) / n * 1e6
    print(f"\nSolicit->Advertise {solicit_us:.1f} us, Request->Reply {request_us:.1f} us")
    assert solicit_us < 1000 and request_us < 1000
