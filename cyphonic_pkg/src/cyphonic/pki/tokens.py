"""One-time enrollment tokens.

A token is 256 random bits, URL-safe base64 without padding (43 characters), bound
to one FQDN and valid for a limited time. The AS keeps only its SHA-256, so a copy
of the database does not let anyone enroll. Consuming a token is atomic in the
store: of two concurrent enrollments with the same token, exactly one succeeds.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import secrets

from cyphonic.errors import EnrollmentError
from cyphonic.store.base import Store, StoreError, TokenRecord

__all__ = [
    "TokenError",
    "check_token",
    "consume_token",
    "create_token",
    "hash_token",
]

_TOKEN_BYTES = 32
#: Longest token text accepted at all (longer input is certainly not a token).
MAX_TOKEN_LENGTH = 256


class TokenError(EnrollmentError):
    """An enrollment token was refused; ``code`` says why (stable, for scripts).

    Codes: ``token_unknown``, ``token_used``, ``token_expired``, ``token_wrong_fqdn``.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _when(t: float) -> str:
    return dt.datetime.fromtimestamp(t, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _norm_fqdn(fqdn: str) -> str:
    return fqdn.lower().rstrip(".")


TOKEN_PREFIX = "cyt_"  # noqa: S105 - a prefix, not a secret


def hash_token(token: str) -> bytes:
    """The SHA-256 under which ``token`` is stored."""
    return hashlib.sha256(token.strip().encode("utf-8", "surrogatepass")).digest()


def create_token(store: Store, fqdn: str, ttl_seconds: float, now: float) -> str:
    """Create a one-time token that enrolls ``fqdn`` until ``now + ttl_seconds``.

    The caller validates ``fqdn`` against the domain (:func:`cyphonic.pki.ca.validate_fqdn`).
    Returns the token text; it is not stored anywhere and cannot be recovered.
    """
    if ttl_seconds <= 0:
        raise EnrollmentError(f"token lifetime must be positive, got {ttl_seconds} s")
    fqdn = _norm_fqdn(fqdn)
    if not fqdn:
        raise EnrollmentError("a token must be bound to an FQDN")
    while True:
        # "cyt_" prefix: never starts with "-" (safe as a CLI argument) and is easy for
        # secret scanners to recognise
        token = (
            TOKEN_PREFIX
            + base64.urlsafe_b64encode(secrets.token_bytes(_TOKEN_BYTES)).rstrip(b"=").decode()
        )
        try:
            store.put_token(
                TokenRecord(
                    token_hash=hash_token(token),
                    fqdn=fqdn,
                    created_at=now,
                    expires_at=now + ttl_seconds,
                )
            )
        except StoreError:  # pragma: no cover - a 256-bit collision
            continue
        return token


def check_token(store: Store, token: str, fqdn: str, now: float) -> TokenRecord:
    """Check that ``token`` could enroll ``fqdn`` at ``now`` without consuming it.

    Raises :class:`TokenError` (an :class:`EnrollmentError`) with the reason.
    """
    if not token or len(token) > MAX_TOKEN_LENGTH:
        raise TokenError("token_unknown", "the enrollment token is not known to this AS")
    record = store.get_token(hash_token(token))
    if record is None:
        raise TokenError(
            "token_unknown",
            "the enrollment token is not known to this AS (mistyped, or created by another "
            "CYPHONIC cloud?)",
        )
    if record.used_at is not None:
        raise TokenError(
            "token_used",
            f"the enrollment token was already used at {_when(record.used_at)}; "
            "create a new one with 'cyphonic token create'",
        )
    if now >= record.expires_at:
        raise TokenError(
            "token_expired",
            f"the enrollment token expired at {_when(record.expires_at)}; "
            "create a new one with 'cyphonic token create'",
        )
    fqdn = _norm_fqdn(fqdn)
    if record.fqdn != fqdn:
        raise TokenError(
            "token_wrong_fqdn",
            f"the enrollment token was created for {record.fqdn}, not {fqdn}",
        )
    return record


def consume_token(store: Store, token: str, fqdn: str, now: float) -> None:
    """Check ``token`` like :func:`check_token`, then mark it used, atomically.

    Exactly one of several concurrent callers succeeds; the others get
    ``token_used``.
    """
    record = check_token(store, token, fqdn, now)
    if not store.mark_token_used(record.token_hash, now):
        raise TokenError(
            "token_used",
            "the enrollment token was already used (just now, by a concurrent enrollment)",
        )
