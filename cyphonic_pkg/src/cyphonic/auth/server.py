"""The AS over TLS: framing, request codec, the asyncio server and its certificate.

Protocol (TCP, default port 4501): TLS 1.3 only. The AS asks for a client certificate
but does not require one (``CERT_OPTIONAL``, trust root: the CYPHONIC CA): enrollment
comes without one; login, ``gn_list`` and ``gn_enroll`` with the caller's node certificate
(for the last two: the adapter's). One request and one response per connection, each a
frame::

    frame   = length:u32 (big-endian, 1..65536) || UTF-8 JSON object of that length

    {"op": "enroll", "token": str, "fqdn": str, "csr": PEM str}
        -> {"ok": true, "cert": PEM str, "ca": PEM str, "node_id": int, "vip4": str, "vip6": str}
    {"op": "login", "fqdn": str}
        -> {"ok": true, "node_id": int, "fqdn": str, "vip4": str, "vip6": str,
            "vip4_pool": CIDR, "vip6_pool": CIDR, "key_id": int, "common_key": base64,
            "key_expires_at": float, "nms_endpoints": [str], "domain": str}
    {"op": "gn_list"}
        -> {"ok": true, "generation": int,
            "general_nodes": [{"mac": "aa:bb:cc:dd:ee:ff", "fqdn": str, "vip4": str,
                               "vip6": str}, ...]}
    {"op": "gn_enroll", "fqdn": str, "csr": PEM str}
        -> {"ok": true, "cert": PEM str, "ca": PEM str, "node_id": int, "vip4": str, "vip6": str}
    any failure
        -> {"ok": false, "code": str, "error": "human-readable reason"}

``code`` is one of ``bad_frame``, ``bad_request`` (the request itself is malformed),
``token_unknown``, ``token_used``, ``token_expired``, ``token_wrong_fqdn``,
``enroll_refused`` (CSR, name, address pool), ``login_refused``, ``refused`` (other
refusals) and ``internal`` (a bug or a broken database on the AS).

General nodes (DESIGN §2 item 7): ``gn_list`` returns the general nodes registered behind
the calling adapter (the paper's "Information Request"), ordered by FQDN, and
``generation``, a counter raised by every change of the general-node records (compare it
for inequality: a different number means "fetch the list again"). ``gn_enroll`` issues the
certificate of one of the caller's general nodes from a CSR the adapter made with that
general node's own keys; ownership is the authorisation (no token). The general node then
logs in with ``login`` and its own certificate. Both need the adapter's client certificate,
verified as at login: without one, or with one the AS does not accept (unknown node,
superseded certificate, the certificate of a general node), the answer is ``login_refused``;
every other refusal of ``gn_enroll`` (unknown general node, one behind another adapter,
bad CSR) is ``enroll_refused``; a list too long for one frame (about 500 general nodes) is
``refused``.

Unknown keys are ignored (room for later versions). Bad input of any kind (TLS
failures, oversized frames, bad JSON, timeouts) is logged with the peer address at
info (rate-limited per address) or debug, counted in :class:`ServerStats`, and never
produces a traceback. Tokens and keys are never logged.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import ssl
import struct
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from cyphonic.auth.service import COMMON_KEY_BYTES, AuthService, EnrollResult, LoginResult
from cyphonic.errors import AuthError, CyphonicError, DecodeError, EnrollmentError
from cyphonic.pki.ca import (
    CertificateAuthority,
    FQDNError,
    issue_server_certificate,
    replace_file,
    validate_fqdn,
)
from cyphonic.store.base import GeneralNodeRecord, is_canonical_mac

__all__ = [
    "AS_CERT_FILE",
    "AS_KEY_FILE",
    "DEFAULT_PORT",
    "MAX_FRAME",
    "REQUEST_TIMEOUT",
    "AuthServer",
    "EnrollRequest",
    "GeneralNodeInfo",
    "GnEnrollRequest",
    "GnListRequest",
    "LoginRequest",
    "Request",
    "ServerStats",
    "build_server_ssl_context",
    "decode_frame",
    "encode_frame",
    "ensure_server_certificate",
    "error_response",
    "frame_length",
    "general_node_to_json",
    "gn_list_answer_from_json",
    "login_result_from_json",
    "login_result_to_json",
    "parse_json_object",
    "parse_request",
    "server_ssl_context",
    "start_as_server",
]

logger = logging.getLogger(__name__)

DEFAULT_PORT = 4501
#: Largest frame payload accepted in either direction.
MAX_FRAME = 64 * 1024
#: Seconds for the TLS handshake, and again for reading the request.
REQUEST_TIMEOUT = 10.0
AS_CERT_FILE = "as.crt"
AS_KEY_FILE = "as.key"

_HEADER = struct.Struct(">I")
_MAX_TOKEN = 256
_MAX_FQDN = 255
_MAX_CSR = 16 * 1024
_I64_MAX = (1 << 63) - 1


# =========================================================================== codec


@dataclass(frozen=True)
class EnrollRequest:
    """``{"op": "enroll", ...}``: a token, the FQDN to enroll and the node's CSR."""

    token: str = field(repr=False)
    fqdn: str
    csr_pem: bytes


@dataclass(frozen=True)
class LoginRequest:
    """``{"op": "login", "fqdn": ...}``: the client certificate comes from TLS."""

    fqdn: str


@dataclass(frozen=True)
class GnListRequest:
    """``{"op": "gn_list"}``: the adapter (its client certificate) asks for its list."""


@dataclass(frozen=True)
class GnEnrollRequest:
    """``{"op": "gn_enroll", ...}``: a certificate for the adapter's general node ``fqdn``."""

    fqdn: str
    csr_pem: bytes


@dataclass(frozen=True)
class GeneralNodeInfo:
    """One general node as ``gn_list`` describes it to its adapter."""

    mac: str
    fqdn: str
    vip4: IPv4Address
    vip6: IPv6Address


Request = EnrollRequest | LoginRequest | GnListRequest | GnEnrollRequest


def frame_length(header: bytes) -> int:
    """The payload length announced by a 4-byte frame header; :class:`DecodeError` if
    it is not in ``1..MAX_FRAME``."""
    if len(header) != _HEADER.size:
        raise DecodeError(f"frame header must be 4 bytes, got {len(header)}")
    (length,) = _HEADER.unpack(header)
    if length == 0:
        raise DecodeError("empty frame")
    if length > MAX_FRAME:
        raise DecodeError(f"frame of {length} bytes exceeds the {MAX_FRAME}-byte limit")
    return int(length)


def encode_frame(obj: Mapping[str, Any]) -> bytes:
    """A frame holding ``obj`` as compact JSON."""
    payload = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("utf-8")
    if len(payload) > MAX_FRAME:
        raise ValueError(f"message of {len(payload)} bytes exceeds the frame limit")
    return _HEADER.pack(len(payload)) + payload


def decode_frame(data: bytes) -> bytes:
    """The payload of one complete frame ``data`` (header included, nothing after)."""
    length = frame_length(data[: _HEADER.size])
    payload = data[_HEADER.size :]
    if len(payload) != length:
        raise DecodeError(f"frame announces {length} bytes but carries {len(payload)}")
    return payload


def parse_json_object(payload: bytes) -> dict[str, Any]:
    """Decode a frame payload as a JSON object; :class:`DecodeError` otherwise."""
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DecodeError(f"not UTF-8 JSON: {str(exc)[:80]}") from None
    if not isinstance(obj, dict):
        raise DecodeError("the message must be a JSON object")
    return obj


def _str_field(obj: Mapping[str, Any], name: str, max_len: int) -> str:
    value = obj.get(name)
    if not isinstance(value, str):
        raise DecodeError(f"field {name!r} must be a string")
    if not value or len(value) > max_len:
        raise DecodeError(f"field {name!r} must be 1..{max_len} characters")
    return value


def _csr_field(obj: Mapping[str, Any]) -> bytes:
    csr = _str_field(obj, "csr", _MAX_CSR)
    try:
        return csr.encode("ascii")
    except UnicodeEncodeError:
        raise DecodeError("field 'csr' must be ASCII PEM") from None


def parse_request(payload: bytes) -> Request:
    """Decode a request payload; :class:`DecodeError` says what is wrong."""
    obj = parse_json_object(payload)
    op = obj.get("op")
    if op == "enroll":
        csr_pem = _csr_field(obj)
        return EnrollRequest(
            token=_str_field(obj, "token", _MAX_TOKEN),
            fqdn=_str_field(obj, "fqdn", _MAX_FQDN),
            csr_pem=csr_pem,
        )
    if op == "login":
        return LoginRequest(fqdn=_str_field(obj, "fqdn", _MAX_FQDN))
    if op == "gn_list":
        return GnListRequest()
    if op == "gn_enroll":
        csr_pem = _csr_field(obj)
        return GnEnrollRequest(fqdn=_str_field(obj, "fqdn", _MAX_FQDN), csr_pem=csr_pem)
    if isinstance(op, str):
        raise DecodeError(f"unknown op {op[:32]!r}")
    raise DecodeError("field 'op' must be a string")


def error_response(code: str, message: str) -> dict[str, Any]:
    """The response for a refused or failed request."""
    return {"ok": False, "code": code, "error": message}


def login_result_to_json(result: LoginResult) -> dict[str, Any]:
    """The wire form of a :class:`LoginResult` (without ``"ok"``)."""
    return {
        "node_id": result.node_id,
        "fqdn": result.fqdn,
        "vip4": str(result.vip4),
        "vip6": str(result.vip6),
        "vip4_pool": result.vip4_pool,
        "vip6_pool": result.vip6_pool,
        "key_id": result.key_id,
        "common_key": base64.b64encode(result.common_key).decode("ascii"),
        "key_expires_at": result.key_expires_at,
        "nms_endpoints": list(result.nms_endpoints),
        "domain": result.domain,
    }


def _int_field(obj: Mapping[str, Any], name: str, lo: int, hi: int) -> int:
    value = obj.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise DecodeError(f"field {name!r} must be an integer in {lo}..{hi}")
    return value


def login_result_from_json(obj: Mapping[str, Any]) -> LoginResult:
    """Decode the AS's login answer; :class:`DecodeError` if anything is off."""
    try:
        vip4 = ip_address(_str_field(obj, "vip4", 64))
        vip6 = ip_address(_str_field(obj, "vip6", 64))
        pool4 = ip_network(_str_field(obj, "vip4_pool", 64))
        pool6 = ip_network(_str_field(obj, "vip6_pool", 64))
    except ValueError as exc:
        raise DecodeError(f"bad address in login answer: {exc}") from None
    if not isinstance(vip4, IPv4Address) or not isinstance(vip6, IPv6Address):
        raise DecodeError("vip4 must be IPv4 and vip6 IPv6")
    if vip4 not in pool4 or vip6 not in pool6:
        raise DecodeError("the VIPs are not inside their pools")
    try:
        key = base64.b64decode(_str_field(obj, "common_key", 64), validate=True)
    except (binascii.Error, ValueError):
        raise DecodeError("common_key is not base64") from None
    if len(key) != COMMON_KEY_BYTES:
        raise DecodeError(f"common_key must be {COMMON_KEY_BYTES} bytes")
    expires = obj.get("key_expires_at")
    if not isinstance(expires, int | float) or isinstance(expires, bool):
        raise DecodeError("field 'key_expires_at' must be a number")
    endpoints = obj.get("nms_endpoints")
    if not isinstance(endpoints, list) or not all(isinstance(e, str) for e in endpoints):
        raise DecodeError("field 'nms_endpoints' must be a list of strings")
    return LoginResult(
        node_id=_int_field(obj, "node_id", 1, 0xFFFFFFFF),
        fqdn=_str_field(obj, "fqdn", _MAX_FQDN),
        vip4=vip4,
        vip6=vip6,
        vip4_pool=str(pool4),
        vip6_pool=str(pool6),
        key_id=_int_field(obj, "key_id", 1, 0xFFFFFFFF),
        common_key=key,
        key_expires_at=float(expires),
        nms_endpoints=tuple(endpoints),
        domain=_str_field(obj, "domain", _MAX_FQDN),
    )


def general_node_to_json(node: GeneralNodeRecord | GeneralNodeInfo) -> dict[str, Any]:
    """One entry of the ``gn_list`` answer."""
    return {"mac": node.mac, "fqdn": node.fqdn, "vip4": str(node.vip4), "vip6": str(node.vip6)}


def gn_list_answer_from_json(
    obj: Mapping[str, Any], domain: str | None = None
) -> tuple[int, list[GeneralNodeInfo]]:
    """Decode the AS's ``gn_list`` answer into ``(generation, general nodes)``.

    Every entry must carry a canonical MAC, an FQDN (under ``domain`` if given), an IPv4
    ``vip4`` and an IPv6 ``vip6``; MACs and FQDNs must be unique. :class:`DecodeError` if
    anything is off.
    """
    generation = _int_field(obj, "generation", 0, _I64_MAX)
    entries = obj.get("general_nodes")
    if not isinstance(entries, list):
        raise DecodeError("field 'general_nodes' must be a list")
    nodes: list[GeneralNodeInfo] = []
    macs: set[str] = set()
    fqdns: set[str] = set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise DecodeError(f"general_nodes[{i}] must be an object")
        mac = _str_field(entry, "mac", 17)
        if not is_canonical_mac(mac):
            raise DecodeError(f"general_nodes[{i}]: bad MAC {mac!r}")
        fqdn = _str_field(entry, "fqdn", _MAX_FQDN)
        if domain is not None:
            try:
                if validate_fqdn(fqdn, domain) != fqdn:
                    raise DecodeError(f"general_nodes[{i}]: FQDN {fqdn!r} is not canonical")
            except FQDNError as exc:
                raise DecodeError(f"general_nodes[{i}]: {exc}") from None
        try:
            vip4 = ip_address(_str_field(entry, "vip4", 64))
            vip6 = ip_address(_str_field(entry, "vip6", 64))
        except ValueError as exc:
            raise DecodeError(f"general_nodes[{i}]: bad address: {exc}") from None
        if not isinstance(vip4, IPv4Address) or not isinstance(vip6, IPv6Address):
            raise DecodeError(f"general_nodes[{i}]: vip4 must be IPv4 and vip6 IPv6")
        if mac in macs or fqdn in fqdns:
            raise DecodeError(f"general_nodes[{i}]: {mac} / {fqdn} is listed twice")
        macs.add(mac)
        fqdns.add(fqdn)
        nodes.append(GeneralNodeInfo(mac=mac, fqdn=fqdn, vip4=vip4, vip6=vip6))
    return generation, nodes


# =========================================================================== certificate


def _server_cert_fits(
    cert: x509.Certificate,
    ca: CertificateAuthority,
    dns_names: list[str],
    ips: list[IPv4Address | IPv6Address],
    now: float,
    renew_before_days: float,
) -> str | None:
    """Why the existing AS certificate must be replaced, or ``None`` if it fits."""
    try:
        cert.verify_directly_issued_by(ca.cert)
    except (ValueError, TypeError, InvalidSignature):
        return "not issued by the current CA"
    if cert.not_valid_after_utc.timestamp() - now < renew_before_days * 86400:
        return "expires soon"
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "has no subjectAltName"
    have_dns = set(san.get_values_for_type(x509.DNSName))
    have_ips = set(san.get_values_for_type(x509.IPAddress))
    if not set(dns_names) <= have_dns or not set(ips) <= have_ips:
        return "does not cover the configured names"
    return None


def ensure_server_certificate(
    ca: CertificateAuthority,
    state_dir: Path,
    now: float,
    *,
    dns_names: Iterable[str] = (),
    ip_addresses: Iterable[str | IPv4Address | IPv6Address] = (),
    renew_before_days: float = 30,
) -> tuple[Path, Path]:
    """Return ``(as.crt, as.key)`` in ``state_dir``, issuing them with the CA if they are
    missing, unreadable, not from this CA, expiring within ``renew_before_days`` or not
    covering ``as.<domain>`` + ``dns_names`` + ``ip_addresses``.
    """
    state_dir = Path(state_dir)
    cert_path, key_path = state_dir / AS_CERT_FILE, state_dir / AS_KEY_FILE
    names = [f"as.{ca.domain}"] + [validate_fqdn(n, ca.domain) for n in dns_names]
    ips = [ip_address(a) for a in ip_addresses]
    reason = "missing"
    if cert_path.exists() and key_path.exists():
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError):
            reason = "unreadable"
        else:
            if key.public_key() != cert.public_key():
                reason = "key does not match"
            else:
                why = _server_cert_fits(cert, ca, names, ips, now, renew_before_days)
                if why is None:
                    return cert_path, key_path
                reason = why
    cert, key = issue_server_certificate(ca, names[1:], ips, now)
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        replace_file(
            key_path,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            0o600,
        )
        replace_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    except OSError as exc:
        raise CyphonicError(
            f"cannot write the AS certificate in {state_dir}: {exc.strerror or exc}"
        ) from None
    logger.info("issued AS certificate %s (previous one %s)", cert_path, reason)
    return cert_path, key_path


def build_server_ssl_context(cert_path: Path, key_path: Path, ca_pem: bytes) -> ssl.SSLContext:
    """TLS 1.3-only server context; client certificates optional, trusted if from the CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.num_tickets = 0  # one request per connection: resumption is useless
    try:
        ctx.load_cert_chain(str(cert_path), str(key_path))
        ctx.load_verify_locations(cadata=ca_pem.decode("ascii"))
    except (OSError, ssl.SSLError) as exc:
        raise CyphonicError(f"cannot load the AS TLS certificate {cert_path}: {exc}") from None
    return ctx


def server_ssl_context(
    ca: CertificateAuthority,
    state_dir: Path,
    now: float,
    *,
    dns_names: Iterable[str] = (),
    ip_addresses: Iterable[str | IPv4Address | IPv6Address] = (),
) -> ssl.SSLContext:
    """:func:`ensure_server_certificate` then :func:`build_server_ssl_context`."""
    cert_path, key_path = ensure_server_certificate(
        ca, state_dir, now, dns_names=dns_names, ip_addresses=ip_addresses
    )
    return build_server_ssl_context(cert_path, key_path, ca.cert_pem)


# =========================================================================== server


@dataclass
class ServerStats:
    """Counters of what the AS server saw (for ``status`` and tests)."""

    connections: int = 0
    busy_rejected: int = 0
    tls_failures: int = 0
    bad_frames: int = 0
    timeouts: int = 0
    enrolled: int = 0
    logged_in: int = 0
    gn_listed: int = 0
    gn_enrolled: int = 0
    refused: int = 0
    internal_errors: int = 0


class _LogLimiter:
    """At most one info-level line per source address per ``interval`` seconds."""

    def __init__(self, interval: float = 60.0, max_sources: int = 4096) -> None:
        self.interval = interval
        self.max_sources = max_sources
        self._last: dict[str, float] = {}

    def level(self, source: str, now: float) -> int:
        last = self._last.get(source)
        if last is not None and now - last < self.interval:
            return logging.DEBUG
        if len(self._last) >= self.max_sources:
            self._last.clear()
        self._last[source] = now
        return logging.INFO


def _peer_name(writer: asyncio.StreamWriter) -> tuple[str, str]:
    """``(host, "host:port")`` of the peer, for logs."""
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = str(peer[0])
        return host, (f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}")
    return "?", "?"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"client certificate rejected: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _enroll_answer(enrolled: EnrollResult) -> dict[str, Any]:
    return {
        "ok": True,
        "cert": enrolled.cert_pem.decode("ascii"),
        "ca": enrolled.ca_pem.decode("ascii"),
        "node_id": enrolled.node.node_id,
        "vip4": str(enrolled.node.vip4),
        "vip6": str(enrolled.node.vip6),
    }


class AuthServer:
    """Connection handling for the AS: TLS, one framed request, one framed answer."""

    def __init__(
        self,
        service: AuthService,
        ssl_context: ssl.SSLContext,
        *,
        clock: Callable[[], float] = time.time,
        timeout: float = REQUEST_TIMEOUT,
        max_connections: int = 256,
        stats: ServerStats | None = None,
    ) -> None:
        self.service = service
        self.ssl_context = ssl_context
        self.clock = clock
        self.timeout = timeout
        self.max_connections = max_connections
        self.stats = stats if stats is not None else ServerStats()
        self._active = 0
        self._limiter = _LogLimiter()

    def handle_request(self, request: Request, peer_cert_der: bytes | None) -> dict[str, Any]:
        """Run one decoded request through the service; always returns a response."""
        now = self.clock()
        try:
            if isinstance(request, EnrollRequest):
                enrolled = self.service.enroll(request.token, request.fqdn, request.csr_pem, now)
                self.stats.enrolled += 1
                return _enroll_answer(enrolled)
            if isinstance(request, LoginRequest):
                result = self.service.login(peer_cert_der, request.fqdn, now)
                self.stats.logged_in += 1
                return {"ok": True, **login_result_to_json(result)}
            if isinstance(request, GnListRequest):
                generation, nodes = self.service.gn_list(peer_cert_der, now)
                answer = {
                    "ok": True,
                    "generation": generation,
                    "general_nodes": [general_node_to_json(n) for n in nodes],
                }
                try:
                    encode_frame(answer)
                except ValueError:
                    raise CyphonicError(
                        f"the list of {len(nodes)} general nodes does not fit in one answer "
                        f"({MAX_FRAME} bytes)"
                    ) from None
                self.stats.gn_listed += 1
                return answer
            enrolled = self.service.gn_enroll(peer_cert_der, request.fqdn, request.csr_pem, now)
            self.stats.gn_enrolled += 1
            return _enroll_answer(enrolled)
        except EnrollmentError as exc:
            code = getattr(exc, "code", None)
            return self._refuse(request, code if isinstance(code, str) else "enroll_refused", exc)
        except AuthError as exc:
            return self._refuse(request, "login_refused", exc)
        except CyphonicError as exc:
            return self._refuse(request, "refused", exc)

    def _refuse(self, request: Request, code: str, exc: Exception) -> dict[str, Any]:
        self.stats.refused += 1
        if isinstance(request, GnListRequest):
            logger.info("refused gn_list: %s", exc)
            return error_response(code, str(exc))
        if isinstance(request, EnrollRequest):
            op = "enroll"
        elif isinstance(request, LoginRequest):
            op = "login"
        else:
            op = "gn_enroll"
        logger.info("refused %s of %r: %s", op, request.fqdn[:64], exc)
        return error_response(code, str(exc))

    async def handle_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """asyncio ``start_server`` callback; never raises."""
        host, peer = _peer_name(writer)
        self.stats.connections += 1
        if self._active >= self.max_connections:
            self.stats.busy_rejected += 1
            logger.log(
                self._limiter.level(host, time.monotonic()),
                "AS busy, dropping connection from %s",
                peer,
            )
            writer.transport.abort()
            return
        self._active += 1
        try:
            await self._serve(reader, writer, host, peer)
        except asyncio.CancelledError:
            # The server is shutting down. End quietly: Python 3.11's start_server
            # would log a spurious error for a handler task that ends cancelled.
            writer.transport.abort()
        except Exception as exc:  # a bug, not bad input: log it in full
            self.stats.internal_errors += 1
            logger.error("internal error serving %s: %s", peer, _describe(exc), exc_info=True)
        finally:
            self._active -= 1
            writer.close()  # the TLS shutdown finishes in the background

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, peer: str
    ) -> None:
        # The TLS upgrade must come first, before anything is read in clear text.
        try:
            await writer.start_tls(self.ssl_context, ssl_handshake_timeout=self.timeout)
        except (TimeoutError, OSError, EOFError, ssl.SSLError) as exc:
            self.stats.tls_failures += 1
            logger.log(
                self._limiter.level(host, time.monotonic()),
                "TLS handshake with %s failed: %s",
                peer,
                _describe(exc),
            )
            return
        try:
            async with asyncio.timeout(self.timeout):
                header = await reader.readexactly(_HEADER.size)
                try:
                    length = frame_length(header)
                except DecodeError as exc:
                    self.stats.bad_frames += 1
                    logger.log(
                        self._limiter.level(host, time.monotonic()),
                        "bad frame from %s: %s",
                        peer,
                        exc,
                    )
                    await self._send(writer, error_response("bad_frame", str(exc)))
                    return
                payload = await reader.readexactly(length)
        except asyncio.IncompleteReadError:
            self.stats.bad_frames += 1
            logger.debug("%s closed the connection before a complete request", peer)
            return
        except TimeoutError:
            self.stats.timeouts += 1
            logger.debug("%s sent no complete request within %g s", peer, self.timeout)
            return
        except (OSError, ssl.SSLError) as exc:
            self.stats.tls_failures += 1
            logger.debug("connection from %s failed: %s", peer, _describe(exc))
            return
        try:
            request = parse_request(payload)
        except DecodeError as exc:
            self.stats.bad_frames += 1
            logger.log(
                self._limiter.level(host, time.monotonic()), "bad request from %s: %s", peer, exc
            )
            await self._send(writer, error_response("bad_request", str(exc)))
            return
        peer_cert: bytes | None = None
        ssl_object = writer.get_extra_info("ssl_object")
        if isinstance(ssl_object, ssl.SSLObject):
            peer_cert = ssl_object.getpeercert(binary_form=True)
        try:
            response = self.handle_request(request, peer_cert)
        except Exception as exc:  # a bug or a broken database: say so, log it in full
            self.stats.internal_errors += 1
            logger.error("internal error serving %s: %s", peer, _describe(exc), exc_info=True)
            response = error_response("internal", "internal error in the AS; see its log")
        await self._send(writer, response)

    async def _send(self, writer: asyncio.StreamWriter, response: Mapping[str, Any]) -> None:
        try:
            writer.write(encode_frame(response))
            await asyncio.wait_for(writer.drain(), timeout=self.timeout)
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            logger.debug("could not send the answer: %s", _describe(exc))


class _StreamProtocol(asyncio.StreamReaderProtocol):
    """``asyncio.start_server``'s protocol, minus a spurious warning.

    The connection starts in clear text and is upgraded with ``start_tls``; a peer
    whose close_notify arrives with its last bytes makes asyncio call
    ``eof_received`` before it knows the stream is TLS, and log a warning about
    the ``True`` it returns. Half-closed connections are of no use here anyway.
    """

    def eof_received(self) -> bool:
        super().eof_received()
        return False


async def start_as_server(
    service: AuthService,
    host: str | list[str] | None,
    port: int,
    ssl_context: ssl.SSLContext,
    *,
    clock: Callable[[], float] = time.time,
    timeout: float = REQUEST_TIMEOUT,
    stats: ServerStats | None = None,
) -> asyncio.Server:
    """Listen for AS requests on ``host:port`` (``port`` 0 picks a free one).

    Build ``ssl_context`` with :func:`server_ssl_context` (or
    :func:`build_server_ssl_context`). Pass ``stats`` to read the counters.
    """
    handler = AuthServer(service, ssl_context, clock=clock, timeout=timeout, stats=stats)
    loop = asyncio.get_running_loop()

    def factory() -> _StreamProtocol:
        reader = asyncio.StreamReader(limit=MAX_FRAME + 1024, loop=loop)
        return _StreamProtocol(reader, handler.handle_connection, loop=loop)

    server = await loop.create_server(factory, host, port)
    logger.info(
        "AS listening on %s",
        ", ".join(str(s.getsockname()[:2]) for s in server.sockets),
    )
    return server
