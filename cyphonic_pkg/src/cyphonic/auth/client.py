"""Node side of the AS protocol: enrollment and login, and the adapter's general-node
requests.

Each function opens a TLS 1.3 connection to the AS, verifies it against the CYPHONIC root
CA under the name ``as.<domain>`` (whatever address it is reached at), sends one request
and reads one answer. Every failure becomes one clear line: :class:`EnrollmentError` for
:func:`enroll` and :func:`gn_enroll`, :class:`AuthError` for :func:`login` and
:func:`gn_list`.

An adapter authenticates :func:`gn_list` and :func:`gn_enroll` with its own node
certificate (``adapter_key_dir/node.crt``). It keeps each general node's keys in a
directory of their own (``gn_key_dir``, laid out like a node's ``key_dir``); a general
node then logs in with :func:`login` and that directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as errno_mod
import os
import re
import socket
import ssl
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cyphonic.auth.server import (
    GeneralNodeInfo,
    encode_frame,
    frame_length,
    gn_list_answer_from_json,
    login_result_from_json,
    parse_json_object,
)
from cyphonic.auth.service import LoginResult
from cyphonic.errors import AuthError, CyphonicError, DecodeError, EnrollmentError
from cyphonic.pki.ca import (
    load_ca_certificate,
    replace_file,
    validate_domain,
    validate_fqdn,
    verify_node_certificate,
)
from cyphonic.pki.node_keys import (
    CA_CERT_FILE,
    NODE_CERT_FILE,
    NODE_KEY_FILE,
    NodeKeys,
    generate_node_keys,
    make_csr,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "GeneralNodeInfo",
    "client_ssl_context",
    "enroll",
    "gn_enroll",
    "gn_list",
    "login",
]

DEFAULT_TIMEOUT = 10.0

_ERRNO_RE = re.compile(r"\[Errno (\d+)\]")

#: TLS alerts the AS sends when it refuses our client certificate.
_ALERTS = {
    "TLSV1_ALERT_UNKNOWN_CA": "the AS does not trust this node's certificate (unknown CA): "
    "node.crt was not issued by this cloud's CA",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the AS refused this node's certificate: it has expired "
    "(enroll again)",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the AS requires a client certificate",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the AS refused this node's certificate (bad certificate)",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "the AS refused this node's certificate "
    "(unsupported certificate)",
    "TLSV1_ALERT_DECRYPT_ERROR": "the AS refused this node's certificate (signature check failed)",
    "TLSV1_ALERT_PROTOCOL_VERSION": "the AS and this node share no TLS version (TLS 1.3 needed)",
    "WRONG_VERSION_NUMBER": "the peer does not speak TLS (wrong port?)",
}


def _where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _os_reason(exc: OSError) -> str:
    """``"Connection refused"`` rather than asyncio's ``Connect call failed (...)``."""
    if isinstance(exc, socket.gaierror):
        return str(exc.strerror or exc)
    code = exc.errno
    if code is None:
        match = _ERRNO_RE.search(str(exc))
        code = int(match.group(1)) if match else None
    if code is not None and code > 0:
        return os.strerror(code)
    return str(exc) or type(exc).__name__


def client_ssl_context(
    ca_cert_path: Path, cert_path: Path | None = None, key_path: Path | None = None
) -> ssl.SSLContext:
    """TLS 1.3-only client context trusting only the CYPHONIC CA (plus the node's own
    certificate and key for login). Raises :class:`CyphonicError` on unusable files."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    try:
        ctx.load_verify_locations(cafile=str(ca_cert_path))
    except FileNotFoundError:
        raise CyphonicError(f"CA certificate {ca_cert_path} not found") from None
    except (OSError, ssl.SSLError) as exc:
        raise CyphonicError(f"cannot load CA certificate {ca_cert_path}: {exc}") from None
    if cert_path is not None and key_path is not None:
        try:
            ctx.load_cert_chain(str(cert_path), str(key_path))
        except FileNotFoundError as exc:
            raise CyphonicError(f"{exc.filename or cert_path} not found (enroll first)") from None
        except (OSError, ssl.SSLError) as exc:
            raise CyphonicError(
                f"cannot load the node certificate {cert_path} with key {key_path}: {exc}"
            ) from None
    return ctx


async def _exchange(
    host: str,
    port: int,
    ctx: ssl.SSLContext,
    server_hostname: str,
    request: dict[str, Any],
    ca_cert_path: Path,
    timeout: float,
    eof_hint: str = "",
) -> dict[str, Any]:
    """Send ``request`` and return the AS's answer object; :class:`CyphonicError` with a
    one-line reason on any failure (the caller re-raises it as its own type)."""
    where = _where(host, port)
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                host,
                port,
                ssl=ctx,
                server_hostname=server_hostname,
                ssl_handshake_timeout=timeout,
            )
            writer.write(encode_frame(request))
            await writer.drain()
            length = frame_length(await reader.readexactly(4))
            return parse_json_object(await reader.readexactly(length))
    except TimeoutError:
        raise CyphonicError(f"the AS at {where} did not answer within {timeout:g} s") from None
    except ssl.SSLCertVerificationError as exc:
        raise CyphonicError(
            f"TLS verification of the AS at {where} as {server_hostname} failed: "
            f"{exc.verify_message or exc.reason}; is {ca_cert_path} the CA of this CYPHONIC cloud?"
        ) from None
    except ssl.SSLError as exc:
        reason = str(exc.reason or "")
        text = _ALERTS.get(reason, f"TLS failed: {reason or exc}")
        raise CyphonicError(f"AS at {where}: {text}") from None
    except asyncio.IncompleteReadError:
        raise CyphonicError(
            f"the AS at {where} closed the connection without answering{eof_hint}"
        ) from None
    except DecodeError as exc:
        raise CyphonicError(f"the AS at {where} sent a malformed answer: {exc}") from None
    except ConnectionResetError:
        raise CyphonicError(f"the AS at {where} reset the connection{eof_hint}") from None
    except OSError as exc:
        if exc.errno in (errno_mod.EPIPE, errno_mod.ECONNABORTED):
            raise CyphonicError(f"the AS at {where} dropped the connection") from None
        raise CyphonicError(f"cannot reach AS at {where}: {_os_reason(exc)}") from None
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), timeout=1.0)


def _refusal(resp: dict[str, Any]) -> str:
    error = resp.get("error")
    code = resp.get("code")
    text = error if isinstance(error, str) and error else "no reason given"
    return f"{text} ({code})" if isinstance(code, str) and code else text


async def enroll(
    as_host: str,
    as_port: int,
    ca_cert_path: Path,
    token: str,
    fqdn: str,
    key_dir: Path,
    domain: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
) -> Path:
    """Enroll this node as ``fqdn``; returns the path of the new ``node.crt``.

    The keys are made (or reused) in ``key_dir`` and only the CSR is sent. The answer
    is checked (issued by the trusted CA, for ``fqdn``, for our two keys) before
    ``node.crt`` is written; ``ca.crt`` (the trust root used) is copied next to it.
    """
    key_dir = Path(key_dir)
    ca_cert_path = Path(ca_cert_path)
    try:
        fqdn = validate_fqdn(fqdn, domain)
        ca_cert = load_ca_certificate(ca_cert_path)
        keys = generate_node_keys(key_dir)
        ctx = client_ssl_context(ca_cert_path)
        request = {
            "op": "enroll",
            "token": token.strip(),
            "fqdn": fqdn,
            "csr": make_csr(keys, fqdn).decode("ascii"),
        }
        resp = await _exchange(
            as_host,
            as_port,
            ctx,
            f"as.{domain.lower().rstrip('.')}",
            request,
            ca_cert_path,
            timeout,
        )
    except EnrollmentError:
        raise
    except CyphonicError as exc:
        raise EnrollmentError(str(exc)) from None
    if resp.get("ok") is not True:
        raise EnrollmentError(f"the AS refused to enroll {fqdn}: {_refusal(resp)}")
    return _store_certificate(resp, ca_cert, ca_cert_path, keys, fqdn, "this node's")


def _store_certificate(
    resp: dict[str, Any],
    ca_cert: x509.Certificate,
    ca_cert_path: Path,
    keys: NodeKeys,
    fqdn: str,
    whose: str,
) -> Path:
    """Check the certificate of an accepted enrollment (issued by the trusted CA, for
    ``fqdn``, for ``keys``), then write it and the CA certificate to ``keys.key_dir``."""
    key_dir = keys.key_dir
    cert_pem = resp.get("cert")
    if not isinstance(cert_pem, str):
        raise EnrollmentError("the AS answered without a certificate")
    try:
        cert = x509.load_pem_x509_certificate(cert_pem.encode("ascii"))
        identity = verify_node_certificate(
            ca_cert, cert.public_bytes(serialization.Encoding.DER), time.time(), fqdn
        )
    except (ValueError, UnicodeEncodeError):
        raise EnrollmentError("the AS sent a certificate that does not parse") from None
    except AuthError as exc:
        raise EnrollmentError(f"the AS sent an unusable certificate: {exc}") from None
    if cert.public_key() != keys.signing_key.public_key() or (
        identity.x25519_public != keys.x25519_public
    ):
        raise EnrollmentError(f"the AS sent a certificate for other keys than {whose}")
    cert_path = key_dir / NODE_CERT_FILE
    try:
        local_ca = key_dir / CA_CERT_FILE
        if not (local_ca.exists() and local_ca.samefile(ca_cert_path)):
            replace_file(local_ca, ca_cert_path.read_bytes(), 0o644)
        replace_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    except OSError as exc:
        raise EnrollmentError(f"cannot write {cert_path}: {exc.strerror or exc}") from None
    return cert_path


def _check_own_certificate(ca_cert_path: Path, cert_path: Path) -> None:
    """Fail early, with the reason, if ``node.crt`` cannot pass the AS's TLS check:
    the AS drops such connections during the handshake without an answer."""
    ca_cert = load_ca_certificate(ca_cert_path)
    try:
        pem = cert_path.read_bytes()
    except FileNotFoundError:
        raise AuthError(f"{cert_path} not found: enroll this node first") from None
    except OSError as exc:
        raise AuthError(f"cannot read {cert_path}: {exc.strerror or exc}") from None
    try:
        der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    except ValueError:
        raise AuthError(f"{cert_path} is not a PEM certificate") from None
    try:
        verify_node_certificate(ca_cert, der, time.time(), None)
    except AuthError as exc:
        raise AuthError(f"{cert_path} cannot be used with the CA {ca_cert_path}: {exc}") from None


async def login(
    as_host: str,
    as_port: int,
    ca_cert_path: Path,
    key_dir: Path,
    fqdn: str,
    domain: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
) -> LoginResult:
    """Log in to the AS with ``key_dir/node.crt``; returns the common key and the rest."""
    key_dir = Path(key_dir)
    ca_cert_path = Path(ca_cert_path)
    cert_path = key_dir / NODE_CERT_FILE
    try:
        fqdn = validate_fqdn(fqdn, domain)
        domain = domain.lower().rstrip(".")
        _check_own_certificate(ca_cert_path, cert_path)
        ctx = client_ssl_context(ca_cert_path, cert_path, key_dir / NODE_KEY_FILE)
        resp = await _exchange(
            as_host,
            as_port,
            ctx,
            f"as.{domain}",
            {"op": "login", "fqdn": fqdn},
            ca_cert_path,
            timeout,
            eof_hint=" (it drops clients whose certificate it cannot verify: is "
            f"{cert_path} issued by this cloud's CA and still valid?)",
        )
    except AuthError:
        raise
    except CyphonicError as exc:
        raise AuthError(str(exc)) from None
    if resp.get("ok") is not True:
        raise AuthError(f"the AS refused the login of {fqdn}: {_refusal(resp)}")
    try:
        result = login_result_from_json(resp)
    except DecodeError as exc:
        raise AuthError(f"the AS sent a malformed login answer: {exc}") from None
    if result.fqdn != fqdn or result.domain != domain:
        raise AuthError(
            f"the AS answered for {result.fqdn} in {result.domain}, not {fqdn} in {domain}"
        )
    return result


def _adapter_context(
    ca_cert_path: Path, adapter_key_dir: Path
) -> tuple[x509.Certificate, ssl.SSLContext, str]:
    """The CA certificate, a TLS context presenting the adapter's certificate, and the
    hint for a connection the AS drops in the handshake. Raises :class:`AuthError`."""
    cert_path = adapter_key_dir / NODE_CERT_FILE
    _check_own_certificate(ca_cert_path, cert_path)
    ca_cert = load_ca_certificate(ca_cert_path)
    ctx = client_ssl_context(ca_cert_path, cert_path, adapter_key_dir / NODE_KEY_FILE)
    hint = (
        " (it drops clients whose certificate it cannot verify: is "
        f"{cert_path} issued by this cloud's CA and still valid?)"
    )
    return ca_cert, ctx, hint


async def gn_list(
    as_host: str,
    as_port: int,
    ca_cert_path: Path,
    key_dir: Path,
    domain: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
) -> tuple[int, list[GeneralNodeInfo]]:
    """The adapter's general nodes, as AS has them: ``(generation, nodes)``.

    Authenticates with the adapter's ``key_dir/node.crt``. ``generation`` changes whenever
    the general-node records change: poll and compare it for inequality. Raises
    :class:`AuthError`.
    """
    key_dir = Path(key_dir)
    ca_cert_path = Path(ca_cert_path)
    try:
        domain = validate_domain(domain)
        _, ctx, hint = _adapter_context(ca_cert_path, key_dir)
        resp = await _exchange(
            as_host,
            as_port,
            ctx,
            f"as.{domain}",
            {"op": "gn_list"},
            ca_cert_path,
            timeout,
            eof_hint=hint,
        )
    except AuthError:
        raise
    except CyphonicError as exc:
        raise AuthError(str(exc)) from None
    if resp.get("ok") is not True:
        raise AuthError(f"the AS refused the general-node list: {_refusal(resp)}")
    try:
        return gn_list_answer_from_json(resp, domain)
    except DecodeError as exc:
        raise AuthError(f"the AS sent a malformed general-node list: {exc}") from None


async def gn_enroll(
    as_host: str,
    as_port: int,
    ca_cert_path: Path,
    adapter_key_dir: Path,
    gn_key_dir: Path,
    gn_fqdn: str,
    domain: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
) -> Path:
    """Get the certificate of the general node ``gn_fqdn``; returns ``gn_key_dir/node.crt``.

    The general node's keys are made (or reused) in ``gn_key_dir`` on this adapter; only
    the CSR is sent, over TLS authenticated with ``adapter_key_dir/node.crt``. The answer
    is checked like :func:`enroll`'s before ``node.crt`` and ``ca.crt`` are written to
    ``gn_key_dir``. Raises :class:`EnrollmentError`.
    """
    adapter_key_dir = Path(adapter_key_dir)
    gn_key_dir = Path(gn_key_dir)
    ca_cert_path = Path(ca_cert_path)
    try:
        domain = validate_domain(domain)
        fqdn = validate_fqdn(gn_fqdn, domain)
        if gn_key_dir.resolve() == adapter_key_dir.resolve():
            raise EnrollmentError(
                f"the general node's key directory {gn_key_dir} is the adapter's own: "
                "give each general node a directory of its own"
            )
        ca_cert, ctx, hint = _adapter_context(ca_cert_path, adapter_key_dir)
        keys = generate_node_keys(gn_key_dir)
        request = {"op": "gn_enroll", "fqdn": fqdn, "csr": make_csr(keys, fqdn).decode("ascii")}
        resp = await _exchange(
            as_host,
            as_port,
            ctx,
            f"as.{domain}",
            request,
            ca_cert_path,
            timeout,
            eof_hint=hint,
        )
    except EnrollmentError:
        raise
    except CyphonicError as exc:  # AuthError of the adapter's certificate included
        raise EnrollmentError(str(exc)) from None
    if resp.get("ok") is not True:
        raise EnrollmentError(f"the AS refused to enroll general node {fqdn}: {_refusal(resp)}")
    return _store_certificate(
        resp, ca_cert, ca_cert_path, keys, fqdn, f"general node {fqdn}'s in {gn_key_dir}"
    )
