"""The general-node (GN) table and the downlink addressing plan, shared by all adapter services.

Every service on the adapter's downlink (DHCPv4, ARP proxy, Router Advertisements, ND proxy,
DHCPv6, the DNS hook) asks the same two questions -- *who is this frame from?* and *is this
address one the adapter stands in for?* -- and answers them from the two objects defined here:

:class:`GeneralNode`
    One GN as AS describes it (paper slide 15: MAC_GN, VIPv4/v6_GN, FQDN_GN).  The MAC is the
    GN's identity on the link: a GN is recognised by the Ethernet source address of its frames,
    never by anything it claims inside a packet.  Its VIPs are fixed by AS, not allocated here.

:class:`GnTable`
    All GNs of this adapter, looked up by MAC, VIPv4 or VIPv6.  The adapter daemon replaces the
    whole table whenever it refreshes the list from AS (:meth:`GnTable.replace`); services keep
    a reference to the table, not to its entries, so they see the new list at once.

:class:`AdapterAddressing`
    The adapter's side of the downlink: its MAC, the VIP pools, its own addresses in them
    (``router4`` = the IPv4 pool's first host: default router and DNS server of the GNs;
    ``dns6`` = the IPv6 pool's first host; ``router6_ll``: the link-local address RAs come
    from) and the CYPHONIC domain.

Peers' VIPs lie in the same pools as the GNs' own, so a GN believes them on-link and resolves
them with ARP or Neighbor Discovery; :meth:`AdapterAddressing.is_peer_vip4` and
:meth:`~AdapterAddressing.is_peer_vip6` say which addresses the adapter answers for with its own
MAC (every pool address that is no GN's and none of the pool's special addresses).

Conventions: MAC addresses are strings ``"aa:bb:cc:dd:ee:ff"`` (lower case, colons) everywhere;
lookups also take the 6 raw bytes of a frame.  Lookups never raise: garbage finds nothing.
Constructors raise :class:`~cyphonic.errors.ConfigError` for bad data (the table comes from AS
and the addressing from the configuration file).

:class:`LogThrottle` is the small per-key rate limiter the services use so that a misbehaving or
unknown host cannot flood the journal.

This module is imported by every adapter service: keep it small and its interface stable.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Final, TypeVar

from cyphonic.errors import ConfigError

__all__ = [
    "AdapterAddressing",
    "GeneralNode",
    "GnTable",
    "LogThrottle",
    "link_local_from_mac",
    "mac_bytes",
    "mac_str",
    "normalize_mac",
]

_MAC_RE: Final = re.compile(r"[0-9a-f]{2}([:-])[0-9a-f]{2}(\1[0-9a-f]{2}){4}")
_K = TypeVar("_K", bound=Hashable)
_LABEL_RE: Final = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")


# --------------------------------------------------------------------------------------------
# MAC addresses


def normalize_mac(mac: str | bytes) -> str:
    """``mac`` as ``aa:bb:cc:dd:ee:ff``; accepts ``:``/``-`` separators, any case, or 6 bytes.

    Raises :class:`ConfigError` for anything else and for multicast (group bit set) or
    all-zero addresses, which no interface can have as its own (IEEE 802, RFC 7042 §2.1).
    """
    if isinstance(mac, bytes | bytearray):
        if len(mac) != 6:
            raise ConfigError(f"bad MAC address {bytes(mac).hex()!r}: need 6 bytes")
        raw = bytes(mac)
    else:
        text = mac.strip().lower()
        if not _MAC_RE.fullmatch(text):
            raise ConfigError(f"bad MAC address {mac!r}: use aa:bb:cc:dd:ee:ff")
        raw = bytes.fromhex(text.replace(":", "").replace("-", ""))
    if raw[0] & 1:
        raise ConfigError(f"MAC address {mac_str(raw)} is a multicast address")
    if raw == bytes(6):
        raise ConfigError("MAC address 00:00:00:00:00:00 is not an interface address")
    return mac_str(raw)


def mac_str(raw: bytes) -> str:
    """6 bytes as ``aa:bb:cc:dd:ee:ff`` (no validation; for logging and lookups)."""
    return ":".join(f"{b:02x}" for b in raw)


def mac_bytes(mac: str) -> bytes:
    """``aa:bb:cc:dd:ee:ff`` (or ``-`` separated) as 6 bytes; :class:`ConfigError` if malformed."""
    return bytes.fromhex(normalize_mac(mac).replace(":", ""))


def link_local_from_mac(mac: str) -> IPv6Address:
    """The modified EUI-64 link-local address of ``mac`` (RFC 4291 §2.5.1 and appendix A)."""
    raw = mac_bytes(mac)
    iid = bytes((raw[0] ^ 0x02, *raw[1:3], 0xFF, 0xFE, *raw[3:6]))
    return IPv6Address(b"\xfe\x80" + bytes(6) + iid)


def _normalize_fqdn(fqdn: str) -> str:
    name = fqdn.strip().lower().rstrip(".")
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_LABEL_RE.fullmatch(x) for x in labels):
        raise ConfigError(f"bad FQDN {fqdn!r} (RFC 1035 §2.3.1 labels, at most 253 characters)")
    return name


# --------------------------------------------------------------------------------------------
# General nodes


@dataclass(frozen=True, slots=True)
class GeneralNode:
    """One general node: its MAC (identity on the link), FQDN and fixed VIPs, as AS knows it.

    ``mac`` and ``fqdn`` are normalised on construction (lower case; no trailing dot);
    string VIPs are converted.  Bad values raise :class:`ConfigError`.
    """

    mac: str
    fqdn: str
    vip4: IPv4Address
    vip6: IPv6Address

    def __post_init__(self) -> None:
        object.__setattr__(self, "mac", normalize_mac(self.mac))
        object.__setattr__(self, "fqdn", _normalize_fqdn(self.fqdn))
        try:
            vip4 = IPv4Address(self.vip4)
            vip6 = IPv6Address(self.vip6)
        except ValueError as exc:
            raise ConfigError(f"general node {self.mac}: bad VIP: {exc}") from exc
        object.__setattr__(self, "vip4", vip4)
        object.__setattr__(self, "vip6", vip6)

    @property
    def mac_bytes(self) -> bytes:
        """The MAC as the 6 bytes found in frames."""
        return bytes.fromhex(self.mac.replace(":", ""))


class GnTable:
    """All general nodes of this adapter, by MAC, VIPv4 and VIPv6.

    The table is replaced as a whole (:meth:`replace`), never edited in place, so a lookup always
    sees one consistent list.  :attr:`generation` counts replacements (services that cache
    per-GN state can compare it).  Not thread-safe: use it from the event loop.
    """

    __slots__ = ("_by_mac", "_by_vip4", "_by_vip6", "_nodes", "generation")

    def __init__(self, nodes: Iterable[GeneralNode] = ()) -> None:
        self._nodes: tuple[GeneralNode, ...] = ()
        self._by_mac: dict[bytes, GeneralNode] = {}
        self._by_vip4: dict[IPv4Address, GeneralNode] = {}
        self._by_vip6: dict[IPv6Address, GeneralNode] = {}
        self.generation = 0
        self.replace(nodes)

    def replace(self, nodes: Iterable[GeneralNode]) -> None:
        """Make ``nodes`` the table's content.

        Raises :class:`ConfigError` -- and leaves the table unchanged -- if two nodes share a
        MAC, an FQDN, a VIPv4 or a VIPv6.
        """
        new = tuple(sorted(nodes, key=lambda n: n.mac))
        by_mac: dict[bytes, GeneralNode] = {}
        by_vip4: dict[IPv4Address, GeneralNode] = {}
        by_vip6: dict[IPv6Address, GeneralNode] = {}
        by_fqdn: dict[str, GeneralNode] = {}
        for node in new:
            _claim(by_mac, node.mac_bytes, node, "MAC", node.mac)
            _claim(by_vip4, node.vip4, node, "VIPv4", str(node.vip4))
            _claim(by_vip6, node.vip6, node, "VIPv6", str(node.vip6))
            _claim(by_fqdn, node.fqdn, node, "FQDN", node.fqdn)
        self._nodes, self._by_mac, self._by_vip4, self._by_vip6 = new, by_mac, by_vip4, by_vip6
        self.generation += 1

    def by_mac(self, mac: str | bytes) -> GeneralNode | None:
        """The GN with this MAC (string in any accepted form, or the 6 bytes of a frame)."""
        if isinstance(mac, bytes | bytearray):
            return self._by_mac.get(bytes(mac))
        try:
            return self._by_mac.get(mac_bytes(mac))
        except ConfigError:
            return None

    def by_vip4(self, ip: IPv4Address | str | bytes) -> GeneralNode | None:
        """The GN whose VIPv4 is ``ip`` (an address, its text or its 4 packed bytes)."""
        try:
            return self._by_vip4.get(ip if isinstance(ip, IPv4Address) else IPv4Address(ip))
        except ValueError:
            return None

    def by_vip6(self, ip: IPv6Address | str | bytes) -> GeneralNode | None:
        """The GN whose VIPv6 is ``ip`` (an address, its text or its 16 packed bytes)."""
        try:
            return self._by_vip6.get(ip if isinstance(ip, IPv6Address) else IPv6Address(ip))
        except ValueError:
            return None

    def all(self) -> tuple[GeneralNode, ...]:
        """Every GN, sorted by MAC."""
        return self._nodes

    def __len__(self) -> int:
        return len(self._nodes)

    def __repr__(self) -> str:
        return f"GnTable({len(self._nodes)} nodes, generation {self.generation})"


def _claim(index: dict[_K, GeneralNode], key: _K, node: GeneralNode, what: str, text: str) -> None:
    holder = index.get(key)
    if holder is not None:
        raise ConfigError(
            f"general nodes {holder.mac} ({holder.fqdn}) and {node.mac} ({node.fqdn}) "
            f"share the {what} {text}"
        )
    index[key] = node


# --------------------------------------------------------------------------------------------
# The adapter's addressing plan on the downlink


@dataclass(frozen=True, slots=True)
class AdapterAddressing:
    """The adapter's own addresses on the downlink and the VIP pools it serves.

    ``router4`` (conventionally the IPv4 pool's first host, see :meth:`from_pools`) must be
    configured on the downlink interface: it is the GNs' default router, DNS server and the
    DHCPv4 server identifier.  ``dns6`` (the IPv6 pool's first host) is the GNs' IPv6 DNS
    server; ``router6_ll`` is the link-local address the adapter's RAs come from.  ``domain``
    is the CYPHONIC domain (lower case, no trailing dot).  Inconsistent values raise
    :class:`ConfigError`.
    """

    downlink_mac: str
    pool4: IPv4Network
    pool6: IPv6Network
    router4: IPv4Address
    router6_ll: IPv6Address
    dns6: IPv6Address
    domain: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "downlink_mac", normalize_mac(self.downlink_mac))
        try:
            pool4 = IPv4Network(self.pool4)
            pool6 = IPv6Network(self.pool6)
            router4 = IPv4Address(self.router4)
            router6_ll = IPv6Address(self.router6_ll)
            dns6 = IPv6Address(self.dns6)
        except ValueError as exc:
            raise ConfigError(f"adapter addressing: {exc}") from exc
        if pool4.prefixlen > 30:
            raise ConfigError(f"VIPv4 pool {pool4} is too small (at most /30)")
        if router4 not in pool4 or router4 in (pool4.network_address, pool4.broadcast_address):
            raise ConfigError(f"router4 {router4} is not a host address of the pool {pool4}")
        if pool6.prefixlen > 126:
            raise ConfigError(f"VIPv6 pool {pool6} is too small")
        if dns6 not in pool6 or dns6 == pool6.network_address:
            raise ConfigError(f"dns6 {dns6} is not a host address of the pool {pool6}")
        if not router6_ll.is_link_local:
            raise ConfigError(f"router6_ll {router6_ll} is not a link-local address (fe80::/10)")
        object.__setattr__(self, "pool4", pool4)
        object.__setattr__(self, "pool6", pool6)
        object.__setattr__(self, "router4", router4)
        object.__setattr__(self, "router6_ll", router6_ll)
        object.__setattr__(self, "dns6", dns6)
        object.__setattr__(self, "domain", _normalize_fqdn(self.domain))

    @classmethod
    def from_pools(
        cls,
        downlink_mac: str,
        pool4: IPv4Network | str,
        pool6: IPv6Network | str,
        domain: str,
        *,
        router6_ll: IPv6Address | str | None = None,
    ) -> AdapterAddressing:
        """The usual plan: ``router4`` and ``dns6`` are the pools' first hosts, ``router6_ll``
        the EUI-64 link-local address of ``downlink_mac`` unless given."""
        try:
            net4 = IPv4Network(pool4)
            net6 = IPv6Network(pool6)
        except ValueError as exc:
            raise ConfigError(f"adapter addressing: {exc}") from exc
        ll = link_local_from_mac(downlink_mac) if router6_ll is None else IPv6Address(router6_ll)
        return cls(
            downlink_mac=downlink_mac,
            pool4=net4,
            pool6=net6,
            router4=net4.network_address + 1,
            router6_ll=ll,
            dns6=net6.network_address + 1,
            domain=domain,
        )

    @property
    def downlink_mac_bytes(self) -> bytes:
        """The adapter's MAC as the 6 bytes found in frames."""
        return bytes.fromhex(self.downlink_mac.replace(":", ""))

    def is_peer_vip4(self, ip: IPv4Address | str | bytes, table: GnTable) -> bool:
        """True if the adapter answers ARP for ``ip`` on behalf of a peer: ``ip`` is in the pool,
        is neither its network nor its broadcast address, is not ``router4`` and is no GN's
        own VIPv4 (a GN answers for its own address itself)."""
        try:
            addr = ip if isinstance(ip, IPv4Address) else IPv4Address(ip)
        except ValueError:
            return False
        pool = self.pool4
        return (
            addr in pool
            and addr != pool.network_address
            and addr != pool.broadcast_address
            and addr != self.router4
            and table.by_vip4(addr) is None
        )

    def is_peer_vip6(self, ip: IPv6Address | str | bytes, table: GnTable) -> bool:
        """True if the adapter answers Neighbor Solicitations for ``ip`` on behalf of a peer:
        in the pool, not its Subnet-Router anycast address (RFC 4291 §2.6.1), not ``dns6``
        (the adapter's own address) and no GN's own VIPv6."""
        try:
            addr = ip if isinstance(ip, IPv6Address) else IPv6Address(ip)
        except ValueError:
            return False
        return (
            addr in self.pool6
            and addr != self.pool6.network_address
            and addr != self.dns6
            and table.by_vip6(addr) is None
        )


# --------------------------------------------------------------------------------------------
# Log rate limiting


class LogThrottle:
    """Allow one log line per key per ``interval`` seconds (python-zeroconf's ``_mark_seen``).

    ``allow(key, now)`` is true the first time a key is seen and again once ``interval`` has
    passed; the number of suppressed calls since the last allowed one is returned by
    :meth:`suppressed` so the next line can say "(and N more)".  At most ``max_keys`` keys are
    remembered (the oldest is forgotten first), so hostile input cannot grow it without bound.
    """

    __slots__ = ("_seen", "interval", "max_keys")

    def __init__(self, interval: float = 60.0, max_keys: int = 1024) -> None:
        self.interval = interval
        self.max_keys = max_keys
        self._seen: OrderedDict[Hashable, list[float]] = OrderedDict()

    def allow(self, key: Hashable, now: float) -> bool:
        entry = self._seen.get(key)
        if entry is not None and 0.0 <= now - entry[0] < self.interval:
            entry[1] += 1
            return False
        if entry is None and len(self._seen) >= self.max_keys:
            self._seen.popitem(last=False)
        self._seen[key] = [now, 0.0] if entry is None else [now, entry[1]]
        self._seen.move_to_end(key)
        return True

    def suppressed(self, key: Hashable) -> int:
        """Calls refused for ``key`` since it was last allowed; resets the count."""
        entry = self._seen.get(key)
        if entry is None:
            return 0
        count = int(entry[1])
        entry[1] = 0.0
        return count
