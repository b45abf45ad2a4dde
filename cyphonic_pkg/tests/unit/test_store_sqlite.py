"""Tests of cyphonic.store.sqlite (and the Store protocol it implements)."""

from __future__ import annotations

import sqlite3
import stat
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cyphonic.store.base import (
    CommonKey,
    DuplicateKeyError,
    GeneralNodeConflictError,
    GeneralNodeRecord,
    PoolExhaustedError,
    Registration,
    Store,
    StoreError,
    TokenRecord,
    is_canonical_mac,
)
from cyphonic.store.sqlite import _MIGRATIONS, SCHEMA_VERSION, SQLiteStore

POOL4 = IPv4Network("10.77.0.0/24")
POOL6 = IPv6Network("fd00:77::/64")
NOW = 1_800_000_000.0


@pytest.fixture
def store() -> SQLiteStore:
    return SQLiteStore(":memory:")


def add_node(store: Store, fqdn: str, serial: int = 1) -> int:
    vip4, vip6 = store.allocate_vips(fqdn, POOL4, POOL6)
    return store.upsert_node(
        fqdn=fqdn,
        vip4=vip4,
        vip6=vip6,
        cert_der=b"cert-" + fqdn.encode(),
        cert_serial=serial,
        x25519_public=bytes(32),
        enrolled_at=NOW,
    ).node_id


def test_is_a_store() -> None:
    s: Store = SQLiteStore(":memory:")
    s.close()


# ----------------------------------------------------------------- file, schema


def test_file_is_private_and_uses_wal(tmp_path: Path) -> None:
    path = tmp_path / "cloud.sqlite"
    with SQLiteStore(path) as s:
        s.put_token(TokenRecord(b"h" * 32, "n.cy.example", NOW, NOW + 1))
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        wal = path.with_name(path.name + "-wal")
        assert wal.exists() and stat.S_IMODE(wal.stat().st_mode) == 0o600
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    conn.close()


def test_reopen_keeps_data_and_schema(tmp_path: Path) -> None:
    path = tmp_path / "cloud.sqlite"
    with SQLiteStore(path) as s:
        node_id = add_node(s, "n1.cy.example")
    with SQLiteStore(path) as s:
        node = s.get_node(node_id)
        assert node is not None and node.fqdn == "n1.cy.example"


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cloud.sqlite"
    SQLiteStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE schema_version SET version = 999")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match=r"schema version 999, newer"):
        SQLiteStore(path)


def test_unopenable_path(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="cannot open database"):
        SQLiteStore(tmp_path / "missing-dir" / "db.sqlite")
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match=r"garbage\.sqlite"):
        SQLiteStore(garbage)


# ----------------------------------------------------------------- tokens


def test_tokens(store: SQLiteStore) -> None:
    rec = TokenRecord(b"\x01" * 32, "n.cy.example", NOW, NOW + 60)
    store.put_token(rec)
    assert store.get_token(rec.token_hash) == rec
    assert store.get_token(b"\x02" * 32) is None
    with pytest.raises(StoreError, match="already exists"):
        store.put_token(rec)
    assert store.mark_token_used(rec.token_hash, NOW + 1)
    assert not store.mark_token_used(rec.token_hash, NOW + 2)
    assert not store.mark_token_used(b"\x02" * 32, NOW + 2)
    got = store.get_token(rec.token_hash)
    assert got is not None and got.used_at == NOW + 1


# ----------------------------------------------------------------- VIP allocation


def test_first_vips_skip_network_gateway(store: SQLiteStore) -> None:
    assert store.allocate_vips("a.cy.example", POOL4, POOL6) == (
        IPv4Address("10.77.0.2"),
        IPv6Address("fd00:77::2"),
    )
    assert store.allocate_vips("b.cy.example", POOL4, POOL6) == (
        IPv4Address("10.77.0.3"),
        IPv6Address("fd00:77::3"),
    )
    # stable: same answer again, in any order
    assert store.allocate_vips("a.cy.example", POOL4, POOL6)[0] == IPv4Address("10.77.0.2")
    assert store.allocate_vips("c.cy.example", POOL4, POOL6)[0] == IPv4Address("10.77.0.4")


def test_vips_stable_across_restart(tmp_path: Path) -> None:
    path = tmp_path / "cloud.sqlite"
    with SQLiteStore(path) as s:
        first = {
            f"n{i}.cy.example": s.allocate_vips(f"n{i}.cy.example", POOL4, POOL6) for i in range(5)
        }
    with SQLiteStore(path) as s:
        for fqdn in reversed(list(first)):
            assert s.allocate_vips(fqdn, POOL4, POOL6) == first[fqdn]
        assert s.allocate_vips("new.cy.example", POOL4, POOL6)[0] == IPv4Address("10.77.0.7")


def test_pool_exhaustion_is_clear(store: SQLiteStore) -> None:
    small4 = IPv4Network("10.9.0.0/29")  # .0 network, .1 gateway, .7 broadcast: .2-.6 usable
    got = [store.allocate_vips(f"n{i}.cy.example", small4, POOL6)[0] for i in range(5)]
    assert got == [IPv4Address(f"10.9.0.{i}") for i in range(2, 7)]
    with pytest.raises(PoolExhaustedError, match=r"VIPv4 pool 10\.9\.0\.0/29 is exhausted"):
        store.allocate_vips("n5.cy.example", small4, POOL6)
    # the old ones still answer
    assert store.allocate_vips("n0.cy.example", small4, POOL6)[0] == IPv4Address("10.9.0.2")


def test_tiny_pools_are_exhausted(store: SQLiteStore) -> None:
    with pytest.raises(PoolExhaustedError, match="VIPv4"):
        store.allocate_vips("x.cy.example", IPv4Network("10.9.0.0/31"), POOL6)
    with pytest.raises(PoolExhaustedError, match="VIPv6"):
        store.allocate_vips("x.cy.example", POOL4, IPv6Network("fd00::/127"))
    v4, v6 = store.allocate_vips(
        "x.cy.example", IPv4Network("10.9.0.0/30"), IPv6Network("fd00::/126")
    )
    assert (v4, v6) == (IPv4Address("10.9.0.2"), IPv6Address("fd00::2"))


def test_ipv6_skips_last_address(store: SQLiteStore) -> None:
    pool6 = IPv6Network("fd00::/125")  # ::0 net, ::1 gateway, ::7 last; ::2-::6 usable
    got = [store.allocate_vips(f"n{i}.cy.example", POOL4, pool6)[1] for i in range(5)]
    assert got[-1] == IPv6Address("fd00::6")
    with pytest.raises(PoolExhaustedError):
        store.allocate_vips("n9.cy.example", POOL4, pool6)


def test_pool_change_moves_only_what_left_the_pool(store: SQLiteStore) -> None:
    _, v6 = store.allocate_vips("a.cy.example", POOL4, POOL6)
    new4 = IPv4Network("10.88.0.0/24")
    m4, m6 = store.allocate_vips("a.cy.example", new4, POOL6)
    assert m4 == IPv4Address("10.88.0.2") and m6 == v6
    assert store.allocate_vips("a.cy.example", new4, POOL6) == (m4, m6)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=60))
def test_allocation_is_unique_and_stable(names: list[int]) -> None:
    pool4 = IPv4Network("10.1.0.0/26")
    pool6 = IPv6Network("fd00:1::/120")
    with SQLiteStore(":memory:") as s:
        seen: dict[int, tuple[IPv4Address, IPv6Address]] = {}
        for n in names:
            vips = s.allocate_vips(f"h{n}.cy.example", pool4, pool6)
            if n in seen:
                assert seen[n] == vips
            seen[n] = vips
            assert vips[0] not in (pool4.network_address, pool4.network_address + 1)
            assert vips[0] != pool4.broadcast_address
        assert len({v[0] for v in seen.values()}) == len(seen)
        assert len({v[1] for v in seen.values()}) == len(seen)


# ----------------------------------------------------------------- nodes


def test_nodes_upsert_keeps_node_id(store: SQLiteStore) -> None:
    node_id = add_node(store, "n1.cy.example", serial=1)
    assert 1 <= node_id <= 0xFFFFFFFF
    assert add_node(store, "n1.cy.example", serial=2**158) == node_id  # big serials fit
    node = store.get_node(node_id)
    assert node is not None
    assert node.cert_serial == 2**158
    assert node.vip4 == IPv4Address("10.77.0.2")
    assert store.get_node_by_fqdn("n1.cy.example") == node
    assert store.get_node(node_id % 0xFFFFFFFF + 1) is None
    assert store.get_node_by_fqdn("nx.cy.example") is None
    assert "cert_der" not in repr(node)


def test_list_nodes_sorted(store: SQLiteStore) -> None:
    for name in ("c", "a", "b"):
        add_node(store, f"{name}.cy.example")
    assert [n.fqdn for n in store.list_nodes()] == ["a.cy.example", "b.cy.example", "c.cy.example"]
    assert len({n.node_id for n in store.list_nodes()}) == 3


def test_node_unique_constraints(store: SQLiteStore) -> None:
    add_node(store, "a.cy.example")
    with pytest.raises(StoreError, match="cannot store node"):
        store.upsert_node(
            fqdn="b.cy.example",
            vip4=IPv4Address("10.77.0.2"),  # a's address
            vip6=IPv6Address("fd00:77::99"),
            cert_der=b"x",
            cert_serial=9,
            x25519_public=bytes(32),
            enrolled_at=NOW,
        )
    assert store.get_node_by_fqdn("b.cy.example") is None
    with pytest.raises(StoreError, match="32 bytes"):
        store.upsert_node(
            fqdn="c.cy.example",
            vip4=IPv4Address("10.77.0.9"),
            vip6=IPv6Address("fd00:77::9"),
            cert_der=b"x",
            cert_serial=9,
            x25519_public=b"short",
            enrolled_at=NOW,
        )


# ----------------------------------------------------------------- common keys


def test_common_keys(store: SQLiteStore) -> None:
    key = CommonKey(key_id=7, node_id=1, key=b"k" * 32, expires_at=NOW + 60)
    store.put_common_key(key)
    assert store.get_common_key(7) == key
    assert store.get_common_key(8) is None
    assert "kkkk" not in repr(key)
    with pytest.raises(DuplicateKeyError, match="7 already exists"):
        store.put_common_key(key)
    with pytest.raises(StoreError, match="32 bytes"):
        store.put_common_key(CommonKey(9, 1, b"short", NOW))
    with pytest.raises(StoreError, match="32-bit"):
        store.put_common_key(CommonKey(0, 1, b"k" * 32, NOW))
    with pytest.raises(StoreError, match="32-bit"):
        store.put_common_key(CommonKey(2**32, 1, b"k" * 32, NOW))


def test_update_key_counters_only_raises(store: SQLiteStore) -> None:
    store.put_common_key(CommonKey(1, 1, b"a" * 32, NOW + 60))
    store.put_common_key(CommonKey(2, 1, b"b" * 32, NOW + 60, high_counter=100))
    store.update_key_counters({1: 50, 2: 10, 3: 99})  # 3 is unknown: ignored
    k1, k2 = store.get_common_key(1), store.get_common_key(2)
    assert k1 is not None and k1.high_counter == 50
    assert k2 is not None and k2.high_counter == 100
    store.update_key_counters({})
    store.update_key_counters({1: 2**63 - 1})
    k1 = store.get_common_key(1)
    assert k1 is not None and k1.high_counter == 2**63 - 1
    with pytest.raises(StoreError, match="out of range"):
        store.update_key_counters({1: 2**63})


def test_delete_expired_keys(store: SQLiteStore) -> None:
    store.put_common_key(CommonKey(1, 1, b"a" * 32, NOW))
    store.put_common_key(CommonKey(2, 1, b"b" * 32, NOW + 1))
    assert store.delete_expired_keys(NOW) == 1
    assert store.get_common_key(1) is None
    assert store.get_common_key(2) is not None
    assert store.delete_expired_keys(NOW) == 0


# ----------------------------------------------------------------- registrations


def test_registrations(store: SQLiteStore) -> None:
    reg = Registration(
        node_id=5,
        addresses=("192.0.2.10", "2001:db8::10"),
        port=30000,
        observed=("198.51.100.1:40000", "[2001:db8::10]:30000"),
        registered_at=NOW,
        last_seen=NOW,
    )
    store.save_registration(reg)
    assert store.get_registration(5) == reg
    moved = Registration(5, ("203.0.113.5",), 30000, ("203.0.113.5:30000",), NOW, NOW + 10, 77)
    store.save_registration(moved)
    assert store.get_registration(5) == moved
    assert reg.key_id == 0 and moved.key_id == 77
    store.save_registration(Registration(3, (), 30000, (), NOW, NOW))
    assert [r.node_id for r in store.list_registrations()] == [3, 5]
    assert store.delete_registration(5)
    assert not store.delete_registration(5)
    assert store.get_registration(5) is None


def test_registration_validation(store: SQLiteStore) -> None:
    with pytest.raises(StoreError, match="not an IP address"):
        store.save_registration(Registration(1, ("nonsense",), 1, (), NOW, NOW))
    with pytest.raises(StoreError, match="cannot store registration"):
        store.save_registration(Registration(1, (), 70000, (), NOW, NOW))
    assert store.list_registrations() == []


def test_store_usable_after_failed_write(store: SQLiteStore) -> None:
    rec = TokenRecord(b"\x01" * 32, "n.cy.example", NOW, NOW + 60)
    store.put_token(rec)
    with pytest.raises(StoreError):
        store.put_token(rec)
    add_node(store, "n1.cy.example")
    assert len(store.list_nodes()) == 1


# ----------------------------------------------------------------- migrations


def make_v1_database(path: Path) -> None:
    """A database file as schema version 1 left it, with some data."""
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for sql in _MIGRATIONS[0]:
        conn.execute(sql)
    conn.execute("INSERT INTO schema_version (version) VALUES (1)")
    conn.execute(
        "INSERT INTO tokens VALUES (?, 'n.cy.example', ?, ?, NULL)", (b"t" * 32, NOW, NOW + 60)
    )
    conn.execute("INSERT INTO vip_allocations VALUES ('n1.cy.example', '10.77.0.2', 'fd00:77::2')")
    conn.execute(
        "INSERT INTO nodes VALUES (42, 'n1.cy.example', '10.77.0.2', 'fd00:77::2', ?, '7', ?, ?)",
        (b"der", bytes(32), NOW),
    )
    conn.execute("INSERT INTO common_keys VALUES (9, 42, ?, ?, 5)", (b"k" * 32, NOW + 60))
    conn.execute(
        "INSERT INTO registrations VALUES (42, '[\"192.0.2.1\"]', 30000, '[]', ?, ?, 9)",
        (NOW, NOW),
    )
    conn.commit()
    conn.close()


def test_schema_version_is_2() -> None:
    assert SCHEMA_VERSION == 2


def test_v1_database_is_migrated_and_keeps_its_data(tmp_path: Path) -> None:
    path = tmp_path / "cloud.sqlite"
    make_v1_database(path)
    with SQLiteStore(path) as s:
        token = s.get_token(b"t" * 32)
        assert token is not None and token.fqdn == "n.cy.example"
        node = s.get_node(42)
        assert node is not None and node.fqdn == "n1.cy.example" and node.cert_serial == 7
        key = s.get_common_key(9)
        assert key is not None and key.high_counter == 5
        reg = s.get_registration(42)
        assert reg is not None and reg.addresses == ("192.0.2.1",) and reg.key_id == 9
        assert s.allocate_vips("n1.cy.example", POOL4, POOL6) == (
            IPv4Address("10.77.0.2"),
            IPv6Address("fd00:77::2"),
        )
        # the new tables work
        assert s.list_general_nodes() == []
        assert s.general_nodes_generation() == 0
        s.put_general_node(gn("02:00:00:00:00:01", "gn1.cy.example", 3))
        assert s.general_nodes_generation() == 1
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    conn.close()
    with SQLiteStore(path) as s:  # reopening an up-to-date file changes nothing
        assert [g.fqdn for g in s.list_general_nodes()] == ["gn1.cy.example"]
        assert s.general_nodes_generation() == 1


def test_a_failed_migration_leaves_the_old_database(tmp_path: Path) -> None:
    path = tmp_path / "cloud.sqlite"
    make_v1_database(path)
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE meta (x INTEGER)")  # in the way of migration 2
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match=r"cloud\.sqlite: table meta already exists"):
        SQLiteStore(path)
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT version FROM schema_version").fetchall() == [(1,)]
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "general_nodes" not in tables and "nodes" in tables
    conn.close()


# ----------------------------------------------------------------- general nodes


def gn(
    mac: str,
    fqdn: str,
    host: int,
    adapter: str = "ad.cy.example",
    vip6_host: int | None = None,
) -> GeneralNodeRecord:
    return GeneralNodeRecord(
        mac=mac,
        fqdn=fqdn,
        vip4=IPv4Address(f"10.77.0.{host}"),
        vip6=IPv6Address(f"fd00:77::{vip6_host if vip6_host is not None else host:x}"),
        adapter_fqdn=adapter,
        created_at=NOW,
    )


def test_is_canonical_mac() -> None:
    assert is_canonical_mac("02:00:5e:00:53:01")
    for bad in ("02:00:5E:00:53:01", "02-00-5e-00-53-01", "02:00:5e:00:53", "", "0200:5e00:5301"):
        assert not is_canonical_mac(bad)


def test_general_nodes_crud(store: SQLiteStore) -> None:
    a = gn("02:00:00:00:00:0a", "a.cy.example", 10)
    b = gn("02:00:00:00:00:0b", "b.cy.example", 11, adapter="other.cy.example")
    c = gn("02:00:00:00:00:0c", "c.cy.example", 12)
    for rec in (c, a, b):
        store.put_general_node(rec)
    assert store.get_general_node("02:00:00:00:00:0a") == a
    assert store.get_general_node("02:00:00:00:00:0A") == a  # any case
    assert store.get_general_node("02:00:00:00:00:ff") is None
    assert store.get_general_node_by_fqdn("b.cy.example") == b
    assert store.get_general_node_by_fqdn("x.cy.example") is None
    assert store.list_general_nodes() == [a, b, c]
    assert store.list_general_nodes("ad.cy.example") == [a, c]
    assert store.list_general_nodes("nobody.cy.example") == []
    assert store.general_nodes_generation() == 3
    assert store.delete_general_node("02:00:00:00:00:0B")
    assert not store.delete_general_node("02:00:00:00:00:0b")
    assert store.list_general_nodes() == [a, c]
    assert store.general_nodes_generation() == 4
    assert store.bump_general_nodes_generation() == 5
    assert store.general_nodes_generation() == 5


def test_put_identical_record_changes_nothing(store: SQLiteStore) -> None:
    a = gn("02:00:00:00:00:0a", "a.cy.example", 10)
    store.put_general_node(a)
    store.put_general_node(GeneralNodeRecord(**{**a.__dict__, "created_at": NOW + 99}))
    assert store.get_general_node(a.mac) == a
    assert store.general_nodes_generation() == 1


def test_general_node_vips_are_reserved(store: SQLiteStore) -> None:
    store.put_general_node(gn("02:00:00:00:00:0a", "a.cy.example", 2))
    assert store.vip_holder(IPv4Address("10.77.0.2")) == "a.cy.example"
    assert store.vip_holder(IPv6Address("fd00:77::2")) == "a.cy.example"
    assert store.vip_holder(IPv4Address("10.77.0.3")) is None
    # the allocator skips them, and gives the general node its own back
    assert store.allocate_vips("n1.cy.example", POOL4, POOL6) == (
        IPv4Address("10.77.0.3"),
        IPv6Address("fd00:77::3"),
    )
    assert store.vip_holder(IPv4Address("10.77.0.3")) == "n1.cy.example"
    assert store.allocate_vips("a.cy.example", POOL4, POOL6) == (
        IPv4Address("10.77.0.2"),
        IPv6Address("fd00:77::2"),
    )


def test_general_node_conflicts(store: SQLiteStore) -> None:
    store.put_general_node(gn("02:00:00:00:00:0a", "a.cy.example", 10))
    add_node(store, "n1.cy.example")  # 10.77.0.2, fd00:77::2
    store.allocate_vips("reserved.cy.example", POOL4, POOL6)  # 10.77.0.3
    cases = [
        (gn("02:00:00:00:00:0a", "other.cy.example", 20), "MAC 02:00:00:00:00:0a is already"),
        (gn("02:00:00:00:00:0b", "a.cy.example", 20), "already the general node with MAC"),
        (gn("02:00:00:00:00:0b", "n1.cy.example", 20), "FQDN of an enrolled node"),
        (gn("02:00:00:00:00:0b", "ad.cy.example", 20, adapter="x.cy.example"), "adapter of"),
        (gn("02:00:00:00:00:0b", "b.cy.example", 20, adapter="a.cy.example"), "itself a general"),
        (gn("02:00:00:00:00:0b", "b.cy.example", 2, vip6_host=20), r"VIPv4 10\.77\.0\.2 .* n1"),
        (gn("02:00:00:00:00:0b", "b.cy.example", 20, vip6_host=3), r"VIPv6 fd00:77::3 .* reserved"),
        (gn("02:00:00:00:00:0b", "b.cy.example", 10, vip6_host=20), r"taken by a\.cy\.example"),
        (gn("02:00:00:00:00:0b", "b.cy.example", 20, adapter="b.cy.example"), "its own adapter"),
    ]
    for record, message in cases:
        with pytest.raises(GeneralNodeConflictError, match=message):
            store.put_general_node(record)
    assert [g.fqdn for g in store.list_general_nodes()] == ["a.cy.example"]
    assert store.general_nodes_generation() == 1
    with pytest.raises(StoreError, match="aa:bb:cc:dd:ee:ff"):
        store.put_general_node(gn("02:00:00:00:00:0B", "b.cy.example", 20))


def test_updating_a_general_node_moves_its_node(store: SQLiteStore) -> None:
    a = gn("02:00:00:00:00:0a", "a.cy.example", 10)
    store.put_general_node(a)
    node_id = store.upsert_node(
        fqdn="a.cy.example",
        vip4=a.vip4,
        vip6=a.vip6,
        cert_der=b"x",
        cert_serial=1,
        x25519_public=bytes(32),
        enrolled_at=NOW,
    ).node_id
    moved = gn("02:00:00:00:00:0a", "a.cy.example", 30, adapter="ad2.cy.example")
    store.put_general_node(moved)  # the node's own VIPs are not "taken"
    assert store.get_general_node(a.mac) == moved
    node = store.get_node(node_id)
    assert node is not None and (node.vip4, node.vip6) == (moved.vip4, moved.vip6)
    assert store.vip_holder(a.vip4) is None
    assert store.general_nodes_generation() == 2


def test_deleting_a_general_node_removes_its_enrollment(store: SQLiteStore) -> None:
    a = gn("02:00:00:00:00:0a", "a.cy.example", 10)
    store.put_general_node(a)
    node_id = store.upsert_node(
        fqdn="a.cy.example",
        vip4=a.vip4,
        vip6=a.vip6,
        cert_der=b"x",
        cert_serial=1,
        x25519_public=bytes(32),
        enrolled_at=NOW,
    ).node_id
    other = add_node(store, "n1.cy.example")
    store.put_common_key(CommonKey(1, node_id, b"a" * 32, NOW + 60))
    store.put_common_key(CommonKey(2, other, b"b" * 32, NOW + 60))
    store.save_registration(Registration(node_id, (), 30000, (), NOW, NOW))
    store.save_registration(Registration(other, (), 30000, (), NOW, NOW))
    assert store.delete_general_node(a.mac)
    assert store.get_node(node_id) is None
    assert store.get_common_key(1) is None and store.get_registration(node_id) is None
    assert store.get_common_key(2) is not None and store.get_registration(other) is not None
    assert store.vip_holder(a.vip4) is None and store.vip_holder(a.vip6) is None
    # the FQDN and the addresses are free again
    store.put_general_node(gn("02:00:00:00:00:0b", "a.cy.example", 10))
