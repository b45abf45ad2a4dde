"""ND proxy of the adapter's downlink: answer Neighbor Solicitations for peer VIPv6s.

General nodes (GNs) get a VIPv6 from the overlay's pool (``fd43:5950::/64``, say) and an
on-link Prefix Information option for it in the adapter's Router Advertisements
(:mod:`cyphonic.adapter.router_advertisement`).  The VIPv6s of their peers lie in the same
prefix, so a GN resolves them with Neighbor Solicitations (RFC 4861 §7.2.2) instead of sending to
a router.  The adapter answers those with its own MAC address — a proxy Neighbor Advertisement
(RFC 4861 §7.2.8) — so that the GN's packets for the peer reach the adapter, which tunnels them
through the overlay (GCCE 2022 paper, slide 17, step 3).

:class:`NdProxy` is the pure core (no sockets, no clock; AF_PACKET I/O lives in
:mod:`cyphonic.adapter.packet_io`): ``handle(frame, now)`` takes one whole Ethernet frame and
returns the frames to send, here at most one Neighbor Advertisement.

What is answered (RFC 4861 §7.2.3, §7.2.4), checked in this order, each refusal counted in
:class:`NdProxyStats` under the name given here:

* frames that are not an ICMPv6 Neighbor Solicitation right after the IPv6 header of an
  untagged frame: ``ignored`` (every other frame of the link passes through here and costs a few
  comparisons; solicitations with extension headers or VLAN tags are not served);
  frames sent by the adapter's own MAC (AF_PACKET also sees outgoing frames): ``own_frame``;
* solicitations failing the validity checks of §7.1.1 (IP hop limit 255, ICMP code 0, ICMP
  length >= 24, a good checksum, a target that is not multicast, no option of length zero, with
  the unspecified source only to a solicited-node address and without a source link-layer
  option) or truncated: ``malformed``;
* Duplicate Address Detection probes (IP source ``::``, §7.2.2/RFC 4862 §5.4.2): ``dad`` — never
  answered, so a GN's DAD can never fail because of the proxy.  (Hence the NA never goes to
  ``ff02::1``: that is only the answer to a solicitation from ``::``, §7.2.4.);
* a unicast Ethernet destination that is not the adapter (a solicitation flooded by a bridge on
  its way to another GN, e.g. NUD of a GN by another GN): ``not_for_us``;
* an Ethernet source that is no registered GN: ``unknown_mac``;
* an IP source that is neither that GN's VIPv6 nor a link-local address (fe80::/10: the GN's
  link-local address is not known in advance, RFC 7217 makes it opaque), or a source link-layer
  address option that differs from the Ethernet source: ``spoofed_source``;
* a link-local target (the adapter's ``router6_ll`` is answered by the adapter's kernel, which owns
  it; other link-local addresses are the GNs' own): ``link_local_target``;
* a target outside the VIPv6 pool: ``outside_pool``;
* the pool's Subnet-Router anycast address (RFC 4291 §2.6.1), which no node holds, and ``dns6``
  when the proxy is told not to answer for it: ``own_address``;
* a target that is a GN's own VIPv6 (the asking GN's or another GN's on this link, which answers
  for itself): ``gn_target``;
* anything else in the pool — a peer VIPv6, or the adapter's DNS address ``dns6`` — is answered:
  ``answered``.

The answer (RFC 4861 §4.4, §7.2.4) goes from the adapter's MAC to the solicitation's Ethernet
source and IP source, with IP source = the target address (the adapter stands in for the peer on
this link, as the peer itself would answer), hop limit 255, flags R=0 (the target is an overlay
host, not a router; the adapter's role as router is told by its RAs), S=1, O=1 and a Target
Link-Layer Address option with the adapter's MAC.

O=1 departs from the SHOULD NOT of §7.2.4 for proxied targets, on purpose: that rule lets the
real owner's NA win over a proxy's, but a peer VIPv6 never lives on this link (the GNs' own
VIPv6s are refused above), so the adapter is the authority, and O=0 would leave a stale entry
(a GN that moved away, a rogue answer) in the GN's neighbour cache unchanged (§7.2.5).

The codec helpers here (Ethernet + IPv6 + ICMPv6 framing, checksum, ND options, and the
:class:`NeighborSolicitation` / :class:`NeighborAdvertisement` dataclasses) are shared with
:mod:`cyphonic.adapter.router_advertisement`.  They are hand-written rather than scapy: scapy
dissects a frame in ~0.5 ms.  :meth:`NdProxy.handle` does not even use the dataclasses: it
validates and answers in one flat function over the frame's bytes, ~2 µs warm and ~20-50 µs with
the cold caches of an idle adapter (measured; twice as much through the dataclasses).  The tests
check every byte against scapy's dissectors and the dataclass codecs.

:attr:`NdProxy.latency` / :attr:`NdProxy.answer_latency` keep the duration of recent calls for
the bench and ``cyphonic status``.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import struct
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from enum import IntEnum
from typing import Final, Self

from cyphonic.adapter.gn import AdapterAddressing, GnTable, LogThrottle, mac_str
from cyphonic.errors import DecodeError

log = logging.getLogger(__name__)

__all__ = [
    "ALL_NODES",
    "ALL_NODES_MAC",
    "ALL_ROUTERS",
    "ETH_P_IPV6",
    "IPPROTO_ICMPV6",
    "ND_HOP_LIMIT",
    "Icmpv6Frame",
    "Icmpv6Type",
    "LatencyRecorder",
    "NdOptionType",
    "NdProxy",
    "NdProxyStats",
    "NeighborAdvertisement",
    "NeighborSolicitation",
    "build_icmpv6_frame",
    "checksum_ok",
    "icmpv6_checksum",
    "is_link_local",
    "multicast_mac",
    "pack_options",
    "parse_options",
    "solicited_node_address",
]

# --------------------------------------------------------------------------------------------
# Framing constants and shared codec helpers (RFC 4861 §4, RFC 8200 §3, RFC 2464 §7)

ETH_HLEN: Final = 14
IPV6_HLEN: Final = 40
ETH_P_IPV6: Final = 0x86DD
IPPROTO_ICMPV6: Final = 58
ND_HOP_LIMIT: Final = 255
"""RFC 4861 §7.1.1/§6.1.1: ND messages are sent and accepted only with hop limit 255."""

_ETHERTYPE_IPV6: Final = b"\x86\xdd"
_ICMP_OFF: Final = ETH_HLEN + IPV6_HLEN  # 54: the ICMPv6 header in an untagged frame
_TYPE_OFF: Final = _ICMP_OFF
_NS_MIN_LEN: Final = 24  # §7.1.1: type, code, checksum, reserved, target
_NA_MIN_LEN: Final = 24  # §7.1.2
_NS_TYPE: Final = 135  # Icmpv6Type.NEIGHBOR_SOLICITATION as a plain int (faster to compare)
_NA_LEN: Final = 32  # NA + a Target Link-Layer Address option
_NA_PSEUDO_TAIL: Final = _NA_LEN.to_bytes(4, "big") + b"\x00\x00\x00\x3a"

ALL_NODES: Final = ipaddress.IPv6Address("ff02::1").packed
ALL_ROUTERS: Final = ipaddress.IPv6Address("ff02::2").packed
ALL_NODES_MAC: Final = bytes.fromhex("333300000001")
_UNSPECIFIED: Final = bytes(16)
_SOLICITED_NODE_PREFIX: Final = ipaddress.IPv6Address("ff02::1:ff00:0").packed[:13]


class Icmpv6Type(IntEnum):
    """ICMPv6 types of Neighbor Discovery (RFC 4861 §4)."""

    ROUTER_SOLICITATION = 133
    ROUTER_ADVERTISEMENT = 134
    NEIGHBOR_SOLICITATION = 135
    NEIGHBOR_ADVERTISEMENT = 136


class NdOptionType(IntEnum):
    """ND option types (RFC 4861 §4.6, RFC 8106 §5)."""

    SOURCE_LINK_LAYER_ADDRESS = 1
    TARGET_LINK_LAYER_ADDRESS = 2
    PREFIX_INFORMATION = 3
    MTU = 5
    RDNSS = 25
    DNSSL = 31


def multicast_mac(group: bytes) -> bytes:
    """Ethernet address of IPv6 multicast ``group``: 33:33 + its last 32 bits (RFC 2464 §7)."""
    return b"\x33\x33" + group[12:16]


def solicited_node_address(address: bytes) -> bytes:
    """``ff02::1:ffXX:XXXX`` of ``address`` (RFC 4291 §2.7.1)."""
    return _SOLICITED_NODE_PREFIX + address[13:16]


def is_link_local(address: bytes) -> bool:
    """fe80::/10 (RFC 4291 §2.5.6)."""
    return address[0] == 0xFE and address[1] & 0xC0 == 0x80


def _sum_mod(data: bytes) -> int:
    """The 16-bit one's-complement sum of ``data`` modulo 0xFFFF (RFC 1071 §2(B)).

    Since 2**16 == 1 (mod 0xFFFF), the big-endian integer of an even-length byte string is
    congruent to the sum of its 16-bit words: one big-int reduction instead of a Python loop.
    """
    if len(data) & 1:
        data += b"\x00"
    return int.from_bytes(data, "big") % 0xFFFF


def _pseudo_header(src: bytes, dst: bytes, length: int) -> bytes:
    """IPv6 pseudo-header of an upper-layer checksum (RFC 8200 §8.1)."""
    return src + dst + length.to_bytes(4, "big") + b"\x00\x00\x00" + bytes((IPPROTO_ICMPV6,))


def icmpv6_checksum(src: bytes, dst: bytes, message: bytes) -> int:
    """ICMPv6 checksum (RFC 4443 §2.3) of ``message``, whose checksum field must be zero."""
    s = _sum_mod(_pseudo_header(src, dst, len(message)) + message)
    # s == 0 means a one's-complement sum of 0xFFFF (the data is never all-zero: next header 58)
    return 0xFFFF - s if s else 0


def checksum_ok(src: bytes, dst: bytes, message: bytes) -> bool:
    """True if ``message`` (checksum included) verifies (RFC 4443 §2.3, RFC 1071)."""
    return _sum_mod(_pseudo_header(src, dst, len(message)) + message) == 0


def build_icmpv6_frame(
    eth_dst: bytes,
    eth_src: bytes,
    ip_src: bytes,
    ip_dst: bytes,
    message: bytes,
    *,
    hop_limit: int = ND_HOP_LIMIT,
) -> bytes:
    """Ethernet + IPv6 + ``message`` with its checksum filled in (bytes 2-3 must be zero).

    Traffic class 0, flow label 0 (RFC 8200 §3); no extension headers.
    """
    csum = icmpv6_checksum(ip_src, ip_dst, message)
    return b"".join(
        (
            eth_dst,
            eth_src,
            _ETHERTYPE_IPV6,
            struct.pack("!IHBB", 0x60000000, len(message), IPPROTO_ICMPV6, hop_limit),
            ip_src,
            ip_dst,
            message[:2],
            csum.to_bytes(2, "big"),
            message[4:],
        )
    )


def parse_options(data: bytes) -> list[tuple[int, bytes]]:
    """ND options (RFC 4861 §4.6) as ``(type, body)`` pairs; ``body`` excludes type and length.

    Raises :class:`DecodeError` on an option of length zero (§7.1.1, §6.1.1) or one running past
    the end of the message.
    """
    options: list[tuple[int, bytes]] = []
    i, end = 0, len(data)
    while i < end:
        if end - i < 2:
            raise DecodeError("truncated ND option header")
        length = data[i + 1] * 8
        if length == 0:
            raise DecodeError("ND option with length 0")
        if i + length > end:
            raise DecodeError("ND option runs past the end of the message")
        options.append((data[i], data[i + 2 : i + length]))
        i += length
    return options


def pack_options(options: Iterable[tuple[int, bytes]]) -> bytes:
    """Inverse of :func:`parse_options`: each body is zero-padded to a multiple of 8 octets."""
    out = bytearray()
    for kind, body in options:
        units = (len(body) + 2 + 7) // 8
        if units > 255:
            raise ValueError(f"ND option {kind} too long: {len(body)} bytes")
        out += bytes((kind, units)) + body + bytes(units * 8 - 2 - len(body))
    return bytes(out)


def _lladdr_option(options: list[tuple[int, bytes]], kind: int) -> bytes | None:
    """The first link-layer address option of ``kind`` (Ethernet: 6 bytes, RFC 2464 §8)."""
    for k, body in options:
        if k == kind:
            if len(body) != 6:
                raise DecodeError("link-layer address option is not 8 octets long")
            return body
    return None


@dataclass(frozen=True, slots=True)
class Icmpv6Frame:
    """An untagged Ethernet frame carrying IPv6 + ICMPv6 without extension headers."""

    eth_dst: bytes
    eth_src: bytes
    ip_src: bytes
    ip_dst: bytes
    hop_limit: int
    message: bytes
    """The ICMPv6 message, header and checksum included, exactly ``payload length`` bytes."""

    @classmethod
    def parse(cls, frame: bytes) -> Self | None:
        """Split ``frame``; None if it is no IPv6/ICMPv6 frame, DecodeError if broken.

        Trailing bytes beyond the IPv6 payload length (Ethernet padding) are ignored.
        """
        if len(frame) < _ICMP_OFF or frame[12:14] != _ETHERTYPE_IPV6:
            return None
        if frame[14] >> 4 != 6:
            raise DecodeError("IPv6 ethertype but IP version is not 6")
        if frame[20] != IPPROTO_ICMPV6:
            return None
        plen = int.from_bytes(frame[18:20], "big")
        if _ICMP_OFF + plen > len(frame):
            raise DecodeError("IPv6 payload length runs past the end of the frame")
        if plen < 4:
            raise DecodeError("ICMPv6 message shorter than its header")
        return cls(
            frame[0:6],
            frame[6:12],
            frame[22:38],
            frame[38:54],
            frame[21],
            frame[_ICMP_OFF : _ICMP_OFF + plen],
        )

    @property
    def icmp_type(self) -> int:
        return self.message[0]

    @property
    def icmp_code(self) -> int:
        return self.message[1]

    def checksum_ok(self) -> bool:
        return checksum_ok(self.ip_src, self.ip_dst, self.message)

    def pack(self) -> bytes:
        """The frame again, with the checksum recomputed."""
        zeroed = self.message[:2] + b"\x00\x00" + self.message[4:]
        return build_icmpv6_frame(
            self.eth_dst, self.eth_src, self.ip_src, self.ip_dst, zeroed, hop_limit=self.hop_limit
        )


@dataclass(frozen=True, slots=True)
class NeighborSolicitation:
    """Neighbor Solicitation message (RFC 4861 §4.3)."""

    target: bytes
    source_lladdr: bytes | None = None

    @classmethod
    def parse(cls, message: bytes) -> Self:
        """Decode and check the message-level rules of §7.1.1 (checksum and hop limit are the
        caller's: they need the IP header).  Raises :class:`DecodeError`."""
        if len(message) < _NS_MIN_LEN:
            raise DecodeError(f"Neighbor Solicitation of {len(message)} bytes (< 24)")
        if message[0] != Icmpv6Type.NEIGHBOR_SOLICITATION:
            raise DecodeError(f"ICMPv6 type {message[0]} is not a Neighbor Solicitation")
        if message[1] != 0:
            raise DecodeError(f"Neighbor Solicitation with ICMP code {message[1]}")
        target = message[8:24]
        if target[0] == 0xFF:
            raise DecodeError("Neighbor Solicitation for a multicast target")
        options = parse_options(message[24:])
        return cls(target, _lladdr_option(options, NdOptionType.SOURCE_LINK_LAYER_ADDRESS))

    def pack(self) -> bytes:
        """The message with a zero checksum (see :func:`build_icmpv6_frame`)."""
        options = (
            []
            if self.source_lladdr is None
            else [(NdOptionType.SOURCE_LINK_LAYER_ADDRESS, self.source_lladdr)]
        )
        return (
            bytes((Icmpv6Type.NEIGHBOR_SOLICITATION, 0, 0, 0, 0, 0, 0, 0))
            + self.target
            + pack_options(options)
        )


@dataclass(frozen=True, slots=True)
class NeighborAdvertisement:
    """Neighbor Advertisement message (RFC 4861 §4.4)."""

    target: bytes
    router: bool
    solicited: bool
    override: bool
    target_lladdr: bytes | None = None

    @classmethod
    def parse(cls, message: bytes) -> Self:
        """Decode and check the message-level rules of §7.1.2.  Raises :class:`DecodeError`."""
        if len(message) < _NA_MIN_LEN:
            raise DecodeError(f"Neighbor Advertisement of {len(message)} bytes (< 24)")
        if message[0] != Icmpv6Type.NEIGHBOR_ADVERTISEMENT:
            raise DecodeError(f"ICMPv6 type {message[0]} is not a Neighbor Advertisement")
        if message[1] != 0:
            raise DecodeError(f"Neighbor Advertisement with ICMP code {message[1]}")
        flags = message[4]
        target = message[8:24]
        if target[0] == 0xFF:
            raise DecodeError("Neighbor Advertisement for a multicast target")
        options = parse_options(message[24:])
        return cls(
            target,
            router=bool(flags & 0x80),
            solicited=bool(flags & 0x40),
            override=bool(flags & 0x20),
            target_lladdr=_lladdr_option(options, NdOptionType.TARGET_LINK_LAYER_ADDRESS),
        )

    def pack(self) -> bytes:
        """The message with a zero checksum (see :func:`build_icmpv6_frame`)."""
        flags = (0x80 if self.router else 0) | (0x40 if self.solicited else 0)
        flags |= 0x20 if self.override else 0
        options = (
            []
            if self.target_lladdr is None
            else [(NdOptionType.TARGET_LINK_LAYER_ADDRESS, self.target_lladdr)]
        )
        return (
            bytes((Icmpv6Type.NEIGHBOR_ADVERTISEMENT, 0, 0, 0, flags, 0, 0, 0))
            + self.target
            + pack_options(options)
        )


# --------------------------------------------------------------------------------------------
# The proxy


@dataclass(slots=True)
class NdProxyStats:
    """Counters of :meth:`NdProxy.handle`, one per outcome (see the module docstring)."""

    answered: int = 0
    ignored: int = 0
    own_frame: int = 0
    malformed: int = 0
    dad: int = 0
    not_for_us: int = 0
    unknown_mac: int = 0
    spoofed_source: int = 0
    link_local_target: int = 0
    outside_pool: int = 0
    own_address: int = 0
    gn_target: int = 0
    internal_error: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class LatencyRecorder:
    """The last ``maxlen`` durations (ns) of a call, with percentiles for the bench."""

    def __init__(self, maxlen: int = 4096) -> None:
        self.samples: deque[int] = deque(maxlen=maxlen)
        self.count = 0
        self.max_ns = 0

    def record(self, ns: int) -> None:
        self.samples.append(ns)
        self.count += 1
        if ns > self.max_ns:
            self.max_ns = ns

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile (0-100, nearest rank) of the kept samples, in µs."""
        if not self.samples:
            return 0.0
        ordered = sorted(self.samples)
        rank = min(len(ordered), max(1, math.ceil(q / 100 * len(ordered))))
        return ordered[rank - 1] / 1000

    def summary(self) -> dict[str, float]:
        """``count``, ``p50_us``, ``p99_us`` and ``max_us``."""
        return {
            "count": float(self.count),
            "p50_us": self.percentile(50),
            "p99_us": self.percentile(99),
            "max_us": self.max_ns / 1000,
        }


class NdProxy:
    """Answers Neighbor Solicitations from GNs for peer VIPv6s with the adapter's MAC.

    ``table`` is the live GN table: the proxy re-reads it whenever its ``generation`` changes
    (:meth:`GnTable.replace`), so GNs added or removed take effect with the next solicitation;
    ``addressing`` the downlink's addresses.  ``answer_dns6`` answers for
    the adapter's DNS address too; pass False if the adapter's kernel holds ``dns6`` on the
    downlink and answers for it itself (both answers are identical, so True is harmless).

    ``latency`` records the duration of every :meth:`handle` call that got as far as a
    Neighbor Solicitation (answered or refused), ``answer_latency`` only of answered ones.
    """

    def __init__(
        self, table: GnTable, addressing: AdapterAddressing, *, answer_dns6: bool = True
    ) -> None:
        self.table = table
        self.mac = addressing.downlink_mac_bytes
        pool = addressing.pool6
        self._pool_net = int(pool.network_address)
        self._pool_mask = int(pool.netmask)
        self._subnet_router = pool.network_address.packed
        self._dns6 = addressing.dns6.packed
        self._answer_dns6 = answer_dns6
        self.stats = NdProxyStats()
        self.latency = LatencyRecorder()
        self.answer_latency = LatencyRecorder()
        self._log_throttle = LogThrottle()
        # The NA's fixed bytes: type 136, code 0, checksum 0, flags R=0 S=1 O=1 (§4.4) ...
        self._na_head = bytes((Icmpv6Type.NEIGHBOR_ADVERTISEMENT, 0, 0, 0, 0x60, 0, 0, 0))
        # ... and the Target Link-Layer Address option (§4.6.1) after the target.
        self._na_tail = bytes((NdOptionType.TARGET_LINK_LAYER_ADDRESS, 1)) + self.mac
        # Ethernet source + type and the IPv6 header up to the addresses (RFC 8200 §3).
        self._na_l2l3 = self.mac + _ETHERTYPE_IPV6 + bytes.fromhex("6000000000203aff")
        self._generation = -1
        self._vip6_by_mac: dict[bytes, bytes] = {}
        self._gn_vip6s: frozenset[bytes] = frozenset()

    def handle(self, frame: bytes, now: float) -> list[bytes]:
        """One received Ethernet frame -> the frames to send (``[]`` or one NA).  Never raises.

        ``now`` (any clock, seconds) only rate-limits debug logging: the proxy keeps no timers.
        """
        # Fast exit for the link's other traffic: untagged IPv6, next header ICMPv6, type 135.
        if (
            len(frame) <= _TYPE_OFF
            or frame[_TYPE_OFF] != _NS_TYPE
            or frame[20] != IPPROTO_ICMPV6
            or frame[12:14] != _ETHERTYPE_IPV6
        ):
            self.stats.ignored += 1
            return []
        start = time.perf_counter_ns()
        try:
            out = self._solicitation(frame, now)
        except Exception:  # a bug, not bad input: keep the event loop alive, but say so
            log.exception("ND proxy failed on a %d-byte frame", len(frame))
            self.stats.internal_error += 1
            out = []
        elapsed = time.perf_counter_ns() - start
        self.latency.record(elapsed)
        if out:
            self.answer_latency.record(elapsed)
        return out

    def _refuse(self, reason: str, eth_src: bytes, why: str, now: float) -> list[bytes]:
        """Count a refusal; log it at debug level, once a minute per source MAC and reason."""
        setattr(self.stats, reason, getattr(self.stats, reason) + 1)
        if log.isEnabledFor(logging.DEBUG) and self._log_throttle.allow((eth_src, reason), now):
            more = self._log_throttle.suppressed((eth_src, reason))
            log.debug(
                "NS from %s refused (%s): %s%s",
                mac_str(eth_src),
                reason,
                why,
                f" (and {more} more)" if more else "",
            )
        return []

    def _refresh(self) -> None:
        """Re-read the GN table after :meth:`GnTable.replace` (its ``generation`` changed)."""
        table = self.table
        self._generation = table.generation
        self._vip6_by_mac = {gn.mac_bytes: gn.vip6.packed for gn in table.all()}
        self._gn_vip6s = frozenset(self._vip6_by_mac.values())

    def _solicitation(self, frame: bytes, now: float) -> list[bytes]:
        # Written out flat on purpose: the adapter idles between solicitations, so each one
        # runs with cold CPU caches, where every extra call and object costs microseconds
        # (measured: ~60 µs with the dataclass codecs above, see the unit test's output).
        stats = self.stats
        eth_src = frame[6:12]
        if eth_src == self.mac:
            stats.own_frame += 1
            return []

        # RFC 4861 §7.1.1 validity checks (the fast path in handle() checked the types).
        plen = (frame[18] << 8) | frame[19]
        end = _ICMP_OFF + plen
        if frame[14] >> 4 != 6:
            return self._refuse("malformed", eth_src, "IP version is not 6", now)
        if end > len(frame):
            return self._refuse("malformed", eth_src, "payload length past the frame", now)
        if plen < _NS_MIN_LEN:
            return self._refuse("malformed", eth_src, f"ICMP length {plen} < 24", now)
        if frame[21] != ND_HOP_LIMIT:
            return self._refuse("malformed", eth_src, f"hop limit {frame[21]}, not 255", now)
        if frame[55] != 0:
            return self._refuse("malformed", eth_src, f"ICMP code {frame[55]}", now)
        # RFC 4443 §2.3 over the pseudo-header (RFC 8200 §8.1) + message; see _sum_mod.
        pseudo = frame[22:54] + plen.to_bytes(4, "big") + b"\x00\x00\x00\x3a"
        summed = pseudo + frame[_ICMP_OFF:end] + (b"\x00" if plen & 1 else b"")
        if int.from_bytes(summed, "big") % 0xFFFF:
            return self._refuse("malformed", eth_src, "bad ICMPv6 checksum", now)
        target = frame[62:78]
        if target[0] == 0xFF:
            return self._refuse("malformed", eth_src, "multicast target", now)
        sllao = None
        i = _ICMP_OFF + _NS_MIN_LEN
        while i < end:  # options (§4.6): none of length 0, none past the end
            olen = frame[i + 1] * 8 if i + 1 < end else 0
            if olen == 0 or i + olen > end:
                return self._refuse("malformed", eth_src, "bad option length", now)
            if frame[i] == NdOptionType.SOURCE_LINK_LAYER_ADDRESS and sllao is None:
                if olen != 8:
                    return self._refuse("malformed", eth_src, "SLLAO not 8 octets", now)
                sllao = frame[i + 2 : i + 8]
            i += olen
        ip_src = frame[22:38]
        if ip_src == _UNSPECIFIED:
            if frame[38:54] != solicited_node_address(target):
                why = "unspecified source to a non-solicited-node destination"
                return self._refuse("malformed", eth_src, why, now)
            if sllao is not None:
                why = "unspecified source with a source link-layer option"
                return self._refuse("malformed", eth_src, why, now)
            stats.dad += 1  # a DAD probe (§7.2.2, RFC 4862 §5.4.2): never answered
            return []
        if not frame[0] & 1 and frame[0:6] != self.mac:
            stats.not_for_us += 1
            return []

        # Who asks: a registered GN, from its own VIPv6 or a link-local address.
        if self.table.generation != self._generation:
            self._refresh()
        vip6 = self._vip6_by_mac.get(eth_src)
        if vip6 is None:
            return self._refuse("unknown_mac", eth_src, "not a registered general node", now)
        if ip_src != vip6 and not is_link_local(ip_src):
            why = f"source {ipaddress.IPv6Address(ip_src)} is not its VIPv6"
            return self._refuse("spoofed_source", eth_src, why, now)
        if sllao is not None and sllao != eth_src:
            why = f"source link-layer option {mac_str(sllao)}"
            return self._refuse("spoofed_source", eth_src, why, now)

        # What for: an address in the pool that no GN of this link holds.
        if is_link_local(target):
            stats.link_local_target += 1
            return []
        if target == self._dns6:
            if not self._answer_dns6:
                stats.own_address += 1
                return []
        else:
            if int.from_bytes(target, "big") & self._pool_mask != self._pool_net:
                stats.outside_pool += 1
                return []
            if target == self._subnet_router:
                stats.own_address += 1
                return []
            if target in self._gn_vip6s:
                stats.gn_target += 1
                return []

        # §7.2.4: solicited NA to the solicitation's source, from the target address (as
        # build_icmpv6_frame() would make it, inlined).
        stats.answered += 1
        message = self._na_head + target + self._na_tail
        s = int.from_bytes(target + ip_src + _NA_PSEUDO_TAIL + message, "big") % 0xFFFF
        checksum = (0xFFFF - s if s else 0).to_bytes(2, "big")
        return [eth_src + self._na_l2l3 + target + ip_src + message[:2] + checksum + message[4:]]
