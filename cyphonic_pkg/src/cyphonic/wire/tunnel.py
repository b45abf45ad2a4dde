"""Codecs for the tunnel packets that share the node's UDP socket.

Every datagram starts with a one-byte :class:`PacketType`; the tunnel packets follow it with
three reserved zero bytes so that the 32-bit fields after them are aligned (the layout of
WireGuard's messages, with our own type codes).  All integers are big-endian.

HandshakeInit (type 2), 124 bytes::

     0      1               4                   8                              16
    +------+---------------+-------------------+-------------------------------+
    | 0x02 | reserved (0)  | sender_index u32  | session_id (8 bytes, NMS)     |
    +------+---------------+-------------------+-------------------------------+
    | Noise message 1 (108 bytes):                                             |
    |   ephemeral (32) | encrypted static (32 + 16 tag) |                      |
    |   encrypted payload = TAI64N timestamp (12 + 16 tag)                     |
    +--------------------------------------------------------------------------+

HandshakeResp (type 3), 60 bytes::

     0      1               4                   8                   12
    +------+---------------+-------------------+-------------------+
    | 0x03 | reserved (0)  | sender_index u32  | receiver_index u32|
    +------+---------------+-------------------+-------------------+
    | Noise message 2 (48 bytes): ephemeral (32) | encrypted empty payload (16 tag) |
    +-------------------------------------------------------------------------------+

Data (type 4), 32 bytes or more::

     0      1               4                     8                               16
    +------+---------------+---------------------+-------------------------------+
    | 0x04 | reserved (0)  | receiver_index u32  | counter u64                   |
    +------+---------------+---------------------+-------------------------------+
    | AES-256-GCM ciphertext of the inner packet (0 bytes = keepalive) | tag (16) |
    +--------------------------------------------------------------------------+

The 16-byte Data header is the AEAD associated data, and ``counter`` is the nonce
(4 zero bytes || counter), so every datagram decrypts on its own.  ``sender_index`` is the
index the *sender* chose for this session; the peer puts it in ``receiver_index`` of what it
sends back, which is how a receiver finds the session of a datagram without trying keys.

Signaling (type 1) is decoded by the signaling codecs; its code is only reserved here.

The dataclasses are for the handshake and for tests.  The data path uses :data:`DATA_HEADER`
and :func:`data_receiver_index` directly so that no object is built per packet.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Final, TypeAlias

from cyphonic.errors import DecodeError

__all__ = [
    "DATA_HEADER",
    "DATA_HEADER_LEN",
    "DATA_MIN_LEN",
    "HANDSHAKE_INIT_LEN",
    "HANDSHAKE_RESP_LEN",
    "INIT_HEADER",
    "NOISE_MSG1_LEN",
    "NOISE_MSG2_LEN",
    "RESP_HEADER",
    "SESSION_ID_LEN",
    "TAG_LEN",
    "TAI64N_LEN",
    "BytesLike",
    "Data",
    "HandshakeInit",
    "HandshakeResp",
    "PacketType",
    "data_receiver_index",
    "packet_type",
]


#: What the parsers accept: ``bytes`` from ``datagram_received``, or a receive buffer.
BytesLike: TypeAlias = bytes | bytearray | memoryview


class PacketType(IntEnum):
    """First byte of every datagram on the node's UDP socket."""

    SIGNALING = 1
    HANDSHAKE_INIT = 2
    HANDSHAKE_RESP = 3
    DATA = 4
    RELAY_BIND = 5  # node <-> TRS, see wire/relay.py
    RELAY_BIND_ACK = 6
    RELAY_DATA = 7
    TRS_CONTROL = 8  # NMS <-> TRS
    PUNCH = 9  # "open my NAPT mapping toward you": type(1) + session id(8), ignored on receipt


TAG_LEN: Final = 16
KEY_LEN: Final = 32
SESSION_ID_LEN: Final = 8
TAI64N_LEN: Final = 12
#: ephemeral || ENC(static) || ENC(timestamp)
NOISE_MSG1_LEN: Final = KEY_LEN + (KEY_LEN + TAG_LEN) + (TAI64N_LEN + TAG_LEN)  # 108
#: ephemeral || ENC(empty payload)
NOISE_MSG2_LEN: Final = KEY_LEN + TAG_LEN  # 48

#: type, 3 reserved bytes, sender_index, session_id
INIT_HEADER: Final = struct.Struct("!B3xI8s")
#: type, 3 reserved bytes, sender_index, receiver_index
RESP_HEADER: Final = struct.Struct("!B3xII")
#: type, 3 reserved bytes, receiver_index, counter  -- also the AEAD associated data
DATA_HEADER: Final = struct.Struct("!B3xIQ")

HANDSHAKE_INIT_LEN: Final = INIT_HEADER.size + NOISE_MSG1_LEN  # 124
HANDSHAKE_RESP_LEN: Final = RESP_HEADER.size + NOISE_MSG2_LEN  # 60
DATA_HEADER_LEN: Final = DATA_HEADER.size  # 16
DATA_MIN_LEN: Final = DATA_HEADER_LEN + TAG_LEN  # 32, a keepalive

_U32_MAX: Final = 0xFFFFFFFF
_U64_MAX: Final = 0xFFFFFFFFFFFFFFFF
_ZERO3: Final = b"\x00\x00\x00"
_TYPES: Final = frozenset(int(t) for t in PacketType)
_RECEIVER_INDEX = struct.Struct("!4xI")


def packet_type(data: BytesLike) -> PacketType:
    """The type of a datagram from its first byte; DecodeError if empty or unknown."""
    if not data:
        raise DecodeError("empty datagram")
    code = data[0]
    if code not in _TYPES:
        raise DecodeError(f"unknown packet type {code}")
    return PacketType(code)


def data_receiver_index(data: BytesLike) -> int:
    """Hot path: the receiver index of a Data packet without building an object.

    Only checks the length; the type byte is the dispatcher's business and the header is
    authenticated by the AEAD anyway.
    """
    if len(data) < DATA_MIN_LEN:
        raise DecodeError("data packet too short")
    index: int = _RECEIVER_INDEX.unpack_from(data)[0]
    return index


def _check_header(data: bytes, expected: PacketType, size: int, exact: bool) -> None:
    if exact and len(data) != size:
        raise DecodeError(f"{expected.name} must be {size} bytes, got {len(data)}")
    if len(data) < size:
        raise DecodeError(f"{expected.name} must be at least {size} bytes, got {len(data)}")
    if data[0] != expected:
        raise DecodeError(f"not a {expected.name} packet")
    if data[1:4] != _ZERO3:
        raise DecodeError("reserved bytes are not zero")


def _check_u32(name: str, value: int) -> None:
    if not 0 <= value <= _U32_MAX:
        raise ValueError(f"{name} out of range for u32")


@dataclass(frozen=True, slots=True)
class HandshakeInit:
    """First handshake message: ``-> e, es, s, ss`` plus a TAI64N timestamp (124 bytes)."""

    sender_index: int
    session_id: bytes
    noise_message: bytes

    def __post_init__(self) -> None:
        _check_u32("sender_index", self.sender_index)
        if len(self.session_id) != SESSION_ID_LEN:
            raise ValueError("session_id must be 8 bytes")
        if len(self.noise_message) != NOISE_MSG1_LEN:
            raise ValueError(f"noise_message must be {NOISE_MSG1_LEN} bytes")

    @property
    def header(self) -> bytes:
        """The first 16 bytes (type, reserved, sender_index, session_id)."""
        return INIT_HEADER.pack(PacketType.HANDSHAKE_INIT, self.sender_index, self.session_id)

    @classmethod
    def parse(cls, data: BytesLike) -> HandshakeInit:
        """Decode exactly 124 bytes; DecodeError otherwise."""
        data = bytes(data)
        _check_header(data, PacketType.HANDSHAKE_INIT, HANDSHAKE_INIT_LEN, exact=True)
        _, sender_index, session_id = INIT_HEADER.unpack_from(data)
        return cls(sender_index, session_id, data[INIT_HEADER.size :])

    def pack(self) -> bytes:
        """Encode to 124 bytes."""
        return self.header + self.noise_message


@dataclass(frozen=True, slots=True)
class HandshakeResp:
    """Second handshake message: ``<- e, ee, se, psk`` with an empty payload (60 bytes)."""

    sender_index: int
    receiver_index: int
    noise_message: bytes

    def __post_init__(self) -> None:
        _check_u32("sender_index", self.sender_index)
        _check_u32("receiver_index", self.receiver_index)
        if len(self.noise_message) != NOISE_MSG2_LEN:
            raise ValueError(f"noise_message must be {NOISE_MSG2_LEN} bytes")

    @classmethod
    def parse(cls, data: BytesLike) -> HandshakeResp:
        """Decode exactly 60 bytes; DecodeError otherwise."""
        data = bytes(data)
        _check_header(data, PacketType.HANDSHAKE_RESP, HANDSHAKE_RESP_LEN, exact=True)
        _, sender_index, receiver_index = RESP_HEADER.unpack_from(data)
        return cls(sender_index, receiver_index, data[RESP_HEADER.size :])

    def pack(self) -> bytes:
        """Encode to 60 bytes."""
        header = RESP_HEADER.pack(PacketType.HANDSHAKE_RESP, self.sender_index, self.receiver_index)
        return header + self.noise_message


@dataclass(frozen=True, slots=True)
class Data:
    """A transport packet: 16-byte header then ciphertext||tag (at least 32 bytes)."""

    receiver_index: int
    counter: int
    ciphertext: bytes

    def __post_init__(self) -> None:
        _check_u32("receiver_index", self.receiver_index)
        if not 0 <= self.counter <= _U64_MAX:
            raise ValueError("counter out of range for u64")
        if len(self.ciphertext) < TAG_LEN:
            raise ValueError("ciphertext must hold at least the 16-byte tag")

    @property
    def header(self) -> bytes:
        """The 16-byte header, which is also the AEAD associated data."""
        return DATA_HEADER.pack(PacketType.DATA, self.receiver_index, self.counter)

    @classmethod
    def parse(cls, data: BytesLike) -> Data:
        """Decode a Data packet of 32 bytes or more; DecodeError otherwise."""
        data = bytes(data)
        _check_header(data, PacketType.DATA, DATA_MIN_LEN, exact=False)
        _, receiver_index, counter = DATA_HEADER.unpack_from(data)
        return cls(receiver_index, counter, data[DATA_HEADER_LEN:])

    def pack(self) -> bytes:
        """Encode header || ciphertext."""
        return self.header + self.ciphertext
