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
    PoolExhaustedError,
    Registration,
    Store,
    StoreError,
    TokenRecord,
)
from cyphonic.store.sqlite import SCHEMA_VERSION, SQLiteStore

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
