"""Stateful DHCPv6 server of the adapter's downlink: each general node gets its fixed VIPv6.

The adapter's Router Advertisements (:mod:`cyphonic.adapter.router_advertisement`, M=1, O=1,
prefix A=0) send the unmodified general nodes (GNs) to stateful DHCPv6 (GCCE 2022 paper,
slides 12-16).  :class:`Dhcp6Server` answers them (RFC 8415): one IA_NA address per GN, which is
the VIPv6 AS assigned to that GN, plus the adapter's DNS server (RFC 3646 §3, option 23) and the
CYPHONIC domain as search list (RFC 3646 §4, option 24), so that the GN's DNS queries reach the
adapter's resolver (route selection is triggered by them, slide 17).

It is a pure core (no sockets, no clock, STYLE.md): ``handle(frame, now)`` takes one whole
Ethernet frame and returns the whole frames to send (the handler signature of
:mod:`cyphonic.adapter.packet_io`).  ``now`` must be wall-clock time (``time.time()``): lease
expiries are written to the persistent :class:`~cyphonic.adapter.leases.LeaseStore`.

**Identity.**  A GN is the Ethernet source MAC of its frames, looked up in the
:class:`~cyphonic.adapter.gn.GnTable` -- never its DUID, whose type differs between clients
(ISC dhclient: DUID-LLT; dhcpcd: DUID-UUID, -LLT or -LL; systemd-networkd: DUID-EN; RFC 8415
§11).
The DUID and IAID are stored in the lease for logging and ``cyphonic status`` only.  A frame
from a MAC that is no GN gets **no answer at all** (logged at INFO, rate-limited, counted):
another DHCPv6 server on the link may serve it, and we do not reveal ourselves to it.

**Accepted frames** (everything else is counted and dropped, see :class:`Dhcp6Stats`):
untagged Ethernet, IPv6 without extension headers, UDP to port 547 with a correct checksum
(RFC 8200 §8.1; or one still to be filled in by checksum offload, as a veth delivers it: see
:meth:`Dhcp6Frame.parse`), from a link-local source (RFC 8415 §17.1: clients send from their
link-local address; relayed messages, §9, are not supported) and a unicast MAC, to ``ff02::1:2``
(All_DHCP_Relay_Agents_and_Servers, RFC 8415 §7.1) on MAC 33:33:00:01:00:02, or unicast to the
adapter's ``router6_ll`` on the adapter's MAC.  The server never sends the Server Unicast option
(RFC 8415 §21.12), so a unicast Request, Renew, Release or Decline is answered by a Reply with
status UseMulticast and nothing else (§18.4); other unicast messages are dropped.

**Messages** (RFC 8415 §18.3; the option rules of §16 and Appendix B):

=====================  ======================================================================
Solicit (§18.3.1)      Advertise with Preference 255 (§21.8: the client requests at once,
                       §18.2.1), the IA_NA with the VIPv6, DNS servers, domain list.  With
                       Rapid Commit (§21.14) in the Solicit (and ``rapid_commit=True``, the
                       default): Reply with Rapid Commit, and the lease is committed.  Rapid
                       Commit is safe here: the address is fixed per MAC, so a second server
                       cannot make us waste one.  Must carry no Server Identifier.
Request (§18.3.2)      Reply with the IA_NA; the lease is committed (state ``bound``).
Confirm (§18.3.3)      Reply with status Success if every address in the IAs is the GN's VIPv6,
                       else NotOnLink (an address outside the pool, or another GN's: the only
                       address appropriate for this client on this link is its VIPv6, so the
                       client is sent back to Solicit).  No Reply if the IAs hold no address.
Renew (§18.3.4)        Reply extending the VIPv6; any other address in the IA is returned with
Rebind (§18.3.5)       lifetimes 0.  Without a lease record (a lost lease file) the binding is
                       created again: the server "MAY create a new binding" and the address is
                       fixed anyway.  Renew needs our Server Identifier, Rebind must have none.
Release (§18.3.7)      Reply status Success; the lease becomes ``released`` but stays filed:
                       the VIPv6 remains reserved for that MAC.  An IA not bound here gets
                       NoBinding.
Decline (§18.3.8)      Reply status Success; logged at ERROR -- a fixed VIP was declined,
                       so another host on the link claims it (duplicate address detection);
                       the lease becomes ``declined``.  The VIPv6 is offered again on the next
                       Solicit: it is the only address this GN may have.
Information-request    Reply with DNS servers and domain list only (§18.3.6); discarded if it
(§18.3.6)              carries an IA option or another server's Identifier (§16.12).
=====================  ======================================================================

Every Advertise/Reply echoes the transaction id and the Client Identifier option (§16) and
carries our Server Identifier, a DUID-LL built from the adapter's downlink MAC (§11.4).  The DNS
Recursive Name Server and Domain Search List options go into every Advertise and every Reply to
Solicit, Request, Renew, Rebind and Information-request, requested in the Option Request option
or not: §21.7 lets a server send options the client did not request, and getting the GN to use
the adapter as its resolver is the point of the whole exercise (dhclient and dhcpcd request both
by default; a client that did not ask ignores them).  IA_TA (§21.5) and IA_PD (RFC 8415 §21.21)
are answered with NoAddrsAvail / NoPrefixAvail inside the IA; a second IA_NA too (a GN has one
VIPv6, and one address can be in one IA only).  Lifetimes: ``preferred``/``valid`` in the IA
Address option (§21.6), T1/T2 default to 0.5 and 0.8 times ``preferred`` (§21.4).

**Leases** are filed in the :class:`~cyphonic.adapter.leases.LeaseStore` under kind ``dhcp6``,
keyed by the GN's MAC (its identity; see above)::

    {"mac": ..., "fqdn": ..., "vip6": ..., "state": "bound" | "released" | "declined",
     "duid": "<hex>", "duid_type": "LLT" | "EN" | "LL" | "UUID" | "type-N", "iaid": int,
     "bound_at": float, "expires": float, "updated": float}

written when a binding is committed or changes state (Request, Rapid Commit Solicit, Renew,
Rebind, Release, Decline) -- never for Solicit or Confirm, so a flood of those costs no disk
writes.  After a restart with the same file, Renew/Rebind/Release/Decline find their binding.
A failing lease file is logged and counted; the answer is still sent (the address is fixed).

The codec here (RFC 8415 §8 message format, §21 options, the Ethernet/IPv6/UDP framing) is
hand-written with ``struct`` rather than scapy: scapy's DHCPv6 dissector is lenient (an option
whose length runs past the end becomes a ``Raw`` payload instead of an error), so it cannot tell
malformed input from good, and it costs ~1 ms per frame.  The tests check our bytes against
scapy's dissectors and build the client messages with scapy.
"""

from __future__ import annotations

import ipaddress
import logging
import struct
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from ipaddress import IPv6Address
from typing import Any, Final, Protocol, Self

from cyphonic.adapter.gn import AdapterAddressing, GeneralNode, LogThrottle, mac_str
from cyphonic.adapter.leases import LeaseStoreError
from cyphonic.adapter.router_advertisement import encode_domain_names
from cyphonic.errors import ConfigError, DecodeError

log = logging.getLogger(__name__)

__all__ = [
    "ALL_DHCP_RELAY_AGENTS_AND_SERVERS",
    "ALL_DHCP_SERVERS_MAC",
    "CLIENT_PORT",
    "LEASE_KIND",
    "SERVER_PORT",
    "Dhcp6Frame",
    "Dhcp6Message",
    "Dhcp6Server",
    "Dhcp6Stats",
    "DuidType",
    "IaAddress",
    "IaNa",
    "IaOther",
    "MessageType",
    "OptionCode",
    "StatusCode",
    "build_udp_frame",
    "duid_ll",
    "duid_type_name",
    "pack_option",
    "parse_options",
    "parse_status",
    "udp_checksum",
]

# --------------------------------------------------------------------------------------------
# Constants (RFC 8415 §7)

CLIENT_PORT: Final = 546
SERVER_PORT: Final = 547
ALL_DHCP_RELAY_AGENTS_AND_SERVERS: Final = IPv6Address("ff02::1:2")
"""§7.1: the link-scoped multicast address clients send to."""
ALL_DHCP_SERVERS_MAC: Final = bytes.fromhex("333300010002")
"""RFC 2464 §7: the Ethernet address of ff02::1:2."""
LEASE_KIND: Final = "dhcp6"
"""The :class:`~cyphonic.adapter.leases.LeaseStore` kind of the records written here."""

ETH_HLEN: Final = 14
IPV6_HLEN: Final = 40
UDP_HLEN: Final = 8
IPPROTO_UDP: Final = 17
_ETHERTYPE_IPV6: Final = b"\x86\xdd"
_UDP_OFF: Final = ETH_HLEN + IPV6_HLEN  # 54
_PAYLOAD_OFF: Final = _UDP_OFF + UDP_HLEN  # 62
_SERVER_PORT_BYTES: Final = SERVER_PORT.to_bytes(2, "big")
_MULTICAST_DST: Final = ALL_DHCP_RELAY_AGENTS_AND_SERVERS.packed
_HOP_LIMIT: Final = 64  # hop limit of our replies (the default of RFC 4861 §6.3.2 / IANA)
_DUID_MAX: Final = 130  # §11.1: type code + at most 128 octets
_INFINITY: Final = 0xFFFFFFFF  # §7.7


class MessageType(IntEnum):
    """DHCPv6 message types (RFC 8415 §7.3)."""

    SOLICIT = 1
    ADVERTISE = 2
    REQUEST = 3
    CONFIRM = 4
    RENEW = 5
    REBIND = 6
    REPLY = 7
    RELEASE = 8
    DECLINE = 9
    RECONFIGURE = 10
    INFORMATION_REQUEST = 11
    RELAY_FORW = 12
    RELAY_REPL = 13


class OptionCode(IntEnum):
    """DHCPv6 option codes used here (RFC 8415 §21, RFC 3646 §3-4)."""

    CLIENTID = 1
    SERVERID = 2
    IA_NA = 3
    IA_TA = 4
    IAADDR = 5
    ORO = 6
    PREFERENCE = 7
    ELAPSED_TIME = 8
    RELAY_MSG = 9
    AUTH = 11
    UNICAST = 12
    STATUS_CODE = 13
    RAPID_COMMIT = 14
    DNS_SERVERS = 23
    DOMAIN_LIST = 24
    IA_PD = 25
    IAPREFIX = 26


class StatusCode(IntEnum):
    """Status codes (RFC 8415 §21.13)."""

    SUCCESS = 0
    UNSPEC_FAIL = 1
    NO_ADDRS_AVAIL = 2
    NO_BINDING = 3
    NOT_ON_LINK = 4
    USE_MULTICAST = 5
    NO_PREFIX_AVAIL = 6


class DuidType(IntEnum):
    """DUID types (RFC 8415 §11.1, RFC 6355 for DUID-UUID)."""

    LLT = 1
    EN = 2
    LL = 3
    UUID = 4


_CLIENT_TYPES: Final = frozenset(
    {
        MessageType.SOLICIT,
        MessageType.REQUEST,
        MessageType.CONFIRM,
        MessageType.RENEW,
        MessageType.REBIND,
        MessageType.RELEASE,
        MessageType.DECLINE,
        MessageType.INFORMATION_REQUEST,
    }
)
_SINGLETONS: Final = frozenset(
    {
        OptionCode.CLIENTID,
        OptionCode.SERVERID,
        OptionCode.ORO,
        OptionCode.PREFERENCE,
        OptionCode.ELAPSED_TIME,
        OptionCode.RAPID_COMMIT,
    }
)
_FIXED_LENGTH: Final[dict[int, int]] = {
    OptionCode.PREFERENCE: 1,
    OptionCode.ELAPSED_TIME: 2,
    OptionCode.RAPID_COMMIT: 0,
}

# --------------------------------------------------------------------------------------------
# Codec: options (RFC 8415 §21.1)

Option = tuple[int, bytes]
"""One option as (code, data), data without the 4-byte code/length header."""

_OPT_HEAD: Final = struct.Struct("!HH")
_IA_HEAD: Final = struct.Struct("!III")  # IAID, T1, T2 (§21.4, §21.21)
_IAADDR_HEAD: Final = struct.Struct("!16sII")  # address, preferred, valid (§21.6)


def parse_options(data: bytes) -> tuple[Option, ...]:
    """The options of ``data`` (§21.1: code u16, length u16, data); :class:`DecodeError` on an
    option header or data running past the end."""
    out: list[Option] = []
    i, end = 0, len(data)
    while i < end:
        if end - i < 4:
            raise DecodeError("truncated DHCPv6 option header")
        code, length = _OPT_HEAD.unpack_from(data, i)
        i += 4
        if i + length > end:
            raise DecodeError(f"DHCPv6 option {code} runs past the end ({length} bytes)")
        out.append((code, data[i : i + length]))
        i += length
    return tuple(out)


def pack_option(code: int, data: bytes = b"") -> bytes:
    """One option, header included (§21.1)."""
    if len(data) > 0xFFFF:
        raise ValueError(f"DHCPv6 option {code} too long: {len(data)} bytes")
    return _OPT_HEAD.pack(code, len(data)) + data


def _pack_options(options: Iterable[Option]) -> bytes:
    return b"".join(pack_option(code, data) for code, data in options)


def _status_data(code: int, message: str) -> bytes:
    """Status Code option data (§21.13): code u16 + UTF-8 message."""
    return code.to_bytes(2, "big") + message.encode()


def parse_status(data: bytes) -> tuple[int, str]:
    """Status Code option data -> (code, message); :class:`DecodeError` if malformed."""
    if len(data) < 2:
        raise DecodeError("Status Code option shorter than 2 bytes")
    try:
        return int.from_bytes(data[:2], "big"), data[2:].decode()
    except UnicodeDecodeError as exc:
        raise DecodeError("Status Code message is not UTF-8") from exc


def _check_duid(what: str, data: bytes) -> bytes:
    if not 3 <= len(data) <= _DUID_MAX:
        raise DecodeError(f"{what} DUID of {len(data)} bytes (RFC 8415 §11.1: 3..130)")
    return data


def duid_ll(mac: bytes) -> bytes:
    """DUID-LL of an Ethernet MAC (RFC 8415 §11.4: type 3, hardware type 1, address)."""
    return struct.pack("!HH", DuidType.LL, 1) + mac


def duid_type_name(duid: bytes) -> str:
    """``"LLT"``, ``"EN"``, ``"LL"``, ``"UUID"`` or ``"type-N"`` (for logs and leases)."""
    code = int.from_bytes(duid[:2], "big")
    try:
        return DuidType(code).name
    except ValueError:
        return f"type-{code}"


@dataclass(frozen=True, slots=True)
class IaAddress:
    """IA Address option (RFC 8415 §21.6)."""

    address: IPv6Address
    preferred: int
    valid: int
    options: tuple[Option, ...] = ()

    @classmethod
    def parse(cls, data: bytes) -> Self:
        if len(data) < _IAADDR_HEAD.size:
            raise DecodeError(f"IA Address option of {len(data)} bytes (< 24)")
        raw, preferred, valid = _IAADDR_HEAD.unpack_from(data)
        return cls(IPv6Address(raw), preferred, valid, parse_options(data[_IAADDR_HEAD.size :]))

    def pack(self) -> bytes:
        """The whole option (header included)."""
        body = _IAADDR_HEAD.pack(self.address.packed, self.preferred, self.valid)
        return pack_option(OptionCode.IAADDR, body + _pack_options(self.options))


@dataclass(frozen=True, slots=True)
class IaNa:
    """Identity Association for Non-temporary Addresses (RFC 8415 §21.4).

    ``addresses`` are its IA Address options, ``status`` its Status Code option (if any),
    ``options`` everything (parsed on input; on output, extra options appended after them).
    """

    iaid: int
    t1: int = 0
    t2: int = 0
    addresses: tuple[IaAddress, ...] = ()
    status: tuple[int, str] | None = None
    options: tuple[Option, ...] = ()

    @classmethod
    def parse(cls, data: bytes) -> Self:
        if len(data) < _IA_HEAD.size:
            raise DecodeError(f"IA_NA option of {len(data)} bytes (< 12)")
        iaid, t1, t2 = _IA_HEAD.unpack_from(data)
        options = parse_options(data[_IA_HEAD.size :])
        addresses = tuple(IaAddress.parse(d) for c, d in options if c == OptionCode.IAADDR)
        statuses = [parse_status(d) for c, d in options if c == OptionCode.STATUS_CODE]
        return cls(iaid, t1, t2, addresses, statuses[0] if statuses else None, options)

    def pack(self) -> bytes:
        """The whole option (header included)."""
        parts = [_IA_HEAD.pack(self.iaid, self.t1, self.t2)]
        parts += [a.pack() for a in self.addresses]
        if self.status is not None:
            code, message = self.status
            parts.append(pack_option(OptionCode.STATUS_CODE, _status_data(code, message)))
        parts += [pack_option(c, d) for c, d in self.options if c not in _IA_OWN_OPTIONS]
        return pack_option(OptionCode.IA_NA, b"".join(parts))


_IA_OWN_OPTIONS: Final = frozenset({OptionCode.IAADDR, OptionCode.STATUS_CODE})


@dataclass(frozen=True, slots=True)
class IaOther:
    """An IA_TA (RFC 8415 §21.5) or IA_PD (§21.21): the server assigns nothing to these, it
    only needs their IAID (and, on input, that they are well formed)."""

    code: int
    iaid: int

    @classmethod
    def parse(cls, code: int, data: bytes) -> Self:
        head = 4 if code == OptionCode.IA_TA else 12
        if len(data) < head:
            raise DecodeError(f"IA option {code} of {len(data)} bytes (< {head})")
        for sub, sub_data in parse_options(data[head:]):
            if sub == OptionCode.IAADDR:
                IaAddress.parse(sub_data)
            elif sub == OptionCode.IAPREFIX and len(sub_data) < 25:
                raise DecodeError("IA Prefix option shorter than 25 bytes (§21.22)")
        return cls(code, int.from_bytes(data[:4], "big"))

    def pack_refusal(self) -> bytes:
        """The IA with no leases and NoAddrsAvail (IA_TA) or NoPrefixAvail (IA_PD)."""
        if self.code == OptionCode.IA_TA:
            status = _status_data(StatusCode.NO_ADDRS_AVAIL, "no temporary addresses here")
            head = self.iaid.to_bytes(4, "big")
        else:
            status = _status_data(StatusCode.NO_PREFIX_AVAIL, "no prefix delegation here")
            head = _IA_HEAD.pack(self.iaid, 0, 0)
        return pack_option(self.code, head + pack_option(OptionCode.STATUS_CODE, status))


@dataclass(frozen=True, slots=True)
class Dhcp6Message:
    """A client/server DHCPv6 message (RFC 8415 §8): type, transaction id, options.

    :meth:`parse` checks the option encoding and the options this server interprets
    (identifiers, IAs, ORO, fixed-length options, no repeated singletons, unique IAIDs) and
    raises :class:`DecodeError`; other options are kept opaque.  Relay messages (§9) are not
    client/server messages and are refused.
    """

    msg_type: int
    transaction_id: int
    options: tuple[Option, ...] = ()
    ia_na: tuple[IaNa, ...] = field(default=(), compare=False)
    ia_other: tuple[IaOther, ...] = field(default=(), compare=False)

    @classmethod
    def parse(cls, data: bytes) -> Self:
        if len(data) < 4:
            raise DecodeError(f"DHCPv6 message of {len(data)} bytes (< 4)")
        msg_type = data[0]
        if msg_type in (MessageType.RELAY_FORW, MessageType.RELAY_REPL):
            raise DecodeError("relay message: relay agents are not supported")
        options = parse_options(data[4:])
        seen: set[int] = set()
        ia_na: list[IaNa] = []
        ia_other: list[IaOther] = []
        iaids: set[tuple[int, int]] = set()
        for code, value in options:
            if code in _SINGLETONS:
                if code in seen:
                    raise DecodeError(f"option {code} repeated")
                seen.add(code)
            if code in (OptionCode.CLIENTID, OptionCode.SERVERID):
                _check_duid(OptionCode(code).name, value)
            elif code == OptionCode.ORO and len(value) % 2:
                raise DecodeError("Option Request option of odd length (§21.7)")
            elif code in _FIXED_LENGTH and len(value) != _FIXED_LENGTH[code]:
                raise DecodeError(f"option {code} of length {len(value)}")
            elif code == OptionCode.STATUS_CODE:
                parse_status(value)
            elif code in (OptionCode.IA_NA, OptionCode.IA_TA, OptionCode.IA_PD):
                iaid: int
                if code == OptionCode.IA_NA:
                    ia = IaNa.parse(value)
                    ia_na.append(ia)
                    iaid = ia.iaid
                else:
                    other = IaOther.parse(code, value)
                    ia_other.append(other)
                    iaid = other.iaid
                if (code, iaid) in iaids:
                    raise DecodeError(f"IAID {iaid} used twice in option {code} (§12)")
                iaids.add((code, iaid))
        return cls(
            msg_type,
            int.from_bytes(data[1:4], "big"),
            options,
            tuple(ia_na),
            tuple(ia_other),
        )

    def pack(self) -> bytes:
        """The message bytes (§8); ``options`` as given (IA objects are for reading)."""
        return (
            bytes((self.msg_type,))
            + self.transaction_id.to_bytes(3, "big")
            + _pack_options(self.options)
        )

    def get(self, code: int) -> bytes | None:
        """The data of the first option ``code``, or None."""
        for c, d in self.options:
            if c == code:
                return d
        return None

    def has(self, code: int) -> bool:
        return any(c == code for c, _ in self.options)

    @property
    def requested(self) -> tuple[int, ...]:
        """Option codes of the Option Request option (§21.7)."""
        oro = self.get(OptionCode.ORO) or b""
        return tuple(int.from_bytes(oro[i : i + 2], "big") for i in range(0, len(oro), 2))


# --------------------------------------------------------------------------------------------
# Codec: Ethernet + IPv6 + UDP (RFC 2464, RFC 8200, RFC 768)


def _sum_mod(data: bytes) -> int:
    """One's-complement sum of ``data`` modulo 0xFFFF (RFC 1071; 2**16 == 1 mod 0xFFFF)."""
    if len(data) & 1:
        data += b"\x00"
    return int.from_bytes(data, "big") % 0xFFFF


def _pseudo_header(src: bytes, dst: bytes, length: int) -> bytes:
    """IPv6 pseudo-header for UDP (RFC 8200 §8.1)."""
    return src + dst + length.to_bytes(4, "big") + b"\x00\x00\x00" + bytes((IPPROTO_UDP,))


def udp_checksum(src: bytes, dst: bytes, segment: bytes) -> int:
    """UDP checksum over IPv6 (RFC 8200 §8.1) of ``segment`` whose checksum field is zero;
    never 0 (a computed 0 is sent as 0xFFFF, RFC 768)."""
    s = _sum_mod(_pseudo_header(src, dst, len(segment)) + segment)
    return 0xFFFF - s if s else 0xFFFF


def build_udp_frame(
    eth_dst: bytes,
    eth_src: bytes,
    ip_src: bytes,
    ip_dst: bytes,
    sport: int,
    dport: int,
    payload: bytes,
    *,
    hop_limit: int = _HOP_LIMIT,
) -> bytes:
    """Ethernet + IPv6 (no extension headers, traffic class and flow label 0) + UDP."""
    length = UDP_HLEN + len(payload)
    segment = struct.pack("!HHHH", sport, dport, length, 0) + payload
    csum = udp_checksum(ip_src, ip_dst, segment)
    return b"".join(
        (
            eth_dst,
            eth_src,
            _ETHERTYPE_IPV6,
            struct.pack("!IHBB", 0x60000000, length, IPPROTO_UDP, hop_limit),
            ip_src,
            ip_dst,
            segment[:6],
            csum.to_bytes(2, "big"),
            payload,
        )
    )


@dataclass(frozen=True, slots=True)
class Dhcp6Frame:
    """An untagged Ethernet frame carrying IPv6 + UDP to port 547 (no extension headers)."""

    eth_dst: bytes
    eth_src: bytes
    ip_src: bytes
    ip_dst: bytes
    sport: int
    payload: bytes
    checksum_partial: bool = False
    """The UDP checksum field held the pseudo-header sum only (see :meth:`parse`)."""

    @classmethod
    def parse(cls, frame: bytes) -> Self | None:
        """Split ``frame``: None if it is not IPv6/UDP to port 547 at all (the link's other
        traffic), :class:`DecodeError` if it claims to be but is broken (lengths, version,
        UDP checksum missing or wrong).  Ethernet padding after the IPv6 payload is ignored.

        A checksum field that holds exactly the folded sum of the pseudo-header is accepted as
        "not computed yet": a sender on the same host (a veth, a bridge to a container or VM)
        hands the frame over with checksum offload pending (``CHECKSUM_PARTIAL``; packet(7)
        reports ``TP_STATUS_CSUMNOTREADY``), and a packet socket sees it before any NIC fills
        it in.  A damaged frame matches that value by chance once in 65535.
        """
        if (
            len(frame) < _PAYLOAD_OFF
            or frame[12:14] != _ETHERTYPE_IPV6
            or frame[20] != IPPROTO_UDP
            or frame[56:58] != _SERVER_PORT_BYTES
        ):
            return None
        if frame[14] >> 4 != 6:
            raise DecodeError("IPv6 ethertype but IP version is not 6")
        plen = int.from_bytes(frame[18:20], "big")
        if _UDP_OFF + plen > len(frame):
            raise DecodeError("IPv6 payload length runs past the end of the frame")
        segment = frame[_UDP_OFF : _UDP_OFF + plen]
        if len(segment) < UDP_HLEN or int.from_bytes(segment[4:6], "big") != plen:
            raise DecodeError("UDP length does not match the IPv6 payload length")
        ip_src, ip_dst = frame[22:38], frame[38:54]
        if segment[6:8] == b"\x00\x00":
            raise DecodeError("UDP checksum 0 over IPv6 (RFC 8200 §8.1)")
        pseudo = _pseudo_header(ip_src, ip_dst, plen)
        partial = False
        if _sum_mod(pseudo + segment) != 0:
            partial = int.from_bytes(segment[6:8], "big") % 0xFFFF == _sum_mod(pseudo)
            if not partial:
                raise DecodeError("bad UDP checksum")
        return cls(
            frame[0:6],
            frame[6:12],
            ip_src,
            ip_dst,
            int.from_bytes(segment[0:2], "big"),
            segment[UDP_HLEN:],
            partial,
        )


# --------------------------------------------------------------------------------------------
# The server


class _GnLookup(Protocol):
    """What the server needs of :class:`cyphonic.adapter.gn.GnTable`."""

    def by_mac(self, mac: str | bytes) -> GeneralNode | None: ...


class _Leases(Protocol):
    """What the server needs of :class:`cyphonic.adapter.leases.LeaseStore`."""

    def get(self, kind: str, key: str) -> dict[str, Any] | None: ...

    def put(self, kind: str, key: str, record: dict[str, Any]) -> None: ...


@dataclass(slots=True)
class Dhcp6Stats:
    """Counters of :meth:`Dhcp6Server.handle`.

    ``rx_<type>`` / ``tx_<type>``: well-formed client messages received (from any MAC) / answers
    sent, by type.

    Drops: ``ignored`` (not IPv6/UDP/547: the link's other traffic), ``own_frame`` (sent by the
    adapter's MAC: AF_PACKET sees outgoing frames), ``not_for_us`` (another destination),
    ``malformed`` (bad framing, checksum, option encoding, or a missing/forbidden identifier,
    §16), ``not_link_local`` (a non-link-local source), ``unsupported`` (server-to-client or
    relay message types, §9), ``unknown_mac`` (no GN has the source MAC: no answer),
    ``wrong_server`` (another server's Identifier), ``unicast`` (sent unicast: UseMulticast or
    dropped, §18.4), ``no_reply`` (a Confirm without addresses, §18.3.3).

    Events: ``checksum_partial`` (a UDP checksum still to be filled in by offload, see
    :meth:`Dhcp6Frame.parse`), ``declined``, ``binding_recreated`` (Renew/Rebind without a
    lease record), ``lease_store_errors``, ``internal_error`` (a bug; logged with traceback).
    """

    rx_solicit: int = 0
    rx_request: int = 0
    rx_confirm: int = 0
    rx_renew: int = 0
    rx_rebind: int = 0
    rx_release: int = 0
    rx_decline: int = 0
    rx_information_request: int = 0
    tx_advertise: int = 0
    tx_reply: int = 0
    ignored: int = 0
    own_frame: int = 0
    not_for_us: int = 0
    malformed: int = 0
    not_link_local: int = 0
    unsupported: int = 0
    unknown_mac: int = 0
    wrong_server: int = 0
    unicast: int = 0
    no_reply: int = 0
    checksum_partial: int = 0
    declined: int = 0
    binding_recreated: int = 0
    lease_store_errors: int = 0
    internal_error: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class Dhcp6Server:
    """Stateful DHCPv6 server for the GNs of one downlink (see the module docstring).

    ``table`` is the live GN table (consulted per message, so a refreshed list takes effect at
    once), ``addressing`` the downlink's plan (``downlink_mac`` and ``router6_ll``, the source
    of every reply; ``dns6`` and ``domain``, sent to the GNs), ``leases`` the persistent store.
    ``preferred``/``valid`` are the address lifetimes (§21.6), ``t1``/``t2`` the IA_NA renewal
    times (§21.4; default 0.5 and 0.8 x ``preferred``), ``server_duid`` our DUID (default:
    DUID-LL of ``downlink_mac``, §11.4), ``preference`` the Advertise preference (§21.8),
    ``rapid_commit`` whether a Solicit with Rapid Commit gets a committing Reply (§18.3.1).
    Inconsistent values raise :class:`ConfigError`.
    """

    def __init__(
        self,
        table: _GnLookup,
        addressing: AdapterAddressing,
        leases: _Leases,
        *,
        preferred: int = 3600,
        valid: int = 7200,
        t1: int | None = None,
        t2: int | None = None,
        server_duid: bytes | None = None,
        preference: int = 255,
        rapid_commit: bool = True,
    ) -> None:
        t1 = preferred // 2 if t1 is None else t1
        t2 = preferred * 4 // 5 if t2 is None else t2
        if not 0 < preferred <= valid <= _INFINITY:
            raise ConfigError(
                f"DHCPv6 lifetimes: need 0 < preferred ({preferred}) <= valid ({valid}) "
                "(RFC 8415 §21.6)"
            )
        if not 0 <= t1 <= t2 <= preferred:
            raise ConfigError(
                f"DHCPv6 T1 {t1} / T2 {t2}: need 0 <= T1 <= T2 <= preferred lifetime "
                "(RFC 8415 §21.4: T1 > T2 is discarded by the client)"
            )
        if not 0 <= preference <= 255:
            raise ConfigError(f"DHCPv6 preference {preference} outside 0..255 (RFC 8415 §21.8)")
        self.table = table
        self.addressing = addressing
        self.leases = leases
        self.preferred, self.valid, self.t1, self.t2 = preferred, valid, t1, t2
        self.preference = preference
        self.rapid_commit = rapid_commit
        self.mac = addressing.downlink_mac_bytes
        self.source = addressing.router6_ll.packed
        self.server_duid = duid_ll(self.mac) if server_duid is None else server_duid
        try:
            _check_duid("server", self.server_duid)
        except DecodeError as exc:
            raise ConfigError(str(exc)) from exc
        try:
            domains = encode_domain_names((addressing.domain,))
        except ValueError as exc:
            raise ConfigError(f"cannot send domain {addressing.domain!r}: {exc}") from exc
        self._config_options: tuple[Option, ...] = (
            (OptionCode.DNS_SERVERS, addressing.dns6.packed),  # RFC 3646 §3
            (OptionCode.DOMAIN_LIST, domains),  # RFC 3646 §4
        )
        self.stats = Dhcp6Stats()
        self._throttle = LogThrottle(60.0)

    # -- entry point -----------------------------------------------------------------------

    def handle(self, frame: bytes, now: float) -> list[bytes]:
        """One received Ethernet frame -> the frames to send (``[]`` or one).  Never raises."""
        try:
            pkt = Dhcp6Frame.parse(frame)
            if pkt is None:
                self.stats.ignored += 1
                return []
            return self._frame(pkt, now)
        except DecodeError as exc:
            return self._malformed(frame[6:12], str(exc), now)
        except Exception:  # a bug, not bad input: keep the event loop alive, but say so
            log.exception("DHCPv6 server failed on a %d-byte frame", len(frame))
            self.stats.internal_error += 1
            return []

    def _malformed(self, src_mac: bytes, why: str, now: float) -> list[bytes]:
        self.stats.malformed += 1
        key = ("malformed", src_mac)
        if log.isEnabledFor(logging.DEBUG) and self._throttle.allow(key, now):
            log.debug(
                "malformed DHCPv6 frame from %s: %s (%d more suppressed)",
                mac_str(src_mac),
                why,
                self._throttle.suppressed(key),
            )
        return []

    def _frame(self, pkt: Dhcp6Frame, now: float) -> list[bytes]:
        stats = self.stats
        if pkt.eth_src == self.mac:
            stats.own_frame += 1
            return []
        if pkt.checksum_partial:
            stats.checksum_partial += 1
        if pkt.ip_dst == _MULTICAST_DST and pkt.eth_dst == ALL_DHCP_SERVERS_MAC:
            unicast = False
        elif pkt.ip_dst == self.source and pkt.eth_dst == self.mac:
            unicast = True
        else:
            stats.not_for_us += 1
            return []
        if pkt.eth_src[0] & 1:
            return self._malformed(pkt.eth_src, "multicast Ethernet source", now)
        if not (pkt.ip_src[0] == 0xFE and pkt.ip_src[1] & 0xC0 == 0x80):
            stats.not_link_local += 1
            return []
        if pkt.payload[:1] in (b"\x0c", b"\x0d"):  # Relay-forw/-repl (§9): no relays here
            stats.unsupported += 1
            return []
        try:
            msg = Dhcp6Message.parse(pkt.payload)
        except DecodeError as exc:
            return self._malformed(pkt.eth_src, str(exc), now)
        if msg.msg_type not in _CLIENT_TYPES:
            stats.unsupported += 1
            return []
        mtype = MessageType(msg.msg_type)
        name = mtype.name.lower()
        setattr(stats, f"rx_{name}", getattr(stats, f"rx_{name}") + 1)
        gn = self.table.by_mac(pkt.eth_src)
        if gn is None:
            stats.unknown_mac += 1
            key = ("unknown", pkt.eth_src)
            if self._throttle.allow(key, now):
                log.info(
                    "DHCPv6 %s from %s (%s): no general node has this MAC; not answering "
                    "(%d more suppressed)",
                    mtype.name,
                    mac_str(pkt.eth_src),
                    ipaddress.IPv6Address(pkt.ip_src),
                    self._throttle.suppressed(key),
                )
            return []
        try:
            self._check_identifiers(mtype, msg)
        except DecodeError as exc:
            return self._malformed(pkt.eth_src, f"{mtype.name}: {exc}", now)
        except _WrongServer:
            stats.wrong_server += 1
            return []
        if unicast:
            stats.unicast += 1
            if mtype not in _USE_MULTICAST_TYPES:
                return []
            status = _status_data(StatusCode.USE_MULTICAST, "use multicast")
            options = [*self._ids(msg), (OptionCode.STATUS_CODE, status)]
            return [self._send(pkt, msg, MessageType.REPLY, options)]
        answer = self._dispatch(mtype, msg, gn, now)
        if answer is None:
            return []
        return [self._send(pkt, msg, *answer)]

    def _send(
        self, pkt: Dhcp6Frame, msg: Dhcp6Message, reply_type: MessageType, options: list[Option]
    ) -> bytes:
        body = Dhcp6Message(reply_type, msg.transaction_id, tuple(options)).pack()
        if reply_type == MessageType.ADVERTISE:
            self.stats.tx_advertise += 1
        else:
            self.stats.tx_reply += 1
        # §18.3.10: unicast to the source address of the client's message, on its link.
        return build_udp_frame(
            pkt.eth_src, self.mac, self.source, pkt.ip_src, SERVER_PORT, CLIENT_PORT, body
        )

    # -- §16: which identifiers each message must (not) carry -------------------------------

    def _check_identifiers(self, mtype: MessageType, msg: Dhcp6Message) -> None:
        server_id = msg.get(OptionCode.SERVERID)
        has_client = msg.has(OptionCode.CLIENTID)
        if mtype == MessageType.INFORMATION_REQUEST:  # §16.12
            if server_id is not None and server_id != self.server_duid:
                raise _WrongServer
            if msg.ia_na or msg.ia_other:
                raise DecodeError("Information-request with an IA option")
            return
        if not has_client:
            raise DecodeError("no Client Identifier option")
        if mtype in _NO_SERVER_ID:  # §16.2 Solicit, §16.5 Confirm, §16.7 Rebind
            if server_id is not None:
                raise DecodeError("Server Identifier option where none is allowed")
        elif server_id is None:  # §16.4 Request, §16.6 Renew, §16.8 Decline, §16.9 Release
            raise DecodeError("no Server Identifier option")
        elif server_id != self.server_duid:
            raise _WrongServer

    # -- §18.3: building the answer ----------------------------------------------------------

    def _ids(self, msg: Dhcp6Message) -> list[Option]:
        """Our Server Identifier + the client's Client Identifier echoed (§16)."""
        ids: list[Option] = [(OptionCode.SERVERID, self.server_duid)]
        client_id = msg.get(OptionCode.CLIENTID)
        if client_id is not None:
            ids.append((OptionCode.CLIENTID, client_id))
        return ids

    def _dispatch(
        self, mtype: MessageType, msg: Dhcp6Message, gn: GeneralNode, now: float
    ) -> _Answer | None:
        if mtype == MessageType.SOLICIT:
            return self._solicit(msg, gn, now)
        if mtype in (MessageType.REQUEST, MessageType.RENEW, MessageType.REBIND):
            return self._assign(mtype, msg, gn, now)
        if mtype == MessageType.CONFIRM:
            return self._confirm(msg, gn)
        if mtype in (MessageType.RELEASE, MessageType.DECLINE):
            return self._release_or_decline(mtype, msg, gn, now)
        # Information-request (§18.3.6): configuration only.
        return MessageType.REPLY, [*self._ids(msg), *self._config_options]

    def _chosen(self, msg: Dhcp6Message, lease: dict[str, Any] | None) -> IaNa | None:
        """The IA_NA that holds the VIPv6: the one bound before (same IAID), else the first."""
        if not msg.ia_na:
            return None
        if lease is not None:
            for ia in msg.ia_na:
                if ia.iaid == lease.get("iaid"):
                    return ia
        return msg.ia_na[0]

    def _ia_options(
        self, msg: Dhcp6Message, gn: GeneralNode, chosen: IaNa | None, *, expire_others: bool
    ) -> list[Option]:
        """The IA options of an Advertise/Reply (§18.3.1, §18.3.2, §18.3.4, §18.3.5).

        ``expire_others`` (Renew, Rebind): addresses in the client's IAs that are not its
        VIPv6 go back with lifetimes 0, so the client stops using them at once.
        """
        out: list[Option] = []
        for ia in msg.ia_na:
            stale = tuple(
                IaAddress(a.address, 0, 0)
                for a in ia.addresses
                if expire_others and (ia is not chosen or a.address != gn.vip6)
            )
            if ia is chosen:
                vip = IaAddress(gn.vip6, self.preferred, self.valid)
                answer = IaNa(ia.iaid, self.t1, self.t2, (vip, *stale))
            else:  # one VIPv6 per GN, and an address lives in one IA only
                status = (StatusCode.NO_ADDRS_AVAIL, "one address per node: see the other IA")
                answer = IaNa(ia.iaid, 0, 0, stale, status)
            out.append((OptionCode.IA_NA, answer.pack()[4:]))
        out += [(other.code, other.pack_refusal()[4:]) for other in msg.ia_other]
        return out

    def _solicit(self, msg: Dhcp6Message, gn: GeneralNode, now: float) -> _Answer:
        """§18.3.1: Advertise, or Reply with Rapid Commit."""
        lease = self._lease(gn)
        chosen = self._chosen(msg, lease)
        if chosen is None:
            # §18.3.1: no address to offer -> "only a Status Code option with NoAddrsAvail".
            status = _status_data(StatusCode.NO_ADDRS_AVAIL, "ask with an IA_NA for an address")
            return MessageType.ADVERTISE, [*self._ids(msg), (OptionCode.STATUS_CODE, status)]
        ias = self._ia_options(msg, gn, chosen, expire_others=False)
        if self.rapid_commit and msg.has(OptionCode.RAPID_COMMIT):
            self._commit(gn, msg, chosen, lease, now, "Solicit+Rapid Commit")
            extra: Option = (OptionCode.RAPID_COMMIT, b"")
            return MessageType.REPLY, [*self._ids(msg), extra, *ias, *self._config_options]
        extra = (OptionCode.PREFERENCE, bytes((self.preference,)))
        return MessageType.ADVERTISE, [*self._ids(msg), extra, *ias, *self._config_options]

    def _assign(
        self, mtype: MessageType, msg: Dhcp6Message, gn: GeneralNode, now: float
    ) -> _Answer:
        """§18.3.2 Request, §18.3.4 Renew, §18.3.5 Rebind: Reply, binding committed."""
        lease = self._lease(gn)
        chosen = self._chosen(msg, lease)
        renewing = mtype != MessageType.REQUEST
        if chosen is not None:
            if renewing and (lease is None or lease.get("vip6") != str(gn.vip6)):
                self.stats.binding_recreated += 1
                log.info(
                    "DHCPv6 %s from %s (%s) without a binding on file: binding %s again",
                    mtype.name,
                    gn.mac,
                    gn.fqdn,
                    gn.vip6,
                )
            self._commit(gn, msg, chosen, lease, now, mtype.name)
        ias = self._ia_options(msg, gn, chosen, expire_others=renewing)
        return MessageType.REPLY, [*self._ids(msg), *ias, *self._config_options]

    def _confirm(self, msg: Dhcp6Message, gn: GeneralNode) -> _Answer | None:
        """§18.3.3: Success if every address is the GN's VIPv6, else NotOnLink."""
        addresses = [a.address for ia in msg.ia_na for a in ia.addresses]
        if not addresses:  # "... the server MUST NOT send a Reply to the client"
            self.stats.no_reply += 1
            return None
        if all(a == gn.vip6 for a in addresses):
            status = _status_data(StatusCode.SUCCESS, "addresses are on-link")
        else:
            wrong = ", ".join(str(a) for a in addresses if a != gn.vip6)
            log.info("DHCPv6 Confirm from %s (%s) for %s: NotOnLink", gn.mac, gn.fqdn, wrong)
            status = _status_data(StatusCode.NOT_ON_LINK, "not this node's address on this link")
        return MessageType.REPLY, [*self._ids(msg), (OptionCode.STATUS_CODE, status)]

    def _release_or_decline(
        self, mtype: MessageType, msg: Dhcp6Message, gn: GeneralNode, now: float
    ) -> _Answer:
        """§18.3.7 Release / §18.3.8 Decline: Reply Success; NoBinding for unknown IAs."""
        lease = self._lease(gn)
        decline = mtype == MessageType.DECLINE
        out: list[Option] = []
        hit: IaNa | None = None
        for ia in msg.ia_na:
            bound = (
                lease is not None
                and lease.get("iaid") == ia.iaid
                and lease.get("vip6") == str(gn.vip6)
                and any(a.address == gn.vip6 for a in ia.addresses)
            )
            if bound:
                hit = ia
            else:
                unbound = IaNa(ia.iaid, status=(StatusCode.NO_BINDING, "no binding for this IA"))
                out.append((OptionCode.IA_NA, unbound.pack()[4:]))
        declined = [ia for ia in msg.ia_na if any(a.address == gn.vip6 for a in ia.addresses)]
        if decline and declined:
            self.stats.declined += 1
            log.error(
                "general node %s (%s) DECLINED its fixed VIPv6 %s: another host on the "
                "downlink uses this address (duplicate address detection failed); the node has "
                "no IPv6 VIP until that host is removed",
                gn.mac,
                gn.fqdn,
                gn.vip6,
            )
        if decline and declined:  # on file whether bound or not: `cyphonic status` shows it
            base = (
                lease
                if hit is not None and lease is not None
                else self._record(gn, msg, declined[0], now)
            )
            self._store(gn, {**base, "state": "declined", "expires": now, "updated": now})
        elif hit is not None and lease is not None:
            self._store(gn, {**lease, "state": "released", "expires": now, "updated": now})
            log.info("DHCPv6 %s (%s) released %s", gn.mac, gn.fqdn, gn.vip6)
        done = "decline" if decline else "release"
        status = _status_data(StatusCode.SUCCESS, f"{done} received")
        return MessageType.REPLY, [*self._ids(msg), (OptionCode.STATUS_CODE, status), *out]

    # -- leases -------------------------------------------------------------------------------

    def _lease(self, gn: GeneralNode) -> dict[str, Any] | None:
        return self.leases.get(LEASE_KIND, gn.mac)

    def _commit(
        self,
        gn: GeneralNode,
        msg: Dhcp6Message,
        ia: IaNa,
        lease: dict[str, Any] | None,
        now: float,
        why: str,
    ) -> None:
        record = self._record(gn, msg, ia, now)
        same = lease is not None and all(
            lease.get(k) == record[k] for k in ("state", "vip6", "iaid", "duid")
        )
        if same and lease is not None:  # an extension of the same binding
            record["bound_at"] = lease.get("bound_at", now)
        else:
            log.info(
                "DHCPv6 %s: %s (%s) bound to %s, DUID-%s %s, IAID %d",
                why,
                gn.mac,
                gn.fqdn,
                gn.vip6,
                record["duid_type"],
                record["duid"],
                ia.iaid,
            )
        self._store(gn, record)

    def _record(self, gn: GeneralNode, msg: Dhcp6Message, ia: IaNa, now: float) -> dict[str, Any]:
        """A fresh ``bound`` lease record (the schema of the module docstring)."""
        duid = msg.get(OptionCode.CLIENTID) or b""
        return {
            "mac": gn.mac,
            "fqdn": gn.fqdn,
            "vip6": str(gn.vip6),
            "state": "bound",
            "duid": duid.hex(),
            "duid_type": duid_type_name(duid),
            "iaid": ia.iaid,
            "bound_at": now,
            "expires": now + self.valid,
            "updated": now,
        }

    def _store(self, gn: GeneralNode, record: dict[str, Any]) -> None:
        try:
            self.leases.put(LEASE_KIND, gn.mac, record)
        except LeaseStoreError as exc:
            self.stats.lease_store_errors += 1
            log.error("DHCPv6 lease of %s (%s) not saved: %s", gn.mac, gn.fqdn, exc)


_Answer = tuple[MessageType, list[Option]]
"""The type of the message to send and its options."""


class _WrongServer(Exception):
    """A message addressed to another server by its Server Identifier (silently dropped)."""


_NO_SERVER_ID: Final = frozenset({MessageType.SOLICIT, MessageType.CONFIRM, MessageType.REBIND})
_USE_MULTICAST_TYPES: Final = frozenset(
    {MessageType.REQUEST, MessageType.RENEW, MessageType.RELEASE, MessageType.DECLINE}
)
