"""Router Advertisements on the adapter's downlink: how general nodes learn to use DHCPv6.

The adapter configures unmodified general nodes (GNs) with the kernel's own RA handling plus a
stateful DHCPv6 client (GCCE 2022 paper, slides 12-16).  :class:`RaSender` is the pure core
(no sockets, no clock; AF_PACKET I/O lives in :mod:`cyphonic.adapter.packet_io`):

* ``periodic(now)``: the unsolicited multicast RAs to ``ff02::1`` of RFC 4861 §6.2.4 — the first
  :data:`MAX_INITIAL_RTR_ADVERTISEMENTS` at most :data:`MAX_INITIAL_RTR_ADVERT_INTERVAL` apart,
  then one every uniformly random interval in ``[MinRtrAdvInterval, MaxRtrAdvInterval]`` — and
  any solicited multicast RA that has come due.  Call it again at :attr:`RaSender.deadline`.
* ``handle(frame, now)``: Router Solicitations (§6.2.6), validated per §6.1.1.  A solicitation
  from a unicast source is answered at once with a unicast RA to the soliciting host — the
  behaviour RFC 7772 §5.1 asks routers to offer and radvd's default ``AdvRASolicitedUnicast`` —
  limited to one per host per :data:`MIN_DELAY_BETWEEN_RAS` and :data:`UNICAST_BURST` per
  second overall; one over a limit (and one from ``::``) is answered by a multicast RA delayed
  by a random ``[0, MAX_RA_DELAY_TIME]`` and at least :data:`MIN_DELAY_BETWEEN_RAS` after the
  previous multicast RA, which ``periodic`` sends (strict §6.2.6 with
  ``solicited_unicast=False``: every answer is such a delayed multicast).
* ``withdraw()``: the final RA of §6.2.5, with router lifetime 0 and every lifetime 0, so the
  GNs drop the on-link prefix (§6.3.4: a valid lifetime of 0 times the prefix out at once) and the
  DNS information (RFC 8106 §5.1/§5.2); the sender is silent afterwards.

Every RA (RFC 4861 §4.2) is sent from the adapter's link-local ``router6_ll`` and MAC with hop
limit 255 and carries:

* Cur Hop Limit 64, M=1 and O=1 (addresses and other configuration come from stateful DHCPv6,
  §4.2 and RFC 4862 §5.6), default router preference medium (RFC 4191 §2.2), Reachable Time
  and Retrans Timer 0 (unspecified);
* **Router Lifetime 0 by default**: the adapter is not a default router.  A GN needs the VIP
  prefix on-link (all peers' VIPv6s are in it, reached by ND through the proxy of
  :mod:`cyphonic.adapter.nd_proxy`) and nothing else: the adapter does not route the GN to the
  Internet, so a default route via it would only black-hole the GN's other IPv6 traffic (or pull
  it away from a real router on the same link).  RFC 4861 §6.3.4 still has hosts process the
  flags and options of an RA with lifetime 0.  Pass ``router_lifetime`` (between
  MaxRtrAdvInterval and 9000 s, §6.2.1) if a deployment ever routes through the adapter;
* a Prefix Information option (§4.6.2) for the VIPv6 pool with L=1 (on-link, so the GN resolves
  peers with ND) and A=0 (no SLAAC: each GN's address is its registered VIPv6, from DHCPv6);
* RDNSS (RFC 8106 §5.1) = ``dns6`` and DNSSL (RFC 8106 §5.2) = the CYPHONIC domain, lifetime
  3 x MaxRtrAdvInterval by default (the §5.1 SHOULD);
* optionally an MTU option (§4.6.4): the daemon should pass the tunnel MTU, so that GNs never
  send packets the overlay has to drop;
* a Source Link-Layer Address option (§4.6.1) with the adapter's MAC, so that the GN can reach
  ``router6_ll`` without resolving it first.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import random
import struct
from dataclasses import asdict, dataclass
from typing import Final, Self

from cyphonic.adapter.gn import AdapterAddressing, LogThrottle, mac_str
from cyphonic.adapter.nd_proxy import (
    ALL_NODES,
    ALL_NODES_MAC,
    ND_HOP_LIMIT,
    Icmpv6Frame,
    Icmpv6Type,
    NdOptionType,
    build_icmpv6_frame,
    pack_options,
    parse_options,
)
from cyphonic.errors import ConfigError, DecodeError

log = logging.getLogger(__name__)

__all__ = [
    "MAX_FINAL_RTR_ADVERTISEMENTS",
    "MAX_INITIAL_RTR_ADVERTISEMENTS",
    "MAX_INITIAL_RTR_ADVERT_INTERVAL",
    "MAX_RA_DELAY_TIME",
    "MIN_DELAY_BETWEEN_RAS",
    "UNICAST_BURST",
    "AdvCurHopLimit",
    "PrefixInformation",
    "RaSender",
    "RaStats",
    "RouterAdvertisement",
    "RouterSolicitation",
    "decode_domain_names",
    "encode_domain_names",
]

# RFC 4861 §10, router constants.
MAX_INITIAL_RTR_ADVERT_INTERVAL: Final = 16.0
MAX_INITIAL_RTR_ADVERTISEMENTS: Final = 3
MAX_FINAL_RTR_ADVERTISEMENTS: Final = 3
MIN_DELAY_BETWEEN_RAS: Final = 3.0
MAX_RA_DELAY_TIME: Final = 0.5

AdvCurHopLimit: Final = 64
"""RFC 4861 §6.2.1 default: the value of the IANA "Assigned Numbers" (RFC 1700 / IANA IP
parameters) default TTL, 64."""

UNICAST_BURST: Final = 20
"""Solicited unicast RAs per second over all hosts (beyond that: a delayed multicast RA)."""

_RS_TYPE: Final = 133  # Icmpv6Type.ROUTER_SOLICITATION as a plain int (faster to compare)
_RS_MIN_LEN: Final = 8  # §6.1.1
_RA_MIN_LEN: Final = 16  # §6.1.2
_UNSPECIFIED: Final = bytes(16)
_TRACKED_SOLICITORS: Final = 1024  # bound of the per-host rate-limit table


# --------------------------------------------------------------------------------------------
# Codec


def encode_domain_names(names: list[str] | tuple[str, ...]) -> bytes:
    """Domain names as in RFC 8106 §5.2: RFC 1035 §3.1 label sequences, no compression.

    Raises ValueError on an empty label, a label over 63 octets or a name over 255 octets.
    """
    out = bytearray()
    for name in names:
        encoded = bytearray()
        for label in name.rstrip(".").split("."):
            raw = label.encode("ascii")
            if not 0 < len(raw) <= 63:
                raise ValueError(f"bad label {label!r} in domain name {name!r}")
            encoded += bytes((len(raw),)) + raw
        encoded += b"\x00"
        if len(encoded) > 255:
            raise ValueError(f"domain name {name!r} is longer than 255 octets")
        out += encoded
    return bytes(out)


def decode_domain_names(data: bytes) -> tuple[str, ...]:
    """Inverse of :func:`encode_domain_names`; the zero padding after the last name is skipped
    (RFC 8106 §5.2).  Raises :class:`DecodeError`."""
    names: list[str] = []
    i, end = 0, len(data)
    while i < end and data[i] != 0:
        labels: list[str] = []
        while True:
            if i >= end:
                raise DecodeError("DNSSL domain name runs past the end of the option")
            n = data[i]
            i += 1
            if n == 0:
                break
            if n > 63 or i + n > end:
                raise DecodeError("bad label length in DNSSL option")
            try:
                labels.append(data[i : i + n].decode("ascii"))
            except UnicodeDecodeError as exc:
                raise DecodeError("non-ASCII label in DNSSL option") from exc
            i += n
        names.append(".".join(labels))
    if any(data[i:]):
        raise DecodeError("non-zero padding after the DNSSL domain names")
    return tuple(names)


@dataclass(frozen=True, slots=True)
class PrefixInformation:
    """Prefix Information option (RFC 4861 §4.6.2)."""

    prefix: ipaddress.IPv6Network
    on_link: bool
    autonomous: bool
    valid_lifetime: int
    preferred_lifetime: int

    def pack_body(self) -> bytes:
        flags = (0x80 if self.on_link else 0) | (0x40 if self.autonomous else 0)
        return (
            struct.pack(
                "!BBIII",
                self.prefix.prefixlen,
                flags,
                self.valid_lifetime,
                self.preferred_lifetime,
                0,
            )
            + self.prefix.network_address.packed
        )

    @classmethod
    def parse_body(cls, body: bytes) -> Self:
        if len(body) != 30:
            raise DecodeError("Prefix Information option is not 32 octets long")
        plen, flags, valid, preferred, _ = struct.unpack("!BBIII", body[:14])
        if plen > 128:
            raise DecodeError(f"prefix length {plen}")
        try:
            net = ipaddress.IPv6Network((body[14:30], plen))
        except ValueError as exc:  # host bits set
            raise DecodeError(f"bad prefix: {exc}") from exc
        return cls(net, bool(flags & 0x80), bool(flags & 0x40), valid, preferred)


@dataclass(frozen=True, slots=True)
class RouterAdvertisement:
    """Router Advertisement message (RFC 4861 §4.2) with the options the adapter uses."""

    cur_hop_limit: int
    managed: bool
    other: bool
    router_lifetime: int
    reachable_time: int = 0
    retrans_timer: int = 0
    source_lladdr: bytes | None = None
    mtu: int | None = None
    prefixes: tuple[PrefixInformation, ...] = ()
    rdnss_lifetime: int = 0
    rdnss: tuple[ipaddress.IPv6Address, ...] = ()
    dnssl_lifetime: int = 0
    dnssl: tuple[str, ...] = ()

    def pack(self) -> bytes:
        """The message with a zero checksum (see :func:`~.nd_proxy.build_icmpv6_frame`)."""
        flags = (0x80 if self.managed else 0) | (0x40 if self.other else 0)  # Prf 00 = medium
        head = struct.pack(
            "!BBHBBHII",
            Icmpv6Type.ROUTER_ADVERTISEMENT,
            0,
            0,
            self.cur_hop_limit,
            flags,
            self.router_lifetime,
            self.reachable_time,
            self.retrans_timer,
        )
        options: list[tuple[int, bytes]] = []
        if self.source_lladdr is not None:
            options.append((NdOptionType.SOURCE_LINK_LAYER_ADDRESS, self.source_lladdr))
        if self.mtu is not None:
            options.append((NdOptionType.MTU, struct.pack("!HI", 0, self.mtu)))
        options += [(NdOptionType.PREFIX_INFORMATION, p.pack_body()) for p in self.prefixes]
        if self.rdnss:
            body = struct.pack("!HI", 0, self.rdnss_lifetime)
            options.append((NdOptionType.RDNSS, body + b"".join(a.packed for a in self.rdnss)))
        if self.dnssl:
            body = struct.pack("!HI", 0, self.dnssl_lifetime) + encode_domain_names(self.dnssl)
            options.append((NdOptionType.DNSSL, body))
        return head + pack_options(options)

    @classmethod
    def parse(cls, message: bytes) -> Self:
        """Decode (message-level checks of §6.1.2 and RFC 8106 §5); raises DecodeError.

        Unknown options are skipped (§4.6).
        """
        if len(message) < _RA_MIN_LEN:
            raise DecodeError(f"Router Advertisement of {len(message)} bytes (< 16)")
        kind, code, _, hop, flags, lifetime, reachable, retrans = struct.unpack(
            "!BBHBBHII", message[:16]
        )
        if kind != Icmpv6Type.ROUTER_ADVERTISEMENT or code != 0:
            raise DecodeError(f"ICMPv6 {kind}/{code} is not a Router Advertisement")
        lladdr: bytes | None = None
        mtu: int | None = None
        prefixes: list[PrefixInformation] = []
        rdnss: list[ipaddress.IPv6Address] = []
        dnssl: list[str] = []
        rdnss_lifetime = dnssl_lifetime = 0
        for opt, body in parse_options(message[16:]):
            if opt == NdOptionType.SOURCE_LINK_LAYER_ADDRESS:
                if len(body) != 6:
                    raise DecodeError("source link-layer address option is not 8 octets")
                lladdr = body
            elif opt == NdOptionType.MTU:
                if len(body) != 6:
                    raise DecodeError("MTU option is not 8 octets")
                mtu = int.from_bytes(body[2:], "big")
            elif opt == NdOptionType.PREFIX_INFORMATION:
                prefixes.append(PrefixInformation.parse_body(body))
            elif opt == NdOptionType.RDNSS:
                if len(body) < 22 or (len(body) - 6) % 16:  # RFC 8106 §5.1: length >= 3, odd
                    raise DecodeError("bad RDNSS option length")
                rdnss_lifetime = int.from_bytes(body[2:6], "big")
                rdnss += [ipaddress.IPv6Address(body[i : i + 16]) for i in range(6, len(body), 16)]
            elif opt == NdOptionType.DNSSL:
                if len(body) < 14:  # RFC 8106 §5.2: length >= 2
                    raise DecodeError("bad DNSSL option length")
                dnssl_lifetime = int.from_bytes(body[2:6], "big")
                dnssl += decode_domain_names(body[6:])
        return cls(
            hop,
            bool(flags & 0x80),
            bool(flags & 0x40),
            lifetime,
            reachable,
            retrans,
            lladdr,
            mtu,
            tuple(prefixes),
            rdnss_lifetime,
            tuple(rdnss),
            dnssl_lifetime,
            tuple(dnssl),
        )


@dataclass(frozen=True, slots=True)
class RouterSolicitation:
    """Router Solicitation message (RFC 4861 §4.1)."""

    source_lladdr: bytes | None = None

    @classmethod
    def parse(cls, message: bytes) -> Self:
        """Decode and check the message-level rules of §6.1.1.  Raises :class:`DecodeError`."""
        if len(message) < _RS_MIN_LEN:
            raise DecodeError(f"Router Solicitation of {len(message)} bytes (< 8)")
        if message[0] != Icmpv6Type.ROUTER_SOLICITATION:
            raise DecodeError(f"ICMPv6 type {message[0]} is not a Router Solicitation")
        if message[1] != 0:
            raise DecodeError(f"Router Solicitation with ICMP code {message[1]}")
        lladdr = None
        for opt, body in parse_options(message[8:]):
            if opt == NdOptionType.SOURCE_LINK_LAYER_ADDRESS:
                if len(body) != 6:
                    raise DecodeError("source link-layer address option is not 8 octets")
                lladdr = body
        return cls(lladdr)

    def pack(self) -> bytes:
        options = (
            []
            if self.source_lladdr is None
            else [(NdOptionType.SOURCE_LINK_LAYER_ADDRESS, self.source_lladdr)]
        )
        return bytes((Icmpv6Type.ROUTER_SOLICITATION, 0, 0, 0, 0, 0, 0, 0)) + pack_options(options)


# --------------------------------------------------------------------------------------------
# The sender


@dataclass(slots=True)
class RaStats:
    """Counters of :class:`RaSender`."""

    unsolicited: int = 0
    solicited_multicast: int = 0
    solicited_unicast: int = 0
    solicitations: int = 0
    rate_limited: int = 0
    malformed: int = 0
    ignored: int = 0
    own_frame: int = 0
    internal_error: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class RaSender:
    """Unsolicited and solicited Router Advertisements of the downlink (see module docstring).

    ``interval`` is (MinRtrAdvInterval, MaxRtrAdvInterval) in seconds, RFC 4861 §6.2.1:
    ``4 <= max <= 1800`` and ``3 <= min <= 0.75 * max``; the default is the RFC's (max 600,
    min 0.33 * max).  ``router_lifetime`` is 0 (not a default router, see above) or between
    ``max`` and 9000.  Prefix lifetimes default to AdvValidLifetime / AdvPreferredLifetime of
    §6.2.1 (30 and 7 days); ``dns_lifetime`` (RDNSS and DNSSL) to 3 x max (RFC 8106 §5.1).
    ``rng`` makes the random intervals reproducible in tests.  Bad values raise ConfigError.

    Times (``now``, :attr:`deadline`) are seconds on any clock that does not jump, the same for
    :meth:`periodic` and :meth:`handle` (the daemon passes ``time.monotonic()``).
    """

    def __init__(
        self,
        addressing: AdapterAddressing,
        *,
        interval: tuple[float, float] = (0.33 * 600.0, 600.0),
        router_lifetime: int = 0,
        mtu: int | None = None,
        cur_hop_limit: int = AdvCurHopLimit,
        prefix_valid_lifetime: int = 2_592_000,
        prefix_preferred_lifetime: int = 604_800,
        dns_lifetime: int | None = None,
        solicited_unicast: bool = True,
        rng: random.Random | None = None,
    ) -> None:
        min_i, max_i = interval
        if not 4 <= max_i <= 1800:
            raise ConfigError(f"MaxRtrAdvInterval {max_i:g} s outside 4..1800 (RFC 4861 §6.2.1)")
        if not 3 <= min_i <= 0.75 * max_i:
            raise ConfigError(
                f"MinRtrAdvInterval {min_i:g} s outside 3..0.75 * MaxRtrAdvInterval "
                "(RFC 4861 §6.2.1)"
            )
        if router_lifetime != 0 and not max_i <= router_lifetime <= 9000:
            raise ConfigError(
                f"router lifetime {router_lifetime} s: 0 or MaxRtrAdvInterval..9000 "
                "(RFC 4861 §6.2.1)"
            )
        if mtu is not None and not 1280 <= mtu <= 0xFFFFFFFF:
            raise ConfigError(f"MTU {mtu} below the IPv6 minimum of 1280 (RFC 8200 §5)")
        if not 0 <= prefix_preferred_lifetime <= prefix_valid_lifetime <= 0xFFFFFFFF:
            raise ConfigError("prefix lifetimes: need 0 <= preferred <= valid (RFC 4861 §6.2.1)")
        if not 0 <= cur_hop_limit <= 255:
            raise ConfigError(f"hop limit {cur_hop_limit} outside 0..255")
        self.mac = addressing.downlink_mac_bytes
        self.source = addressing.router6_ll.packed  # link-local: AdapterAddressing checks it
        self.min_interval, self.max_interval = float(min_i), float(max_i)
        self.solicited_unicast = solicited_unicast
        self._rng = rng or random.Random()
        dns_life = int(3 * max_i) if dns_lifetime is None else dns_lifetime
        self.advertisement = RouterAdvertisement(
            cur_hop_limit=cur_hop_limit,
            managed=True,
            other=True,
            router_lifetime=router_lifetime,
            source_lladdr=self.mac,
            mtu=mtu,
            prefixes=(
                PrefixInformation(
                    addressing.pool6,
                    on_link=True,
                    autonomous=False,
                    valid_lifetime=prefix_valid_lifetime,
                    preferred_lifetime=prefix_preferred_lifetime,
                ),
            ),
            rdnss_lifetime=dns_life,
            rdnss=(addressing.dns6,),
            dnssl_lifetime=dns_life,
            dnssl=(addressing.domain,) if addressing.domain.strip(".") else (),
        )
        """The RA this sender sends (a dataclass: tests and ``cyphonic status`` read it)."""
        try:
            self._message = self.advertisement.pack()
        except ValueError as exc:  # a domain with a bad label
            raise ConfigError(f"cannot advertise domain {addressing.domain!r}: {exc}") from exc
        self._multicast_frame = build_icmpv6_frame(
            ALL_NODES_MAC, self.mac, self.source, ALL_NODES, self._message
        )
        self.stats = RaStats()
        self._log_throttle = LogThrottle()
        self._next_unsolicited = -math.inf  # the first periodic() call advertises
        self._initial_left = MAX_INITIAL_RTR_ADVERTISEMENTS
        self._last_multicast = -math.inf
        self._pending_multicast = math.inf  # a solicited multicast RA scheduled for then
        self._last_unicast: dict[bytes, float] = {}  # per soliciting address (§6.2.6 spirit)
        self._burst_window = -math.inf
        self._burst_count = 0
        self.withdrawn = False

    @property
    def deadline(self) -> float:
        """When :meth:`periodic` has something to send next (``-inf``: now; ``inf``: never)."""
        if self.withdrawn:
            return math.inf
        return min(self._next_unsolicited, self._pending_multicast)

    def periodic(self, now: float) -> list[bytes]:
        """The multicast RA due at ``now`` (unsolicited §6.2.4 or solicited §6.2.6), if any."""
        if self.withdrawn or now < self.deadline:
            return []
        if now >= self._pending_multicast and now < self._next_unsolicited:
            self.stats.solicited_multicast += 1
        else:
            self.stats.unsolicited += 1
        self._sent_multicast(now)
        return [self._multicast_frame]

    def _sent_multicast(self, now: float) -> None:
        """Reset the timers after a multicast RA (§6.2.4: "whenever a multicast advertisement is
        sent, the timer for the next unsolicited advertisement is reset")."""
        self._last_multicast = now
        self._pending_multicast = math.inf
        interval = self._rng.uniform(self.min_interval, self.max_interval)
        if self._initial_left > 0:
            self._initial_left -= 1
            if self._initial_left > 0:  # the first few are at most 16 s apart
                interval = min(interval, MAX_INITIAL_RTR_ADVERT_INTERVAL)
        self._next_unsolicited = now + interval

    def handle(self, frame: bytes, now: float) -> list[bytes]:
        """One received Ethernet frame -> frames to send now.  Never raises.

        Answers a valid Router Solicitation (RFC 4861 §6.2.6) with a unicast RA at once, or
        schedules a delayed multicast one for :meth:`periodic` (see the module docstring): then
        :attr:`deadline` moves forward and the caller must re-arm its timer.
        """
        if (
            len(frame) <= 54
            or frame[54] != _RS_TYPE
            or frame[20] != 58
            or frame[12:14] != b"\x86\xdd"
            or self.withdrawn
        ):
            self.stats.ignored += 1
            return []
        try:
            return self._solicitation(frame, now)
        except Exception:  # a bug, not bad input: keep the event loop alive, but say so
            log.exception("RA sender failed on a %d-byte frame", len(frame))
            self.stats.internal_error += 1
            return []

    def _solicitation(self, frame: bytes, now: float) -> list[bytes]:
        if frame[6:12] == self.mac:  # our own transmissions, seen by AF_PACKET
            self.stats.own_frame += 1
            return []
        try:
            pkt = Icmpv6Frame.parse(frame)
            if pkt is None:
                self.stats.ignored += 1
                return []
            # RFC 4861 §6.1.1 validity checks.
            if pkt.hop_limit != ND_HOP_LIMIT:
                raise DecodeError(f"hop limit {pkt.hop_limit}, not 255")
            if not pkt.checksum_ok():
                raise DecodeError("bad ICMPv6 checksum")
            rs = RouterSolicitation.parse(pkt.message)
            if pkt.ip_src == _UNSPECIFIED and rs.source_lladdr is not None:
                raise DecodeError("unspecified source with a source link-layer option")
        except DecodeError as exc:
            self.stats.malformed += 1
            if log.isEnabledFor(logging.DEBUG) and self._log_throttle.allow(frame[6:12], now):
                log.debug("malformed RS from %s: %s", mac_str(frame[6:12]), exc)
            return []
        if not pkt.eth_dst[0] & 1 and pkt.eth_dst != self.mac:
            self.stats.ignored += 1  # unicast to another host, flooded by a bridge
            return []
        self.stats.solicitations += 1
        if self.solicited_unicast and pkt.ip_src != _UNSPECIFIED and pkt.ip_src[0] != 0xFF:
            if self._unicast_allowed(pkt.ip_src, now):
                self.stats.solicited_unicast += 1
                eth_dst = rs.source_lladdr or pkt.eth_src
                return [
                    build_icmpv6_frame(eth_dst, self.mac, self.source, pkt.ip_src, self._message)
                ]
            self.stats.rate_limited += 1
        self._schedule_multicast(now)
        return []

    def _unicast_allowed(self, source: bytes, now: float) -> bool:
        """One unicast answer per soliciting address per MIN_DELAY_BETWEEN_RAS, and at most
        UNICAST_BURST per second overall (a host rotating source addresses cannot make the
        adapter flood the link)."""
        last = self._last_unicast.get(source)
        if last is not None and now - last < MIN_DELAY_BETWEEN_RAS:
            return False
        if now - self._burst_window >= 1.0:
            self._burst_window, self._burst_count = now, 0
        if self._burst_count >= UNICAST_BURST:
            return False
        self._burst_count += 1
        if len(self._last_unicast) >= _TRACKED_SOLICITORS:
            self._last_unicast = {
                a: t for a, t in self._last_unicast.items() if now - t < MIN_DELAY_BETWEEN_RAS
            }
        self._last_unicast[source] = now
        return True

    def _schedule_multicast(self, now: float) -> None:
        """§6.2.6: a random delay in [0, MAX_RA_DELAY_TIME], and no sooner than
        MIN_DELAY_BETWEEN_RAS after the previous multicast RA; several solicitations share one
        answer, and an unsolicited RA due earlier makes it unnecessary."""
        delay = self._rng.uniform(0.0, MAX_RA_DELAY_TIME)
        at = now + delay
        if now - self._last_multicast < MIN_DELAY_BETWEEN_RAS:
            at = self._last_multicast + MIN_DELAY_BETWEEN_RAS + delay
        if at < self._next_unsolicited and at < self._pending_multicast:
            self._pending_multicast = at

    def withdraw(self) -> list[bytes]:
        """The final multicast RA of §6.2.5 (router lifetime 0, prefix valid and preferred
        lifetimes 0, RDNSS/DNSSL lifetimes 0); afterwards the sender stays silent.

        §6.2.5 allows up to :data:`MAX_FINAL_RTR_ADVERTISEMENTS` final RAs: the caller may send
        the returned frame again (a second time some 100 ms later covers a lost frame).
        """
        ra = self.advertisement
        final = RouterAdvertisement(
            cur_hop_limit=ra.cur_hop_limit,
            managed=ra.managed,
            other=ra.other,
            router_lifetime=0,
            source_lladdr=ra.source_lladdr,
            mtu=ra.mtu,
            prefixes=tuple(
                PrefixInformation(p.prefix, p.on_link, p.autonomous, 0, 0) for p in ra.prefixes
            ),
            rdnss_lifetime=0,
            rdnss=ra.rdnss,
            dnssl_lifetime=0,
            dnssl=ra.dnssl,
        )
        self.withdrawn = True
        return [build_icmpv6_frame(ALL_NODES_MAC, self.mac, self.source, ALL_NODES, final.pack())]
