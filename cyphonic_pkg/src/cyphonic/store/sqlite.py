"""The default :class:`~cyphonic.store.base.Store`: SQLite through the standard library.

One connection per store object, WAL journal (readers do not block the writer, so AS
and NMS may run as separate processes on one database file), every write in one
``BEGIN IMMEDIATE`` transaction, a ``schema_version`` table for migrations (schema 1:
tokens, VIP allocations, nodes, common keys, registrations; schema 2: general nodes and
the ``meta`` table holding their generation counter). An older database file is
migrated in place when it is opened, keeping its data.
``SQLiteStore(":memory:")`` is the in-memory fake used by logic tests.

The database holds common keys: the file is created mode 0600 (SQLite gives its
``-wal``/``-shm`` files the same mode).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import sqlite3
from collections.abc import Iterator, Mapping
from ipaddress import (
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    ip_address,
)
from pathlib import Path
from types import TracebackType
from typing import Any

from cyphonic.store.base import (
    U32_MAX,
    CommonKey,
    DuplicateKeyError,
    GeneralNodeConflictError,
    GeneralNodeRecord,
    NodeRecord,
    PoolExhaustedError,
    Registration,
    StoreError,
    TokenRecord,
    is_canonical_mac,
)

__all__ = ["SCHEMA_VERSION", "SQLiteStore"]

logger = logging.getLogger(__name__)

_I64_MAX = (1 << 63) - 1

#: Each entry migrates the schema from version ``index`` to ``index + 1``.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE tokens (
            token_hash BLOB PRIMARY KEY,
            fqdn TEXT NOT NULL,
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            used_at REAL
        )""",
        """CREATE TABLE vip_allocations (
            fqdn TEXT PRIMARY KEY,
            vip4 TEXT NOT NULL UNIQUE,
            vip6 TEXT NOT NULL UNIQUE
        )""",
        """CREATE TABLE nodes (
            node_id INTEGER PRIMARY KEY CHECK (node_id BETWEEN 1 AND 4294967295),
            fqdn TEXT NOT NULL UNIQUE,
            vip4 TEXT NOT NULL UNIQUE,
            vip6 TEXT NOT NULL UNIQUE,
            cert_der BLOB NOT NULL,
            cert_serial TEXT NOT NULL,
            x25519_public BLOB NOT NULL CHECK (length(x25519_public) = 32),
            enrolled_at REAL NOT NULL
        )""",
        """CREATE TABLE common_keys (
            key_id INTEGER PRIMARY KEY CHECK (key_id BETWEEN 1 AND 4294967295),
            node_id INTEGER NOT NULL,
            key BLOB NOT NULL CHECK (length(key) = 32),
            expires_at REAL NOT NULL,
            high_counter INTEGER NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX common_keys_expires_at ON common_keys (expires_at)",
        "CREATE INDEX common_keys_node_id ON common_keys (node_id)",
        """CREATE TABLE registrations (
            node_id INTEGER PRIMARY KEY,
            addresses TEXT NOT NULL,
            port INTEGER NOT NULL CHECK (port BETWEEN 0 AND 65535),
            observed TEXT NOT NULL,
            registered_at REAL NOT NULL,
            last_seen REAL NOT NULL,
            key_id INTEGER NOT NULL DEFAULT 0
        )""",
    ),
    # 1 -> 2: general nodes behind adapters, and their generation counter
    (
        """CREATE TABLE general_nodes (
            mac TEXT PRIMARY KEY CHECK (length(mac) = 17 AND mac = lower(mac)),
            fqdn TEXT NOT NULL UNIQUE,
            vip4 TEXT NOT NULL UNIQUE,
            vip6 TEXT NOT NULL UNIQUE,
            adapter_fqdn TEXT NOT NULL,
            created_at REAL NOT NULL
        )""",
        "CREATE INDEX general_nodes_adapter_fqdn ON general_nodes (adapter_fqdn)",
        """CREATE TABLE meta (
            key TEXT PRIMARY KEY,
            value INTEGER NOT NULL
        )""",
        "INSERT INTO meta (key, value) VALUES ('general_nodes_generation', 0)",
    ),
)

#: The schema version this code writes.
SCHEMA_VERSION = len(_MIGRATIONS)

_GENERATION_KEY = "general_nodes_generation"


def _check_u32(value: int, what: str) -> None:
    if not 1 <= value <= U32_MAX:
        raise StoreError(f"{what} {value} is not a non-zero 32-bit unsigned integer")


def _first_free(pool: IPv4Network | IPv6Network, taken: set[int], family: str) -> int:
    """First host address of ``pool`` not in ``taken``, skipping the network address,
    the first host (gateway) and the last address."""
    first = int(pool.network_address) + 2
    last = int(pool.broadcast_address) - 1
    candidate = first
    while candidate <= last:
        if candidate not in taken:
            return candidate
        candidate += 1
    usable = max(0, last - first + 1)
    raise PoolExhaustedError(
        f"the VIP{family} pool {pool} is exhausted ({usable} assignable addresses, "
        "all allocated); configure a larger pool"
    )


class SQLiteStore:
    """:class:`~cyphonic.store.base.Store` on an SQLite file (or ``":memory:"``)."""

    def __init__(self, path: str | Path, *, busy_timeout: float = 5.0) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            self._create_private(Path(self.path))
        try:
            self._conn = sqlite3.connect(self.path, isolation_level=None, timeout=busy_timeout)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open database {self.path}: {exc}") from None
        try:
            self._conn.execute("PRAGMA foreign_keys = ON")
            if self.path != ":memory:":
                mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    logger.warning("database %s: WAL not available (journal %s)", self.path, mode)
                self._conn.execute("PRAGMA synchronous = NORMAL")
            self._migrate()
        except sqlite3.Error as exc:
            self._conn.close()
            raise StoreError(f"cannot use database {self.path}: {exc}") from None
        except BaseException:
            self._conn.close()
            raise

    # ------------------------------------------------------------------ plumbing

    @staticmethod
    def _create_private(path: Path) -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot open database {path}: {exc.strerror or exc}") from None
        os.close(fd)

    def _migrate(self) -> None:
        with self._write() as db:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT version FROM schema_version").fetchone()
            version = 0 if row is None else int(row[0])
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"database {self.path} has schema version {version}, newer than this "
                    f"software understands ({SCHEMA_VERSION}); upgrade cyphonic"
                )
            for statements in _MIGRATIONS[version:]:
                for sql in statements:
                    db.execute(sql)
            if row is None:
                db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif version != SCHEMA_VERSION:
                db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
                logger.info("database %s migrated to schema %d", self.path, SCHEMA_VERSION)

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction.

        SQLite errors become :class:`StoreError`, except ``IntegrityError`` which the
        caller turns into a specific message.
        """
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(f"database {self.path}: cannot start a transaction: {exc}") from None
        try:
            yield self._conn
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error) and not isinstance(exc, sqlite3.IntegrityError):
                raise StoreError(f"database {self.path}: {exc}") from None
            raise
        try:
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")
            raise StoreError(f"database {self.path}: commit failed: {exc}") from None

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        try:
            return self._conn.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"database {self.path}: {exc}") from None

    def close(self) -> None:
        """Close the connection (idempotent)."""
        self._conn.close()

    def __enter__(self) -> SQLiteStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ tokens

    def put_token(self, token: TokenRecord) -> None:
        """Store a new token (its hash must be new)."""
        try:
            with self._write() as db:
                db.execute(
                    "INSERT INTO tokens (token_hash, fqdn, created_at, expires_at, used_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (
                        token.token_hash,
                        token.fqdn,
                        token.created_at,
                        token.expires_at,
                        token.used_at,
                    ),
                )
        except sqlite3.IntegrityError:
            raise StoreError("a token with this hash already exists") from None

    def get_token(self, token_hash: bytes) -> TokenRecord | None:
        """The token with this hash, or ``None``."""
        rows = self._query(
            "SELECT token_hash, fqdn, created_at, expires_at, used_at FROM tokens"
            " WHERE token_hash = ?",
            (token_hash,),
        )
        if not rows:
            return None
        h, fqdn, created, expires, used = rows[0]
        return TokenRecord(bytes(h), fqdn, created, expires, used)

    def mark_token_used(self, token_hash: bytes, now: float) -> bool:
        """Atomically set ``used_at``; ``True`` only for the first caller."""
        with self._write() as db:
            cur = db.execute(
                "UPDATE tokens SET used_at = ? WHERE token_hash = ? AND used_at IS NULL",
                (now, token_hash),
            )
            return cur.rowcount == 1

    # ------------------------------------------------------------------ nodes

    def allocate_vips(
        self, fqdn: str, pool4: IPv4Network, pool6: IPv6Network
    ) -> tuple[IPv4Address, IPv6Address]:
        """The stable VIPs of ``fqdn`` (see :meth:`Store.allocate_vips`)."""
        with self._write() as db:
            row = db.execute(
                "SELECT vip4, vip6 FROM vip_allocations WHERE fqdn = ?", (fqdn,)
            ).fetchone()
            old4 = IPv4Address(row[0]) if row else None
            old6 = IPv6Address(row[1]) if row else None
            vip4 = old4 if old4 is not None and old4 in pool4 else None
            vip6 = old6 if old6 is not None and old6 in pool6 else None
            if vip4 is not None and vip6 is not None:
                return vip4, vip6
            taken4: set[int] = set()
            taken6: set[int] = set()
            for a4, a6 in db.execute("SELECT vip4, vip6 FROM vip_allocations"):
                taken4.add(int(IPv4Address(a4)))
                taken6.add(int(IPv6Address(a6)))
            # addresses held by nodes from older pools (and by general nodes) are taken too
            for a4, a6 in db.execute(
                "SELECT vip4, vip6 FROM nodes UNION ALL SELECT vip4, vip6 FROM general_nodes"
            ):
                taken4.add(int(IPv4Address(a4)))
                taken6.add(int(IPv6Address(a6)))
            if vip4 is None:
                vip4 = IPv4Address(_first_free(pool4, taken4, "v4"))
            if vip6 is None:
                vip6 = IPv6Address(_first_free(pool6, taken6, "v6"))
            db.execute(
                "INSERT INTO vip_allocations (fqdn, vip4, vip6) VALUES (?, ?, ?)"
                " ON CONFLICT (fqdn) DO UPDATE SET vip4 = excluded.vip4, vip6 = excluded.vip6",
                (fqdn, str(vip4), str(vip6)),
            )
            if row is not None:
                logger.info("VIPs of %s moved to the configured pools: %s %s", fqdn, vip4, vip6)
            return vip4, vip6

    _NODE_COLUMNS = "node_id, fqdn, vip4, vip6, cert_der, cert_serial, x25519_public, enrolled_at"

    @staticmethod
    def _node(row: tuple[Any, ...]) -> NodeRecord:
        node_id, fqdn, vip4, vip6, cert_der, serial, x25519_public, enrolled_at = row
        return NodeRecord(
            node_id=int(node_id),
            fqdn=fqdn,
            vip4=IPv4Address(vip4),
            vip6=IPv6Address(vip6),
            cert_der=bytes(cert_der),
            cert_serial=int(serial),
            x25519_public=bytes(x25519_public),
            enrolled_at=float(enrolled_at),
        )

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
        """Create or update the node for ``fqdn``, keeping its ``node_id``."""
        if len(x25519_public) != 32:
            raise StoreError("x25519_public must be 32 bytes")
        try:
            with self._write() as db:
                row = db.execute("SELECT node_id FROM nodes WHERE fqdn = ?", (fqdn,)).fetchone()
                args = (
                    str(vip4),
                    str(vip6),
                    cert_der,
                    str(cert_serial),
                    x25519_public,
                    enrolled_at,
                )
                if row is not None:
                    node_id = int(row[0])
                    db.execute(
                        "UPDATE nodes SET vip4 = ?, vip6 = ?, cert_der = ?, cert_serial = ?,"
                        " x25519_public = ?, enrolled_at = ? WHERE node_id = ?",
                        (*args, node_id),
                    )
                else:
                    while True:
                        node_id = secrets.randbelow(U32_MAX) + 1
                        if (
                            db.execute(
                                "SELECT 1 FROM nodes WHERE node_id = ?", (node_id,)
                            ).fetchone()
                            is None
                        ):
                            break
                    db.execute(
                        f"INSERT INTO nodes ({self._NODE_COLUMNS})"  # noqa: S608 - constant
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (node_id, fqdn, *args),
                    )
        except sqlite3.IntegrityError as exc:
            raise StoreError(f"cannot store node {fqdn}: {exc}") from None
        return NodeRecord(
            node_id=node_id,
            fqdn=fqdn,
            vip4=vip4,
            vip6=vip6,
            cert_der=cert_der,
            cert_serial=cert_serial,
            x25519_public=x25519_public,
            enrolled_at=enrolled_at,
        )

    def get_node(self, node_id: int) -> NodeRecord | None:
        """The node with this id, or ``None``."""
        rows = self._query(
            f"SELECT {self._NODE_COLUMNS} FROM nodes WHERE node_id = ?",  # noqa: S608
            (node_id,),
        )
        return self._node(rows[0]) if rows else None

    def get_node_by_fqdn(self, fqdn: str) -> NodeRecord | None:
        """The node with this FQDN, or ``None``."""
        rows = self._query(
            f"SELECT {self._NODE_COLUMNS} FROM nodes WHERE fqdn = ?",  # noqa: S608
            (fqdn,),
        )
        return self._node(rows[0]) if rows else None

    def get_node_by_vip(self, vip: str) -> NodeRecord | None:
        """The node holding this VIPv4 or VIPv6 (canonical text form), or ``None``."""
        rows = self._query(
            f"SELECT {self._NODE_COLUMNS} FROM nodes WHERE vip4 = ? OR vip6 = ?",  # noqa: S608
            (vip, vip),
        )
        return self._node(rows[0]) if rows else None

    def list_nodes(self) -> list[NodeRecord]:
        """All nodes, ordered by FQDN."""
        rows = self._query(f"SELECT {self._NODE_COLUMNS} FROM nodes ORDER BY fqdn")  # noqa: S608
        return [self._node(r) for r in rows]

    # ------------------------------------------------------------------ general nodes

    _GN_COLUMNS = "mac, fqdn, vip4, vip6, adapter_fqdn, created_at"

    @staticmethod
    def _general_node(row: tuple[Any, ...]) -> GeneralNodeRecord:
        mac, fqdn, vip4, vip6, adapter_fqdn, created_at = row
        return GeneralNodeRecord(
            mac=mac,
            fqdn=fqdn,
            vip4=IPv4Address(vip4),
            vip6=IPv6Address(vip6),
            adapter_fqdn=adapter_fqdn,
            created_at=float(created_at),
        )

    @staticmethod
    def _holders(db: sqlite3.Connection, vip: str) -> list[str]:
        """Every FQDN holding ``vip`` (canonical text): nodes and general nodes first,
        then allocations."""
        rows = db.execute(
            "SELECT fqdn FROM nodes WHERE vip4 = ?1 OR vip6 = ?1"
            " UNION ALL SELECT fqdn FROM general_nodes WHERE vip4 = ?1 OR vip6 = ?1"
            " UNION ALL SELECT fqdn FROM vip_allocations WHERE vip4 = ?1 OR vip6 = ?1",
            (vip,),
        ).fetchall()
        return [str(r[0]) for r in rows]

    @staticmethod
    def _bump(db: sqlite3.Connection) -> int:
        db.execute("UPDATE meta SET value = value + 1 WHERE key = ?", (_GENERATION_KEY,))
        row = db.execute("SELECT value FROM meta WHERE key = ?", (_GENERATION_KEY,)).fetchone()
        return int(row[0])

    def vip_holder(self, vip: IPv4Address | IPv6Address) -> str | None:
        """The FQDN of the node, general node or allocation holding ``vip``, or ``None``."""
        try:
            holders = self._holders(self._conn, str(vip))
        except sqlite3.Error as exc:
            raise StoreError(f"database {self.path}: {exc}") from None
        return holders[0] if holders else None

    def put_general_node(self, record: GeneralNodeRecord) -> None:
        """Create or update a general node (see :meth:`Store.put_general_node`)."""
        r = record
        if not is_canonical_mac(r.mac):
            raise StoreError(f"general node MAC {r.mac!r} is not of the form aa:bb:cc:dd:ee:ff")
        if not r.fqdn or not r.adapter_fqdn:
            raise StoreError("a general node needs an FQDN and an adapter FQDN")
        if not isinstance(r.vip4, IPv4Address) or not isinstance(r.vip6, IPv6Address):
            raise StoreError("a general node needs an IPv4Address and an IPv6Address")
        if r.fqdn == r.adapter_fqdn:
            raise GeneralNodeConflictError(f"general node {r.fqdn} cannot be its own adapter")
        vip4, vip6 = str(r.vip4), str(r.vip6)

        def conflict(message: str) -> GeneralNodeConflictError:
            return GeneralNodeConflictError(f"cannot store general node {r.fqdn}: {message}")

        try:
            with self._write() as db:
                old = db.execute(
                    "SELECT fqdn, vip4, vip6, adapter_fqdn FROM general_nodes WHERE mac = ?",
                    (r.mac,),
                ).fetchone()
                if old is not None:
                    if old[0] != r.fqdn:
                        raise conflict(f"MAC {r.mac} is already general node {old[0]}")
                    if tuple(old[1:]) == (vip4, vip6, r.adapter_fqdn):
                        return  # identical: nothing changes
                else:
                    row = db.execute(
                        "SELECT mac FROM general_nodes WHERE fqdn = ?", (r.fqdn,)
                    ).fetchone()
                    if row is not None:
                        raise conflict(f"it is already the general node with MAC {row[0]}")
                    if db.execute("SELECT 1 FROM nodes WHERE fqdn = ?", (r.fqdn,)).fetchone():
                        raise conflict("it is the FQDN of an enrolled node")
                row = db.execute(
                    "SELECT 1 FROM general_nodes WHERE adapter_fqdn = ? LIMIT 1", (r.fqdn,)
                ).fetchone()
                if row is not None:
                    raise conflict("it is the adapter of other general nodes")
                row = db.execute(
                    "SELECT mac FROM general_nodes WHERE fqdn = ?", (r.adapter_fqdn,)
                ).fetchone()
                if row is not None:
                    raise conflict(f"its adapter {r.adapter_fqdn} is itself a general node")
                for family, vip in ((4, vip4), (6, vip6)):
                    others = sorted({h for h in self._holders(db, vip) if h != r.fqdn})
                    if others:
                        raise conflict(f"VIPv{family} {vip} is taken by {', '.join(others)}")
                db.execute(
                    f"INSERT INTO general_nodes ({self._GN_COLUMNS})"  # noqa: S608 - constant
                    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (mac) DO UPDATE SET"
                    " vip4 = excluded.vip4, vip6 = excluded.vip6,"
                    " adapter_fqdn = excluded.adapter_fqdn",
                    (r.mac, r.fqdn, vip4, vip6, r.adapter_fqdn, r.created_at),
                )
                db.execute(
                    "INSERT INTO vip_allocations (fqdn, vip4, vip6) VALUES (?, ?, ?)"
                    " ON CONFLICT (fqdn) DO UPDATE SET vip4 = excluded.vip4,"
                    " vip6 = excluded.vip6",
                    (r.fqdn, vip4, vip6),
                )
                # an enrolled general node keeps its node record in step
                db.execute(
                    "UPDATE nodes SET vip4 = ?, vip6 = ? WHERE fqdn = ?", (vip4, vip6, r.fqdn)
                )
                self._bump(db)
        except sqlite3.IntegrityError as exc:
            raise conflict(str(exc)) from None

    def get_general_node(self, mac: str) -> GeneralNodeRecord | None:
        """The general node with this MAC (any case), or ``None``."""
        rows = self._query(
            f"SELECT {self._GN_COLUMNS} FROM general_nodes WHERE mac = ?",  # noqa: S608
            (mac.lower(),),
        )
        return self._general_node(rows[0]) if rows else None

    def get_general_node_by_fqdn(self, fqdn: str) -> GeneralNodeRecord | None:
        """The general node with this FQDN, or ``None``."""
        rows = self._query(
            f"SELECT {self._GN_COLUMNS} FROM general_nodes WHERE fqdn = ?",  # noqa: S608
            (fqdn,),
        )
        return self._general_node(rows[0]) if rows else None

    def list_general_nodes(self, adapter_fqdn: str | None = None) -> list[GeneralNodeRecord]:
        """All general nodes, or those behind ``adapter_fqdn``, ordered by FQDN."""
        if adapter_fqdn is None:
            rows = self._query(
                f"SELECT {self._GN_COLUMNS} FROM general_nodes ORDER BY fqdn"  # noqa: S608
            )
        else:
            rows = self._query(
                f"SELECT {self._GN_COLUMNS} FROM general_nodes"  # noqa: S608
                " WHERE adapter_fqdn = ? ORDER BY fqdn",
                (adapter_fqdn,),
            )
        return [self._general_node(r) for r in rows]

    def delete_general_node(self, mac: str) -> bool:
        """Delete a general node with its node record, registration, common keys and
        VIP reservation; ``True`` if there was one."""
        with self._write() as db:
            row = db.execute(
                "SELECT fqdn FROM general_nodes WHERE mac = ?", (mac.lower(),)
            ).fetchone()
            if row is None:
                return False
            fqdn = row[0]
            db.execute("DELETE FROM general_nodes WHERE mac = ?", (mac.lower(),))
            node = db.execute("SELECT node_id FROM nodes WHERE fqdn = ?", (fqdn,)).fetchone()
            if node is not None:
                for table in ("registrations", "common_keys", "nodes"):
                    db.execute(
                        f"DELETE FROM {table} WHERE node_id = ?",  # noqa: S608 - constant
                        (node[0],),
                    )
            db.execute("DELETE FROM vip_allocations WHERE fqdn = ?", (fqdn,))
            self._bump(db)
            return True

    def general_nodes_generation(self) -> int:
        """The generation counter of the general-node records."""
        rows = self._query("SELECT value FROM meta WHERE key = ?", (_GENERATION_KEY,))
        return int(rows[0][0]) if rows else 0

    def bump_general_nodes_generation(self) -> int:
        """Raise the generation counter; returns the new value."""
        with self._write() as db:
            return self._bump(db)

    # ------------------------------------------------------------------ common keys

    def put_common_key(self, key: CommonKey) -> None:
        """Store a new key; :class:`DuplicateKeyError` if ``key_id`` is taken."""
        _check_u32(key.key_id, "key_id")
        if len(key.key) != 32:
            raise StoreError("a common key must be 32 bytes")
        if not 0 <= key.high_counter <= _I64_MAX:
            raise StoreError(f"high_counter {key.high_counter} out of range")
        try:
            with self._write() as db:
                db.execute(
                    "INSERT INTO common_keys (key_id, node_id, key, expires_at, high_counter)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (key.key_id, key.node_id, key.key, key.expires_at, key.high_counter),
                )
        except sqlite3.IntegrityError:
            raise DuplicateKeyError(f"common key id {key.key_id} already exists") from None

    def get_common_key(self, key_id: int) -> CommonKey | None:
        """The key with this id (even if expired), or ``None``."""
        rows = self._query(
            "SELECT key_id, node_id, key, expires_at, high_counter FROM common_keys"
            " WHERE key_id = ?",
            (key_id,),
        )
        if not rows:
            return None
        kid, node_id, key, expires_at, high = rows[0]
        return CommonKey(int(kid), int(node_id), bytes(key), float(expires_at), int(high))

    def update_key_counters(self, counters: Mapping[int, int]) -> None:
        """Raise each key's ``high_counter`` to at least the given value (one transaction)."""
        items = sorted(counters.items())
        for key_id, counter in items:
            if not 0 <= counter <= _I64_MAX:
                raise StoreError(f"counter {counter} of key {key_id} out of range")
        if not items:
            return
        with self._write() as db:
            db.executemany(
                "UPDATE common_keys SET high_counter = ? WHERE key_id = ? AND high_counter < ?",
                [(c, k, c) for k, c in items],
            )

    def delete_expired_keys(self, now: float) -> int:
        """Delete keys with ``expires_at <= now``; returns how many."""
        with self._write() as db:
            return db.execute("DELETE FROM common_keys WHERE expires_at <= ?", (now,)).rowcount

    # ------------------------------------------------------------------ registrations

    @staticmethod
    def _registration(row: tuple[Any, ...]) -> Registration:
        node_id, addresses, port, observed, registered_at, last_seen, key_id = row
        return Registration(
            node_id=int(node_id),
            addresses=tuple(str(a) for a in json.loads(addresses)),
            port=int(port),
            observed=tuple(str(o) for o in json.loads(observed)),
            registered_at=float(registered_at),
            last_seen=float(last_seen),
            key_id=int(key_id),
        )

    def save_registration(self, registration: Registration) -> None:
        """Create or replace the registration of ``registration.node_id``."""
        r = registration
        for a in r.addresses:
            try:
                ip_address(a)
            except ValueError:
                raise StoreError(f"registration address {a!r} is not an IP address") from None
        try:
            with self._write() as db:
                db.execute(
                    "INSERT INTO registrations"
                    " (node_id, addresses, port, observed, registered_at, last_seen, key_id)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (node_id) DO UPDATE SET addresses = excluded.addresses,"
                    " port = excluded.port, observed = excluded.observed,"
                    " registered_at = excluded.registered_at, last_seen = excluded.last_seen,"
                    " key_id = excluded.key_id",
                    (
                        r.node_id,
                        json.dumps(list(r.addresses)),
                        r.port,
                        json.dumps(list(r.observed)),
                        r.registered_at,
                        r.last_seen,
                        r.key_id,
                    ),
                )
        except sqlite3.IntegrityError as exc:
            raise StoreError(f"cannot store registration of node {r.node_id}: {exc}") from None

    def get_registration(self, node_id: int) -> Registration | None:
        """The registration of ``node_id``, or ``None``."""
        rows = self._query(
            "SELECT node_id, addresses, port, observed, registered_at, last_seen, key_id"
            " FROM registrations WHERE node_id = ?",
            (node_id,),
        )
        return self._registration(rows[0]) if rows else None

    def list_registrations(self) -> list[Registration]:
        """All registrations, ordered by ``node_id``."""
        rows = self._query(
            "SELECT node_id, addresses, port, observed, registered_at, last_seen, key_id"
            " FROM registrations ORDER BY node_id"
        )
        return [self._registration(r) for r in rows]

    def delete_registration(self, node_id: int) -> bool:
        """Delete the registration of ``node_id``; ``True`` if there was one."""
        with self._write() as db:
            return (
                db.execute("DELETE FROM registrations WHERE node_id = ?", (node_id,)).rowcount == 1
            )
