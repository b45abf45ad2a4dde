"""One error hierarchy for the whole package.

Every error a user can cause (bad bytes, bad configuration, a refused login) is a
``CyphonicError`` so that the CLI can print one clear line instead of a traceback.
"""

from __future__ import annotations


class CyphonicError(Exception):
    """Base class of every error raised on purpose by this package."""


class DecodeError(CyphonicError):
    """Bytes that do not parse as the message they claim to be."""


class CryptoError(CyphonicError):
    """Authentication tag mismatch, wrong key, replay or handshake failure."""


class ReplayError(CryptoError):
    """A counter that was already seen or is too old for the replay window."""


class AuthError(CyphonicError):
    """Login refused: bad certificate, unknown node, expired key."""


class EnrollmentError(CyphonicError):
    """Enrollment refused: unknown, reused or expired token, bad CSR."""


class ConfigError(CyphonicError):
    """A configuration file that is missing, unreadable or has a bad key."""


class SignalingError(CyphonicError):
    """NMS answered with an explicit error (unknown FQDN, not registered, ...)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class RequestTimeout(CyphonicError):
    """A request that was retransmitted until its deadline without an answer."""
