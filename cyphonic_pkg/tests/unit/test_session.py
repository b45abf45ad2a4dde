"""Tunnel sessions: handshake over our packets, Keypair data path, rekey policy, fuzzing."""

from __future__ import annotations

import os
import random
import secrets

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from hypothesis import given, settings
from hypothesis import strategies as st
from noise.connection import Keypair as NoiseKeypair
from noise.connection import NoiseConnection

from cyphonic.crypto.noise import public_bytes
from cyphonic.dataplane.session import (
    DEFAULT_POLICY,
    PROLOGUE_LABEL,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
    Initiator,
    Keypair,
    Lookup,
    LookupResult,
    SessionPolicy,
    generate_index,
    respond,
    tai64n,
)
from cyphonic.errors import CryptoError, DecodeError, ReplayError
from cyphonic.wire.tunnel import (
    DATA_HEADER,
    INIT_HEADER,
    Data,
    HandshakeInit,
    HandshakeResp,
)

I_STATIC = X25519PrivateKey.generate()
R_STATIC = X25519PrivateKey.generate()
I_PUB = public_bytes(I_STATIC)
R_PUB = public_bytes(R_STATIC)
PSK = os.urandom(32)
SESSION = bytes.fromhex("0011223344556677")
I_INDEX = 0x11111111
R_INDEX = 0x22222222
WALL = 1_700_000_000.0
SHORT = SessionPolicy(
    rekey_after_time=1.0,
    reject_after_time=2.0,
    rekey_after_messages=3,
    reject_after_messages=5,
    replay_window_bits=128,
)


def lookup_for(last: bytes | None = None, psk: bytes = PSK, expected: bytes = I_PUB) -> Lookup:
    table: dict[bytes, LookupResult] = {SESSION: (psk, expected, last)}
    return table.get


def initiator(
    now: float = 0.0, wall: float = WALL, psk: bytes = PSK, policy: SessionPolicy = DEFAULT_POLICY
) -> Initiator:
    return Initiator(I_STATIC, R_PUB, psk, SESSION, I_INDEX, now, wall_time=wall, policy=policy)


def handshake(policy: SessionPolicy = DEFAULT_POLICY, now: float = 0.0) -> tuple[Keypair, Keypair]:
    ini = initiator(now=now, policy=policy)
    resp = respond(ini.create_init(), R_STATIC, lookup_for(), R_INDEX, now, policy=policy)
    return ini.consume_response(resp.packet, now), resp.keypair


def _raw(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


# --- handshake ------------------------------------------------------------------------------


def test_handshake_and_data_both_ways() -> None:
    ini = initiator()
    init_packet = ini.create_init()
    assert len(init_packet) == 124
    assert ini.create_init() == init_packet  # retransmission sends the same bytes
    parsed = HandshakeInit.parse(init_packet)
    assert parsed.sender_index == I_INDEX and parsed.session_id == SESSION

    resp = respond(init_packet, R_STATIC, lookup_for(), R_INDEX, 5.0)
    assert len(resp.packet) == 60
    assert resp.initiator_static == I_PUB
    assert resp.timestamp == ini.timestamp == tai64n(WALL)
    parsed_resp = HandshakeResp.parse(resp.packet)
    assert (parsed_resp.sender_index, parsed_resp.receiver_index) == (R_INDEX, I_INDEX)

    a = ini.consume_response(resp.packet, 6.0)
    b = resp.keypair
    assert (a.local_index, a.remote_index, a.is_initiator, a.created_at) == (
        I_INDEX,
        R_INDEX,
        True,
        6.0,
    )
    assert (b.local_index, b.remote_index, b.is_initiator, b.created_at) == (
        R_INDEX,
        I_INDEX,
        False,
        5.0,
    )
    assert a.send_key == b.recv_key and a.recv_key == b.send_key and a.send_key != a.recv_key
    assert a.confirmed and not b.confirmed

    keepalive = a.encrypt(b"", 7.0)
    assert len(keepalive) == 32
    assert b.decrypt(keepalive, 7.0) == b""
    assert b.confirmed
    for n in range(3):
        msg = os.urandom(1 + n * 500)
        pkt = a.encrypt(msg, 7.0)
        assert Data.parse(pkt).counter == n + 1 and Data.parse(pkt).receiver_index == R_INDEX
        assert b.decrypt(pkt, 7.0) == msg
        back = b.encrypt(msg, 7.0)
        assert Data.parse(back).counter == n and Data.parse(back).receiver_index == I_INDEX
        assert a.decrypt(back, 7.0) == msg


def test_unknown_session() -> None:
    with pytest.raises(CryptoError, match="unknown session"):
        respond(initiator().create_init(), R_STATIC, lambda _sid: None, R_INDEX, 0.0)


def test_initiator_static_not_the_expected_one() -> None:
    other = public_bytes(X25519PrivateKey.generate())
    with pytest.raises(CryptoError, match="static key"):
        respond(initiator().create_init(), R_STATIC, lookup_for(expected=other), R_INDEX, 0.0)


def test_wrong_responder_static() -> None:
    with pytest.raises(CryptoError):
        respond(initiator().create_init(), X25519PrivateKey.generate(), lookup_for(), R_INDEX, 0.0)


def test_timestamp_replay_protection() -> None:
    packet = initiator(wall=WALL).create_init()
    first = respond(packet, R_STATIC, lookup_for(None), R_INDEX, 0.0)
    # The caller stored first.timestamp: the same packet again is a replay.
    with pytest.raises(CryptoError, match="replayed"):
        respond(packet, R_STATIC, lookup_for(first.timestamp), R_INDEX, 0.0)
    older = initiator(wall=WALL - 10).create_init()
    with pytest.raises(CryptoError, match="replayed"):
        respond(older, R_STATIC, lookup_for(first.timestamp), R_INDEX, 0.0)
    newer = initiator(wall=WALL + 1).create_init()
    assert respond(newer, R_STATIC, lookup_for(first.timestamp), R_INDEX, 0.0).timestamp > (
        first.timestamp
    )


def test_tai64n() -> None:
    assert tai64n(0.0) == bytes.fromhex("400000000000000a00000000")
    assert tai64n(1.5)[:8] == bytes.fromhex("400000000000000b")
    # Nanoseconds are whitened to ~16.8 ms steps; later enough times compare greater.
    assert tai64n(WALL) < tai64n(WALL + 0.02) < tai64n(WALL + 1)
    assert tai64n(WALL) == tai64n(WALL + 0.001)


def test_wrong_psk_detected_by_initiator_and_genuine_response_still_accepted() -> None:
    ini = initiator()
    bad = respond(ini.create_init(), R_STATIC, lookup_for(psk=os.urandom(32)), R_INDEX, 0.0)
    with pytest.raises(CryptoError):
        ini.consume_response(bad.packet, 0.0)
    good = respond(ini.create_init(), R_STATIC, lookup_for(), R_INDEX, 0.0)
    a = ini.consume_response(good.packet, 0.0)
    assert good.keypair.decrypt(a.encrypt(b"x", 0.0), 0.0) == b"x"


def test_session_id_and_sender_index_are_bound_to_the_handshake() -> None:
    packet = initiator().create_init()
    other_session = bytes(8)
    moved = packet[:8] + other_session + packet[16:]
    table: dict[bytes, LookupResult] = {other_session: (PSK, I_PUB, None)}
    with pytest.raises(CryptoError):
        respond(moved, R_STATIC, table.get, R_INDEX, 0.0)
    reindexed = INIT_HEADER.pack(2, I_INDEX ^ 1, SESSION) + packet[16:]
    with pytest.raises(CryptoError):
        respond(reindexed, R_STATIC, lookup_for(), R_INDEX, 0.0)


def test_consume_response_rejections() -> None:
    ini = initiator(now=0.0, policy=SHORT)
    resp = respond(ini.create_init(), R_STATIC, lookup_for(), R_INDEX, 0.0)
    with pytest.raises(DecodeError):
        ini.consume_response(resp.packet[:-1], 0.0)
    wrong_receiver = HandshakeResp.parse(resp.packet)
    misdirected = HandshakeResp(R_INDEX, I_INDEX + 1, wrong_receiver.noise_message).pack()
    with pytest.raises(CryptoError, match="another session"):
        ini.consume_response(misdirected, 0.0)
    with pytest.raises(CryptoError, match="too late"):
        ini.consume_response(resp.packet, SHORT.reject_after_time)
    ini.consume_response(resp.packet, 0.5)
    with pytest.raises(CryptoError, match="already"):
        ini.consume_response(resp.packet, 0.5)


def test_argument_checks() -> None:
    with pytest.raises(ValueError):
        Initiator(I_STATIC, R_PUB, PSK, b"short", I_INDEX, 0.0, wall_time=WALL)
    with pytest.raises(ValueError):
        Initiator(I_STATIC, R_PUB, PSK, SESSION, 0, 0.0, wall_time=WALL)
    with pytest.raises(ValueError):
        Initiator(I_STATIC, R_PUB, b"short", SESSION, I_INDEX, 0.0, wall_time=WALL)
    with pytest.raises(ValueError):
        respond(initiator().create_init(), R_STATIC, lookup_for(), 2**32, 0.0)
    with pytest.raises(ValueError):
        SessionPolicy(rekey_after_time=10, reject_after_time=5)
    with pytest.raises(ValueError):
        SessionPolicy(reject_after_messages=2**64)
    with pytest.raises(ValueError):
        Keypair(b"k", bytes(32), 1, 2, 0.0, True)


def test_default_wall_clock_is_used_when_not_given() -> None:
    ini = Initiator(I_STATIC, R_PUB, PSK, SESSION, I_INDEX, 0.0)
    assert ini.timestamp > tai64n(WALL)


# --- interop of the whole session layer with noiseprotocol ---------------------------------


def _their_conn(initiator: bool, prologue: bytes) -> NoiseConnection:
    conn = NoiseConnection.from_name(b"Noise_IKpsk2_25519_AESGCM_SHA256")
    if initiator:
        conn.set_as_initiator()
        conn.set_keypair_from_private_bytes(NoiseKeypair.STATIC, _raw(I_STATIC))
        conn.set_keypair_from_public_bytes(NoiseKeypair.REMOTE_STATIC, R_PUB)
    else:
        conn.set_as_responder()
        conn.set_keypair_from_private_bytes(NoiseKeypair.STATIC, _raw(R_STATIC))
    conn.set_psks(PSK)
    conn.set_prologue(prologue)
    conn.start_handshake()
    return conn


def test_interop_noiseprotocol_initiator_with_our_respond() -> None:
    header = INIT_HEADER.pack(2, I_INDEX, SESSION)
    theirs = _their_conn(True, PROLOGUE_LABEL + header)
    packet = header + theirs.write_message(tai64n(WALL))
    resp = respond(packet, R_STATIC, lookup_for(), R_INDEX, 0.0)
    assert theirs.read_message(HandshakeResp.parse(resp.packet).noise_message) == b""
    ours = resp.keypair
    for counter in range(3):
        aad = DATA_HEADER.pack(4, R_INDEX, counter)
        ct = theirs.noise_protocol.cipher_state_encrypt.encrypt_with_ad(aad, b"in %d" % counter)
        assert ours.decrypt(aad + ct, 0.0) == b"in %d" % counter
        pkt = ours.encrypt(b"out %d" % counter, 0.0)
        their_plain = theirs.noise_protocol.cipher_state_decrypt.decrypt_with_ad(pkt[:16], pkt[16:])
        assert their_plain == b"out %d" % counter


def test_interop_our_initiator_with_noiseprotocol_responder() -> None:
    ini = initiator()
    packet = ini.create_init()
    theirs = _their_conn(False, PROLOGUE_LABEL + packet[:16])
    assert theirs.read_message(packet[16:]) == tai64n(WALL)
    resp = HandshakeResp(R_INDEX, I_INDEX, theirs.write_message(b"")).pack()
    ours = ini.consume_response(resp, 0.0)
    for counter in range(3):
        pkt = ours.encrypt(b"out %d" % counter, 0.0)
        their_plain = theirs.noise_protocol.cipher_state_decrypt.decrypt_with_ad(pkt[:16], pkt[16:])
        assert their_plain == b"out %d" % counter
        aad = DATA_HEADER.pack(4, I_INDEX, counter)
        ct = theirs.noise_protocol.cipher_state_encrypt.encrypt_with_ad(aad, b"in")
        assert ours.decrypt(aad + ct, 0.0) == b"in"


# --- data path ------------------------------------------------------------------------------


def test_counter_reuse_rejected() -> None:
    a, b = handshake()
    pkt = a.encrypt(b"once", 0.0)
    assert b.decrypt(pkt, 0.0) == b"once"
    with pytest.raises(ReplayError):
        b.decrypt(pkt, 0.0)


def test_reordered_packets_accepted_exactly_once() -> None:
    a, b = handshake()
    packets = [(a.encrypt(b"%d" % n, 0.0), b"%d" % n) for n in range(200)]
    shuffled = packets * 2
    random.Random(7).shuffle(shuffled)
    accepted = []
    for pkt, plain in shuffled:
        try:
            assert b.decrypt(pkt, 0.0) == plain
            accepted.append(plain)
        except ReplayError:
            pass
    assert sorted(accepted) == sorted(p for _, p in packets)


def test_too_old_counter_rejected() -> None:
    a, b = handshake(SessionPolicy(replay_window_bits=128))  # window of 64 counters
    old = a.encrypt(b"old", 0.0)
    for _ in range(65):
        newer = a.encrypt(b"", 0.0)
    assert b.decrypt(newer, 0.0) == b""  # counter 65: counter 0 is 65 behind
    with pytest.raises(ReplayError):
        b.decrypt(old, 0.0)


def test_forged_packets_do_not_move_the_window() -> None:
    a, b = handshake()
    genuine = a.encrypt(b"payload", 0.0)
    for pos in range(len(genuine)):  # type, reserved, index, counter, ciphertext, tag
        tampered = bytearray(genuine)
        tampered[pos] ^= 0x01
        with pytest.raises((CryptoError, DecodeError)):
            b.decrypt(bytes(tampered), 0.0)
    forged_ahead = DATA_HEADER.pack(4, R_INDEX, 10**6) + os.urandom(40)
    with pytest.raises(CryptoError):
        b.decrypt(forged_ahead, 0.0)
    assert b.replay_window.top == -1
    assert b.decrypt(genuine, 0.0) == b"payload"


def test_decrypt_rejects_misaddressed_and_malformed() -> None:
    a, b = handshake()
    pkt = a.encrypt(b"x", 0.0)
    with pytest.raises(CryptoError, match="another session"):
        a.decrypt(pkt, 0.0)  # addressed to b's index
    with pytest.raises(DecodeError):
        b.decrypt(pkt[:31], 0.0)
    with pytest.raises(DecodeError):
        b.decrypt(b"\x03" + pkt[1:], 0.0)
    other_a, _ = handshake()
    with pytest.raises(CryptoError):
        b.decrypt(other_a.encrypt(b"x", 0.0), 0.0)  # same indexes, other keys


def test_each_datagram_decrypts_on_its_own() -> None:
    a, b = handshake()
    packets = [a.encrypt(b"%d" % n, 0.0) for n in range(10)]
    for n in (9, 3, 7):
        assert b.decrypt(packets[n], 0.0) == b"%d" % n


def test_buffer_packets() -> None:
    a, b = handshake()
    assert b.decrypt(bytearray(a.encrypt(b"ba", 0.0)), 0.0) == b"ba"
    assert b.decrypt(memoryview(a.encrypt(b"mv", 0.0)), 0.0) == b"mv"


def test_repr_hides_keys() -> None:
    a, _ = handshake()
    text = repr(a)
    assert a.send_key.hex() not in text and a.recv_key.hex() not in text
    assert "0x11111111" in text


# --- rekey policy ---------------------------------------------------------------------------


def test_default_constants() -> None:
    assert REKEY_AFTER_TIME == 120 and REJECT_AFTER_TIME == 180
    assert REKEY_AFTER_MESSAGES == 2**60
    assert REJECT_AFTER_MESSAGES == 2**64 - 2**13 - 1
    p = SessionPolicy()
    assert (p.rekey_after_time, p.reject_after_time) == (120, 180)
    assert p.replay_window_bits == 8192


def test_time_based_rekey_and_expiry() -> None:
    a, b = handshake(SHORT, now=100.0)
    assert not a.needs_rekey(100.9) and not a.expired(100.9)
    assert a.needs_rekey(101.0)
    assert not b.needs_rekey(101.5)  # the responder leaves time-based rekeying to the initiator
    pkt = a.encrypt(b"late", 101.9)
    assert b.decrypt(pkt, 101.9) == b"late"
    assert a.expired(102.0) and b.expired(102.0)
    with pytest.raises(CryptoError, match="expired"):
        a.encrypt(b"", 102.0)
    late = b.encrypt(b"", 101.0)
    with pytest.raises(CryptoError, match="expired"):
        a.decrypt(late, 102.0)


def test_message_based_rekey_and_limit() -> None:
    a, b = handshake(SHORT)
    sent = [a.encrypt(b"", 0.0) for _ in range(3)]
    assert a.send_counter == 3
    assert a.needs_rekey(0.0)
    assert b.needs_rekey(0.0) is False
    sent += [a.encrypt(b"", 0.0) for _ in range(2)]
    assert a.expired(0.0)
    with pytest.raises(CryptoError, match="limit"):
        a.encrypt(b"", 0.0)
    for pkt in sent:
        b.decrypt(pkt, 0.0)
    # A counter at or beyond the limit is refused on receive as well.
    beyond = DATA_HEADER.pack(4, R_INDEX, SHORT.reject_after_messages) + bytes(16)
    with pytest.raises(ReplayError):
        b.decrypt(beyond, 0.0)
    responder_sent = [b.encrypt(b"", 0.0) for _ in range(3)]
    assert b.needs_rekey(0.0)  # message limits apply to both sides
    assert len(responder_sent) == 3


def test_generate_index(monkeypatch: pytest.MonkeyPatch) -> None:
    for _ in range(1000):
        assert 0 < generate_index() < 2**32
    draws = iter([4, 9, 11])  # randbelow(2**32 - 1) results; the index is draw + 1
    monkeypatch.setattr(secrets, "randbelow", lambda _bound: next(draws))
    assert generate_index({5, 10}) == 12


# --- fuzzing: only DecodeError / CryptoError ----------------------------------------------

_FUZZ_A, _FUZZ_B = handshake()


def _data_like() -> st.SearchStrategy[bytes]:
    valid_header = st.builds(
        lambda counter, body: DATA_HEADER.pack(4, R_INDEX, counter) + body,
        st.integers(0, 2**64 - 1),
        st.binary(max_size=100),
    )
    return st.binary(max_size=100) | valid_header


@settings(max_examples=3000, deadline=None)
@given(_data_like())
def test_fuzz_keypair_decrypt(data: bytes) -> None:
    try:
        _FUZZ_B.decrypt(data, 0.0)
    except (DecodeError, CryptoError):
        return
    raise AssertionError("random bytes decrypted")


def _init_like() -> st.SearchStrategy[bytes]:
    valid_header = st.builds(
        lambda index, body: INIT_HEADER.pack(2, index, SESSION) + body,
        st.integers(0, 2**32 - 1),
        st.binary(min_size=108, max_size=108) | st.binary(max_size=120),
    )
    return st.binary(max_size=130) | valid_header


@settings(max_examples=3000, deadline=None)
@given(_init_like())
def test_fuzz_respond(data: bytes) -> None:
    try:
        respond(data, R_STATIC, lookup_for(), R_INDEX, 0.0)
    except (DecodeError, CryptoError):
        return
    raise AssertionError("random bytes completed a handshake")


_FUZZ_INITIATOR = initiator()


def _resp_like() -> st.SearchStrategy[bytes]:
    valid_header = st.builds(
        lambda index, body: HandshakeResp(index, I_INDEX, body).pack(),
        st.integers(0, 2**32 - 1),
        st.binary(min_size=48, max_size=48),
    )
    return st.binary(max_size=70) | valid_header


@settings(max_examples=3000, deadline=None)
@given(_resp_like())
def test_fuzz_consume_response(data: bytes) -> None:
    try:
        _FUZZ_INITIATOR.consume_response(data, 0.0)
    except (DecodeError, CryptoError):
        return
    raise AssertionError("random bytes completed a handshake")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 99), max_size=300))
def test_any_delivery_order_accepts_each_packet_once(order: list[int]) -> None:
    a, b = handshake()
    packets = [a.encrypt(b"%d" % n, 0.0) for n in range(100)]
    accepted: list[int] = []
    for n in order:
        try:
            assert b.decrypt(packets[n], 0.0) == b"%d" % n
            accepted.append(n)
        except ReplayError:
            assert n in accepted
    assert sorted(accepted) == sorted(set(order))
