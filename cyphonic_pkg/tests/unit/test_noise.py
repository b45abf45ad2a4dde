"""Noise_IKpsk2_25519_AESGCM_SHA256: spec vectors, interop with ``noiseprotocol``, failures."""

from __future__ import annotations

import os

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from hypothesis import given, settings
from hypothesis import strategies as st
from noise.connection import Keypair as NoiseKeypair
from noise.connection import NoiseConnection

from cyphonic.crypto.noise import (
    MAX_NONCE,
    PROTOCOL_NAME,
    CipherState,
    HandshakeState,
    SymmetricState,
    aesgcm_nonce,
    hkdf,
    public_bytes,
)
from cyphonic.errors import CryptoError

# ---------------------------------------------------------------------------------------
# Test vector: cacophony (haskell-cryptography/cacophony, vectors/cacophony.txt), entry
# "Noise_IKpsk2_25519_AESGCM_SHA256".  Messages 0-1 are the handshake, 2-5 transport
# messages alternating initiator->responder, responder->initiator.
# ---------------------------------------------------------------------------------------
VEC_PROLOGUE = bytes.fromhex("4a6f686e2047616c74")
VEC_PSK = bytes.fromhex("54686973206973206d7920417573747269616e20706572737065637469766521")
VEC_INIT_STATIC = bytes.fromhex("e61ef9919cde45dd5f82166404bd08e38bceb5dfdfded0a34c8df7ed542214d1")
VEC_INIT_EPHEMERAL = bytes.fromhex(
    "893e28b9dc6ca8d611ab664754b8ceb7bac5117349a4439a6b0569da977c464a"
)
VEC_INIT_REMOTE_STATIC = bytes.fromhex(
    "31e0303fd6418d2f8c0e78b91f22e8caed0fbe48656dcf4767e4834f701b8f62"
)
VEC_RESP_STATIC = bytes.fromhex("4a3acbfdb163dec651dfa3194dece676d437029c62a408b4c5ea9114246e4893")
VEC_RESP_EPHEMERAL = bytes.fromhex(
    "bbdb4cdbd309f1a1f2e1456967fe288cadd6f712d65dc7b7793d5e63da6b375b"
)
VEC_MESSAGES = [
    (
        "4c756477696720766f6e204d69736573",
        "ca35def5ae56cec33dc2036731ab14896bc4c75dbb07a61f879f8e3afa4c79445a1baf339186d786"
        "7062b0dd31f5de322d370165d217939b2b7ed9e2bae7840458ea65c2ce1554e0e8077fe7334c4bd5"
        "14c658fd04d97b86d216f58f59714a7e24144155045c8f36bed85a2cb0fd9af7",
    ),
    (
        "4d757272617920526f746862617264",
        "95ebc60d2b1fa672c1f46a8aa265ef51bfe38e7ccb39ec5be34069f1448088432fe8d675e949799d"
        "2a968211a66cc7ba2b0f4cad8eda3c2bd37eae737bbf88",
    ),
    ("462e20412e20486179656b", "38cbf3835c78b7802df0dd0d9640ff8575debd0cb61cfb52590da1"),
    ("4361726c204d656e676572", "ffc365ff6955fc66c5d809b31ac995f812c5770bd29f0df12f0ffd"),
    (
        "4a65616e2d426170746973746520536179",
        "a7f2828174c4ead2491ffeb77c41c890fd1229ee36f23ccb9066a795daff1cad6b",
    ),
    (
        "457567656e2042f6686d20766f6e2042617765726b",
        "3b86963d5c0e6e3b4153d77153836606393eefc4e5e6dae97796552d1265839ee3825cb80c",
    ),
]

NAME = b"Noise_IKpsk2_25519_AESGCM_SHA256"


def _key(raw: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(raw)


def _raw(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def _pair(
    psk_i: bytes = VEC_PSK,
    psk_r: bytes = VEC_PSK,
    prologue_i: bytes = b"p",
    prologue_r: bytes = b"p",
) -> tuple[HandshakeState, HandshakeState, X25519PrivateKey, X25519PrivateKey]:
    i_s, r_s = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    ini = HandshakeState(True, i_s, psk_i, rs=public_bytes(r_s), prologue=prologue_i)
    res = HandshakeState(False, r_s, psk_r, prologue=prologue_r)
    return ini, res, i_s, r_s


def _theirs(
    initiator: bool, s: X25519PrivateKey, psk: bytes, prologue: bytes, rs: bytes | None = None
) -> NoiseConnection:
    conn = NoiseConnection.from_name(NAME)
    if initiator:
        conn.set_as_initiator()
    else:
        conn.set_as_responder()
    conn.set_keypair_from_private_bytes(NoiseKeypair.STATIC, _raw(s))
    if rs is not None:
        conn.set_keypair_from_public_bytes(NoiseKeypair.REMOTE_STATIC, rs)
    conn.set_psks(psk)
    conn.set_prologue(prologue)
    conn.start_handshake()
    return conn


# --- spec vector ---------------------------------------------------------------------------


def test_public_key_of_vector_static_matches() -> None:
    assert public_bytes(_key(VEC_RESP_STATIC)) == VEC_INIT_REMOTE_STATIC


def test_cacophony_vector() -> None:
    ini = HandshakeState(
        True,
        _key(VEC_INIT_STATIC),
        VEC_PSK,
        rs=VEC_INIT_REMOTE_STATIC,
        prologue=VEC_PROLOGUE,
        e=_key(VEC_INIT_EPHEMERAL),
    )
    res = HandshakeState(
        False, _key(VEC_RESP_STATIC), VEC_PSK, prologue=VEC_PROLOGUE, e=_key(VEC_RESP_EPHEMERAL)
    )
    (p0, c0), (p1, c1) = VEC_MESSAGES[0], VEC_MESSAGES[1]
    m0 = ini.write_message(bytes.fromhex(p0))
    assert m0.hex() == c0
    assert res.read_message(m0) == bytes.fromhex(p0)
    assert res.remote_static == public_bytes(_key(VEC_INIT_STATIC))
    m1 = res.write_message(bytes.fromhex(p1))
    assert m1.hex() == c1
    assert ini.read_message(m1) == bytes.fromhex(p1)
    assert ini.complete and res.complete
    assert ini.handshake_hash == res.handshake_hash
    assert ini.split() == res.split()

    i_to_r, r_to_i = ini.split()
    send = {True: CipherState(i_to_r), False: CipherState(r_to_i)}
    recv = {True: CipherState(i_to_r), False: CipherState(r_to_i)}
    for n, (payload, ciphertext) in enumerate(VEC_MESSAGES[2:]):
        from_initiator = n % 2 == 0
        assert send[from_initiator].encrypt_with_ad(b"", bytes.fromhex(payload)).hex() == (
            ciphertext
        )
        assert recv[from_initiator].decrypt_with_ad(b"", bytes.fromhex(ciphertext)) == (
            bytes.fromhex(payload)
        )


def test_hkdf_matches_rfc5869() -> None:
    """Noise's HKDF (section 4.3) is RFC 5869 HKDF with salt = ck and empty info."""
    ck, ikm = os.urandom(32), os.urandom(32)
    expected = HKDF(hashes.SHA256(), 96, salt=ck, info=b"").derive(ikm)
    assert b"".join(hkdf(ck, ikm, 3)) == expected
    assert b"".join(hkdf(ck, ikm, 2)) == expected[:64]
    with pytest.raises(ValueError):
        hkdf(ck, ikm, 4)


def test_initialize_symmetric_pads_short_name() -> None:
    ss = SymmetricState()
    assert len(PROTOCOL_NAME) == 32
    assert ss.h == PROTOCOL_NAME == ss.ck
    long = SymmetricState(b"x" * 40)
    assert len(long.h) == 32 and long.h != b"x" * 32


def test_aesgcm_nonce_layout() -> None:
    assert aesgcm_nonce(0x0102030405060708) == bytes.fromhex("000000000102030405060708")


# --- interop with noiseprotocol --------------------------------------------------------------


@pytest.mark.parametrize("prologue", [b"", b"CYPHONIC prologue \x00\x01"])
def test_interop_ours_initiator_theirs_responder(prologue: bytes) -> None:
    psk = os.urandom(32)
    i_s, r_s = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    ours = HandshakeState(True, i_s, psk, rs=public_bytes(r_s), prologue=prologue)
    theirs = _theirs(False, r_s, psk, prologue)

    assert theirs.read_message(ours.write_message(b"hello responder")) == b"hello responder"
    assert ours.read_message(theirs.write_message(b"hello initiator")) == b"hello initiator"
    assert theirs.handshake_finished
    assert ours.handshake_hash == theirs.get_handshake_hash()

    i_to_r, r_to_i = ours.split()
    send, recv = CipherState(i_to_r), CipherState(r_to_i)
    for n in range(5):
        msg = os.urandom(n * 100)
        assert theirs.decrypt(send.encrypt_with_ad(b"", msg)) == msg
        assert recv.decrypt_with_ad(b"", theirs.encrypt(msg)) == msg


@pytest.mark.parametrize("prologue", [b"", b"CYPHONIC prologue \x00\x01"])
def test_interop_theirs_initiator_ours_responder(prologue: bytes) -> None:
    psk = os.urandom(32)
    i_s, r_s = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    theirs = _theirs(True, i_s, psk, prologue, rs=public_bytes(r_s))
    ours = HandshakeState(False, r_s, psk, prologue=prologue)

    assert ours.read_message(theirs.write_message(b"ts")) == b"ts"
    assert ours.remote_static == public_bytes(i_s)
    assert theirs.read_message(ours.write_message(b"")) == b""
    assert theirs.handshake_finished
    assert ours.handshake_hash == theirs.get_handshake_hash()

    i_to_r, r_to_i = ours.split()
    send, recv = CipherState(r_to_i), CipherState(i_to_r)
    for n in range(5):
        msg = os.urandom(n * 100 + 1)
        assert theirs.decrypt(send.encrypt_with_ad(b"", msg)) == msg
        assert recv.decrypt_with_ad(b"", theirs.encrypt(msg)) == msg


def test_interop_transport_with_associated_data() -> None:
    """Our split keys used the way the data plane uses them: AD = header, explicit nonce."""
    psk = os.urandom(32)
    i_s, r_s = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    ours = HandshakeState(True, i_s, psk, rs=public_bytes(r_s))
    theirs = _theirs(False, r_s, psk, b"")
    theirs.read_message(ours.write_message())
    ours.read_message(theirs.write_message())
    i_to_r, _ = ours.split()
    header = b"\x04\x00\x00\x00" + bytes(12)
    ct = AESGCM(i_to_r).encrypt(aesgcm_nonce(0), b"data", header)
    assert theirs.noise_protocol.cipher_state_decrypt.decrypt_with_ad(header, ct) == b"data"


def test_interop_wrong_psk_detected_by_our_initiator() -> None:
    i_s, r_s = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    ours = HandshakeState(True, i_s, os.urandom(32), rs=public_bytes(r_s))
    theirs = _theirs(False, r_s, os.urandom(32), b"")
    theirs.read_message(ours.write_message())  # psk2: message 1 does not depend on the PSK
    with pytest.raises(CryptoError):
        ours.read_message(theirs.write_message())


def test_interop_wrong_psk_detected_by_their_initiator() -> None:
    i_s, r_s = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    theirs = _theirs(True, i_s, os.urandom(32), b"", rs=public_bytes(r_s))
    ours = HandshakeState(False, r_s, os.urandom(32))
    ours.read_message(theirs.write_message())
    with pytest.raises(InvalidTag):  # noiseprotocol lets cryptography's error through
        theirs.read_message(ours.write_message())


# --- failures --------------------------------------------------------------------------------


def test_round_trip_with_payloads() -> None:
    ini, res, i_s, _ = _pair()
    assert res.read_message(ini.write_message(b"a" * 12)) == b"a" * 12
    assert res.remote_static == public_bytes(i_s)
    assert ini.read_message(res.write_message(b"b")) == b"b"
    assert ini.split() == res.split()
    k1, k2 = ini.split()
    assert len(k1) == len(k2) == 32 and k1 != k2


def test_wrong_psk_fails_at_message_2() -> None:
    ini, res, _, _ = _pair(psk_i=b"\x01" * 32, psk_r=b"\x02" * 32)
    res.read_message(ini.write_message())
    with pytest.raises(CryptoError):
        ini.read_message(res.write_message())


def test_wrong_responder_static_fails_at_message_1() -> None:
    i_s = X25519PrivateKey.generate()
    believed, actual = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    ini = HandshakeState(True, i_s, VEC_PSK, rs=public_bytes(believed))
    res = HandshakeState(False, actual, VEC_PSK)
    with pytest.raises(CryptoError):
        res.read_message(ini.write_message())


def test_prologue_mismatch_fails() -> None:
    ini, res, _, _ = _pair(prologue_i=b"session A", prologue_r=b"session B")
    with pytest.raises(CryptoError):
        res.read_message(ini.write_message())


def test_every_tampered_byte_of_message_1_fails() -> None:
    ini, _, _, r_s = _pair()
    msg = ini.write_message(b"x" * 12)
    for pos in range(len(msg)):
        tampered = bytearray(msg)
        tampered[pos] ^= 0x01
        res = HandshakeState(False, r_s, VEC_PSK, prologue=b"p")
        with pytest.raises(CryptoError):
            res.read_message(bytes(tampered))


def test_every_tampered_byte_of_message_2_fails_and_state_survives() -> None:
    ini, res, _, _ = _pair()
    res.read_message(ini.write_message())
    msg = res.write_message()
    for pos in range(len(msg)):
        tampered = bytearray(msg)
        tampered[pos] ^= 0x80
        with pytest.raises(CryptoError):
            ini.read_message(bytes(tampered))
    for bad in (b"", msg[:-1], msg + b"\x00"):
        with pytest.raises(CryptoError):
            ini.read_message(bad)
    # A forged response did not damage the initiator: the genuine one still completes it.
    assert ini.read_message(msg) == b""
    assert ini.split() == res.split()


def test_out_of_order_use_fails() -> None:
    ini, res, _, _ = _pair()
    with pytest.raises(CryptoError):
        ini.read_message(b"\x00" * 48)
    with pytest.raises(CryptoError):
        res.write_message()
    with pytest.raises(CryptoError):
        ini.split()
    res.read_message(ini.write_message())
    with pytest.raises(CryptoError):
        ini.write_message()
    ini.read_message(res.write_message())
    with pytest.raises(CryptoError):
        ini.write_message()
    with pytest.raises(CryptoError):
        res.read_message(b"\x00" * 100)


def test_low_order_public_keys_are_refused() -> None:
    s = X25519PrivateKey.generate()
    ini = HandshakeState(True, s, VEC_PSK, rs=bytes(32))
    with pytest.raises(CryptoError):
        ini.write_message()
    res = HandshakeState(False, X25519PrivateKey.generate(), VEC_PSK)
    with pytest.raises(CryptoError):
        res.read_message(bytes(32) + os.urandom(76))


def test_constructor_argument_checks() -> None:
    s = X25519PrivateKey.generate()
    with pytest.raises(ValueError):
        HandshakeState(True, s, b"short", rs=bytes(32))
    with pytest.raises(ValueError):
        HandshakeState(True, s, VEC_PSK)
    with pytest.raises(ValueError):
        HandshakeState(False, s, VEC_PSK, rs=bytes(32))
    with pytest.raises(ValueError):
        CipherState(b"short")


def test_cipher_state_nonce_and_failures() -> None:
    key = os.urandom(32)
    enc, dec = CipherState(key), CipherState(key)
    ct = enc.encrypt_with_ad(b"ad", b"m")
    with pytest.raises(CryptoError):
        dec.decrypt_with_ad(b"other", ct)
    assert dec.n == 0  # a failed decrypt does not advance the nonce
    with pytest.raises(CryptoError):
        dec.decrypt_with_ad(b"ad", ct[:15])
    assert dec.decrypt_with_ad(b"ad", ct) == b"m" and dec.n == 1
    enc.set_nonce(MAX_NONCE)
    with pytest.raises(CryptoError):
        enc.encrypt_with_ad(b"", b"")
    dec.set_nonce(MAX_NONCE)
    with pytest.raises(CryptoError):
        dec.decrypt_with_ad(b"", ct)
    empty = CipherState()
    assert not empty.has_key()
    assert empty.encrypt_with_ad(b"", b"clear") == b"clear"
    assert empty.decrypt_with_ad(b"", b"clear") == b"clear"
    with pytest.raises(CryptoError):
        empty.rekey()


def test_cipher_state_rekey_matches_spec() -> None:
    key = os.urandom(32)
    ours = CipherState(key)
    ours.set_nonce(7)
    ours.rekey()
    new_key = AESGCM(key).encrypt(aesgcm_nonce(MAX_NONCE), bytes(32), b"")[:32]
    assert ours.n == 7
    assert ours.encrypt_with_ad(b"", b"m") == AESGCM(new_key).encrypt(aesgcm_nonce(7), b"m", b"")


# --- fuzzing ---------------------------------------------------------------------------------

_R_STATIC = X25519PrivateKey.generate()


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_responder_read_message_only_crypto_error(data: bytes) -> None:
    res = HandshakeState(False, _R_STATIC, VEC_PSK)
    with pytest.raises(CryptoError):
        res.read_message(data)


@settings(max_examples=3000, deadline=None)
@given(st.binary(min_size=0, max_size=120))
def test_fuzz_initiator_read_message_only_crypto_error(data: bytes) -> None:
    ini = HandshakeState(True, _R_STATIC, VEC_PSK, rs=public_bytes(_R_STATIC))
    ini.write_message()
    with pytest.raises(CryptoError):
        ini.read_message(data)
