"""Tests of cyphonic.admin: general-node records on the cloud (add, remove, list)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cyphonic import admin
from cyphonic.admin import GeneralNodeError, add_general_node, validate_mac
from cyphonic.errors import CyphonicError
from cyphonic.store.base import GeneralNodeRecord, is_canonical_mac
from cyphonic.store.sqlite import SQLiteStore

NOW = 1_800_000_000.0
DOMAIN = "cy.example"
POOL4 = IPv4Network("10.77.0.0/24")
POOL6 = IPv6Network("fd00:77::/64")
MAC1 = "02:00:5e:00:53:01"
MAC2 = "02:00:5e:00:53:02"


@pytest.fixture
def store() -> SQLiteStore:
    return SQLiteStore(":memory:")


def add(store: SQLiteStore, **kw: Any) -> GeneralNodeRecord:
    args: dict[str, Any] = {"mac": MAC1, "fqdn": "gn1.cy.example", "adapter_fqdn": "ad.cy.example"}
    args.update(kw)
    return add_general_node(store, DOMAIN, POOL4, POOL6, now=NOW, **args)


def enroll_node(store: SQLiteStore, fqdn: str) -> None:
    vip4, vip6 = store.allocate_vips(fqdn, POOL4, POOL6)
    store.upsert_node(
        fqdn=fqdn,
        vip4=vip4,
        vip6=vip6,
        cert_der=b"x",
        cert_serial=1,
        x25519_public=bytes(32),
        enrolled_at=NOW,
    )


# ----------------------------------------------------------------- MAC addresses


def test_validate_mac_forms() -> None:
    for form in ("02:00:5e:00:53:01", "02-00-5E-00-53-01", " 02:00:5E:00:53:01 ", "02005e005301"):
        assert validate_mac(form) == MAC1


@pytest.mark.parametrize(
    ("mac", "message"),
    [
        ("02:00:5e:00:53", "bad MAC address"),
        ("02:00:5e:00:53:01:07", "bad MAC address"),
        ("02:00-5e:00:53:01", "bad MAC address"),
        ("02:00:5e:00:53:0g", "bad MAC address"),
        ("", "bad MAC address"),
        ("00:00:00:00:00:00", "all zero"),
        ("ff:ff:ff:ff:ff:ff", "multicast/broadcast"),
        ("01:00:5e:00:00:01", "multicast/broadcast"),
        ("33:33:00:00:00:01", "multicast/broadcast"),
    ],
)
def test_validate_mac_refusals(mac: str, message: str) -> None:
    with pytest.raises(GeneralNodeError, match=message):
        validate_mac(mac)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=6, max_size=6), st.sampled_from([":", "-", ""]), st.booleans())
def test_validate_mac_property(raw: bytes, sep: str, upper: bool) -> None:
    text = sep.join(f"{b:02x}" for b in raw)
    text = text.upper() if upper else text
    if raw[0] & 1 or raw == bytes(6):
        with pytest.raises(GeneralNodeError):
            validate_mac(text)
    else:
        mac = validate_mac(text)
        assert is_canonical_mac(mac) and bytes.fromhex(mac.replace(":", "")) == raw


# ----------------------------------------------------------------- add


def test_add_allocates_vips(store: SQLiteStore) -> None:
    rec = add(store, mac="02-00-5E-00-53-01", fqdn="GN1.cy.example.", adapter_fqdn="AD.cy.example")
    assert rec == GeneralNodeRecord(
        mac=MAC1,
        fqdn="gn1.cy.example",
        vip4=IPv4Address("10.77.0.2"),
        vip6=IPv6Address("fd00:77::2"),
        adapter_fqdn="ad.cy.example",
        created_at=NOW,
    )
    assert store.get_general_node(MAC1) == rec
    second = add(store, mac=MAC2, fqdn="gn2.cy.example")
    assert (second.vip4, second.vip6) == (IPv4Address("10.77.0.3"), IPv6Address("fd00:77::3"))
    # nodes enrolled later get other addresses
    enroll_node(store, "n1.cy.example")
    node = store.get_node_by_fqdn("n1.cy.example")
    assert node is not None and node.vip4 == IPv4Address("10.77.0.4")


def test_add_with_given_vips(store: SQLiteStore) -> None:
    rec = add(store, vip4="10.77.0.50", vip6=IPv6Address("fd00:77::50"))
    assert (rec.vip4, rec.vip6) == (IPv4Address("10.77.0.50"), IPv6Address("fd00:77::50"))
    # only one given: the other is allocated
    rec2 = add(store, mac=MAC2, fqdn="gn2.cy.example", vip6="fd00:77::99")
    assert (rec2.vip4, rec2.vip6) == (IPv4Address("10.77.0.2"), IPv6Address("fd00:77::99"))
    rec3 = add(store, mac="02:00:5e:00:53:03", fqdn="gn3.cy.example", vip4="10.77.0.3")
    assert (rec3.vip4, rec3.vip6) == (IPv4Address("10.77.0.3"), IPv6Address("fd00:77::2"))
    # the allocator skips all of them afterwards
    assert store.allocate_vips("n.cy.example", POOL4, POOL6) == (
        IPv4Address("10.77.0.4"),
        IPv6Address("fd00:77::3"),
    )


def test_add_is_idempotent(store: SQLiteStore) -> None:
    first = add(store)
    generation = admin.generation(store)
    again = add_general_node(
        store,
        DOMAIN,
        POOL4,
        POOL6,
        mac="02:00:5E:00:53:01",
        fqdn="gn1.cy.example.",
        adapter_fqdn="ad.cy.example",
        now=NOW + 100,
    )
    assert again == first  # created_at unchanged too
    assert add(store, vip4=first.vip4, vip6=str(first.vip6)) == first
    assert admin.generation(store) == generation
    assert admin.list_general_nodes(store) == [first]


def test_add_conflicts(store: SQLiteStore) -> None:
    first = add(store)  # gn1, MAC1, 10.77.0.2, behind ad
    add(store, mac=MAC2, fqdn="gn2.cy.example", adapter_fqdn="ad2.cy.example")  # 10.77.0.3
    enroll_node(store, "n1.cy.example")  # 10.77.0.4
    store.allocate_vips("reserved.cy.example", POOL4, POOL6)  # 10.77.0.5
    mac3 = "02:00:5e:00:53:03"
    cases: list[tuple[dict[str, Any], str]] = [
        ({"fqdn": "gn9.cy.example"}, r"MAC 02:00:5e:00:53:01 is already general node gn1"),
        ({"adapter_fqdn": "ad2.cy.example"}, r"already behind adapter ad\.cy\.example, not ad2"),
        ({"vip4": "10.77.0.9"}, r"already has VIPv4 10\.77\.0\.2, not 10\.77\.0\.9"),
        ({"vip6": "fd00:77::9"}, r"already has VIPv6 fd00:77::2, not fd00:77::9"),
        ({"mac": mac3}, r"gn1\.cy\.example is already the general node with MAC 02:00:5e:00:53:01"),
        ({"mac": mac3, "fqdn": "n1.cy.example"}, r"n1\.cy\.example is an enrolled node"),
        (
            {"mac": mac3, "fqdn": "ad.cy.example", "adapter_fqdn": "ad2.cy.example"},
            r"ad\.cy\.example is the adapter of other",
        ),
        (
            {"mac": mac3, "fqdn": "gn3.cy.example", "adapter_fqdn": "gn2.cy.example"},
            r"adapter gn2\.cy\.example is itself a general node \(MAC 02:00:5e:00:53:02\)",
        ),
        (
            {"mac": mac3, "fqdn": "gn3.cy.example", "vip4": "10.77.0.2"},
            r"10\.77\.0\.2 is taken by gn1",
        ),
        ({"mac": mac3, "fqdn": "gn3.cy.example", "vip4": "10.77.0.4"}, r"taken by n1\.cy\.example"),
        ({"mac": mac3, "fqdn": "gn3.cy.example", "vip6": "fd00:77::5"}, r"taken by reserved\.cy"),
        ({"mac": mac3, "fqdn": "gn3.cy.example", "vip6": "fd00:77::3"}, r"taken by gn2\.cy"),
    ]
    for kw, message in cases:
        with pytest.raises(GeneralNodeError, match=message):
            add(store, **kw)
    assert [g.fqdn for g in admin.list_general_nodes(store)] == ["gn1.cy.example", "gn2.cy.example"]
    assert store.get_general_node(MAC1) == first
    assert store.vip_holder(IPv4Address("10.77.0.6")) is None  # nothing was left reserved


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"mac": "ff:ff:ff:ff:ff:ff"}, "multicast"),
        ({"fqdn": "gn1.other.example"}, r"general node FQDN: .*not under the CYPHONIC domain"),
        ({"fqdn": "bad_name.cy.example"}, "general node FQDN: .*may only contain"),
        ({"fqdn": "as.cy.example"}, "reserved for the AS"),
        ({"adapter_fqdn": "ad.other.example"}, "adapter FQDN: .*not under the CYPHONIC domain"),
        ({"adapter_fqdn": "as.cy.example"}, "adapter FQDN: .*reserved for the AS"),
        ({"adapter_fqdn": "gn1.cy.example"}, "cannot be its own adapter"),
        (
            {"vip4": "10.78.0.5"},
            r"VIPv4 10\.78\.0\.5 is not in the configured pool 10\.77\.0\.0/24",
        ),
        ({"vip6": "fd00:78::5"}, "VIPv6 fd00:78::5 is not in the configured pool"),
        ({"vip4": "10.77.0.0"}, "cannot be assigned"),
        ({"vip4": "10.77.0.1"}, "cannot be assigned"),
        ({"vip4": "10.77.0.255"}, "cannot be assigned"),
        ({"vip6": "fd00:77::1"}, "cannot be assigned"),
        ({"vip6": "fd00:77::ffff:ffff:ffff:ffff"}, "cannot be assigned"),
        ({"vip4": "fd00:77::5"}, "is not an IPv4 address"),
        ({"vip6": "10.77.0.5"}, "is not an IPv6 address"),
        ({"vip4": "nonsense"}, "is not an IPv4 address"),
    ],
)
def test_add_refuses_bad_input(store: SQLiteStore, kw: dict[str, Any], message: str) -> None:
    with pytest.raises(GeneralNodeError, match=message):
        add(store, **kw)
    assert store.list_general_nodes() == []
    assert admin.generation(store) == 0


def test_add_refuses_a_bad_domain(store: SQLiteStore) -> None:
    with pytest.raises(GeneralNodeError, match="may only contain"):
        add_general_node(
            store, "bad_domain", POOL4, POOL6, mac=MAC1, fqdn="a.b", adapter_fqdn="c.d", now=NOW
        )


def test_pool_exhaustion(store: SQLiteStore) -> None:
    tiny = IPv4Network("10.9.0.0/30")  # one assignable address
    kw: dict[str, Any] = {"adapter_fqdn": "ad.cy.example", "now": NOW}
    add_general_node(store, DOMAIN, tiny, POOL6, mac=MAC1, fqdn="a.cy.example", **kw)
    with pytest.raises(GeneralNodeError, match=r"cannot give b\.cy\.example an address.*exhausted"):
        add_general_node(store, DOMAIN, tiny, POOL6, mac=MAC2, fqdn="b.cy.example", **kw)


def test_errors_are_cyphonic_errors() -> None:
    assert issubclass(GeneralNodeError, CyphonicError)


# ----------------------------------------------------------------- remove, list, generation


def test_remove_by_mac_or_fqdn(store: SQLiteStore) -> None:
    add(store)
    add(store, mac=MAC2, fqdn="gn2.cy.example")
    assert admin.remove_general_node(store, "02-00-5E-00-53-01")
    assert not admin.remove_general_node(store, MAC1)
    assert admin.remove_general_node(store, "GN2.cy.example.")
    assert not admin.remove_general_node(store, "gn2.cy.example")
    assert not admin.remove_general_node(store, "")
    assert not admin.remove_general_node(store, "nonsense")
    assert admin.list_general_nodes(store) == []


def test_removed_names_and_addresses_are_free_again(store: SQLiteStore) -> None:
    rec = add(store, vip4="10.77.0.40")
    admin.remove_general_node(store, MAC1)
    again = add(store, mac=MAC2, vip4="10.77.0.40")
    assert again.fqdn == rec.fqdn and again.vip4 == rec.vip4


def test_list_by_adapter(store: SQLiteStore) -> None:
    a = add(store, fqdn="b.cy.example")
    b = add(store, mac=MAC2, fqdn="a.cy.example", adapter_fqdn="ad2.cy.example")
    c = add(store, mac="02:00:5e:00:53:03", fqdn="c.cy.example")
    assert admin.list_general_nodes(store) == [b, a, c]
    assert admin.list_general_nodes(store, "AD.cy.example.") == [a, c]
    assert admin.list_general_nodes(store, "ad2.cy.example") == [b]
    assert admin.list_general_nodes(store, "none.cy.example") == []


def test_generation_counts_changes(store: SQLiteStore) -> None:
    assert admin.generation(store) == 0
    add(store)
    assert admin.generation(store) == 1
    add(store)  # no change
    assert admin.generation(store) == 1
    add(store, mac=MAC2, fqdn="gn2.cy.example")
    assert admin.generation(store) == 2
    with pytest.raises(GeneralNodeError):
        add(store, mac=MAC2, fqdn="gn3.cy.example")
    assert admin.generation(store) == 2
    admin.remove_general_node(store, MAC2)
    assert admin.generation(store) == 3
    admin.remove_general_node(store, MAC2)  # nothing removed
    assert admin.generation(store) == 3
    assert admin.bump_generation(store) == 4 == admin.generation(store)


def test_general_node_to_json(store: SQLiteStore) -> None:
    rec = add(store)
    assert admin.general_node_to_json(rec) == {
        "mac": MAC1,
        "fqdn": "gn1.cy.example",
        "vip4": "10.77.0.2",
        "vip6": "fd00:77::2",
        "adapter_fqdn": "ad.cy.example",
        "created_at": NOW,
    }


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.booleans(), st.integers(0, 5), st.integers(0, 5), st.integers(0, 1)),
        max_size=25,
    )
)
def test_random_operations_keep_the_records_consistent(
    ops: list[tuple[bool, int, int, int]],
) -> None:
    """Random adds (conflicting or not) and removes: MACs, FQDNs and VIPs stay unique, and
    the generation changes exactly when the list does."""
    with SQLiteStore(":memory:") as store:
        for is_add, m, f, a in ops:
            before = admin.list_general_nodes(store)
            generation = admin.generation(store)
            mac = f"02:00:00:00:00:{m:02x}"
            if is_add:
                try:
                    add(store, mac=mac, fqdn=f"gn{f}.cy.example", adapter_fqdn=f"ad{a}.cy.example")
                except GeneralNodeError:
                    assert admin.list_general_nodes(store) == before
            else:
                admin.remove_general_node(store, mac)
            after = admin.list_general_nodes(store)
            assert (after != before) == (admin.generation(store) != generation)
            for attr in ("mac", "fqdn", "vip4", "vip6"):
                assert len({getattr(g, attr) for g in after}) == len(after)
