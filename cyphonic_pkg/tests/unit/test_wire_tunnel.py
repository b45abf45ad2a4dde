"""Tunnel packet codecs: layout vectors, round trips, and fuzzing of every parser.

The hex vectors spell out the layouts documented in ``cyphonic.wire.tunnel`` byte by byte
(our own format: no external RFC defines it).
"""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cyphonic.errors import DecodeError
from cyphonic.wire.tunnel import (
    DATA_HEADER,
    DATA_MIN_LEN,
    HANDSHAKE_INIT_LEN,
    HANDSHAKE_RESP_LEN,
    NOISE_MSG1_LEN,
    NOISE_MSG2_LEN,
    Data,
    HandshakeInit,
    HandshakeResp,
    PacketType,
    data_receiver_index,
    packet_type,
)

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)


def test_sizes() -> None:
    assert NOISE_MSG1_LEN == 32 + 48 + 28 == 108
    assert NOISE_MSG2_LEN == 48
    assert HANDSHAKE_INIT_LEN == 124
    assert HANDSHAKE_RESP_LEN == 60
    assert DATA_HEADER.size == 16 and DATA_MIN_LEN == 32


def test_handshake_init_vector() -> None:
    msg = bytes(range(108))
    pkt = HandshakeInit(0x0A0B0C0D, bytes.fromhex("1122334455667788"), msg)
    expected = bytes.fromhex("020000000a0b0c0d1122334455667788") + msg
    assert pkt.pack() == expected
    assert pkt.header == expected[:16]
    assert HandshakeInit.parse(expected) == pkt


def test_handshake_resp_vector() -> None:
    msg = bytes(range(48))
    pkt = HandshakeResp(0x01020304, 0xFFFFFFFF, msg)
    expected = bytes.fromhex("0300000001020304ffffffff") + msg
    assert pkt.pack() == expected
    assert HandshakeResp.parse(expected) == pkt


def test_data_vector() -> None:
    pkt = Data(0x01020304, 0x0000000100000002, b"\xaa" * 16)
    expected = bytes.fromhex("04000000010203040000000100000002") + b"\xaa" * 16
    assert pkt.pack() == expected
    assert pkt.header == expected[:16]
    assert DATA_HEADER.pack(4, 0x01020304, 0x0000000100000002) == expected[:16]
    assert Data.parse(expected) == pkt
    assert data_receiver_index(expected) == 0x01020304


def test_packet_type() -> None:
    for t in PacketType:
        assert packet_type(bytes([t]) + b"rest") is t
    assert [int(t) for t in PacketType] == list(range(1, 10))
    for bad in (b"", b"\x00", b"\x0a", b"\xff"):
        with pytest.raises(DecodeError):
            packet_type(bad)


@pytest.mark.parametrize(
    ("cls", "good"),
    [
        (HandshakeInit, HandshakeInit(1, bytes(8), bytes(108)).pack()),
        (HandshakeResp, HandshakeResp(1, 2, bytes(48)).pack()),
        (Data, Data(1, 2, bytes(16)).pack()),
    ],
)
def test_parse_rejects_bad_bytes(
    cls: type[HandshakeInit | HandshakeResp | Data], good: bytes
) -> None:
    cls.parse(good)
    bad_samples = [
        b"",
        good[:1],
        good[:-1],
        bytes([good[0] % 4 + 1]) + good[1:],  # another type
        good[:1] + b"\x00\x01\x00" + good[4:],  # reserved byte set
    ]
    if cls is not Data:  # Data has a variable length
        bad_samples.append(good + b"\x00")
    for bad in bad_samples:
        with pytest.raises(DecodeError):
            cls.parse(bad)


def test_data_accepts_any_length_from_32() -> None:
    for extra in (0, 1, 1400, 65000):
        assert len(Data.parse(Data(7, 9, bytes(16 + extra)).pack()).ciphertext) == 16 + extra


def test_data_receiver_index_short() -> None:
    with pytest.raises(DecodeError):
        data_receiver_index(bytes(31))


def test_constructors_validate() -> None:
    with pytest.raises(ValueError):
        HandshakeInit(-1, bytes(8), bytes(108))
    with pytest.raises(ValueError):
        HandshakeInit(2**32, bytes(8), bytes(108))
    with pytest.raises(ValueError):
        HandshakeInit(1, bytes(7), bytes(108))
    with pytest.raises(ValueError):
        HandshakeInit(1, bytes(8), bytes(107))
    with pytest.raises(ValueError):
        HandshakeResp(1, 2**32, bytes(48))
    with pytest.raises(ValueError):
        HandshakeResp(1, 2, bytes(47))
    with pytest.raises(ValueError):
        Data(1, 2**64, bytes(16))
    with pytest.raises(ValueError):
        Data(1, 0, bytes(15))


# --- round trips --------------------------------------------------------------------------


@given(u32, st.binary(min_size=8, max_size=8), st.binary(min_size=108, max_size=108))
def test_handshake_init_round_trip(index: int, session_id: bytes, msg: bytes) -> None:
    pkt = HandshakeInit(index, session_id, msg)
    raw = pkt.pack()
    assert len(raw) == HANDSHAKE_INIT_LEN
    assert packet_type(raw) is PacketType.HANDSHAKE_INIT
    assert HandshakeInit.parse(raw) == pkt
    assert HandshakeInit.parse(bytearray(raw)) == pkt
    assert HandshakeInit.parse(memoryview(raw)) == pkt
    assert packet_type(memoryview(raw)) is PacketType.HANDSHAKE_INIT


@given(u32, u32, st.binary(min_size=48, max_size=48))
def test_handshake_resp_round_trip(sender: int, receiver: int, msg: bytes) -> None:
    pkt = HandshakeResp(sender, receiver, msg)
    raw = pkt.pack()
    assert len(raw) == HANDSHAKE_RESP_LEN
    assert packet_type(raw) is PacketType.HANDSHAKE_RESP
    assert HandshakeResp.parse(raw) == pkt


@given(u32, u64, st.binary(min_size=16, max_size=2000))
def test_data_round_trip(receiver: int, counter: int, ct: bytes) -> None:
    pkt = Data(receiver, counter, ct)
    raw = pkt.pack()
    assert packet_type(raw) is PacketType.DATA
    assert Data.parse(raw) == pkt
    assert DATA_HEADER.unpack_from(raw) == (4, receiver, counter)
    assert data_receiver_index(raw) == receiver


# --- fuzzing: only DecodeError ------------------------------------------------------------

# Random bytes, plus random bytes behind a valid type byte and zero reserved bytes so the
# fuzzer reaches past the first checks.
_any_bytes = st.binary(max_size=200) | st.builds(
    lambda t, body: bytes([t, 0, 0, 0]) + body,
    st.integers(1, 4),
    st.binary(max_size=150)
    | st.binary(min_size=120, max_size=120)  # a whole HandshakeInit
    | st.binary(min_size=56, max_size=56),  # a whole HandshakeResp
)


@settings(max_examples=3000)
@given(_any_bytes)
def test_fuzz_packet_type(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        assert 1 <= int(packet_type(data)) <= 9


@settings(max_examples=3000)
@given(_any_bytes)
def test_fuzz_handshake_init_parse(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        assert HandshakeInit.parse(data).pack() == data


@settings(max_examples=3000)
@given(_any_bytes)
def test_fuzz_handshake_resp_parse(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        assert HandshakeResp.parse(data).pack() == data


@settings(max_examples=3000)
@given(_any_bytes)
def test_fuzz_data_parse(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        assert Data.parse(data).pack() == data


@settings(max_examples=3000)
@given(_any_bytes)
def test_fuzz_data_receiver_index(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        data_receiver_index(data)
