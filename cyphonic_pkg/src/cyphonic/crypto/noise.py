"""Noise Protocol Framework (revision 34), exactly ``Noise_IKpsk2_25519_AESGCM_SHA256``.

This is the handshake of the CYPHONIC tunnel, written straight from the specification
(https://noiseprotocol.org/noise.html, rev 34) on top of ``cryptography`` (X25519,
AES-256-GCM) and the standard library (SHA-256, HMAC).  The three objects are the ones the
spec defines (section 5): :class:`CipherState`, :class:`SymmetricState` and
:class:`HandshakeState`.  Only one pattern is supported, so the token tables below are fixed
rather than parsed from a name::

    IKpsk2:
      <- s                          (pre-message: the initiator knows the responder's static)
      ...
      -> e, es, s, ss               (message 1)
      <- e, ee, se, psk             (message 2; "psk2" = the PSK is mixed at the end of it)

With the DH, cipher and hash chosen (section 12): ``DHLEN = 32``, ``HASHLEN = 32``, a key is
32 bytes, the AEAD tag is 16 bytes and the AES-GCM nonce is 4 zero bytes followed by the
64-bit *big-endian* counter ``n``.  Wire sizes of the two messages::

    message 1: e (32) || ENC(s) (32 + 16) || ENC(payload) (len(payload) + 16)
    message 2: e (32) || ENC(payload) (len(payload) + 16)

After message 2 both sides call :meth:`HandshakeState.split` which returns two raw 32-byte
keys: the first protects initiator -> responder traffic, the second responder -> initiator.

Every failure (bad tag, a public key that gives an all-zero shared secret, wrong length,
out-of-order use) raises :class:`~cyphonic.errors.CryptoError`.  A failed
:meth:`HandshakeState.read_message` leaves the state as it was before the call, so a forged
message 2 cannot kill an initiator that is still waiting for the genuine one.

Nothing here logs; keys never leave these objects except through :meth:`split`.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from cyphonic.errors import CryptoError

__all__ = [
    "DHLEN",
    "HASHLEN",
    "KEYLEN",
    "MAX_NONCE",
    "PROTOCOL_NAME",
    "PSKLEN",
    "TAGLEN",
    "CipherState",
    "HandshakeState",
    "SymmetricState",
    "aesgcm_nonce",
    "dh",
    "hkdf",
    "public_bytes",
]

PROTOCOL_NAME: Final = b"Noise_IKpsk2_25519_AESGCM_SHA256"
DHLEN: Final = 32
HASHLEN: Final = 32
KEYLEN: Final = 32
TAGLEN: Final = 16
PSKLEN: Final = 32
#: Nonce 2**64 - 1 is reserved by the spec (section 5.1); using it is an error.
MAX_NONCE: Final = 2**64 - 1

_NONCE = struct.Struct("!4xQ")  # 4 zero bytes || uint64 big-endian counter (section 12.4)

# The two message patterns of IKpsk2 (section 7.5 and 9), and who writes each one.
_MESSAGE_PATTERNS: Final[tuple[tuple[str, ...], ...]] = (
    ("e", "es", "s", "ss"),  # -> initiator to responder
    ("e", "ee", "se", "psk"),  # <- responder to initiator
)


def aesgcm_nonce(n: int) -> bytes:
    """The 12-byte AES-GCM nonce for counter ``n``: 4 zero bytes || ``n`` as big-endian u64."""
    return _NONCE.pack(n)


def public_bytes(key: X25519PrivateKey) -> bytes:
    """Raw 32-byte X25519 public key of ``key``."""
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def dh(private: X25519PrivateKey, public: bytes) -> bytes:
    """X25519(private, public); raises CryptoError on a bad or low-order public key.

    ``cryptography`` refuses an all-zero shared secret (a low-order point), which the spec
    permits (section 12.1) and which we turn into a handshake failure.
    """
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:
        raise CryptoError("invalid X25519 public key") from exc


def _hash(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.digest(key, data, "sha256")


def hkdf(chaining_key: bytes, input_key_material: bytes, num_outputs: int) -> tuple[bytes, ...]:
    """HKDF as the Noise spec defines it (section 4.3), with HMAC-SHA256.

    ``temp_key = HMAC(ck, ikm)``; ``out1 = HMAC(temp_key, 0x01)``;
    ``out2 = HMAC(temp_key, out1 || 0x02)``; ``out3 = HMAC(temp_key, out2 || 0x03)``.
    """
    if num_outputs not in (2, 3):
        raise ValueError("num_outputs must be 2 or 3")
    temp_key = _hmac(chaining_key, input_key_material)
    out1 = _hmac(temp_key, b"\x01")
    out2 = _hmac(temp_key, out1 + b"\x02")
    if num_outputs == 2:
        return out1, out2
    return out1, out2, _hmac(temp_key, out2 + b"\x03")


class CipherState:
    """A key ``k`` (or none) and a 64-bit nonce ``n`` (spec section 5.1).

    The AESGCM object is built once per key.  With no key, encryption is the identity, as the
    spec requires for the start of a handshake.
    """

    __slots__ = ("_aead", "n")

    def __init__(self, key: bytes | None = None, nonce: int = 0) -> None:
        self._aead: AESGCM | None = None
        self.n = nonce
        if key is not None:
            self.initialize_key(key)

    def initialize_key(self, key: bytes) -> None:
        """InitializeKey(k): set the key and reset the nonce to zero."""
        if len(key) != KEYLEN:
            raise ValueError("cipher key must be 32 bytes")
        self._aead = AESGCM(key)
        self.n = 0

    def has_key(self) -> bool:
        """HasKey()."""
        return self._aead is not None

    def set_nonce(self, nonce: int) -> None:
        """SetNonce(n)."""
        self.n = nonce

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes) -> bytes:
        """EncryptWithAd(ad, plaintext): ``ENCRYPT(k, n++, ad, plaintext)`` or the plaintext."""
        if self._aead is None:
            return plaintext
        if self.n >= MAX_NONCE:
            raise CryptoError("nonce exhausted")
        ciphertext = self._aead.encrypt(_NONCE.pack(self.n), plaintext, ad)
        self.n += 1
        return ciphertext

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes) -> bytes:
        """DecryptWithAd(ad, ciphertext); ``n`` only advances when the tag verifies."""
        if self._aead is None:
            return ciphertext
        if self.n >= MAX_NONCE:
            raise CryptoError("nonce exhausted")
        if len(ciphertext) < TAGLEN:
            raise CryptoError("ciphertext shorter than the tag")
        try:
            plaintext = self._aead.decrypt(_NONCE.pack(self.n), ciphertext, ad)
        except InvalidTag as exc:
            raise CryptoError("authentication failed") from exc
        self.n += 1
        return plaintext

    def rekey(self) -> None:
        """Rekey() (section 4.2): ``k = ENCRYPT(k, 2**64-1, b"", zeros)[:32]``; n unchanged."""
        if self._aead is None:
            raise CryptoError("rekey without a key")
        new_key = self._aead.encrypt(_NONCE.pack(MAX_NONCE), bytes(KEYLEN), b"")[:KEYLEN]
        self._aead = AESGCM(new_key)


class SymmetricState:
    """Chaining key ``ck``, handshake hash ``h`` and a CipherState (spec section 5.2)."""

    __slots__ = ("_key", "cipher", "ck", "h")

    def __init__(self, protocol_name: bytes = PROTOCOL_NAME) -> None:
        """InitializeSymmetric(protocol_name)."""
        if len(protocol_name) <= HASHLEN:
            self.h = protocol_name.ljust(HASHLEN, b"\x00")
        else:
            self.h = _hash(protocol_name)
        self.ck = self.h
        self.cipher = CipherState()
        # The raw key of ``cipher``: kept only so that a failed read can be rolled back.
        self._key: bytes | None = None

    def _set_key(self, key: bytes) -> None:
        self._key = key
        self.cipher.initialize_key(key)

    def mix_key(self, input_key_material: bytes) -> None:
        """MixKey(ikm): ``ck, temp_k = HKDF(ck, ikm, 2)``; InitializeKey(temp_k)."""
        self.ck, temp_k = hkdf(self.ck, input_key_material, 2)
        self._set_key(temp_k)

    def mix_hash(self, data: bytes) -> None:
        """MixHash(data): ``h = HASH(h || data)``."""
        self.h = _hash(self.h + data)

    def mix_key_and_hash(self, input_key_material: bytes) -> None:
        """MixKeyAndHash(ikm): ``ck, temp_h, temp_k = HKDF(ck, ikm, 3)``; used for ``psk``."""
        self.ck, temp_h, temp_k = hkdf(self.ck, input_key_material, 3)
        self.mix_hash(temp_h)
        self._set_key(temp_k)

    def get_handshake_hash(self) -> bytes:
        """GetHandshakeHash(): ``h``, usable as a channel binding after the handshake."""
        return self.h

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        """EncryptAndHash(plaintext): encrypt with ``h`` as AD, then MixHash(ciphertext)."""
        ciphertext = self.cipher.encrypt_with_ad(self.h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        """DecryptAndHash(ciphertext): decrypt with ``h`` as AD, then MixHash(ciphertext)."""
        plaintext = self.cipher.decrypt_with_ad(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[bytes, bytes]:
        """Split(): the two transport keys ``(initiator->responder, responder->initiator)``."""
        k1, k2 = hkdf(self.ck, b"", 2)
        return k1, k2

    def _snapshot(self) -> tuple[bytes, bytes, bytes | None, int]:
        return self.ck, self.h, self._key, self.cipher.n

    def _restore(self, snap: tuple[bytes, bytes, bytes | None, int]) -> None:
        self.ck, self.h, key, nonce = snap
        self._key = key
        self.cipher = CipherState(key, nonce)


class HandshakeState:
    """The IKpsk2 handshake for one side (spec section 5.3).

    ``s`` is the local static key; the initiator must pass the responder's static public key
    as ``rs`` (the IK pre-message), the responder learns ``rs`` from message 1 and exposes it
    as :attr:`remote_static`.  ``e`` may be given to make a run deterministic (test vectors);
    otherwise a fresh ephemeral key is generated when it is needed.

    Use: the initiator calls ``write_message`` then ``read_message``; the responder
    ``read_message`` then ``write_message``; then both call :meth:`split`.
    """

    __slots__ = ("_e", "_index", "_psk", "_re", "_rs", "_s", "_ss", "initiator")

    def __init__(
        self,
        initiator: bool,
        s: X25519PrivateKey,
        psk: bytes,
        *,
        rs: bytes | None = None,
        prologue: bytes = b"",
        e: X25519PrivateKey | None = None,
    ) -> None:
        if len(psk) != PSKLEN:
            raise ValueError("psk must be 32 bytes")
        if initiator and (rs is None or len(rs) != DHLEN):
            raise ValueError("the IK initiator needs the responder's 32-byte static key")
        if not initiator and rs is not None:
            raise ValueError("the IK responder learns rs from message 1")
        self.initiator = initiator
        self._s = s
        self._psk = psk
        self._rs = rs
        self._e = e
        self._re: bytes | None = None
        self._index = 0  # next message pattern to process
        self._ss = SymmetricState(PROTOCOL_NAME)
        self._ss.mix_hash(prologue)
        # Pre-message "<- s": both sides hash the responder's static public key.
        self._ss.mix_hash(rs if rs is not None else public_bytes(s))

    @property
    def complete(self) -> bool:
        """True once both messages have been processed."""
        return self._index == len(_MESSAGE_PATTERNS)

    @property
    def remote_static(self) -> bytes | None:
        """The peer's static public key (known from the start for the initiator)."""
        return self._rs

    @property
    def handshake_hash(self) -> bytes:
        """Current ``h``; after completion, a unique id of this handshake."""
        return self._ss.get_handshake_hash()

    def _writes_next(self) -> bool:
        # Message 0 is written by the initiator, message 1 by the responder.
        return (self._index == 0) == self.initiator

    def write_message(self, payload: bytes = b"") -> bytes:
        """WriteMessage(payload): the next handshake message, carrying ``payload``."""
        if self.complete or not self._writes_next():
            raise CryptoError("handshake message written out of order")
        ss = self._ss
        out = bytearray()
        for step in _MESSAGE_PATTERNS[self._index]:
            if step == "e":
                if self._e is None:
                    self._e = X25519PrivateKey.generate()
                e_pub = public_bytes(self._e)
                out += e_pub
                ss.mix_hash(e_pub)
                ss.mix_key(e_pub)  # psk handshakes also MixKey(e) (section 9.2)
            elif step == "s":
                out += ss.encrypt_and_hash(public_bytes(self._s))
            elif step == "psk":
                ss.mix_key_and_hash(self._psk)
            else:
                ss.mix_key(self._dh_token(step))
        out += ss.encrypt_and_hash(payload)
        self._index += 1
        return bytes(out)

    def read_message(self, message: bytes) -> bytes:
        """ReadMessage(message): process the peer's message and return its payload.

        Raises CryptoError on any failure and then leaves this object unchanged.
        """
        if self.complete or self._writes_next():
            raise CryptoError("handshake message read out of order")
        snapshot = self._ss._snapshot()
        saved_re, saved_rs = self._re, self._rs
        try:
            payload = self._read(bytes(message))
        except CryptoError:
            self._ss._restore(snapshot)
            self._re, self._rs = saved_re, saved_rs
            raise
        self._index += 1
        return payload

    def _read(self, message: bytes) -> bytes:
        ss = self._ss
        pos = 0
        for step in _MESSAGE_PATTERNS[self._index]:
            if step == "e":
                re = message[pos : pos + DHLEN]
                if len(re) != DHLEN:
                    raise CryptoError("handshake message too short")
                pos += DHLEN
                self._re = re
                ss.mix_hash(re)
                ss.mix_key(re)
            elif step == "s":
                size = DHLEN + TAGLEN if ss.cipher.has_key() else DHLEN
                enc = message[pos : pos + size]
                if len(enc) != size:
                    raise CryptoError("handshake message too short")
                pos += size
                self._rs = ss.decrypt_and_hash(enc)
            elif step == "psk":
                ss.mix_key_and_hash(self._psk)
            else:
                ss.mix_key(self._dh_token(step))
        return ss.decrypt_and_hash(message[pos:])

    def _dh_token(self, step: str) -> bytes:
        """The DH for ``ee``/``es``/``se``/``ss``; first letter = initiator's key, second =
        responder's key (section 7.1)."""
        e, re, rs = self._e, self._re, self._rs
        if step == "ee":
            local, remote = e, re
        elif step == "ss":
            local, remote = self._s, rs
        elif step == "es":
            local, remote = (e, rs) if self.initiator else (self._s, re)
        elif step == "se":
            local, remote = (self._s, re) if self.initiator else (e, rs)
        else:  # pragma: no cover - the pattern table only holds the tokens above
            raise AssertionError(step)
        if local is None or remote is None:  # pragma: no cover - guaranteed by the pattern
            raise CryptoError(f"missing key for {step}")
        return dh(local, remote)

    def split(self) -> tuple[bytes, bytes]:
        """Split() after completion: ``(initiator->responder key, responder->initiator key)``.

        Raw 32-byte AES-256-GCM keys; the caller wraps them (see
        :class:`cyphonic.dataplane.session.Keypair`) and should drop this object.
        """
        if not self.complete:
            raise CryptoError("handshake not complete")
        return self._ss.split()
