"""A node's own keys: generated locally, never sent anywhere.

``key_dir`` holds (file names below are fixed):

- ``node.key``   ECDSA P-256 signing key (PKCS#8 PEM, mode 0600): the certificate key,
  used for mutual TLS with the AS;
- ``x25519.key`` static X25519 key (PKCS#8 PEM, mode 0600): the node's Noise key,
  bound to its certificate by the X25519 extension;
- ``node.crt``   the node certificate, written by enrollment;
- ``ca.crt``     the CYPHONIC root CA certificate (the trust root).

Only the CSR (:func:`make_csr`) leaves the node.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.x509.oid import NameOID

from cyphonic.errors import CyphonicError
from cyphonic.pki.ca import encode_x25519_extension, write_new_file

__all__ = [
    "CA_CERT_FILE",
    "NODE_CERT_FILE",
    "NODE_KEY_FILE",
    "X25519_KEY_FILE",
    "NodeKeys",
    "generate_node_keys",
    "load_node_keys",
    "make_csr",
]

logger = logging.getLogger(__name__)

NODE_KEY_FILE = "node.key"
X25519_KEY_FILE = "x25519.key"
NODE_CERT_FILE = "node.crt"
CA_CERT_FILE = "ca.crt"


@dataclass(frozen=True)
class NodeKeys:
    """A node's signing key and static X25519 key, and where they live."""

    key_dir: Path
    signing_key: ec.EllipticCurvePrivateKey = field(repr=False)
    x25519_key: x25519.X25519PrivateKey = field(repr=False)

    @property
    def key_path(self) -> Path:
        """Path of ``node.key``."""
        return self.key_dir / NODE_KEY_FILE

    @property
    def cert_path(self) -> Path:
        """Path of ``node.crt`` (may not exist yet)."""
        return self.key_dir / NODE_CERT_FILE

    @property
    def ca_cert_path(self) -> Path:
        """Path of the node's copy of ``ca.crt`` (may not exist yet)."""
        return self.key_dir / CA_CERT_FILE

    @property
    def x25519_public(self) -> bytes:
        """The raw 32-byte X25519 public key."""
        return self.x25519_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def x25519_private_bytes(self) -> bytes:
        """The raw 32-byte X25519 private key (for the Noise handshake)."""
        return self.x25519_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )


def _pkcs8(key: ec.EllipticCurvePrivateKey | x25519.X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_private(path: Path) -> object:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CyphonicError(
            f"{path} not found (generate the node keys with 'cyphonic enroll')"
        ) from None
    except OSError as exc:
        raise CyphonicError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise CyphonicError(f"{path} is not an unencrypted PEM private key") from None


def _load_signing(path: Path) -> ec.EllipticCurvePrivateKey:
    key = _load_private(path)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise CyphonicError(f"{path} is not an ECDSA P-256 key")
    return key


def _load_x25519(path: Path) -> x25519.X25519PrivateKey:
    key = _load_private(path)
    if not isinstance(key, x25519.X25519PrivateKey):
        raise CyphonicError(f"{path} is not an X25519 key")
    return key


def load_node_keys(key_dir: Path) -> NodeKeys:
    """Load the node's keys from ``key_dir``; clear error if missing or unreadable."""
    key_dir = Path(key_dir)
    return NodeKeys(
        key_dir=key_dir,
        signing_key=_load_signing(key_dir / NODE_KEY_FILE),
        x25519_key=_load_x25519(key_dir / X25519_KEY_FILE),
    )


def generate_node_keys(key_dir: Path) -> NodeKeys:
    """Load the node's keys from ``key_dir``, creating whichever is missing.

    Existing keys are never overwritten. New key files are created mode 0600,
    ``key_dir`` mode 0700 if it has to be created.
    """
    key_dir = Path(key_dir)
    try:
        key_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise CyphonicError(
            f"cannot create key directory {key_dir}: {exc.strerror or exc}"
        ) from None
    for name in (NODE_KEY_FILE, X25519_KEY_FILE):
        path = key_dir / name
        if path.exists():
            continue
        new: ec.EllipticCurvePrivateKey | x25519.X25519PrivateKey = (
            ec.generate_private_key(ec.SECP256R1())
            if name == NODE_KEY_FILE
            else x25519.X25519PrivateKey.generate()
        )
        try:
            write_new_file(path, _pkcs8(new), 0o600)
            logger.info("generated %s", path)
        except FileExistsError:
            pass  # created concurrently: load what is there
        except OSError as exc:
            raise CyphonicError(f"cannot write {path}: {exc.strerror or exc}") from None
    return load_node_keys(key_dir)


def make_csr(keys: NodeKeys, fqdn: str) -> bytes:
    """A PEM CSR for ``fqdn`` (subject CN and SAN) carrying the X25519 extension."""
    fqdn = fqdn.lower().rstrip(".")
    if not fqdn:
        raise CyphonicError("cannot make a CSR for an empty FQDN")
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, fqdn)]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(fqdn)]), critical=False)
        .add_extension(encode_x25519_extension(keys.x25519_public), critical=False)
        .sign(keys.signing_key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)
