"""Tests of cyphonic.pki.ca and cyphonic.pki.node_keys."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cyphonic.errors import AuthError, CyphonicError, EnrollmentError
from cyphonic.pki.ca import (
    X25519_EXTENSION_OID,
    CertificateAuthority,
    FQDNError,
    decode_x25519_extension,
    encode_x25519_extension,
    init_ca,
    issue_node_certificate,
    issue_server_certificate,
    load_ca,
    validate_fqdn,
    verify_node_certificate,
)
from cyphonic.pki.node_keys import (
    NodeKeys,
    generate_node_keys,
    load_node_keys,
    make_csr,
)

NOW = 1_800_000_000.0
DAY = 86400.0
DOMAIN = "cy.example"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return init_ca(tmp_path / "ca", DOMAIN, NOW)


@pytest.fixture
def keys(tmp_path: Path) -> NodeKeys:
    return generate_node_keys(tmp_path / "node")


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def csr_with(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    cn: str | None,
    sans: list[x509.GeneralName] | None,
    x25519: bytes | None = b"\x11" * 32,
) -> bytes:
    name = [x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else []
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(name))
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if x25519 is not None:
        builder = builder.add_extension(encode_x25519_extension(x25519), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


# ----------------------------------------------------------------- OID and extension


def test_x25519_oid_is_a_uuid_oid() -> None:
    arcs = X25519_EXTENSION_OID.dotted_string.split(".")
    assert arcs[:2] == ["2", "25"]
    u = uuid.UUID(int=int(arcs[2]))
    assert u.version == 4


def test_x25519_extension_der_is_an_octet_string_of_32_bytes() -> None:
    # X.690 §8.7: OCTET STRING, primitive, tag 0x04, definite short length 0x20.
    key = bytes(range(32))
    ext = encode_x25519_extension(key)
    assert ext.value == bytes.fromhex("0420") + key
    with pytest.raises(ValueError):
        encode_x25519_extension(b"\x00" * 31)


def test_decode_x25519_extension_rejects_malformed() -> None:
    bad = x509.UnrecognizedExtension(X25519_EXTENSION_OID, b"\x04\x1f" + b"\x00" * 31)
    exts = x509.Extensions([x509.Extension(X25519_EXTENSION_OID, False, bad)])
    with pytest.raises(ValueError):
        decode_x25519_extension(exts)
    assert decode_x25519_extension(x509.Extensions([])) is None


# ----------------------------------------------------------------- FQDN


@pytest.mark.parametrize(
    ("fqdn", "expected"),
    [
        ("node1.cy.example", "node1.cy.example"),
        ("Node1.CY.Example.", "node1.cy.example"),
        ("a-b.c.cy.example", "a-b.c.cy.example"),
        ("x" * 63 + ".cy.example", "x" * 63 + ".cy.example"),
    ],
)
def test_validate_fqdn_accepts(fqdn: str, expected: str) -> None:
    assert validate_fqdn(fqdn, DOMAIN) == expected


@pytest.mark.parametrize(
    ("fqdn", "reason"),
    [
        ("", "empty"),
        ("cy.example", "not under"),
        ("node.other.example", "not under"),
        ("nodecy.example", "not under"),
        ("-node.cy.example", "start or end"),
        ("node-.cy.example", "start or end"),
        ("no_de.cy.example", "may only contain"),
        ("nöde.cy.example", "punycode"),
        ("a..cy.example", "empty label"),
        ("x" * 64 + ".cy.example", "longer than 63"),
        (".".join(["abcdefghi"] * 25) + ".cy.example", "longer than 253"),
        ("node .cy.example", "may only contain"),
    ],
)
def test_validate_fqdn_rejects_with_reason(fqdn: str, reason: str) -> None:
    with pytest.raises(FQDNError, match=reason):
        validate_fqdn(fqdn, DOMAIN)


def test_fqdn_error_is_a_cyphonic_error() -> None:
    assert issubclass(FQDNError, CyphonicError)


# ----------------------------------------------------------------- CA files


def test_init_ca_writes_private_key_0600_and_ca_cert(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    ca_dir = tmp_path / "ca"
    assert mode(ca_dir / "ca.key") == 0o600
    assert mode(ca_dir) == 0o700
    cert = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    assert cert == ca.cert
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    nc = cert.extensions.get_extension_for_class(x509.NameConstraints)
    assert nc.critical and nc.value.permitted_subtrees == [x509.DNSName(DOMAIN)]
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime == dt.timedelta(days=3650)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert ca.domain == DOMAIN
    cert.verify_directly_issued_by(cert)  # self-signed


def test_init_ca_refuses_existing_ca(tmp_path: Path, ca: CertificateAuthority) -> None:
    before = (tmp_path / "ca" / "ca.key").read_bytes()
    with pytest.raises(CyphonicError, match=r"already exists: .*ca\.key"):
        init_ca(tmp_path / "ca", DOMAIN, NOW)
    assert (tmp_path / "ca" / "ca.key").read_bytes() == before


def test_init_ca_refuses_bad_domain(tmp_path: Path) -> None:
    with pytest.raises(FQDNError):
        init_ca(tmp_path / "ca", "bad_domain", NOW)


def test_load_ca_round_trip(tmp_path: Path, ca: CertificateAuthority) -> None:
    loaded = load_ca(tmp_path / "ca")
    assert loaded.cert == ca.cert
    assert loaded.domain == DOMAIN
    assert loaded.key.private_numbers() == ca.key.private_numbers()


def test_load_ca_missing(tmp_path: Path) -> None:
    with pytest.raises(CyphonicError, match=r"no CA in .*ca init"):
        load_ca(tmp_path / "nothing")


def test_load_ca_missing_key(tmp_path: Path, ca: CertificateAuthority) -> None:
    (tmp_path / "ca" / "ca.key").unlink()
    with pytest.raises(CyphonicError, match=r"ca\.key not found"):
        load_ca(tmp_path / "ca")


def test_load_ca_unreadable_key(tmp_path: Path, ca: CertificateAuthority) -> None:
    key = tmp_path / "ca" / "ca.key"
    key.unlink()
    key.mkdir()  # reading a directory fails even for root
    with pytest.raises(CyphonicError, match="cannot read CA key"):
        load_ca(tmp_path / "ca")


def test_load_ca_garbage_and_mismatch(tmp_path: Path, ca: CertificateAuthority) -> None:
    other = init_ca(tmp_path / "other", DOMAIN, NOW)
    (tmp_path / "ca" / "ca.key").write_bytes((tmp_path / "other" / "ca.key").read_bytes())
    with pytest.raises(CyphonicError, match="does not match"):
        load_ca(tmp_path / "ca")
    (tmp_path / "ca" / "ca.key").write_bytes(b"garbage")
    with pytest.raises(CyphonicError, match="not an unencrypted PEM"):
        load_ca(tmp_path / "ca")
    (tmp_path / "ca" / "ca.crt").write_bytes(b"garbage")
    with pytest.raises(CyphonicError, match="not a PEM certificate"):
        load_ca(tmp_path / "ca")
    assert other.cert != ca.cert


# ----------------------------------------------------------------- node keys


def test_generate_node_keys_creates_0600_files(tmp_path: Path, keys: NodeKeys) -> None:
    node = tmp_path / "node"
    assert mode(node / "node.key") == 0o600
    assert mode(node / "x25519.key") == 0o600
    assert len(keys.x25519_public) == 32
    assert len(keys.x25519_private_bytes()) == 32
    assert "key_dir" in repr(keys) and "_rust" not in repr(keys)


def test_generate_node_keys_never_overwrites(tmp_path: Path, keys: NodeKeys) -> None:
    before = (
        (tmp_path / "node" / "node.key").read_bytes(),
        (tmp_path / "node" / "x25519.key").read_bytes(),
    )
    again = generate_node_keys(tmp_path / "node")
    after = (
        (tmp_path / "node" / "node.key").read_bytes(),
        (tmp_path / "node" / "x25519.key").read_bytes(),
    )
    assert before == after
    assert again.x25519_public == keys.x25519_public
    assert again.signing_key.public_key() == keys.signing_key.public_key()


def test_generate_node_keys_completes_a_half_set(tmp_path: Path, keys: NodeKeys) -> None:
    (tmp_path / "node" / "x25519.key").unlink()
    again = generate_node_keys(tmp_path / "node")
    assert again.signing_key.public_key() == keys.signing_key.public_key()
    assert again.x25519_public != keys.x25519_public


def test_load_node_keys_missing(tmp_path: Path) -> None:
    with pytest.raises(CyphonicError, match=r"node\.key not found"):
        load_node_keys(tmp_path)


def test_load_node_keys_wrong_type(tmp_path: Path, keys: NodeKeys) -> None:
    node = tmp_path / "node"
    (node / "x25519.key").write_bytes((node / "node.key").read_bytes())
    with pytest.raises(CyphonicError, match="not an X25519 key"):
        load_node_keys(node)


def test_make_csr(keys: NodeKeys) -> None:
    csr = x509.load_pem_x509_csr(make_csr(keys, "Node1.cy.example"))
    assert csr.is_signature_valid
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "node1.cy.example"
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["node1.cy.example"]
    assert decode_x25519_extension(csr.extensions) == keys.x25519_public


# ----------------------------------------------------------------- node certificates


def test_issue_node_certificate(ca: CertificateAuthority, keys: NodeKeys) -> None:
    cert = issue_node_certificate(ca, make_csr(keys, "n1.cy.example"), "n1.cy.example", 90, NOW)
    cert.verify_directly_issued_by(ca.cert)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "n1.cy.example"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["n1.cy.example"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ext = cert.extensions.get_extension_for_oid(X25519_EXTENSION_OID)
    assert not ext.critical
    assert decode_x25519_extension(cert.extensions) == keys.x25519_public
    assert cert.public_key() == keys.signing_key.public_key()
    assert cert.not_valid_after_utc.timestamp() == pytest.approx(NOW + 90 * DAY)
    other = issue_node_certificate(ca, make_csr(keys, "n1.cy.example"), "n1.cy.example", 90, NOW)
    assert other.serial_number != cert.serial_number


def test_node_certificate_lifetime_is_capped_by_the_ca(
    ca: CertificateAuthority, keys: NodeKeys
) -> None:
    cert = issue_node_certificate(ca, make_csr(keys, "n1.cy.example"), "n1.cy.example", 99999, NOW)
    assert cert.not_valid_after_utc == ca.cert.not_valid_after_utc


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda k: b"not a csr", "not a PEM certificate signing request"),
        (lambda k: csr_with(k, "n2.cy.example", [x509.DNSName("n1.cy.example")]), "subject CN"),
        (lambda k: csr_with(k, None, [x509.DNSName("n1.cy.example")]), "subject CN"),
        (lambda k: csr_with(k, "n1.cy.example", None), "only subjectAltName"),
        (
            lambda k: csr_with(
                k, "n1.cy.example", [x509.DNSName("n1.cy.example"), x509.DNSName("evil.cy.example")]
            ),
            "only subjectAltName",
        ),
        (
            lambda k: csr_with(
                k, "n1.cy.example", [x509.IPAddress(ipaddress.ip_address("10.0.0.1"))]
            ),
            "only subjectAltName",
        ),
        (
            lambda k: csr_with(k, "n1.cy.example", [x509.DNSName("n1.cy.example")], None),
            "lacks the X25519",
        ),
    ],
)
def test_issue_node_certificate_refuses_bad_csr(
    ca: CertificateAuthority, make: object, reason: str
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    assert callable(make)
    with pytest.raises(EnrollmentError, match=reason):
        issue_node_certificate(ca, make(key), "n1.cy.example", 90, NOW)


def test_issue_node_certificate_refuses_malformed_x25519(ca: CertificateAuthority) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    bad = x509.UnrecognizedExtension(X25519_EXTENSION_OID, b"\x04\x02ab")
    pem = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "n1.cy.example")]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("n1.cy.example")]), critical=False)
        .add_extension(bad, critical=False)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    with pytest.raises(EnrollmentError, match="X25519 key extension is malformed"):
        issue_node_certificate(ca, pem, "n1.cy.example", 90, NOW)


def test_issue_node_certificate_refuses_tampered_signature(
    ca: CertificateAuthority, keys: NodeKeys
) -> None:
    csr = x509.load_pem_x509_csr(make_csr(keys, "n1.cy.example"))
    raw = bytearray(csr.public_bytes(serialization.Encoding.DER))
    raw[-5] ^= 0x01  # inside the ECDSA signature
    tampered = x509.load_der_x509_csr(bytes(raw)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(EnrollmentError, match="signature"):
        issue_node_certificate(ca, tampered, "n1.cy.example", 90, NOW)


def test_issue_node_certificate_refuses_non_p256_keys(ca: CertificateAuthority) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = csr_with(rsa_key, "n1.cy.example", [x509.DNSName("n1.cy.example")])
    with pytest.raises(EnrollmentError, match="ECDSA P-256"):
        issue_node_certificate(ca, pem, "n1.cy.example", 90, NOW)
    p384 = ec.generate_private_key(ec.SECP384R1())
    pem = csr_with(p384, "n1.cy.example", [x509.DNSName("n1.cy.example")])
    with pytest.raises(EnrollmentError, match="ECDSA P-256"):
        issue_node_certificate(ca, pem, "n1.cy.example", 90, NOW)


def test_issue_node_certificate_refuses_names_outside_domain(
    ca: CertificateAuthority, keys: NodeKeys
) -> None:
    with pytest.raises(EnrollmentError, match="not under the CYPHONIC domain"):
        issue_node_certificate(ca, make_csr(keys, "n1.other.example"), "n1.other.example", 90, NOW)
    with pytest.raises(EnrollmentError, match="must be positive"):
        issue_node_certificate(ca, make_csr(keys, "n1.cy.example"), "n1.cy.example", 0, NOW)


# ----------------------------------------------------------------- verification


def test_verify_node_certificate(ca: CertificateAuthority, keys: NodeKeys) -> None:
    cert = issue_node_certificate(ca, make_csr(keys, "n1.cy.example"), "n1.cy.example", 90, NOW)
    ident = verify_node_certificate(ca.cert, der(cert), NOW + DAY, "N1.cy.example")
    assert ident.fqdn == "n1.cy.example"
    assert ident.x25519_public == keys.x25519_public
    assert ident.serial == cert.serial_number
    assert ident.not_after == cert.not_valid_after_utc
    assert verify_node_certificate(ca.cert, der(cert), NOW, None) == ident


def test_verify_node_certificate_failures(
    tmp_path: Path, ca: CertificateAuthority, keys: NodeKeys
) -> None:
    cert = issue_node_certificate(ca, make_csr(keys, "n1.cy.example"), "n1.cy.example", 90, NOW)
    with pytest.raises(AuthError, match=r"certificate is for n1\.cy\.example, not n2\.cy\.example"):
        verify_node_certificate(ca.cert, der(cert), NOW, "n2.cy.example")
    with pytest.raises(AuthError, match="expired"):
        verify_node_certificate(ca.cert, der(cert), NOW + 91 * DAY, None)
    later = issue_node_certificate(
        ca, make_csr(keys, "n1.cy.example"), "n1.cy.example", 90, NOW + 2 * DAY
    )
    with pytest.raises(AuthError, match="not valid before"):
        verify_node_certificate(ca.cert, der(later), NOW + DAY, None)
    with pytest.raises(AuthError, match="CA certificate is outside its validity"):
        verify_node_certificate(ca.cert, der(cert), NOW - DAY, None)
    with pytest.raises(AuthError, match="not valid DER"):
        verify_node_certificate(ca.cert, b"\x30\x03\x02\x01", NOW, None)
    other = init_ca(tmp_path / "other", DOMAIN, NOW)
    forged = issue_node_certificate(
        other, make_csr(keys, "n1.cy.example"), "n1.cy.example", 90, NOW
    )
    with pytest.raises(AuthError, match="not issued by this CYPHONIC CA"):
        verify_node_certificate(ca.cert, der(forged), NOW, None)
    with pytest.raises(AuthError, match="CA certificate cannot be used"):
        verify_node_certificate(ca.cert, der(ca.cert), NOW, None)


def test_verify_refuses_server_certificates(ca: CertificateAuthority) -> None:
    server, _ = issue_server_certificate(ca, [], [], NOW)
    with pytest.raises(AuthError, match="client authentication"):
        verify_node_certificate(ca.cert, der(server), NOW, None)


def test_verify_refuses_certificate_without_x25519(ca: CertificateAuthority) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "n1.cy.example")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(dt.datetime.fromtimestamp(NOW - 10, tz=dt.UTC))
        .not_valid_after(dt.datetime.fromtimestamp(NOW + DAY, tz=dt.UTC))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("n1.cy.example")]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )
    with pytest.raises(AuthError, match="lacks the X25519"):
        verify_node_certificate(ca.cert, der(cert), NOW, None)


# ----------------------------------------------------------------- server certificates


def test_issue_server_certificate(ca: CertificateAuthority) -> None:
    cert, key = issue_server_certificate(
        ca, ["cloud.cy.example"], ["192.0.2.1", "2001:db8::1"], NOW
    )
    assert cert.public_key() == key.public_key()
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["as.cy.example", "cloud.cy.example"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("192.0.2.1"),
        ipaddress.ip_address("2001:db8::1"),
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    cert.verify_directly_issued_by(ca.cert)


def test_issue_server_certificate_refuses_out_of_domain_names(ca: CertificateAuthority) -> None:
    with pytest.raises(CyphonicError, match="not under the CYPHONIC domain"):
        issue_server_certificate(ca, ["as.example.com"], [], NOW)
    with pytest.raises(CyphonicError, match="not an IP address"):
        issue_server_certificate(ca, [], ["nonsense"], NOW)
