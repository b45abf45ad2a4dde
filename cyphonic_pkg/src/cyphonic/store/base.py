"""The cloud's persistent state behind one small interface.

AS and NMS talk to a :class:`Store`; :class:`cyphonic.store.sqlite.SQLiteStore` is the
default implementation (``SQLiteStore(":memory:")`` is the fake for logic tests), and
a PostgreSQL implementation can be added behind the same protocol when several cloud
instances share state. No SQL leaves the implementation.

Times are seconds since the epoch (floats), as passed in by the caller.

General nodes (DESIGN §2 item 7) are devices behind a CYPHONIC adapter: the store keeps
one :class:`GeneralNodeRecord` per MAC, and a *generation* counter that every change of
the general-node records raises, so adapters can tell that their list changed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Protocol

from cyphonic.errors import CyphonicError

__all__ = [
    "U32_MAX",
    "CommonKey",
    "DuplicateKeyError",
    "GeneralNodeConflictError",
    "GeneralNodeRecord",
    "NodeRecord",
    "PoolExhaustedError",
    "Registration",
    "Store",
    "StoreError",
    "TokenRecord",
    "is_canonical_mac",
]

U32_MAX = 0xFFFFFFFF

_CANONICAL_MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


def is_canonical_mac(mac: str) -> bool:
    """Whether ``mac`` is written the way the store keeps MACs: ``aa:bb:cc:dd:ee:ff``
    (lower-case hex, colons). Says nothing about unicast; see :mod:`cyphonic.admin`."""
    return isinstance(mac, str) and _CANONICAL_MAC_RE.fullmatch(mac) is not None


class StoreError(CyphonicError):
    """The store cannot do what was asked (database unusable, constraint violated)."""


class PoolExhaustedError(StoreError):
    """No free virtual address is left in a VIP pool."""


class DuplicateKeyError(StoreError):
    """A common key with this ``key_id`` already exists."""


class GeneralNodeConflictError(StoreError):
    """A general-node record clashes with another general node, a node or a VIP; the
    message names the conflict."""


@dataclass(frozen=True)
class TokenRecord:
    """An enrollment token as stored: only the SHA-256 of the token is kept."""

    token_hash: bytes
    fqdn: str
    created_at: float
    expires_at: float
    used_at: float | None = None


@dataclass(frozen=True)
class NodeRecord:
    """An enrolled node: identity, virtual addresses and current certificate."""

    node_id: int
    fqdn: str
    vip4: IPv4Address
    vip6: IPv6Address
    cert_der: bytes = field(repr=False)
    cert_serial: int
    x25519_public: bytes
    enrolled_at: float


@dataclass(frozen=True)
class CommonKey:
    """A node-NMS common key handed out by the AS at login.

    ``high_counter`` is the replay high-water mark of messages under this key,
    persisted (in batches) by NMS so that a restart does not reopen the window.
    """

    key_id: int
    node_id: int
    key: bytes = field(repr=False)
    expires_at: float
    high_counter: int = 0


@dataclass(frozen=True)
class Registration:
    """A node's network information as registered with NMS.

    ``addresses`` are the node's own real addresses (``"ip"`` strings), ``port`` its
    UDP port; ``observed`` the source endpoints NMS saw, one per address family
    (``"ip:port"`` or ``"[ip6]:port"``), which differ from ``addresses`` behind NAPT.
    ``key_id`` is the common key the node last signaled with (NMS answers and sends
    Route Directions under it); 0 if unknown.
    """

    node_id: int
    addresses: tuple[str, ...]
    port: int
    observed: tuple[str, ...]
    registered_at: float
    last_seen: float
    key_id: int = 0


@dataclass(frozen=True)
class GeneralNodeRecord:
    """A general node: an unmodified device behind the adapter ``adapter_fqdn``.

    ``mac`` is its identity on the adapter's link, canonical ``aa:bb:cc:dd:ee:ff``;
    ``fqdn``, ``vip4`` and ``vip6`` its CYPHONIC identity. Once its adapter has enrolled
    it, a :class:`NodeRecord` with the same FQDN and VIPs exists too.
    """

    mac: str
    fqdn: str
    vip4: IPv4Address
    vip6: IPv6Address
    adapter_fqdn: str
    created_at: float


class Store(Protocol):
    """Persistent state of the cloud (AS and NMS). Every write is one transaction."""

    # -- enrollment tokens --------------------------------------------------
    def put_token(self, token: TokenRecord) -> None:
        """Store a new token (its hash must be new)."""

    def get_token(self, token_hash: bytes) -> TokenRecord | None:
        """The token with this hash, or ``None``."""

    def mark_token_used(self, token_hash: bytes, now: float) -> bool:
        """Atomically set ``used_at`` if the token exists and is unused.

        Returns ``True`` for exactly one caller per token; ``False`` otherwise.
        """

    # -- nodes and virtual addresses ----------------------------------------
    def allocate_vips(
        self, fqdn: str, pool4: IPv4Network, pool6: IPv6Network
    ) -> tuple[IPv4Address, IPv6Address]:
        """The VIPs of ``fqdn``: allocated once, then the same answer forever.

        A new allocation takes the first free host of each pool in order, skipping
        the network address, the pool's first host (reserved for gateways) and the
        last (broadcast) address. An address kept for ``fqdn`` that is no longer in
        the configured pool is replaced. Raises :class:`PoolExhaustedError`.
        """

    def upsert_node(
        self,
        *,
        fqdn: str,
        vip4: IPv4Address,
        vip6: IPv6Address,
        cert_der: bytes,
        cert_serial: int,
        x25519_public: bytes,
        enrolled_at: float,
    ) -> NodeRecord:
        """Create the node for ``fqdn`` (random non-zero u32 ``node_id``) or update it
        in place on re-enrollment, keeping its ``node_id``."""

    def get_node(self, node_id: int) -> NodeRecord | None:
        """The node with this id, or ``None``."""

    def get_node_by_fqdn(self, fqdn: str) -> NodeRecord | None:
        """The node with this FQDN, or ``None``."""

    def get_node_by_vip(self, vip: str) -> NodeRecord | None:
        """The node holding this VIPv4 or VIPv6, or ``None``."""
        ...

    def list_nodes(self) -> list[NodeRecord]:
        """All nodes, ordered by FQDN."""

    # -- node-NMS common keys -----------------------------------------------
    def put_common_key(self, key: CommonKey) -> None:
        """Store a new key; :class:`DuplicateKeyError` if ``key_id`` is taken."""

    def get_common_key(self, key_id: int) -> CommonKey | None:
        """The key with this id (even if expired), or ``None``."""

    def update_key_counters(self, counters: Mapping[int, int]) -> None:
        """Raise the ``high_counter`` of each ``key_id`` to at least the given value
        (never lowers it; unknown ids are ignored), all in one transaction."""

    def delete_expired_keys(self, now: float) -> int:
        """Delete keys with ``expires_at <= now``; returns how many."""

    # -- registrations --------------------------------------------------------
    def save_registration(self, registration: Registration) -> None:
        """Create or replace the registration of ``registration.node_id``."""

    def get_registration(self, node_id: int) -> Registration | None:
        """The registration of ``node_id``, or ``None``."""

    def list_registrations(self) -> list[Registration]:
        """All registrations, ordered by ``node_id``."""

    def delete_registration(self, node_id: int) -> bool:
        """Delete the registration of ``node_id``; ``True`` if there was one."""

    # -- general nodes ------------------------------------------------------------
    def vip_holder(self, vip: IPv4Address | IPv6Address) -> str | None:
        """The FQDN holding ``vip``: a node, a general node or an allocation made by
        :meth:`allocate_vips`; ``None`` if the address is free."""
        ...

    def put_general_node(self, record: GeneralNodeRecord) -> None:
        """Create ``record``, or update the general node with the same MAC (which must
        have the same FQDN), in one transaction that also reserves its VIPs for its FQDN
        (see :meth:`allocate_vips`) and, if it was enrolled, moves its node's VIPs.

        Raises :class:`GeneralNodeConflictError` if the MAC is another FQDN's, the FQDN
        another MAC's or an enrolled node's or an adapter's, the adapter is a general
        node, or a VIP is held by anyone else. Storing an identical record (``created_at``
        aside) changes nothing; any other change raises the generation.
        """

    def get_general_node(self, mac: str) -> GeneralNodeRecord | None:
        """The general node with this MAC (any case), or ``None``."""
        ...

    def get_general_node_by_fqdn(self, fqdn: str) -> GeneralNodeRecord | None:
        """The general node with this FQDN, or ``None``."""
        ...

    def list_general_nodes(self, adapter_fqdn: str | None = None) -> list[GeneralNodeRecord]:
        """All general nodes, or those behind ``adapter_fqdn``, ordered by FQDN."""
        ...

    def delete_general_node(self, mac: str) -> bool:
        """Delete the general node with this MAC and everything it held (its node record,
        registration, common keys and VIP reservation), raising the generation.
        ``True`` if there was one."""
        ...

    def general_nodes_generation(self) -> int:
        """A counter raised by every change of the general-node records (starts at 0)."""
        ...

    def bump_general_nodes_generation(self) -> int:
        """Raise the generation without a change (adapters then fetch their list again);
        returns the new value."""
        ...

    # -- lifecycle ---------------------------------------------------------------
    def close(self) -> None:
        """Release the database connection."""
