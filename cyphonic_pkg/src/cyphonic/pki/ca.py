"""The CYPHONIC certificate authority: root key, node and AS certificates, verification.

The CA is an ECDSA P-256 key and a self-signed certificate kept in a directory
(``ca.key``, mode 0600, and ``ca.crt``). Its certificate carries a critical
*name constraint* limiting every certificate it issues to the CYPHONIC domain;
that constraint is also where :func:`load_ca` reads the domain back from.

Every node certificate binds three things together: the node's FQDN (subject CN
and the only SAN dNSName), its ECDSA signing key (the certificate key, used for
mutual TLS with the AS) and its static X25519 key (the Noise key of the data
plane), carried in a private non-critical extension under a UUID-based OID
(ITU-T X.667, ``2.25.<uuid as integer>``; no registration needed)::

    extnValue = OCTET STRING (SIZE (32))   -- the raw X25519 public key

All functions take the clock as ``now``: seconds since the epoch (``time.time()``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import logging
import os
import re
import secrets
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cyphonic.errors import AuthError, CyphonicError, EnrollmentError

__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "X25519_EXTENSION_OID",
    "CertificateAuthority",
    "FQDNError",
    "NodeIdentity",
    "certificate_fqdn",
    "decode_x25519_extension",
    "encode_x25519_extension",
    "init_ca",
    "issue_node_certificate",
    "issue_server_certificate",
    "load_ca",
    "load_ca_certificate",
    "pem_certificates",
    "replace_file",
    "validate_domain",
    "validate_fqdn",
    "verify_node_certificate",
    "write_new_file",
]

logger = logging.getLogger(__name__)

CA_KEY_FILE = "ca.key"
CA_CERT_FILE = "ca.crt"

#: OID of the extension binding a node's static X25519 (Noise) key to its certificate.
#: ``2.25.`` + the integer value of the UUID a74a45f8-ff4b-4843-8051-7898b9ba08ca.
X25519_EXTENSION_OID = x509.ObjectIdentifier("2.25.222366724477469171718741024727650404554")

CA_LIFETIME_DAYS = 3650
#: Certificates start this long before ``now`` so that a peer whose clock lags
#: a little does not see them as "not yet valid".
BACKDATE = dt.timedelta(minutes=5)

_X25519_KEY_LEN = 32
_LABEL_RE = re.compile(r"[a-z0-9-]{1,63}")


class FQDNError(CyphonicError):
    """A name that is not a valid FQDN, or is not under the CYPHONIC domain."""


@dataclass(frozen=True)
class CertificateAuthority:
    """The CYPHONIC root: its key, its certificate and the domain it is constrained to."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    domain: str

    @property
    def cert_pem(self) -> bytes:
        """The CA certificate in PEM (what nodes install as their trust root)."""
        return self.cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class NodeIdentity:
    """What a verified node certificate says about its holder."""

    fqdn: str
    x25519_public: bytes
    serial: int
    not_after: dt.datetime


# --------------------------------------------------------------------------- names


def _check_labels(name: str, what: str) -> None:
    if len(name) > 253:
        raise FQDNError(f"{what} {name!r} is longer than 253 characters")
    for label in name.split("."):
        if not label:
            raise FQDNError(f"{what} {name!r} has an empty label")
        if len(label) > 63:
            raise FQDNError(
                f"{what} {name!r}: label {label[:20]!r}... is longer than 63 characters"
            )
        if not _LABEL_RE.fullmatch(label):
            raise FQDNError(
                f"{what} {name!r}: label {label!r} may only contain a-z, 0-9 and '-' "
                "(internationalised names must be given in punycode)"
            )
        if label.startswith("-") or label.endswith("-"):
            raise FQDNError(f"{what} {name!r}: label {label!r} may not start or end with '-'")


def _normalise(name: str) -> str:
    name = name.lower()
    return name[:-1] if name.endswith(".") else name


def validate_domain(domain: str) -> str:
    """Return the CYPHONIC ``domain`` lowercased, or raise :class:`FQDNError`."""
    if not isinstance(domain, str) or not domain:
        raise FQDNError("the CYPHONIC domain is empty")
    norm = _normalise(domain)
    _check_labels(norm, "domain")
    return norm


def validate_fqdn(fqdn: str, domain: str) -> str:
    """Return ``fqdn`` lowercased (without a trailing dot) if it is a valid name
    strictly below ``domain``; raise :class:`FQDNError` with the reason otherwise.
    """
    if not isinstance(fqdn, str) or not fqdn:
        raise FQDNError("the FQDN is empty")
    dom = validate_domain(domain)
    norm = _normalise(fqdn)
    _check_labels(norm, "FQDN")
    if not norm.endswith("." + dom):
        raise FQDNError(f"{norm!r} is not under the CYPHONIC domain {dom!r}")
    return norm


# --------------------------------------------------------------------------- files


def write_new_file(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` and write ``data``; refuse to overwrite.

    The mode is applied at creation (``O_CREAT | O_EXCL``), so a private key is never
    readable by others, not even for an instant. Raises ``FileExistsError``.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have removed bits we asked for
        with os.fdopen(fd, "wb", closefd=False) as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    finally:
        os.close(fd)


def replace_file(path: Path, data: bytes, mode: int) -> None:
    """Atomically replace (or create) ``path`` with ``data`` and ``mode``."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        write_new_file(tmp, data, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CyphonicError(f"{what} {path} not found") from None
    except OSError as exc:
        raise CyphonicError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


# --------------------------------------------------------------------------- helpers


def _utc(now: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(now, tz=dt.UTC)


def encode_x25519_extension(public_key: bytes) -> x509.UnrecognizedExtension:
    """The X25519 binding extension for a raw 32-byte public key."""
    if len(public_key) != _X25519_KEY_LEN:
        raise ValueError(f"X25519 public key must be 32 bytes, got {len(public_key)}")
    return x509.UnrecognizedExtension(X25519_EXTENSION_OID, b"\x04\x20" + public_key)


def decode_x25519_extension(extensions: x509.Extensions) -> bytes | None:
    """The raw X25519 public key from ``extensions``; ``None`` if absent.

    Raises ``ValueError`` if the extension is present but malformed.
    """
    try:
        ext = extensions.get_extension_for_oid(X25519_EXTENSION_OID)
    except x509.ExtensionNotFound:
        return None
    value = ext.value
    if not isinstance(value, x509.UnrecognizedExtension):  # pragma: no cover - defensive
        raise ValueError("X25519 extension has an unexpected type")
    raw = value.value
    if len(raw) != 2 + _X25519_KEY_LEN or raw[:2] != b"\x04\x20":
        raise ValueError("X25519 extension is not an OCTET STRING of 32 bytes")
    return bytes(raw[2:])


def _single_dns_name(extensions: x509.Extensions) -> str | None:
    """The one dNSName of the SAN if the SAN holds exactly that and nothing else."""
    try:
        san = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    names = list(san)
    if len(names) != 1 or not isinstance(names[0], x509.DNSName):
        return None
    return names[0].value


def _common_names(name: x509.Name) -> list[str]:
    return [str(a.value) for a in name.get_attributes_for_oid(NameOID.COMMON_NAME)]


def certificate_fqdn(cert: x509.Certificate) -> str | None:
    """The FQDN a node certificate is for (its single SAN dNSName), if any."""
    return _single_dns_name(cert.extensions)


def _ca_domain(cert: x509.Certificate) -> str:
    try:
        nc = cert.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        raise CyphonicError(
            "CA certificate has no name constraints: it was not made by 'cyphonic ca init'"
        ) from None
    dns = [n.value for n in nc.permitted_subtrees or [] if isinstance(n, x509.DNSName)]
    if len(dns) != 1:
        raise CyphonicError("CA certificate must permit exactly one DNS subtree (the domain)")
    return validate_domain(dns[0])


# --------------------------------------------------------------------------- CA


def init_ca(ca_dir: Path, domain: str, now: float) -> CertificateAuthority:
    """Create a new CA for ``domain`` in ``ca_dir`` (created mode 0700 if missing).

    Refuses, with the path in the message, if a CA key or certificate is already there.
    """
    domain = validate_domain(domain)
    ca_dir = Path(ca_dir)
    key_path, cert_path = ca_dir / CA_KEY_FILE, ca_dir / CA_CERT_FILE
    for path in (key_path, cert_path):
        if path.exists():
            raise CyphonicError(f"a CA already exists: {path} is present (refusing to overwrite)")
    try:
        ca_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise CyphonicError(f"cannot create CA directory {ca_dir}: {exc.strerror or exc}") from None

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "CYPHONIC"),
            # a random tag keeps two CAs of one domain apart in names and error messages
            x509.NameAttribute(
                NameOID.COMMON_NAME, f"CYPHONIC root CA {domain} {secrets.token_hex(4)}"
            ),
        ]
    )
    start = _utc(now) - BACKDATE
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=CA_LIFETIME_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.NameConstraints(permitted_subtrees=[x509.DNSName(domain)], excluded_subtrees=None),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        write_new_file(key_path, key_pem, 0o600)
        write_new_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    except FileExistsError as exc:
        raise CyphonicError(f"a CA already exists: {exc.filename} appeared meanwhile") from None
    except OSError as exc:
        raise CyphonicError(f"cannot write CA files in {ca_dir}: {exc.strerror or exc}") from None
    logger.info("created CYPHONIC CA for %s in %s", domain, ca_dir)
    return CertificateAuthority(cert=cert, key=key, domain=domain)


def load_ca_certificate(path: Path) -> x509.Certificate:
    """Load a PEM CA certificate (a node's trust root) with a clear error."""
    data = _read_file(Path(path), "CA certificate")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise CyphonicError(f"{path} is not a PEM certificate") from None


def load_ca(ca_dir: Path) -> CertificateAuthority:
    """Load the CA from ``ca_dir`` (``ca.key`` + ``ca.crt``) with clear errors."""
    ca_dir = Path(ca_dir)
    key_path, cert_path = ca_dir / CA_KEY_FILE, ca_dir / CA_CERT_FILE
    if not key_path.exists() and not cert_path.exists():
        raise CyphonicError(f"no CA in {ca_dir} (run 'cyphonic ca init' first)")
    cert = load_ca_certificate(cert_path)
    key_pem = _read_file(key_path, "CA key")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise CyphonicError(f"{key_path} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CyphonicError(f"{key_path} is not an ECDSA key")
    if key.public_key() != cert.public_key():
        raise CyphonicError(f"{key_path} does not match the certificate {cert_path}")
    with contextlib.suppress(OSError):
        if stat.S_IMODE(key_path.stat().st_mode) & 0o077:
            logger.warning("CA key %s is readable by group/others; chmod 600 it", key_path)
    return CertificateAuthority(cert=cert, key=key, domain=_ca_domain(cert))


def _leaf_builder(
    ca: CertificateAuthority,
    subject_cn: str,
    public_key: ec.EllipticCurvePublicKey,
    now: float,
    lifetime_days: int,
) -> x509.CertificateBuilder:
    start = _utc(now) - BACKDATE
    end = min(_utc(now) + dt.timedelta(days=lifetime_days), ca.cert.not_valid_after_utc)
    if end <= _utc(now):
        raise CyphonicError("the CA certificate has expired; create a new CA")
    ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]))
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
    )


def issue_node_certificate(
    ca: CertificateAuthority,
    csr_pem: bytes,
    fqdn: str,
    lifetime_days: int,
    now: float,
) -> x509.Certificate:
    """Check a node's CSR and issue its certificate for ``fqdn``.

    The CSR must be correctly self-signed by an ECDSA P-256 key, name ``fqdn`` as its
    subject CN and as its only SAN dNSName, and carry the X25519 extension, which is
    copied into the certificate. Raises :class:`EnrollmentError` with the reason.
    """
    if lifetime_days <= 0:
        raise EnrollmentError(f"certificate lifetime must be positive, got {lifetime_days} days")
    try:
        fqdn = validate_fqdn(fqdn, ca.domain)
    except FQDNError as exc:
        raise EnrollmentError(str(exc)) from None
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError:
        raise EnrollmentError("the CSR is not a PEM certificate signing request") from None
    try:
        signature_ok = csr.is_signature_valid
        public_key = csr.public_key()
        extensions = csr.extensions
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise EnrollmentError(f"the CSR is malformed: {exc}") from None
    if not signature_ok:
        raise EnrollmentError("the CSR signature does not verify")
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ec.SECP256R1
    ):
        raise EnrollmentError("the CSR key must be an ECDSA P-256 key")
    cns = _common_names(csr.subject)
    if [cn.lower() for cn in cns] != [fqdn]:
        raise EnrollmentError(f"the CSR subject CN is {cns!r}, expected exactly {fqdn!r}")
    san = _single_dns_name(extensions)
    if san is None or san.lower() != fqdn:
        raise EnrollmentError(f"the CSR must name {fqdn!r} as its only subjectAltName dNSName")
    try:
        x25519 = decode_x25519_extension(extensions)
    except ValueError as exc:
        raise EnrollmentError(f"the CSR's X25519 key extension is malformed: {exc}") from None
    if x25519 is None:
        raise EnrollmentError(
            f"the CSR lacks the X25519 key extension ({X25519_EXTENSION_OID.dotted_string})"
        )
    try:
        builder = _leaf_builder(ca, fqdn, public_key, now, lifetime_days)
    except CyphonicError as exc:
        raise EnrollmentError(str(exc)) from None
    return (
        builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(fqdn)]), critical=False)
        .add_extension(encode_x25519_extension(x25519), critical=False)
        .sign(ca.key, hashes.SHA256())
    )


def issue_server_certificate(
    ca: CertificateAuthority,
    dns_names: Iterable[str],
    ip_addresses: Iterable[str | ipaddress.IPv4Address | ipaddress.IPv6Address],
    now: float,
    *,
    lifetime_days: int = 397,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Issue a TLS server certificate (serverAuth) for the AS, with a fresh P-256 key.

    ``as.<domain>`` (the name every client verifies) is always included; other DNS
    names must be under the domain too (the CA's name constraint would make them
    invalid otherwise).
    """
    names: list[str] = [f"as.{ca.domain}"]
    for name in dns_names:
        try:
            norm = validate_fqdn(name, ca.domain)
        except FQDNError as exc:
            raise CyphonicError(f"cannot put {name!r} in the AS certificate: {exc}") from None
        if norm not in names:
            names.append(norm)
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for ip in ip_addresses:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            raise CyphonicError(f"{ip!r} is not an IP address") from None
        if addr not in ips:
            ips.append(addr)
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    sans += [x509.IPAddress(a) for a in ips]
    cert = (
        _leaf_builder(ca, names[0], key.public_key(), now, lifetime_days)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return cert, key


def verify_node_certificate(
    ca_cert: x509.Certificate,
    cert_der: bytes,
    now: float,
    expected_fqdn: str | None,
) -> NodeIdentity:
    """Verify a node certificate (DER) against the CYPHONIC CA.

    Checks: issued and signed by ``ca_cert``, inside its validity window at ``now``
    (and so is the CA), not a CA itself, allowed for TLS client authentication,
    exactly one SAN dNSName under the CA's domain, the X25519 extension, and, if
    ``expected_fqdn`` is given, that the certificate is for that name.
    Raises :class:`AuthError` with the reason.
    """
    try:
        cert = x509.load_der_x509_certificate(cert_der)
    except ValueError:
        raise AuthError("the certificate is not valid DER") from None
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise AuthError(
            f"the certificate was not issued by this CYPHONIC CA (issuer: "
            f"{cert.issuer.rfc4514_string()})"
        ) from None
    t = _utc(now)
    if not ca_cert.not_valid_before_utc <= t <= ca_cert.not_valid_after_utc:
        raise AuthError("the CYPHONIC CA certificate is outside its validity period")
    if t < cert.not_valid_before_utc:
        raise AuthError(
            f"the certificate is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M:%SZ}"
        )
    if t > cert.not_valid_after_utc:
        raise AuthError(f"the certificate expired at {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}")
    try:
        exts = cert.extensions
        try:
            bc = exts.get_extension_for_class(x509.BasicConstraints).value
            if bc.ca:
                raise AuthError("a CA certificate cannot be used as a node certificate")
        except x509.ExtensionNotFound:
            pass
        try:
            eku = exts.get_extension_for_class(x509.ExtendedKeyUsage).value
            if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
                raise AuthError("the certificate is not allowed for client authentication")
        except x509.ExtensionNotFound:
            pass
        fqdn = _single_dns_name(exts)
        x25519 = decode_x25519_extension(exts)
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise AuthError(f"the certificate has malformed extensions: {exc}") from None
    if fqdn is None:
        raise AuthError("the certificate does not name exactly one FQDN in its subjectAltName")
    try:
        fqdn = validate_fqdn(fqdn, _ca_domain(ca_cert))
    except CyphonicError as exc:
        raise AuthError(f"the certificate's name is not acceptable: {exc}") from None
    if x25519 is None:
        raise AuthError("the certificate lacks the X25519 key extension")
    if expected_fqdn is not None and fqdn != _normalise(expected_fqdn):
        raise AuthError(f"certificate is for {fqdn}, not {_normalise(expected_fqdn)}")
    return NodeIdentity(
        fqdn=fqdn,
        x25519_public=x25519,
        serial=cert.serial_number,
        not_after=cert.not_valid_after_utc,
    )


def pem_certificates(certs: Sequence[x509.Certificate]) -> bytes:
    """Concatenated PEM of ``certs``."""
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
