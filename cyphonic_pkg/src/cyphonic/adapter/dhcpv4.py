"""DHCPv4 server of the adapter's downlink (RFC 2131, options RFC 2132).

Each general node (GN) gets its fixed VIPv4 -- assigned by AS/NMS, not allocated here -- with the
pool's netmask, the adapter's ``router4`` as default router and DNS server and the CYPHONIC
domain.  The GN's whole VIPv4 pool is on-link for it; the ARP proxy
(:mod:`cyphonic.adapter.arp_proxy`) answers for the peers in it.

:class:`Dhcp4Server` is the pure core, driven like aioquic's connection: ``handle(frame, now)``
takes one whole received Ethernet frame and returns the whole frames to send (the I/O edge is an
AF_PACKET socket, :mod:`cyphonic.adapter.packet_io`; :func:`main` wires a stand-alone server).
``now`` is wall-clock seconds (``time.time()``): lease times are persisted in the
:class:`~cyphonic.adapter.leases.LeaseStore` (kind ``"dhcp4"``, key = the GN's MAC) and must mean
the same after a restart.

Who is served
    A GN is identified by the **Ethernet source address** of the frame, and ``chaddr`` must
    equal it: a GN cannot obtain, renew or release another GN's lease by writing its MAC into
    ``chaddr``.  Frames from MACs that are not in the :class:`~cyphonic.adapter.gn.GnTable` get
    no answer (counted ``unknown_mac``, logged at INFO once a minute per MAC).  Relayed messages
    (``giaddr`` != 0, RFC 2131 §4.1) are not supported: the GNs are on the adapter's own link,
    and a relay could not prove which MAC it speaks for.  Dropped, counted ``relayed``.

Messages (RFC 2131 §4.3; the client states are those of §4.3.2)
    DHCPDISCOVER -> DHCPOFFER of the GN's VIPv4 (§4.3.1).  With a Rapid Commit option and
        ``rapid_commit`` enabled -> DHCPACK with Rapid Commit instead (RFC 4039 §4).
    DHCPREQUEST, told apart by §4.3.2:
        SELECTING (server identifier present): ours and ``requested IP`` = the VIP -> DHCPACK;
        ours and another address -> DHCPNAK; another server's identifier -> silence (the client
        chose that server; §4.3.2 says a server "not selected" treats the request as a decline
        of its offer -- counted ``other_server``, never NAKed).
        INIT-REBOOT (``requested IP``, no server identifier, ``ciaddr`` 0) and
        RENEWING/REBINDING (``ciaddr`` set; unicast to us / broadcast) -> DHCPACK if the
        address is the GN's VIP, else DHCPNAK ("wrong address": a VIP that AS has changed, a
        GN moved from another network).  The binding of a GN is its reservation, so a GN that
        renews the right address is ACKed even when the lease store holds no record of it (a
        fresh or lost store): NAKing it would only make it drop its address and get the same
        one back.  The address of a GN inside its DECLINE hold-down is NAKed.
        A request with none of these field combinations is malformed.
    DHCPDECLINE (§4.3.3) for the VIP: the GN found another host answering ARP for its fixed
        address.  The VIP cannot be swapped for another, so the event is logged at ERROR (an
        address conflict on the downlink needs an operator) and the address is held down for
        ``decline_holddown`` seconds -- DISCOVERs of that GN are ignored, REQUESTs NAKed --
        after which it is offered again.  No answer (§4.3.3).
    DHCPRELEASE (§4.3.4) of the VIP: the lease is marked ``released``; the address stays
        reserved for the GN (its VIP is fixed).  No answer.
    DHCPINFORM (§4.3.5) from a GN whose ``ciaddr`` is its VIP -> DHCPACK without ``yiaddr``,
        lease time or T1/T2 (Table 3), unicast to ``ciaddr``.
    Other types (LEASEQUERY, ...), BOOTREPLY, plain BOOTP (no option 53 / no magic cookie):
        ignored and counted.

Options in OFFER/ACK (RFC 2132)
    53 message type, 54 server identifier (``router4``), 51 lease time, 58/59 T1/T2 (0.5 and
    0.875 of the lease, RFC 2131 §4.4.5), 1 subnet mask (the pool's), 3 router and 6 DNS server
    (``router4``), 15 domain name -- always; 28 broadcast address, 119 domain search (RFC 3397)
    and 26 interface MTU (if ``mtu`` is set: the overlay's encapsulation makes the GNs' usable
    MTU smaller than the link's) when requested; 61 client identifier echoed unaltered (RFC 6842
    §3), 80 rapid commit when used.  Options the client lists in its Parameter Request List come
    in that order (RFC 2132 §9.8), after 53 and 54.  The options field stays within 308 bytes
    (the 312-byte minimum of RFC 2131 §2 less the cookie) by leaving out requested extras; the
    BOOTP message is padded to at least 300 bytes (RFC 1542 §2.1).  DHCPNAK carries only 53, 54,
    56 (a message saying why) and 61.  The server does not use option overload for its replies;
    it accepts it in requests (RFC 2131 §4.1), as well as long options split per RFC 3396.

Where replies go (RFC 2131 §4.1, with ``giaddr`` always 0)
    DHCPNAK: broadcast.  ``ciaddr`` set (RENEWING, REBINDING, INFORM): unicast to ``ciaddr``.
    Broadcast flag set: broadcast.  Otherwise unicast to ``yiaddr`` at ``chaddr``.  Unicast
    replies go to the GN's MAC directly (no ARP; the client may not have its address yet).
    Replies come from ``router4``:67 and the adapter's MAC.

Malformed input
    Anything addressed to UDP port 67 that does not parse -- truncated headers, bad IPv4 header
    checksum, UDP length beyond the datagram, a BOOTP message shorter than 240 bytes, a wrong
    hardware type or length, an option running past its field, a missing end option, a wrong
    length for a fixed-size option -- is dropped and counted ``malformed``, logged at DEBUG and
    rate-limited.  :meth:`Dhcp4Server.handle` never raises: a bug would be counted in
    ``internal_errors`` and logged, and the tests assert that it stays 0.  The UDP checksum is
    not verified: frames from the adapter's own stack carry offloaded (partial) checksums, and
    Ethernet's FCS already guards the link.

Codec
    Hand-written with ``struct`` (about 150 lines, below) rather than scapy.  Measured on this
    machine scapy 2.8 takes ~0.12 ms to dissect and ~0.9 ms to build one DHCP frame, against
    tens of microseconds here, and it is too lax for a server facing untrusted hosts: a
    truncated message dissects without error (the DHCP layer is silently missing), and an
    option whose length runs past the end becomes a stray ``bytes`` item in the option list.
    The tests build their requests with scapy and dissect the replies with it, so the two
    codecs check each other.

Wiring (what :func:`main` does and the adapter daemon should do)
    ``router4`` configured on the downlink with the pool's prefix (``ip addr add
    10.64.0.1/16 dev <downlink>``); a :class:`~cyphonic.adapter.packet_io.RawLink` for
    ``ETH_P_IP`` with :func:`~cyphonic.adapter.packet_io.udp4_dst_port_filter` (67) feeding
    :meth:`Dhcp4Server.handle`; a :class:`~cyphonic.adapter.packet_io.UdpSink` on port 67 of the
    downlink (unicast renewals and releases reach the kernel too); ``now`` = ``time.time()``.

Counters (``Dhcp4Server.counters``, names in :data:`COUNTER_NAMES`): ``received`` frames;
``not_dhcp``, ``not_for_us``, ``malformed``, ``relayed``, ``chaddr_mismatch``, ``unknown_mac``,
``bad_vip`` (a GN whose VIPv4 is not a host address of the pool: never served), ``unsupported``;
per message type received ``discover``, ``request``, ``decline``, ``release``, ``inform`` and
the REQUEST states ``request_selecting``, ``request_init_reboot``, ``request_renewing``,
``request_rebinding``; ``other_server``, ``ignored`` (a DECLINE/RELEASE/INFORM for an address
that is not the GN's), ``declined_holddown``; sent ``offer``, ``ack``, ``nak``, ``rapid_commit``;
``store_errors`` (a lease that could not be written: the ACK is still sent, the binding is fixed
anyway) and ``internal_errors``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import socket
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from ipaddress import IPv4Address, IPv4Network, IPv6Address
from typing import Any, Final, Self

from cyphonic.adapter.gn import AdapterAddressing, GeneralNode, GnTable, LogThrottle, mac_str
from cyphonic.adapter.leases import LeaseStore
from cyphonic.errors import ConfigError, CyphonicError, DecodeError

log = logging.getLogger(__name__)

__all__ = [
    "COUNTER_NAMES",
    "Dhcp4Message",
    "Dhcp4Server",
    "MessageType",
    "Option",
    "Udp4Datagram",
    "build_udp4_frame",
    "encode_domain_search",
    "inet_checksum",
    "main",
    "pack_options",
    "parse_options",
    "parse_udp4_frame",
]

SERVER_PORT: Final = 67
CLIENT_PORT: Final = 68
BOOTREQUEST: Final = 1
BOOTREPLY: Final = 2
HTYPE_ETHERNET: Final = 1
MAGIC_COOKIE: Final = b"\x63\x82\x53\x63"  # RFC 2131 §3
BROADCAST_FLAG: Final = 0x8000  # RFC 2131 §2, figure 2
BROADCAST_MAC: Final = b"\xff" * 6
LIMITED_BROADCAST: Final = IPv4Address("255.255.255.255")
ZERO4: Final = IPv4Address(0)
MIN_BOOTP_SIZE: Final = 300  # RFC 1542 §2.1
MAX_OPTIONS_SIZE: Final = 308  # RFC 2131 §2: clients accept a 312-byte options field
ETH_P_IP: Final = 0x0800
IP_TTL: Final = 64
LEASE_KIND: Final = "dhcp4"

_BOOTP: Final = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s4s")  # 240 bytes, RFC 2131 figure 1
_IPV4: Final = struct.Struct("!BBHHHBBH4s4s")
_UDP: Final = struct.Struct("!HHHH")


class MessageType(IntEnum):
    """DHCP message types, option 53 (RFC 2132 §9.6)."""

    DISCOVER = 1
    OFFER = 2
    REQUEST = 3
    DECLINE = 4
    ACK = 5
    NAK = 6
    RELEASE = 7
    INFORM = 8


class Option(IntEnum):
    """The DHCP options this server reads or writes (RFC 2132 unless noted)."""

    PAD = 0
    SUBNET_MASK = 1
    ROUTER = 3
    DNS_SERVER = 6
    HOST_NAME = 12
    DOMAIN_NAME = 15
    INTERFACE_MTU = 26
    BROADCAST_ADDRESS = 28
    REQUESTED_IP = 50
    LEASE_TIME = 51
    OVERLOAD = 52
    MESSAGE_TYPE = 53
    SERVER_ID = 54
    PARAMETER_REQUEST_LIST = 55
    MESSAGE = 56
    MAX_MESSAGE_SIZE = 57
    RENEWAL_TIME = 58
    REBINDING_TIME = 59
    CLIENT_ID = 61
    RAPID_COMMIT = 80  # RFC 4039
    RELAY_AGENT_INFO = 82  # RFC 3046
    DOMAIN_SEARCH = 119  # RFC 3397
    END = 255


# Options whose length is fixed (RFC 2132 §3-9, RFC 4039 §4); a wrong length is malformed.
_FIXED_LENGTH: Final[dict[int, int]] = {
    Option.SUBNET_MASK: 4,
    Option.INTERFACE_MTU: 2,
    Option.BROADCAST_ADDRESS: 4,
    Option.REQUESTED_IP: 4,
    Option.LEASE_TIME: 4,
    Option.OVERLOAD: 1,
    Option.MESSAGE_TYPE: 1,
    Option.SERVER_ID: 4,
    Option.MAX_MESSAGE_SIZE: 2,
    Option.RENEWAL_TIME: 4,
    Option.REBINDING_TIME: 4,
    Option.RAPID_COMMIT: 0,
}
_MIN_LENGTH: Final[dict[int, int]] = {
    Option.PARAMETER_REQUEST_LIST: 1,
    Option.CLIENT_ID: 2,
}  # §9.8, §9.14


# --------------------------------------------------------------------------------------------
# Codec: DHCP messages (RFC 2131 §2, RFC 2132 §2-3, RFC 3396)


def parse_options(data: bytes, options: dict[int, bytes], *, need_end: bool) -> None:
    """Add the options of one options field to ``options`` (repeated codes concatenated,
    RFC 3396 §7).  Raises :class:`DecodeError` if an option runs past the field or, with
    ``need_end``, the field has no end option (RFC 2132 §3.2)."""
    i, n = 0, len(data)
    while i < n:
        code = data[i]
        if code == Option.PAD:
            i += 1
            continue
        if code == Option.END:
            return
        if i + 2 > n:
            raise DecodeError(f"option {code} truncated: no length byte")
        length = data[i + 1]
        if i + 2 + length > n:
            raise DecodeError(f"option {code} of length {length} runs past its field")
        value = data[i + 2 : i + 2 + length]
        options[code] = options[code] + value if code in options else value
        i += 2 + length
    if need_end:
        raise DecodeError("options field has no end option (RFC 2132 §3.2)")


def pack_options(options: Sequence[tuple[int, bytes]]) -> bytes:
    """Options (without the end option); values over 255 bytes are split (RFC 3396 §5)."""
    out = bytearray()
    for code, value in options:
        if not value:
            out += bytes((code, 0))
        for start in range(0, len(value), 255):
            chunk = value[start : start + 255]
            out += bytes((code, len(chunk))) + chunk
    return bytes(out)


@dataclass(frozen=True, slots=True)
class Dhcp4Message:
    """One BOOTP/DHCP message (RFC 2131 §2, figure 1), options decoded per RFC 2132/3396.

    ``options`` holds each option once, in order of first appearance, with repeated instances
    concatenated.  ``chaddr`` is kept as its 16 bytes (zero-padded on construction).
    :meth:`parse` validates the lengths of the options this server uses (:data:`_FIXED_LENGTH`)
    and raises :class:`DecodeError` for anything malformed.
    """

    op: int
    xid: int
    chaddr: bytes
    ciaddr: IPv4Address = ZERO4
    yiaddr: IPv4Address = ZERO4
    siaddr: IPv4Address = ZERO4
    giaddr: IPv4Address = ZERO4
    flags: int = 0
    secs: int = 0
    hops: int = 0
    htype: int = HTYPE_ETHERNET
    hlen: int = 6
    sname: bytes = b""
    file: bytes = b""
    options: tuple[tuple[int, bytes], ...] = ()
    _index: dict[int, bytes] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.chaddr) != 16:
            object.__setattr__(self, "chaddr", self.chaddr.ljust(16, b"\0")[:16])
        if not self._index:
            self._index.update(self.options)

    def option(self, code: int) -> bytes | None:
        """The value of option ``code``, or None."""
        return self._index.get(code)

    @property
    def message_type(self) -> int | None:
        """Option 53 (RFC 2132 §9.6), or None for a plain BOOTP message."""
        value = self._index.get(Option.MESSAGE_TYPE)
        return value[0] if value else None

    @property
    def client_mac(self) -> bytes:
        """``chaddr`` cut to ``hlen``: the client's hardware address."""
        return self.chaddr[: min(self.hlen, 16)]

    def address_option(self, code: int) -> IPv4Address | None:
        """A 4-byte address option (50, 54) as an address, or None if absent."""
        value = self._index.get(code)
        return None if value is None else IPv4Address(value)

    @classmethod
    def parse(cls, data: bytes) -> Self:
        """Decode a BOOTP message carrying DHCP options; :class:`DecodeError` if malformed."""
        if len(data) < _BOOTP.size:
            raise DecodeError(f"BOOTP message of {len(data)} bytes (at least 240)")
        (
            op,
            htype,
            hlen,
            hops,
            xid,
            secs,
            flags,
            ciaddr,
            yiaddr,
            siaddr,
            giaddr,
            chaddr,
            sname,
            file,
            cookie,
        ) = _BOOTP.unpack_from(data)
        if op not in (BOOTREQUEST, BOOTREPLY):
            raise DecodeError(f"BOOTP op {op}")
        if cookie != MAGIC_COOKIE:
            raise DecodeError("no DHCP magic cookie (RFC 2131 §3)")
        index: dict[int, bytes] = {}
        parse_options(data[_BOOTP.size :], index, need_end=True)
        overload = index.get(Option.OVERLOAD)
        if overload is not None:  # RFC 2131 §4.1: options continue in 'file', then 'sname'
            if len(overload) != 1 or overload[0] not in (1, 2, 3):
                raise DecodeError(f"bad option overload value {overload.hex()}")
            if overload[0] & 1:
                parse_options(file, index, need_end=False)
            if overload[0] & 2:
                parse_options(sname, index, need_end=False)
        for code, value in index.items():
            want = _FIXED_LENGTH.get(code)
            if want is not None and len(value) != want:
                raise DecodeError(f"option {code} has length {len(value)}, not {want}")
            if len(value) < _MIN_LENGTH.get(code, 0):
                raise DecodeError(f"option {code} has length {len(value)}, too short")
        return cls(
            op=op,
            xid=xid,
            chaddr=chaddr,
            ciaddr=IPv4Address(ciaddr),
            yiaddr=IPv4Address(yiaddr),
            siaddr=IPv4Address(siaddr),
            giaddr=IPv4Address(giaddr),
            flags=flags,
            secs=secs,
            hops=hops,
            htype=htype,
            hlen=hlen,
            sname=b"" if overload is not None and overload[0] & 2 else sname.rstrip(b"\0"),
            file=b"" if overload is not None and overload[0] & 1 else file.rstrip(b"\0"),
            options=tuple(index.items()),
            _index=index,
        )

    def pack(self, *, min_size: int = MIN_BOOTP_SIZE) -> bytes:
        """Encode, with an end option, padded with PAD to at least ``min_size`` bytes."""
        head = _BOOTP.pack(
            self.op,
            self.htype,
            self.hlen,
            self.hops,
            self.xid,
            self.secs,
            self.flags,
            self.ciaddr.packed,
            self.yiaddr.packed,
            self.siaddr.packed,
            self.giaddr.packed,
            self.chaddr.ljust(16, b"\0")[:16],
            self.sname[:64],
            self.file[:128],
            MAGIC_COOKIE,
        )
        message = head + pack_options(self.options) + bytes((Option.END,))
        return message.ljust(min_size, b"\0")


def encode_domain_search(domains: Sequence[str]) -> bytes:
    """The Domain Search option's value (RFC 3397 §2: RFC 1035 names, uncompressed here)."""
    out = bytearray()
    for domain in domains:
        for label in domain.strip(".").split("."):
            raw = label.encode("ascii")
            if not 0 < len(raw) < 64:
                raise ValueError(f"bad label {label!r} in {domain!r}")
            out += bytes((len(raw),)) + raw
        out += b"\0"
    return bytes(out)


# --------------------------------------------------------------------------------------------
# Codec: Ethernet + IPv4 + UDP (RFC 894, RFC 791, RFC 768)


def inet_checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``."""
    if len(data) % 2:
        data += b"\0"
    total = int.from_bytes(data, "big") % 0xFFFF  # 2**16 == 1 (mod 0xffff): one's-complement sum
    if total == 0 and any(data):
        total = 0xFFFF
    return ~total & 0xFFFF


@dataclass(frozen=True, slots=True)
class Udp4Datagram:
    """A UDP datagram in an untagged Ethernet II frame (addresses as raw bytes)."""

    eth_dst: bytes
    eth_src: bytes
    ip_src: bytes
    ip_dst: bytes
    sport: int
    dport: int
    payload: bytes


def parse_udp4_frame(frame: bytes) -> Udp4Datagram | None:
    """The UDP datagram in ``frame``; None if it is no IPv4/UDP frame or a fragment.

    Raises :class:`DecodeError` for a broken IPv4 or UDP header (RFC 791 §3.1, RFC 768): bad
    version or header length, a total length beyond the frame, a bad header checksum, a UDP
    length that does not fit.  The UDP checksum is not checked (see module docstring).
    """
    if len(frame) < 14:
        raise DecodeError(f"Ethernet frame of {len(frame)} bytes")
    if frame[12:14] != b"\x08\x00":
        return None
    if len(frame) < 14 + _IPV4.size:
        raise DecodeError("IPv4 header truncated")
    ver_ihl, _tos, total, _ident, frag, _ttl, proto, _csum, src, dst = _IPV4.unpack_from(frame, 14)
    ihl = (ver_ihl & 0x0F) * 4
    if ver_ihl >> 4 != 4 or ihl < 20:
        raise DecodeError(f"bad IPv4 version/IHL byte 0x{ver_ihl:02x}")
    if total < ihl or 14 + total > len(frame):
        raise DecodeError(f"IPv4 total length {total} does not fit the frame")
    if inet_checksum(frame[14 : 14 + ihl]) != 0:
        raise DecodeError("bad IPv4 header checksum")
    if proto != socket.IPPROTO_UDP or frag & 0x3FFF:
        return None
    udp = frame[14 + ihl : 14 + total]
    if len(udp) < _UDP.size:
        raise DecodeError("UDP header truncated")
    sport, dport, length, _ucsum = _UDP.unpack_from(udp)
    if length < _UDP.size or length > len(udp):
        raise DecodeError(f"UDP length {length} does not fit the IPv4 payload of {len(udp)}")
    return Udp4Datagram(frame[0:6], frame[6:12], src, dst, sport, dport, udp[8:length])


def build_udp4_frame(
    eth_dst: bytes,
    eth_src: bytes,
    ip_src: bytes,
    ip_dst: bytes,
    sport: int,
    dport: int,
    payload: bytes,
    *,
    ident: int = 0,
    ttl: int = IP_TTL,
) -> bytes:
    """An Ethernet II frame with an IPv4 (no options, DF clear) and UDP header, checksums set."""
    udp_len = _UDP.size + len(payload)
    pseudo = ip_src + ip_dst + struct.pack("!BBH", 0, socket.IPPROTO_UDP, udp_len)
    udp_head = _UDP.pack(sport, dport, udp_len, 0)
    ucsum = inet_checksum(pseudo + udp_head + payload) or 0xFFFF  # RFC 768: 0 means "none"
    ip_head = _IPV4.pack(
        0x45, 0, 20 + udp_len, ident & 0xFFFF, 0, ttl, socket.IPPROTO_UDP, 0, ip_src, ip_dst
    )
    ip_head = ip_head[:10] + inet_checksum(ip_head).to_bytes(2, "big") + ip_head[12:]
    return (
        eth_dst
        + eth_src
        + b"\x08\x00"
        + ip_head
        + _UDP.pack(sport, dport, udp_len, ucsum)
        + payload
    )


# --------------------------------------------------------------------------------------------
# The server

COUNTER_NAMES: Final = (
    "received",
    "not_dhcp",
    "not_for_us",
    "malformed",
    "relayed",
    "chaddr_mismatch",
    "unknown_mac",
    "bad_vip",
    "unsupported",
    "discover",
    "request",
    "request_selecting",
    "request_init_reboot",
    "request_renewing",
    "request_rebinding",
    "decline",
    "release",
    "inform",
    "other_server",
    "ignored",
    "declined_holddown",
    "offer",
    "ack",
    "nak",
    "rapid_commit",
    "store_errors",
    "internal_errors",
)


class _Ignore(Exception):
    """Internal: drop the message, counted under ``counter``."""

    def __init__(self, counter: str) -> None:
        super().__init__(counter)
        self.counter = counter


class Dhcp4Server:
    """DHCPv4 for the GNs of ``table`` on the adapter's downlink (see module docstring).

    ``lease_time`` (seconds) is granted on every ACK; ``domain`` defaults to the addressing's
    CYPHONIC domain; ``mtu`` (68..65535) adds option 26 when requested; ``decline_holddown``
    is how long a DECLINEd VIP is withheld; ``rapid_commit`` enables RFC 4039.
    """

    def __init__(
        self,
        table: GnTable,
        addressing: AdapterAddressing,
        leases: LeaseStore,
        *,
        lease_time: int = 3600,
        domain: str | None = None,
        mtu: int | None = None,
        decline_holddown: float = 60.0,
        rapid_commit: bool = True,
        log_interval: float = 60.0,
    ) -> None:
        if not 1 <= lease_time < 0xFFFFFFFF:
            raise ConfigError(f"lease_time {lease_time} outside 1..{0xFFFFFFFF - 1} s")
        if mtu is not None and not 68 <= mtu <= 0xFFFF:
            raise ConfigError(f"mtu {mtu} outside 68..65535 (RFC 2132 §5.1)")
        self.table = table
        self.addressing = addressing
        self.leases = leases
        self.lease_time = lease_time
        self.domain = (domain if domain is not None else addressing.domain).strip(".").lower()
        self.mtu = mtu
        self.decline_holddown = decline_holddown
        self.rapid_commit = rapid_commit
        self.counters: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)
        self._throttle = LogThrottle(log_interval)
        self._mac = addressing.downlink_mac_bytes
        self._server_id = addressing.router4
        self._accepted_dst = frozenset(
            {
                LIMITED_BROADCAST.packed,
                addressing.router4.packed,
                addressing.pool4.broadcast_address.packed,
            }
        )
        self._ident = 0
        pool = addressing.pool4
        self._config: dict[int, bytes] = {
            Option.SUBNET_MASK: pool.netmask.packed,
            Option.ROUTER: addressing.router4.packed,
            Option.DNS_SERVER: addressing.router4.packed,
            Option.BROADCAST_ADDRESS: pool.broadcast_address.packed,
        }
        if self.domain:
            try:
                self._config[Option.DOMAIN_NAME] = self.domain.encode("ascii")
                self._config[Option.DOMAIN_SEARCH] = encode_domain_search([self.domain])
            except ValueError as exc:  # UnicodeEncodeError is a ValueError too
                raise ConfigError(f"bad domain {self.domain!r}: {exc}") from exc
        if mtu is not None:
            self._config[Option.INTERFACE_MTU] = mtu.to_bytes(2, "big")
        self._always = tuple(
            c
            for c in (Option.SUBNET_MASK, Option.ROUTER, Option.DNS_SERVER, Option.DOMAIN_NAME)
            if c in self._config
        )

    # -- entry point -------------------------------------------------------------------------

    def handle(self, frame: bytes, now: float) -> list[bytes]:
        """Answer one received Ethernet frame; returns the frames to send (often none)."""
        self.counters["received"] += 1
        try:
            return self._handle(frame, now)
        except _Ignore as ignore:
            self.counters[ignore.counter] += 1
        except DecodeError as exc:
            self.counters["malformed"] += 1
            src = mac_str(frame[6:12]) if len(frame) >= 12 else "?"
            if self._throttle.allow(("malformed", src), now):
                log.debug("malformed DHCP frame from %s: %s", src, exc)
        except Exception:  # never let a bug escape into the event loop; tests assert 0
            self.counters["internal_errors"] += 1
            if self._throttle.allow("internal", now):
                log.exception("DHCPv4 server failed on a frame (%s)", frame[:64].hex())
        return []

    def lease_state(self, mac: str, now: float) -> str:
        """The GN's lease for ``cyphonic status``: ``none``, ``bound``, ``expired``,
        ``released`` or ``declined``."""
        record = self.leases.get(LEASE_KIND, mac)
        if record is None:
            return "none"
        state = str(record.get("state", "none"))
        if state == "bound" and now >= float(record.get("expires", 0)):
            return "expired"
        return state

    # -- dispatch ----------------------------------------------------------------------------

    def _handle(self, frame: bytes, now: float) -> list[bytes]:
        dgram = parse_udp4_frame(frame)
        if dgram is None or dgram.dport != SERVER_PORT:
            raise _Ignore("not_dhcp")
        if dgram.eth_dst != BROADCAST_MAC and dgram.eth_dst != self._mac:
            raise _Ignore("not_for_us")
        if dgram.ip_dst not in self._accepted_dst:
            raise _Ignore("not_for_us")
        payload = dgram.payload
        if len(payload) >= _BOOTP.size and payload[236:240] != MAGIC_COOKIE:
            raise _Ignore("not_dhcp")  # plain BOOTP (RFC 951): not served
        msg = Dhcp4Message.parse(payload)
        if msg.op != BOOTREQUEST:
            raise _Ignore("not_dhcp")
        if msg.htype != HTYPE_ETHERNET or msg.hlen != 6:
            raise DecodeError(f"hardware type {msg.htype}/length {msg.hlen} is not Ethernet")
        mtype = msg.message_type
        if mtype is None:
            raise _Ignore("not_dhcp")
        src = dgram.eth_src
        if msg.giaddr != ZERO4:
            self._note("relayed", src, now, "relayed DHCP message via %s dropped", msg.giaddr)
            raise _Ignore("relayed")
        if msg.client_mac != src:
            self._note(
                "chaddr",
                src,
                now,
                "DHCP from %s claims chaddr %s: dropped",
                mac_str(src),
                mac_str(msg.client_mac),
                level=logging.WARNING,
            )
            raise _Ignore("chaddr_mismatch")
        gn = self.table.by_mac(src)
        if gn is None:
            self._note(
                "unknown",
                src,
                now,
                "DHCP %s from unknown MAC %s: no answer",
                _type_name(mtype),
                mac_str(src),
            )
            raise _Ignore("unknown_mac")
        if not self._usable(gn.vip4):
            self._note(
                "bad_vip",
                src,
                now,
                "general node %s (%s) has VIPv4 %s outside the hosts of %s",
                gn.mac,
                gn.fqdn,
                gn.vip4,
                self.addressing.pool4,
                level=logging.ERROR,
            )
            raise _Ignore("bad_vip")
        if mtype == MessageType.DISCOVER:
            return self._discover(msg, gn, now)
        if mtype == MessageType.REQUEST:
            return self._request(msg, dgram, gn, now)
        if mtype == MessageType.DECLINE:
            return self._decline(msg, gn, now)
        if mtype == MessageType.RELEASE:
            return self._release(msg, gn, now)
        if mtype == MessageType.INFORM:
            return self._inform(msg, gn, now)
        raise _Ignore("unsupported")

    # -- message types -----------------------------------------------------------------------

    def _discover(self, msg: Dhcp4Message, gn: GeneralNode, now: float) -> list[bytes]:
        """RFC 2131 §4.3.1 (and RFC 4039 §4 for Rapid Commit)."""
        self.counters["discover"] += 1
        if self._held_down(gn, now):
            self._note(
                "holddown",
                gn.mac_bytes,
                now,
                "DHCPDISCOVER from %s: its VIP %s was declined, held down for %g s",
                gn.mac,
                gn.vip4,
                self.decline_holddown,
                level=logging.WARNING,
            )
            raise _Ignore("declined_holddown")
        if self.rapid_commit and msg.option(Option.RAPID_COMMIT) is not None:
            self.counters["rapid_commit"] += 1
            self._commit(msg, gn, now)
            log.info("DHCPACK (rapid commit) %s to %s (%s)", gn.vip4, gn.mac, gn.fqdn)
            return [self._reply(msg, gn, MessageType.ACK, rapid=True)]
        log.debug("DHCPOFFER %s to %s (%s)", gn.vip4, gn.mac, gn.fqdn)
        return [self._reply(msg, gn, MessageType.OFFER)]

    def _request(
        self, msg: Dhcp4Message, dgram: Udp4Datagram, gn: GeneralNode, now: float
    ) -> list[bytes]:
        """RFC 2131 §4.3.2: tell SELECTING, INIT-REBOOT, RENEWING and REBINDING apart."""
        self.counters["request"] += 1
        server_id = msg.address_option(Option.SERVER_ID)
        requested = msg.address_option(Option.REQUESTED_IP)
        if server_id is not None:
            state = "selecting"
            if server_id != self._server_id:
                log.debug("DHCPREQUEST from %s selects server %s, not us", gn.mac, server_id)
                raise _Ignore("other_server")
            wanted = requested if requested is not None else msg.ciaddr
        elif requested is not None and msg.ciaddr == ZERO4:
            state, wanted = "init_reboot", requested
        elif msg.ciaddr != ZERO4:
            unicast = dgram.ip_dst == self._server_id.packed
            state, wanted = ("renewing" if unicast else "rebinding"), msg.ciaddr
        else:
            raise DecodeError("DHCPREQUEST with neither server id, requested address nor ciaddr")
        self.counters[f"request_{state}"] += 1
        if wanted != gn.vip4:
            return [self._nak(msg, gn, now, f"{wanted} is not your address", state)]
        if self._held_down(gn, now):
            return [self._nak(msg, gn, now, f"{wanted} was declined", state)]
        self._commit(msg, gn, now)
        level = logging.DEBUG if state in ("renewing", "rebinding") else logging.INFO
        log.log(level, "DHCPACK %s to %s (%s) [%s]", gn.vip4, gn.mac, gn.fqdn, state)
        return [self._reply(msg, gn, MessageType.ACK)]

    def _decline(self, msg: Dhcp4Message, gn: GeneralNode, now: float) -> list[bytes]:
        """RFC 2131 §4.3.3: mark the address unusable; the VIP is fixed, so only for a while."""
        self.counters["decline"] += 1
        self._check_server_id(msg)
        declined = msg.address_option(Option.REQUESTED_IP)
        if declined != gn.vip4:
            log.info(
                "DHCPDECLINE from %s for %s, not its VIP %s: ignored", gn.mac, declined, gn.vip4
            )
            raise _Ignore("ignored")
        old = self.leases.get(LEASE_KIND, gn.mac) or {}
        record = {
            **old,
            **self._record_base(msg, gn, now),
            "state": "declined",
            "declined_at": now,
            "declines": int(old.get("declines", 0)) + 1,
        }
        self._store(gn, record, now)
        log.error(
            "general node %s (%s) DECLINED its VIPv4 %s: another host on the downlink answers "
            "ARP for it (address conflict, RFC 2131 §4.3.3). The VIP is fixed: holding it down "
            "for %g s, then offering it again. Find the conflicting host.",
            gn.mac,
            gn.fqdn,
            gn.vip4,
            self.decline_holddown,
        )
        return []

    def _release(self, msg: Dhcp4Message, gn: GeneralNode, now: float) -> list[bytes]:
        """RFC 2131 §4.3.4: the lease ends; the address stays reserved for this GN."""
        self.counters["release"] += 1
        self._check_server_id(msg)
        if msg.ciaddr != gn.vip4:
            log.info(
                "DHCPRELEASE from %s of %s, not its VIP %s: ignored", gn.mac, msg.ciaddr, gn.vip4
            )
            raise _Ignore("ignored")
        old = self.leases.get(LEASE_KIND, gn.mac) or {}
        record = {**old, **self._record_base(msg, gn, now), "state": "released", "expires": now}
        record["released_at"] = now
        self._store(gn, record, now)
        log.info("DHCPRELEASE %s by %s (%s)", gn.vip4, gn.mac, gn.fqdn)
        return []

    def _inform(self, msg: Dhcp4Message, gn: GeneralNode, now: float) -> list[bytes]:
        """RFC 2131 §4.3.5: configuration only, for a GN that already has its VIP."""
        self.counters["inform"] += 1
        if msg.ciaddr != gn.vip4:
            log.info(
                "DHCPINFORM from %s with ciaddr %s, not its VIP %s: ignored",
                gn.mac,
                msg.ciaddr,
                gn.vip4,
            )
            raise _Ignore("ignored")
        return [self._reply(msg, gn, MessageType.ACK, inform=True)]

    # -- helpers -----------------------------------------------------------------------------

    def _usable(self, vip: IPv4Address) -> bool:
        pool = self.addressing.pool4
        return (
            vip in pool
            and vip != pool.network_address
            and vip != pool.broadcast_address
            and vip != self._server_id
        )

    def _check_server_id(self, msg: Dhcp4Message) -> None:
        server_id = msg.address_option(Option.SERVER_ID)
        if server_id is not None and server_id != self._server_id:
            raise _Ignore("other_server")

    def _held_down(self, gn: GeneralNode, now: float) -> bool:
        record = self.leases.get(LEASE_KIND, gn.mac)
        if record is None or record.get("state") != "declined":
            return False
        if record.get("vip4") != str(gn.vip4):
            return False  # AS gave the GN another VIP since
        return 0.0 <= now - float(record.get("declined_at", 0.0)) < self.decline_holddown

    def _record_base(self, msg: Dhcp4Message, gn: GeneralNode, now: float) -> dict[str, Any]:
        client_id = msg.option(Option.CLIENT_ID)
        return {
            "vip4": str(gn.vip4),
            "fqdn": gn.fqdn,
            "client_id": client_id.hex() if client_id is not None else None,
            "updated": now,
        }

    def _commit(self, msg: Dhcp4Message, gn: GeneralNode, now: float) -> None:
        """Persist the binding before the ACK goes out (RFC 2131 §3.1 step 4)."""
        old = self.leases.get(LEASE_KIND, gn.mac) or {}
        record = {
            **self._record_base(msg, gn, now),
            "state": "bound",
            "granted": now,
            "expires": now + self.lease_time,
            "declines": int(old.get("declines", 0)),
        }
        self._store(gn, record, now)

    def _store(self, gn: GeneralNode, record: dict[str, Any], now: float) -> None:
        try:
            self.leases.put(LEASE_KIND, gn.mac, record)
        except (CyphonicError, OSError) as exc:
            self.counters["store_errors"] += 1
            if self._throttle.allow("store", now):
                log.error("cannot persist the DHCPv4 lease of %s: %s", gn.mac, exc)

    def _note(
        self, kind: str, src: bytes, now: float, fmt: str, *args: object, level: int = logging.INFO
    ) -> None:
        key = (kind, src)
        if self._throttle.allow(key, now):
            more = self._throttle.suppressed(key)
            log.log(level, fmt + (f" (and {more} more)" if more else ""), *args)

    def _nak(self, msg: Dhcp4Message, gn: GeneralNode, now: float, why: str, state: str) -> bytes:
        self._note(
            "nak",
            gn.mac_bytes,
            now,
            "DHCPNAK to %s (%s) [%s]: %s",
            gn.mac,
            gn.fqdn,
            state,
            why,
            level=logging.WARNING,
        )
        return self._reply(msg, gn, MessageType.NAK, message=why)

    def _reply(
        self,
        req: Dhcp4Message,
        gn: GeneralNode,
        mtype: MessageType,
        *,
        inform: bool = False,
        rapid: bool = False,
        message: str = "",
    ) -> bytes:
        """Build OFFER/ACK/NAK (RFC 2131 §4.3.1 table 3) and address it per §4.1."""
        options: list[tuple[int, bytes]] = [
            (Option.MESSAGE_TYPE, bytes((mtype,))),
            (Option.SERVER_ID, self._server_id.packed),
        ]
        client_id = req.option(Option.CLIENT_ID)
        if mtype == MessageType.NAK:
            options.append((Option.MESSAGE, message.encode("ascii", "replace")[:255]))
            yiaddr = ZERO4
        else:
            yiaddr = ZERO4 if inform else gn.vip4
            options += self._config_options(req, lease=not inform)
            if rapid:
                options.append((Option.RAPID_COMMIT, b""))
        if client_id is not None:
            options.append((Option.CLIENT_ID, client_id))  # RFC 6842 §3: MUST echo
        reply = Dhcp4Message(
            op=BOOTREPLY,
            xid=req.xid,
            chaddr=req.chaddr,
            ciaddr=req.ciaddr if mtype == MessageType.ACK else ZERO4,
            yiaddr=yiaddr,
            flags=req.flags & BROADCAST_FLAG,
            options=tuple(options),
        )
        if mtype == MessageType.NAK:
            ip_dst, eth_dst = LIMITED_BROADCAST, BROADCAST_MAC
        elif req.ciaddr != ZERO4:
            ip_dst, eth_dst = req.ciaddr, req.client_mac
        elif req.flags & BROADCAST_FLAG:
            ip_dst, eth_dst = LIMITED_BROADCAST, BROADCAST_MAC
        else:
            ip_dst, eth_dst = yiaddr, req.client_mac
        self.counters[{MessageType.OFFER: "offer", MessageType.ACK: "ack"}.get(mtype, "nak")] += 1
        self._ident = (self._ident + 1) & 0xFFFF
        return build_udp4_frame(
            eth_dst,
            self._mac,
            self._server_id.packed,
            ip_dst.packed,
            SERVER_PORT,
            CLIENT_PORT,
            reply.pack(),
            ident=self._ident,
        )

    def _config_options(self, req: Dhcp4Message, *, lease: bool) -> list[tuple[int, bytes]]:
        """Lease times and configuration, in Parameter Request List order (RFC 2132 §9.8)."""
        available = dict(self._config)
        must: list[int] = list(self._always)
        if lease:
            t = self.lease_time
            available[Option.LEASE_TIME] = t.to_bytes(4, "big")
            available[Option.RENEWAL_TIME] = (t // 2).to_bytes(4, "big")
            available[Option.REBINDING_TIME] = (t * 7 // 8).to_bytes(4, "big")
            must = [Option.LEASE_TIME, Option.RENEWAL_TIME, Option.REBINDING_TIME, *must]
        prl = req.option(Option.PARAMETER_REQUEST_LIST) or b""
        order = [c for c in dict.fromkeys(prl) if c in available]
        order += [c for c in must if c not in order]
        # Keep within the options field every client accepts: drop requested extras from the end.
        size = 3 + 6 + 2 + len(req.option(Option.CLIENT_ID) or b"") + 2 + 1  # 53, 54, 61, 80, end
        size += sum(2 + len(available[code]) for code in must)
        chosen: list[int] = []
        for code in order:
            if code not in must:
                cost = 2 + len(available[code])
                if size + cost > MAX_OPTIONS_SIZE:
                    continue
                size += cost
            chosen.append(code)
        return [(code, available[code]) for code in chosen]


def _type_name(mtype: int) -> str:
    try:
        return "DHCP" + MessageType(mtype).name
    except ValueError:
        return f"type {mtype}"


# --------------------------------------------------------------------------------------------
# Stand-alone server: ``python -m cyphonic.adapter.dhcpv4`` (development and the e2e tests;
# the adapter daemon wires the same pieces itself).


def _parse_gn(spec: str) -> GeneralNode:
    parts = spec.split(",")
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"--gn {spec!r}: use MAC,FQDN,VIPv4,VIPv6")
    try:
        return GeneralNode(parts[0], parts[1], IPv4Address(parts[2]), IPv6Address(parts[3]))
    except (CyphonicError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"--gn {spec!r}: {exc}") from exc


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cyphonic.adapter.dhcpv4",
        description="Serve DHCPv4 (and optionally the ARP proxy) on one downlink interface. "
        "Prints one JSON line when ready and one with the counters when stopped (SIGTERM).",
    )
    parser.add_argument("--interface", required=True, help="the downlink interface")
    parser.add_argument("--pool4", required=True, type=IPv4Network, help="VIPv4 pool")
    parser.add_argument("--pool6", default="fd00:cafe::/64", help="VIPv6 pool")
    parser.add_argument("--domain", required=True, help="the CYPHONIC domain")
    parser.add_argument("--lease-file", required=True, help="JSON lease store")
    parser.add_argument("--lease-time", type=int, default=3600)
    parser.add_argument("--mtu", type=int, default=None)
    parser.add_argument("--no-rapid-commit", action="store_true")
    parser.add_argument("--arp-proxy", action="store_true", help="also run the ARP proxy")
    parser.add_argument(
        "--gn", action="append", type=_parse_gn, default=[], metavar="MAC,FQDN,VIP4,VIP6"
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


async def _serve_main(args: argparse.Namespace) -> dict[str, Any]:
    from cyphonic.adapter.arp_proxy import ArpProxy  # optional service
    from cyphonic.adapter.packet_io import (  # the I/O edge, only here
        ETH_P_ARP,
        ETH_P_IP,
        RawLink,
        UdpSink,
        serve,
        udp4_dst_port_filter,
    )

    dhcp_link = RawLink(args.interface, [ETH_P_IP], bpf=udp4_dst_port_filter(SERVER_PORT)).open()
    addressing = AdapterAddressing.from_pools(
        dhcp_link.mac_str, args.pool4, args.pool6, args.domain
    )
    table = GnTable(args.gn)
    server = Dhcp4Server(
        table,
        addressing,
        LeaseStore(args.lease_file),
        lease_time=args.lease_time,
        mtu=args.mtu,
        rapid_commit=not args.no_rapid_commit,
    )
    sink = UdpSink(args.interface, SERVER_PORT).open()
    tasks = [asyncio.create_task(serve(dhcp_link, [server.handle]))]
    proxy = None
    arp_link = None
    if args.arp_proxy:
        proxy = ArpProxy(table, addressing)
        arp_link = RawLink(args.interface, [ETH_P_ARP]).open()
        tasks.append(asyncio.create_task(serve(arp_link, [proxy.handle])))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    ready = {
        "ready": True,
        "interface": args.interface,
        "mac": dhcp_link.mac_str,
        "router4": str(addressing.router4),
        "gns": len(table),
    }
    print(json.dumps(ready), flush=True)
    await stop.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    sink.close()
    result: dict[str, Any] = {
        "dhcp4": server.counters,
        "dhcp4_link": dhcp_link.stats,
        "udp_sink_discarded": sink.discarded,
        "lease_states": {gn.mac: server.lease_state(gn.mac, time.time()) for gn in table.all()},
    }
    dhcp_link.close()
    if proxy is not None and arp_link is not None:
        result["arp"] = proxy.counters
        result["arp_link"] = arp_link.stats
        result["arp_latency"] = proxy.latency_summary()
        arp_link.close()
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Run a stand-alone DHCPv4 server (see :func:`_build_parser`); needs CAP_NET_RAW."""
    args = _build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        result = asyncio.run(_serve_main(args))
    except (CyphonicError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"stopped": True, **result}), flush=True)
    return 0


if __name__ == "__main__":  # run the imported module, so loggers are named cyphonic.adapter.*
    from cyphonic.adapter.dhcpv4 import main as _main

    sys.exit(_main())
