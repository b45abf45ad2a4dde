"""The Authentication Server's logic, without sockets.

Operations (DESIGN §2 flows 1 and 7):

- :meth:`AuthService.enroll`: a one-time token + a CSR made on the node → the node's
  certificate (the private keys never leave the node). The node gets a random
  ``node_id`` and its VIPs on first enrollment and keeps both when it re-enrolls.
- :meth:`AuthService.login`: the node's certificate (from mutual TLS) → a fresh
  node-NMS *common key*, stored for NMS, plus what the node needs to talk to NMS.
- :meth:`AuthService.gn_list`: an adapter, authenticated by its certificate as at login,
  gets the general nodes registered behind it (the paper's "Information Request") and the
  generation counter of the general-node records.
- :meth:`AuthService.gn_enroll`: an adapter, authenticated the same way, gets a
  certificate for one of *its* general nodes (from a CSR made with the general node's own
  keys, which the adapter holds). Ownership is the authorisation: no token. The general
  node then logs in with the ordinary :meth:`AuthService.login`.

A node cannot enroll under the FQDN of a general node (only its adapter can).

The TLS server (:mod:`cyphonic.auth.server`) only frames requests and calls these.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from cryptography.hazmat.primitives import serialization

from cyphonic.errors import AuthError, CyphonicError, EnrollmentError
from cyphonic.pki.ca import (
    CertificateAuthority,
    FQDNError,
    decode_x25519_extension,
    issue_node_certificate,
    validate_domain,
    validate_fqdn,
    verify_node_certificate,
)
from cyphonic.pki.tokens import check_token, consume_token
from cyphonic.store.base import (
    U32_MAX,
    CommonKey,
    DuplicateKeyError,
    GeneralNodeRecord,
    NodeRecord,
    PoolExhaustedError,
    Store,
    StoreError,
)

__all__ = ["COMMON_KEY_BYTES", "AuthService", "EnrollResult", "LoginResult"]

logger = logging.getLogger(__name__)

COMMON_KEY_BYTES = 32


@dataclass(frozen=True)
class EnrollResult:
    """What an enrollment produced: the certificate for the node and its record."""

    cert_pem: bytes
    ca_pem: bytes
    node: NodeRecord


@dataclass(frozen=True)
class LoginResult:
    """What a node learns at login (and the AS returns on the wire)."""

    node_id: int
    fqdn: str
    vip4: IPv4Address
    vip6: IPv6Address
    vip4_pool: str
    vip6_pool: str
    key_id: int
    common_key: bytes = field(repr=False)
    key_expires_at: float
    nms_endpoints: tuple[str, ...]
    domain: str


class AuthService:
    """The AS: enrollment and login against a :class:`~cyphonic.store.base.Store`."""

    def __init__(
        self,
        store: Store,
        ca: CertificateAuthority,
        domain: str,
        pool4: IPv4Network,
        pool6: IPv6Network,
        nms_endpoints: list[str],
        key_lifetime: float,
        cert_lifetime_days: int,
    ) -> None:
        self.store = store
        self.ca = ca
        self.domain = validate_domain(domain)
        if self.domain != ca.domain:
            raise CyphonicError(
                f"the configured domain {self.domain!r} is not the CA's domain {ca.domain!r}"
            )
        if key_lifetime <= 0:
            raise CyphonicError(f"key lifetime must be positive, got {key_lifetime}")
        if cert_lifetime_days <= 0:
            raise CyphonicError(f"certificate lifetime must be positive, got {cert_lifetime_days}")
        self.pool4 = pool4
        self.pool6 = pool6
        self.nms_endpoints = tuple(nms_endpoints)
        self.key_lifetime = key_lifetime
        self.cert_lifetime_days = cert_lifetime_days
        self._ca_pem = ca.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def as_hostname(self) -> str:
        """The TLS name clients verify: ``as.<domain>`` (reserved, never a node)."""
        return f"as.{self.domain}"

    def enroll(self, token: str, fqdn: str, csr_pem: bytes, now: float) -> EnrollResult:
        """Enroll ``fqdn`` with a one-time ``token`` and the node's CSR.

        The token is consumed only once the CSR has been accepted, so a bad CSR does
        not burn it. Raises :class:`EnrollmentError` with the reason.
        """
        try:
            fqdn = validate_fqdn(fqdn, self.domain)
        except FQDNError as exc:
            raise EnrollmentError(str(exc)) from None
        if fqdn == self.as_hostname:
            raise EnrollmentError(f"{fqdn} is reserved for the AS")
        general_node = self.store.get_general_node_by_fqdn(fqdn)
        if general_node is not None:
            raise EnrollmentError(
                f"{fqdn} is a general node behind the adapter {general_node.adapter_fqdn}; "
                "only its adapter can enroll it"
            )
        check_token(self.store, token, fqdn, now)
        cert = issue_node_certificate(self.ca, csr_pem, fqdn, self.cert_lifetime_days, now)
        x25519 = decode_x25519_extension(cert.extensions)
        assert x25519 is not None  # issue_node_certificate guarantees it
        consume_token(self.store, token, fqdn, now)
        try:
            vip4, vip6 = self.store.allocate_vips(fqdn, self.pool4, self.pool6)
        except PoolExhaustedError as exc:
            raise EnrollmentError(f"the AS cannot give {fqdn} an address: {exc}") from None
        node = self.store.upsert_node(
            fqdn=fqdn,
            vip4=vip4,
            vip6=vip6,
            cert_der=cert.public_bytes(serialization.Encoding.DER),
            cert_serial=cert.serial_number,
            x25519_public=x25519,
            enrolled_at=now,
        )
        logger.info(
            "enrolled %s: node_id %d, %s, %s, certificate serial %x",
            fqdn,
            node.node_id,
            vip4,
            vip6,
            cert.serial_number,
        )
        return EnrollResult(
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            ca_pem=self._ca_pem,
            node=node,
        )

    def login(self, peer_cert_der: bytes | None, requested_fqdn: str, now: float) -> LoginResult:
        """Authenticate a node by its certificate and hand out a fresh common key.

        Raises :class:`AuthError`: no or bad certificate, certificate for another
        name, node not enrolled, or a certificate superseded by a later enrollment.
        """
        if peer_cert_der is None:
            raise AuthError("login needs the node's client certificate (node.crt)")
        identity = verify_node_certificate(self.ca.cert, peer_cert_der, now, None)
        try:
            fqdn = validate_fqdn(requested_fqdn, self.domain)
        except FQDNError as exc:
            raise AuthError(str(exc)) from None
        if identity.fqdn != fqdn:
            raise AuthError(f"certificate is for {identity.fqdn}, not {fqdn}")
        node = self.store.get_node_by_fqdn(fqdn)
        if node is None:
            raise AuthError(f"{fqdn} is not enrolled with this AS")
        if node.cert_serial != identity.serial:
            raise AuthError(
                f"this certificate of {fqdn} (serial {identity.serial:x}) was superseded by a "
                "later enrollment; use the newest node.crt"
            )
        key = secrets.token_bytes(COMMON_KEY_BYTES)
        expires_at = now + self.key_lifetime
        for _ in range(64):
            key_id = secrets.randbelow(U32_MAX) + 1
            try:
                self.store.put_common_key(
                    CommonKey(key_id=key_id, node_id=node.node_id, key=key, expires_at=expires_at)
                )
                break
            except DuplicateKeyError:
                continue
        else:  # pragma: no cover - 64 collisions in a 32-bit space
            raise AuthError("the AS could not allocate a key id; try again")
        logger.info("login of %s (node_id %d): key id %d", fqdn, node.node_id, key_id)
        return LoginResult(
            node_id=node.node_id,
            fqdn=fqdn,
            vip4=node.vip4,
            vip6=node.vip6,
            vip4_pool=str(self.pool4),
            vip6_pool=str(self.pool6),
            key_id=key_id,
            common_key=key,
            key_expires_at=expires_at,
            nms_endpoints=self.nms_endpoints,
            domain=self.domain,
        )

    # ------------------------------------------------------------------ general nodes

    def _authenticate(self, cert_der: bytes | None, now: float, op: str) -> NodeRecord:
        """The enrolled node presenting ``cert_der``, verified exactly as at login (CA,
        validity, the current certificate of an enrolled node); :class:`AuthError`."""
        if cert_der is None:
            raise AuthError(f"{op} needs the adapter's client certificate (node.crt)")
        identity = verify_node_certificate(self.ca.cert, cert_der, now, None)
        node = self.store.get_node_by_fqdn(identity.fqdn)
        if node is None:
            raise AuthError(f"{identity.fqdn} is not enrolled with this AS")
        if node.cert_serial != identity.serial:
            raise AuthError(
                f"this certificate of {identity.fqdn} (serial {identity.serial:x}) was "
                "superseded by a later enrollment; use the newest node.crt"
            )
        if self.store.get_general_node_by_fqdn(node.fqdn) is not None:
            raise AuthError(f"{node.fqdn} is a general node, not an adapter")
        return node

    def gn_list(
        self, adapter_cert_der: bytes | None, now: float
    ) -> tuple[int, list[GeneralNodeRecord]]:
        """The generation counter and the general nodes behind the calling adapter.

        The generation is read before the list: if the list changes in between, the
        adapter gets the newer list with the older number and fetches again next time,
        never an old list with a new number. Raises :class:`AuthError`.
        """
        adapter = self._authenticate(adapter_cert_der, now, "gn_list")
        generation = self.store.general_nodes_generation()
        nodes = self.store.list_general_nodes(adapter.fqdn)
        logger.debug("gn_list of %s: %d general nodes", adapter.fqdn, len(nodes))
        return generation, nodes

    def gn_enroll(
        self, adapter_cert_der: bytes | None, gn_fqdn: str, csr_pem: bytes, now: float
    ) -> EnrollResult:
        """Issue the certificate of the general node ``gn_fqdn`` for its adapter.

        The caller must be the adapter the general node is registered behind. The
        certificate has the node profile (X25519 extension included); the general node
        gets (or keeps) a node record with its registered VIPs, so it can log in and NMS
        routes to it like to any node; a new certificate supersedes the previous one.
        Raises :class:`AuthError` if the adapter is not authenticated and
        :class:`EnrollmentError` for every other refusal.
        """
        adapter = self._authenticate(adapter_cert_der, now, "gn_enroll")
        try:
            fqdn = validate_fqdn(gn_fqdn, self.domain)
        except FQDNError as exc:
            raise EnrollmentError(str(exc)) from None
        record = self.store.get_general_node_by_fqdn(fqdn)
        if record is None:
            raise EnrollmentError(
                f"{fqdn} is not a general node registered with this AS "
                "(add it with 'cyphonic general-node add')"
            )
        if record.adapter_fqdn != adapter.fqdn:
            raise EnrollmentError(
                f"general node {fqdn} is behind the adapter {record.adapter_fqdn}, "
                f"not {adapter.fqdn}"
            )
        cert = issue_node_certificate(self.ca, csr_pem, fqdn, self.cert_lifetime_days, now)
        x25519 = decode_x25519_extension(cert.extensions)
        assert x25519 is not None  # issue_node_certificate guarantees it
        try:
            node = self.store.upsert_node(
                fqdn=fqdn,
                vip4=record.vip4,
                vip6=record.vip6,
                cert_der=cert.public_bytes(serialization.Encoding.DER),
                cert_serial=cert.serial_number,
                x25519_public=x25519,
                enrolled_at=now,
            )
        except StoreError as exc:
            raise EnrollmentError(f"the AS cannot store general node {fqdn}: {exc}") from None
        logger.info(
            "enrolled general node %s (%s) for adapter %s: node_id %d, %s, %s, "
            "certificate serial %x",
            fqdn,
            record.mac,
            adapter.fqdn,
            node.node_id,
            record.vip4,
            record.vip6,
            cert.serial_number,
        )
        return EnrollResult(
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            ca_pem=self._ca_pem,
            node=node,
        )
