"""Administration of general nodes on the cloud host (``cyphonic general-node add|remove|list``).

A *general node* (GN) is an unmodified device behind a CYPHONIC adapter (DESIGN §2 item 7).
It gets a CYPHONIC identity of its own (FQDN, VIPv4, VIPv6; later a certificate and X25519
key made and held by its adapter) and is recognised on the adapter's link by its MAC.

These functions work directly on the cloud's :class:`~cyphonic.store.base.Store`: whoever can
open the cloud's database (mode 0600) is the administrator, no further authentication is
asked. Every function is pure apart from the store; times are passed in (``now``).

Every change of the records raises the store's *generation* counter, which AS returns with
each adapter's list (``gn_list``), so an adapter can tell that its list changed.
"""

from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

from cyphonic.errors import CyphonicError
from cyphonic.pki.ca import FQDNError, validate_domain, validate_fqdn
from cyphonic.store.base import (
    GeneralNodeConflictError,
    GeneralNodeRecord,
    PoolExhaustedError,
    Store,
)

__all__ = [
    "GeneralNodeError",
    "add_general_node",
    "bump_generation",
    "general_node_to_json",
    "generation",
    "list_general_nodes",
    "remove_general_node",
    "validate_mac",
]

_MAC_RE = re.compile(r"[0-9a-f]{2}([:-])[0-9a-f]{2}(\1[0-9a-f]{2}){4}|[0-9a-f]{12}")


class GeneralNodeError(CyphonicError):
    """A general node cannot be added as asked: bad input or a conflict (named)."""


def _parse_mac(mac: str) -> bytes | None:
    if not isinstance(mac, str):
        return None
    text = mac.strip().lower()
    if not _MAC_RE.fullmatch(text):
        return None
    return bytes.fromhex(text.replace(":", "").replace("-", ""))


def validate_mac(mac: str) -> str:
    """``mac`` as ``aa:bb:cc:dd:ee:ff`` (lower case).

    Accepts ``:`` or ``-`` separators or 12 bare hex digits, in any case. Refuses, with
    :class:`GeneralNodeError`, anything else, multicast (group bit set, which includes the
    broadcast address) and all-zero addresses: no interface has those as its own.
    """
    raw = _parse_mac(mac)
    if raw is None:
        raise GeneralNodeError(f"bad MAC address {mac!r}: use the form aa:bb:cc:dd:ee:ff")
    text = ":".join(f"{b:02x}" for b in raw)
    if raw == bytes(6):
        raise GeneralNodeError(f"MAC address {text} is all zero: not an interface address")
    if raw[0] & 1:
        raise GeneralNodeError(
            f"MAC address {text} is a multicast/broadcast address: a general node needs its "
            "own unicast MAC"
        )
    return text


def _name(fqdn: str, domain: str, what: str) -> str:
    try:
        name = validate_fqdn(fqdn, domain)
    except FQDNError as exc:
        raise GeneralNodeError(f"{what}: {exc}") from None
    if name == f"as.{domain}":
        raise GeneralNodeError(f"{what}: {name} is reserved for the AS")
    return name


def _assignable(pool: IPv4Network | IPv6Network, vip: IPv4Address | IPv6Address) -> None:
    """Refuse a VIP outside ``pool`` or on one of the addresses the allocator never hands
    out (network address, first host = gateway, last address)."""
    family = f"VIPv{pool.version}"
    if vip not in pool:
        raise GeneralNodeError(f"{family} {vip} is not in the configured pool {pool}")
    offset = int(vip) - int(pool.network_address)
    if offset < 2 or vip == pool.broadcast_address:
        raise GeneralNodeError(
            f"{family} {vip} cannot be assigned: the network address, the pool's first host "
            f"(the gateway) and its last address are reserved in {pool}"
        )


def _vip4(value: IPv4Address | str | None) -> IPv4Address | None:
    if value is None or isinstance(value, IPv4Address):
        return value
    try:
        return IPv4Address(str(value).strip())
    except ValueError:
        raise GeneralNodeError(f"VIPv4 {value!r} is not an IPv4 address") from None


def _vip6(value: IPv6Address | str | None) -> IPv6Address | None:
    if value is None or isinstance(value, IPv6Address):
        return value
    try:
        return IPv6Address(str(value).strip())
    except ValueError:
        raise GeneralNodeError(f"VIPv6 {value!r} is not an IPv6 address") from None


def add_general_node(
    store: Store,
    domain: str,
    pool4: IPv4Network,
    pool6: IPv6Network,
    *,
    mac: str,
    fqdn: str,
    adapter_fqdn: str,
    vip4: IPv4Address | str | None = None,
    vip6: IPv6Address | str | None = None,
    now: float,
) -> GeneralNodeRecord:
    """Register the general node ``mac`` as ``fqdn`` behind the adapter ``adapter_fqdn``.

    VIPs not given are allocated like a node's (stable per FQDN, the first free address of
    each pool); given VIPs must be assignable addresses of the pools that nobody else holds.
    The adapter need not be enrolled yet.

    Idempotent: the same MAC, FQDN and adapter again (with no VIPs, or the ones it has)
    returns the stored record unchanged. Raises :class:`GeneralNodeError` for bad input and
    for every conflict, naming it: the MAC is another FQDN's or behind another adapter, the
    FQDN is another MAC's, an enrolled node's or an adapter's, the adapter is a general
    node, a VIP is taken, or a pool is exhausted.
    """
    try:
        domain = validate_domain(domain)
    except FQDNError as exc:
        raise GeneralNodeError(str(exc)) from None
    mac = validate_mac(mac)
    fqdn = _name(fqdn, domain, "general node FQDN")
    adapter = _name(adapter_fqdn, domain, "adapter FQDN")
    if fqdn == adapter:
        raise GeneralNodeError(f"general node {fqdn} cannot be its own adapter")
    want4, want6 = _vip4(vip4), _vip6(vip6)

    existing = store.get_general_node(mac)
    if existing is not None:
        if existing.fqdn != fqdn:
            raise GeneralNodeError(
                f"MAC {mac} is already general node {existing.fqdn}; remove it first to "
                f"rename it {fqdn}"
            )
        if existing.adapter_fqdn != adapter:
            raise GeneralNodeError(
                f"general node {fqdn} ({mac}) is already behind adapter "
                f"{existing.adapter_fqdn}, not {adapter}; remove it first to move it"
            )
        for family, want, have in ((4, want4, existing.vip4), (6, want6, existing.vip6)):
            if want is not None and want != have:
                raise GeneralNodeError(
                    f"general node {fqdn} ({mac}) already has VIPv{family} {have}, not "
                    f"{want}; remove it first to change its addresses"
                )
        return existing

    other = store.get_general_node_by_fqdn(fqdn)
    if other is not None:
        raise GeneralNodeError(f"{fqdn} is already the general node with MAC {other.mac}")
    if store.get_node_by_fqdn(fqdn) is not None:
        raise GeneralNodeError(
            f"{fqdn} is an enrolled node: a general node needs an FQDN of its own"
        )
    if store.list_general_nodes(fqdn):
        raise GeneralNodeError(f"{fqdn} is the adapter of other general nodes")
    behind = store.get_general_node_by_fqdn(adapter)
    if behind is not None:
        raise GeneralNodeError(f"the adapter {adapter} is itself a general node (MAC {behind.mac})")
    for pool, want in ((pool4, want4), (pool6, want6)):
        if want is None:
            continue
        _assignable(pool, want)
        holder = store.vip_holder(want)
        if holder is not None and holder != fqdn:
            raise GeneralNodeError(f"VIPv{want.version} {want} is taken by {holder}")

    if want4 is None or want6 is None:
        try:
            got4, got6 = store.allocate_vips(fqdn, pool4, pool6)
        except PoolExhaustedError as exc:
            raise GeneralNodeError(f"cannot give {fqdn} an address: {exc}") from None
        want4 = got4 if want4 is None else want4
        want6 = got6 if want6 is None else want6
    record = GeneralNodeRecord(
        mac=mac,
        fqdn=fqdn,
        vip4=want4,
        vip6=want6,
        adapter_fqdn=adapter,
        created_at=now,
    )
    try:
        store.put_general_node(record)
    except GeneralNodeConflictError as exc:  # a concurrent change since the checks above
        raise GeneralNodeError(str(exc)) from None
    stored = store.get_general_node(mac)
    return stored if stored is not None else record


def remove_general_node(store: Store, mac_or_fqdn: str) -> bool:
    """Remove the general node with this MAC (any accepted form) or FQDN, with its
    enrollment (node record, registration, common keys: it can no longer log in) and its
    VIP reservation. ``True`` if there was one, ``False`` if nothing matched."""
    raw = _parse_mac(mac_or_fqdn)
    if raw is not None:
        return store.delete_general_node(":".join(f"{b:02x}" for b in raw))
    name = mac_or_fqdn.strip().lower().rstrip(".")
    if not name:
        return False
    record = store.get_general_node_by_fqdn(name)
    return record is not None and store.delete_general_node(record.mac)


def list_general_nodes(store: Store, adapter_fqdn: str | None = None) -> list[GeneralNodeRecord]:
    """All general nodes, or those behind ``adapter_fqdn``, ordered by FQDN."""
    if adapter_fqdn is not None:
        adapter_fqdn = adapter_fqdn.strip().lower().rstrip(".")
    return store.list_general_nodes(adapter_fqdn)


def generation(store: Store) -> int:
    """The generation counter of the general-node records (what ``gn_list`` returns)."""
    return store.general_nodes_generation()


def bump_generation(store: Store) -> int:
    """Raise the generation without a change, so every adapter fetches its list again."""
    return store.bump_general_nodes_generation()


def general_node_to_json(record: GeneralNodeRecord) -> dict[str, Any]:
    """A record as JSON-ready dict (for ``cyphonic general-node list --json``)."""
    return {
        "mac": record.mac,
        "fqdn": record.fqdn,
        "vip4": str(record.vip4),
        "vip6": str(record.vip6),
        "adapter_fqdn": record.adapter_fqdn,
        "created_at": record.created_at,
    }
