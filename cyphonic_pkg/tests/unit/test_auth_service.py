"""Tests of cyphonic.auth.service (the AS logic, no sockets)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cyphonic.admin import GeneralNodeError, add_general_node, remove_general_node
from cyphonic.auth.service import AuthService, EnrollResult, LoginResult
from cyphonic.errors import AuthError, CyphonicError, EnrollmentError
from cyphonic.pki.ca import (
    CertificateAuthority,
    init_ca,
    issue_node_certificate,
    verify_node_certificate,
)
from cyphonic.pki.node_keys import NodeKeys, generate_node_keys, make_csr
from cyphonic.pki.tokens import TokenError, create_token, hash_token
from cyphonic.store.base import GeneralNodeRecord
from cyphonic.store.sqlite import SQLiteStore

NOW = 1_800_000_000.0
DAY = 86400.0
DOMAIN = "cy.example"
POOL4 = IPv4Network("10.77.0.0/24")
POOL6 = IPv6Network("fd00:77::/64")


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return init_ca(tmp_path / "ca", DOMAIN, NOW - DAY)


@pytest.fixture
def store() -> SQLiteStore:
    return SQLiteStore(":memory:")


@pytest.fixture
def service(store: SQLiteStore, ca: CertificateAuthority) -> AuthService:
    return AuthService(store, ca, DOMAIN, POOL4, POOL6, ["192.0.2.1:4502"], 3600.0, 90)


def keys_for(tmp_path: Path, name: str) -> NodeKeys:
    return generate_node_keys(tmp_path / name)


def enroll(
    service: AuthService, keys: NodeKeys, fqdn: str, now: float = NOW
) -> tuple[EnrollResult, bytes]:
    token = create_token(service.store, fqdn, 600, now)
    result = service.enroll(token, fqdn, make_csr(keys, fqdn), now)
    cert = x509.load_pem_x509_certificate(result.cert_pem)
    return result, cert.public_bytes(serialization.Encoding.DER)


def test_enroll(service: AuthService, ca: CertificateAuthority, tmp_path: Path) -> None:
    keys = keys_for(tmp_path, "n1")
    result, der = enroll(service, keys, "n1.cy.example")
    ident = verify_node_certificate(ca.cert, der, NOW, "n1.cy.example")
    assert ident.x25519_public == keys.x25519_public
    assert result.ca_pem == ca.cert_pem
    node = result.node
    assert node.fqdn == "n1.cy.example"
    assert node.vip4 == IPv4Address("10.77.0.2")
    assert node.vip6 == IPv6Address("fd00:77::2")
    assert node.cert_der == der
    assert node.cert_serial == ident.serial
    assert node.x25519_public == keys.x25519_public
    assert service.store.get_node(node.node_id) == node


def test_reenroll_keeps_node_id_and_vips(service: AuthService, tmp_path: Path) -> None:
    first, _ = enroll(service, keys_for(tmp_path, "a"), "n1.cy.example")
    enroll(service, keys_for(tmp_path, "other"), "n2.cy.example")
    second, _ = enroll(service, keys_for(tmp_path, "b"), "n1.cy.example", NOW + 10)
    assert second.node.node_id == first.node.node_id
    assert (second.node.vip4, second.node.vip6) == (first.node.vip4, first.node.vip6)
    assert second.node.cert_serial != first.node.cert_serial
    assert second.node.x25519_public != first.node.x25519_public
    stored = service.store.get_node_by_fqdn("n1.cy.example")
    assert stored is not None and stored.cert_serial == second.node.cert_serial


def test_enroll_normalises_the_fqdn(service: AuthService, tmp_path: Path) -> None:
    keys = keys_for(tmp_path, "n1")
    token = create_token(service.store, "n1.cy.example", 600, NOW)
    result = service.enroll(token, "N1.CY.example.", make_csr(keys, "n1.cy.example"), NOW)
    assert result.node.fqdn == "n1.cy.example"


def test_bad_csr_does_not_burn_the_token(service: AuthService, tmp_path: Path) -> None:
    keys = keys_for(tmp_path, "n1")
    token = create_token(service.store, "n1.cy.example", 600, NOW)
    with pytest.raises(EnrollmentError, match="subject CN"):
        service.enroll(token, "n1.cy.example", make_csr(keys, "n9.cy.example"), NOW)
    service.enroll(token, "n1.cy.example", make_csr(keys, "n1.cy.example"), NOW)


def test_enroll_refusals(service: AuthService, tmp_path: Path) -> None:
    keys = keys_for(tmp_path, "n1")
    csr = make_csr(keys, "n1.cy.example")
    with pytest.raises(EnrollmentError, match="not under the CYPHONIC domain"):
        service.enroll("t", "n1.other.example", csr, NOW)
    with pytest.raises(EnrollmentError, match="may only contain"):
        service.enroll("t", "bad_name.cy.example", csr, NOW)
    with pytest.raises(EnrollmentError, match="reserved for the AS"):
        service.enroll("t", "as.cy.example", make_csr(keys, "as.cy.example"), NOW)
    with pytest.raises(TokenError, match="not known"):
        service.enroll("forged-token", "n1.cy.example", csr, NOW)
    token = create_token(service.store, "n1.cy.example", 60, NOW)
    with pytest.raises(TokenError, match="expired"):
        service.enroll(token, "n1.cy.example", csr, NOW + 61)
    other = create_token(service.store, "n2.cy.example", 60, NOW)
    with pytest.raises(TokenError, match=r"created for n2\.cy\.example, not n1\.cy\.example"):
        service.enroll(other, "n1.cy.example", csr, NOW)
    assert service.store.list_nodes() == []


def test_enroll_refuses_a_reused_token(service: AuthService, tmp_path: Path) -> None:
    keys = keys_for(tmp_path, "n1")
    token = create_token(service.store, "n1.cy.example", 600, NOW)
    service.enroll(token, "n1.cy.example", make_csr(keys, "n1.cy.example"), NOW)
    with pytest.raises(TokenError, match="already used"):
        service.enroll(token, "n1.cy.example", make_csr(keys, "n1.cy.example"), NOW + 1)


def test_pool_exhaustion_is_an_enrollment_error(ca: CertificateAuthority, tmp_path: Path) -> None:
    tiny = AuthService(
        SQLiteStore(":memory:"), ca, DOMAIN, IPv4Network("10.0.0.0/30"), POOL6, [], 60, 30
    )
    enroll(tiny, keys_for(tmp_path, "a"), "a.cy.example")
    with pytest.raises(
        EnrollmentError, match=r"cannot give b\.cy\.example an address: .*exhausted"
    ):
        enroll(tiny, keys_for(tmp_path, "b"), "b.cy.example")


def test_constructor_checks(store: SQLiteStore, ca: CertificateAuthority) -> None:
    with pytest.raises(CyphonicError, match="not the CA's domain"):
        AuthService(store, ca, "other.example", POOL4, POOL6, [], 60, 30)
    with pytest.raises(CyphonicError, match="key lifetime"):
        AuthService(store, ca, DOMAIN, POOL4, POOL6, [], 0, 30)
    with pytest.raises(CyphonicError, match="certificate lifetime"):
        AuthService(store, ca, DOMAIN, POOL4, POOL6, [], 60, 0)


# ----------------------------------------------------------------- login


def test_login(service: AuthService, tmp_path: Path) -> None:
    enrolled, der = enroll(service, keys_for(tmp_path, "n1"), "n1.cy.example")
    result = service.login(der, "n1.cy.example", NOW + 5)
    assert isinstance(result, LoginResult)
    assert result.node_id == enrolled.node.node_id
    assert (result.fqdn, result.domain) == ("n1.cy.example", DOMAIN)
    assert (result.vip4, result.vip6) == (enrolled.node.vip4, enrolled.node.vip6)
    assert (result.vip4_pool, result.vip6_pool) == ("10.77.0.0/24", "fd00:77::/64")
    assert result.nms_endpoints == ("192.0.2.1:4502",)
    assert len(result.common_key) == 32
    assert result.key_expires_at == NOW + 5 + 3600
    assert result.common_key.hex() not in repr(result)
    stored = service.store.get_common_key(result.key_id)
    assert stored is not None
    assert stored.key == result.common_key
    assert stored.node_id == result.node_id
    assert stored.expires_at == result.key_expires_at
    assert stored.high_counter == 0
    again = service.login(der, "n1.cy.example", NOW + 6)
    assert again.key_id != result.key_id and again.common_key != result.common_key


def test_login_claiming_another_fqdn(service: AuthService, tmp_path: Path) -> None:
    _, der = enroll(service, keys_for(tmp_path, "n1"), "n1.cy.example")
    enroll(service, keys_for(tmp_path, "n2"), "n2.cy.example")
    with pytest.raises(AuthError, match=r"certificate is for n1\.cy\.example, not n2\.cy\.example"):
        service.login(der, "n2.cy.example", NOW)


def test_login_with_superseded_certificate(service: AuthService, tmp_path: Path) -> None:
    _, old = enroll(service, keys_for(tmp_path, "a"), "n1.cy.example")
    _, new = enroll(service, keys_for(tmp_path, "b"), "n1.cy.example", NOW + 1)
    with pytest.raises(AuthError, match="superseded by a later enrollment"):
        service.login(old, "n1.cy.example", NOW + 2)
    service.login(new, "n1.cy.example", NOW + 2)


def test_login_with_certificate_from_another_ca(service: AuthService, tmp_path: Path) -> None:
    enroll(service, keys_for(tmp_path, "n1"), "n1.cy.example")
    other = init_ca(tmp_path / "other", DOMAIN, NOW - DAY)
    keys = keys_for(tmp_path, "evil")
    forged = issue_node_certificate(other, make_csr(keys, "n1.cy.example"), "n1.cy.example", 9, NOW)
    with pytest.raises(AuthError, match="not issued by this CYPHONIC CA"):
        service.login(forged.public_bytes(serialization.Encoding.DER), "n1.cy.example", NOW)


def test_login_refusals(service: AuthService, ca: CertificateAuthority, tmp_path: Path) -> None:
    _, der = enroll(service, keys_for(tmp_path, "n1"), "n1.cy.example")
    with pytest.raises(AuthError, match="client certificate"):
        service.login(None, "n1.cy.example", NOW)
    with pytest.raises(AuthError, match="expired"):
        service.login(der, "n1.cy.example", NOW + 91 * DAY)
    with pytest.raises(AuthError, match="not under the CYPHONIC domain"):
        service.login(der, "n1.other.example", NOW)
    # a valid certificate of the CA for a node the AS does not know
    keys = keys_for(tmp_path, "ghost")
    ghost = issue_node_certificate(
        ca, make_csr(keys, "ghost.cy.example"), "ghost.cy.example", 9, NOW
    )
    with pytest.raises(AuthError, match=r"ghost\.cy\.example is not enrolled"):
        service.login(ghost.public_bytes(serialization.Encoding.DER), "ghost.cy.example", NOW)
    assert service.store.delete_expired_keys(NOW + 10**9) == 0  # no key was handed out


# ----------------------------------------------------------------- general nodes


def add_gn(
    service: AuthService,
    mac: str = "02:00:5e:00:53:01",
    fqdn: str = "gn1.cy.example",
    adapter: str = "ad.cy.example",
) -> GeneralNodeRecord:
    return add_general_node(
        service.store,
        DOMAIN,
        POOL4,
        POOL6,
        mac=mac,
        fqdn=fqdn,
        adapter_fqdn=adapter,
        now=NOW,
    )


def gn_enroll(
    service: AuthService, adapter_der: bytes | None, keys: NodeKeys, fqdn: str, now: float = NOW
) -> tuple[EnrollResult, bytes]:
    result = service.gn_enroll(adapter_der, fqdn, make_csr(keys, fqdn), now)
    cert = x509.load_pem_x509_certificate(result.cert_pem)
    return result, cert.public_bytes(serialization.Encoding.DER)


def test_gn_list_returns_the_callers_general_nodes(service: AuthService, tmp_path: Path) -> None:
    _, ad = enroll(service, keys_for(tmp_path, "ad"), "ad.cy.example")
    _, ad2 = enroll(service, keys_for(tmp_path, "ad2"), "ad2.cy.example")
    _, plain = enroll(service, keys_for(tmp_path, "n1"), "n1.cy.example")
    b = add_gn(service, "02:00:5e:00:53:02", "gn-b.cy.example")
    a = add_gn(service, "02:00:5e:00:53:01", "gn-a.cy.example")
    c = add_gn(service, "02:00:5e:00:53:03", "gn-c.cy.example", adapter="ad2.cy.example")
    generation, nodes = service.gn_list(ad, NOW)
    assert generation == 3
    assert nodes == [a, b]
    assert service.gn_list(ad2, NOW) == (3, [c])
    assert service.gn_list(plain, NOW) == (3, [])  # a node without general nodes
    service.store.delete_general_node(b.mac)
    assert service.gn_list(ad, NOW) == (4, [a])


def test_gn_list_authenticates_like_login(
    service: AuthService, ca: CertificateAuthority, tmp_path: Path
) -> None:
    _, old = enroll(service, keys_for(tmp_path, "ad"), "ad.cy.example")
    add_gn(service)
    with pytest.raises(AuthError, match=r"gn_list needs the adapter's client certificate"):
        service.gn_list(None, NOW)
    with pytest.raises(AuthError, match="expired"):
        service.gn_list(old, NOW + 91 * DAY)
    _, new = enroll(service, keys_for(tmp_path, "ad-new"), "ad.cy.example", NOW + 1)
    with pytest.raises(AuthError, match="superseded by a later enrollment"):
        service.gn_list(old, NOW + 2)
    assert len(service.gn_list(new, NOW + 2)[1]) == 1
    other = init_ca(tmp_path / "other", DOMAIN, NOW - DAY)
    keys = keys_for(tmp_path, "evil")
    forged = issue_node_certificate(other, make_csr(keys, "ad.cy.example"), "ad.cy.example", 9, NOW)
    with pytest.raises(AuthError, match="not issued by this CYPHONIC CA"):
        service.gn_list(forged.public_bytes(serialization.Encoding.DER), NOW)
    ghost = issue_node_certificate(
        ca, make_csr(keys, "ghost.cy.example"), "ghost.cy.example", 9, NOW
    )
    with pytest.raises(AuthError, match=r"ghost\.cy\.example is not enrolled"):
        service.gn_list(ghost.public_bytes(serialization.Encoding.DER), NOW)


def test_gn_enroll_then_login(
    service: AuthService, ca: CertificateAuthority, tmp_path: Path
) -> None:
    _, ad = enroll(service, keys_for(tmp_path, "ad"), "ad.cy.example")
    rec = add_gn(service)
    keys = keys_for(tmp_path, "gn1")
    result, der = gn_enroll(service, ad, keys, "GN1.cy.example.")
    ident = verify_node_certificate(ca.cert, der, NOW, "gn1.cy.example")
    assert ident.x25519_public == keys.x25519_public
    assert result.ca_pem == ca.cert_pem
    node = result.node
    assert (node.fqdn, node.vip4, node.vip6) == (rec.fqdn, rec.vip4, rec.vip6)
    assert node.cert_serial == ident.serial and node.x25519_public == keys.x25519_public
    assert service.store.get_node_by_fqdn("gn1.cy.example") == node
    login = service.login(der, "gn1.cy.example", NOW + 1)
    assert (login.node_id, login.vip4, login.vip6) == (node.node_id, rec.vip4, rec.vip6)
    # a new certificate (new keys) supersedes the first, keeping node_id and VIPs
    again, der2 = gn_enroll(service, ad, keys_for(tmp_path, "gn1-new"), "gn1.cy.example", NOW + 5)
    assert again.node.node_id == node.node_id and again.node.vip4 == rec.vip4
    with pytest.raises(AuthError, match="superseded"):
        service.login(der, "gn1.cy.example", NOW + 6)
    service.login(der2, "gn1.cy.example", NOW + 6)
    # the general node is not an adapter
    with pytest.raises(AuthError, match=r"gn1\.cy\.example is a general node, not an adapter"):
        service.gn_list(der2, NOW + 6)
    # the record is unchanged by the enrollment
    assert service.store.get_general_node(rec.mac) == rec


def test_gn_enroll_refusals(service: AuthService, tmp_path: Path) -> None:
    _, ad = enroll(service, keys_for(tmp_path, "ad"), "ad.cy.example")
    _, ad2 = enroll(service, keys_for(tmp_path, "ad2"), "ad2.cy.example")
    add_gn(service)
    keys = keys_for(tmp_path, "gn1")
    csr = make_csr(keys, "gn1.cy.example")
    with pytest.raises(AuthError, match=r"gn_enroll needs the adapter's client certificate"):
        service.gn_enroll(None, "gn1.cy.example", csr, NOW)
    with pytest.raises(
        EnrollmentError,
        match=r"general node gn1\.cy\.example is behind the adapter ad\.cy\.example, not ad2",
    ):
        service.gn_enroll(ad2, "gn1.cy.example", csr, NOW)
    with pytest.raises(EnrollmentError, match=r"gn9\.cy\.example is not a general node registered"):
        service.gn_enroll(ad, "gn9.cy.example", make_csr(keys, "gn9.cy.example"), NOW)
    with pytest.raises(EnrollmentError, match=r"ad2\.cy\.example is not a general node"):
        service.gn_enroll(ad, "ad2.cy.example", make_csr(keys, "ad2.cy.example"), NOW)
    with pytest.raises(EnrollmentError, match="not under the CYPHONIC domain"):
        service.gn_enroll(ad, "gn1.other.example", csr, NOW)
    with pytest.raises(EnrollmentError, match="subject CN"):
        service.gn_enroll(ad, "gn1.cy.example", make_csr(keys, "gn2.cy.example"), NOW)
    with pytest.raises(EnrollmentError, match="not a PEM certificate signing request"):
        service.gn_enroll(ad, "gn1.cy.example", b"garbage", NOW)
    assert service.store.get_node_by_fqdn("gn1.cy.example") is None


def test_node_enrollment_with_a_general_node_fqdn_is_refused(
    service: AuthService, tmp_path: Path
) -> None:
    add_gn(service)
    keys = keys_for(tmp_path, "n")
    token = create_token(service.store, "gn1.cy.example", 600, NOW)
    with pytest.raises(
        EnrollmentError,
        match=r"gn1\.cy\.example is a general node behind the adapter ad\.cy\.example; only its",
    ):
        service.enroll(token, "gn1.cy.example", make_csr(keys, "gn1.cy.example"), NOW)
    assert service.store.get_node_by_fqdn("gn1.cy.example") is None
    stored = service.store.get_token(hash_token(token))
    assert stored is not None and stored.used_at is None  # the token was not burnt
    # and the other way round: a general node cannot take an enrolled node's name
    enroll(service, keys_for(tmp_path, "n1"), "n1.cy.example")
    with pytest.raises(GeneralNodeError, match=r"n1\.cy\.example is an enrolled node"):
        add_gn(service, "02:00:5e:00:53:09", "n1.cy.example")


def test_removed_general_node_cannot_log_in(service: AuthService, tmp_path: Path) -> None:
    _, ad = enroll(service, keys_for(tmp_path, "ad"), "ad.cy.example")
    rec = add_gn(service)
    _, der = gn_enroll(service, ad, keys_for(tmp_path, "gn1"), "gn1.cy.example")
    login = service.login(der, "gn1.cy.example", NOW)
    assert remove_general_node(service.store, rec.fqdn)
    with pytest.raises(AuthError, match=r"gn1\.cy\.example is not enrolled"):
        service.login(der, "gn1.cy.example", NOW + 1)
    assert service.store.get_common_key(login.key_id) is None
    with pytest.raises(EnrollmentError, match="not a general node registered"):
        gn_enroll(service, ad, keys_for(tmp_path, "gn1"), "gn1.cy.example")
