"""Codecs of the Tunnel Relay Server (TRS): node <-> TRS packets and NMS <-> TRS control.

The first byte of every datagram continues :class:`cyphonic.wire.tunnel.PacketType`:
5 RELAY_BIND, 6 RELAY_BIND_ACK, 7 RELAY_DATA (node <-> TRS) and 8 TRS_CONTROL (NMS <-> TRS,
on NMS's signaling socket, where the first byte tells it from signaling, type 1).
All integers are big-endian.

RelayBind (type 5, node -> TRS) and RelayBindAck (type 6, TRS -> node), 36 bytes each::

     0      1      2             4                              12                      20
    +------+------+-------------+------------------------------+-----------------------+
    | type | side | reserved(0) | session_id (8 bytes, NMS)    | timestamp_ms (u64)    |
    +------+------+-------------+------------------------------+-----------------------+
    | mac = HMAC-SHA256(relay_key, bytes 0..19)[:16]                                    |
    +-----------------------------------------------------------------------------------+

``side`` is 0 for the MN and 1 for the CN of the session; ``relay_key`` is the 32-byte key
NMS gave both nodes (Route Direction) and the TRS (Relay Request).  The TRS learns the side's
endpoint from the bind's *source* (the NAT mapping), accepts only a timestamp newer than the
last one of that side (replay), and answers with the same fields under type 6; because the
type byte is inside the MAC, a bind cannot pass for an ack or the other way round.

RelayData (type 7, both directions), 13 bytes or more::

     0      1                   4                              12
    +------+-------------------+------------------------------+------------------------
    | 0x07 | reserved (0)      | session_id (8 bytes)         | payload: the node's tunnel
    +------+-------------------+------------------------------+ datagram (type 2, 3 or 4)
                                                                 already end-to-end encrypted

The TRS forwards the whole datagram unchanged to the other side; the receiving node strips
the 12-byte header and handles the payload as if it came straight from the peer.

TRS control (type 8) is the signaling envelope of :mod:`cyphonic.wire.signaling` with type 8
instead of 1 (``key_id`` = the TRS's ``trs_id``, direction 0 TRS -> NMS, 1 NMS -> TRS)::

    0x08 | dir | rsvd(2) | key_id (u32) | counter (u64) | AES-256-GCM ciphertext + tag

Its plaintext is a TLV message (``msg_type | txid | TLV*``) of :class:`ControlType`, whose codes
start at 32 so that they are never mistaken for signaling messages.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar, Final, Self

from cyphonic.errors import DecodeError
from cyphonic.wire import signaling as sig
from cyphonic.wire.signaling import Endpoint, FieldSpec, Kind, Message
from cyphonic.wire.tunnel import BytesLike

__all__ = [
    "BIND",
    "BIND_LEN",
    "CONTROL_MESSAGES",
    "DATA_HEADER",
    "DATA_HEADER_LEN",
    "DATA_MIN_LEN",
    "KEY_LEN",
    "MAC_LEN",
    "RELAY_BIND",
    "RELAY_BIND_ACK",
    "RELAY_DATA",
    "SESSION_ID_LEN",
    "TRS_CONTROL",
    "ControlHeader",
    "ControlMessage",
    "ControlType",
    "RelayBind",
    "RelayBindAck",
    "RelayData",
    "RelayRequest",
    "RelayResponse",
    "Side",
    "TrsHello",
    "TrsHelloAck",
    "bind_mac",
    "data_session_id",
    "parse_control",
]

#: Packet types (first byte), continuing ``PacketType`` of wire/tunnel.py.
RELAY_BIND: Final = 5
RELAY_BIND_ACK: Final = 6
RELAY_DATA: Final = 7
TRS_CONTROL: Final = 8

SESSION_ID_LEN: Final = 8
KEY_LEN: Final = 32
MAC_LEN: Final = 16
_U64_MAX: Final = 0xFFFFFFFFFFFFFFFF
_ZERO2: Final = b"\x00\x00"
_ZERO3: Final = b"\x00\x00\x00"

#: type, side, 2 reserved bytes, session_id, timestamp_ms -- the MAC'd part of a bind (ack)
BIND: Final = struct.Struct("!BBxx8sQ")
BIND_LEN: Final = BIND.size + MAC_LEN  # 36
#: type, 3 reserved bytes, session_id
DATA_HEADER: Final = struct.Struct("!B3x8s")
DATA_HEADER_LEN: Final = DATA_HEADER.size  # 12
DATA_MIN_LEN: Final = DATA_HEADER_LEN + 1  # an empty payload is never relayed


class Side(IntEnum):
    """Which end of the relayed session a node is."""

    MN = 0
    CN = 1


def bind_mac(relay_key: bytes, head: bytes) -> bytes:
    """The 16-byte MAC of a bind or bind ack: HMAC-SHA256(relay_key, head)[:16]."""
    return hmac.digest(relay_key, head, hashlib.sha256)[:MAC_LEN]


@dataclass(frozen=True, slots=True)
class RelayBind:
    """Node -> TRS: "this is where side ``side`` of ``session_id`` is now" (36 bytes).

    ``parse`` checks the layout only; :meth:`verify` checks the MAC with the session's key.
    """

    TYPE: ClassVar[int] = RELAY_BIND

    side: Side
    session_id: bytes
    timestamp_ms: int
    mac: bytes

    def __post_init__(self) -> None:
        if len(self.session_id) != SESSION_ID_LEN:
            raise ValueError("session_id must be 8 bytes")
        if not 0 <= self.timestamp_ms <= _U64_MAX:
            raise ValueError("timestamp_ms out of range for u64")
        if len(self.mac) != MAC_LEN:
            raise ValueError("mac must be 16 bytes")

    @property
    def head(self) -> bytes:
        """The 20 bytes the MAC covers."""
        return BIND.pack(self.TYPE, self.side, self.session_id, self.timestamp_ms)

    @classmethod
    def create(cls, relay_key: bytes, side: Side, session_id: bytes, timestamp_ms: int) -> Self:
        """Build a bind (or ack) with its MAC computed under ``relay_key``."""
        head = BIND.pack(cls.TYPE, side, session_id, timestamp_ms)
        return cls(side, session_id, timestamp_ms, bind_mac(relay_key, head))

    def verify(self, relay_key: bytes) -> bool:
        """Constant-time check of the MAC."""
        return hmac.compare_digest(self.mac, bind_mac(relay_key, self.head))

    @classmethod
    def parse(cls, data: BytesLike) -> Self:
        """Decode exactly 36 bytes; DecodeError otherwise."""
        data = bytes(data)
        if len(data) != BIND_LEN:
            raise DecodeError(f"relay bind must be {BIND_LEN} bytes, got {len(data)}")
        ptype, side, session_id, timestamp_ms = BIND.unpack_from(data)
        if ptype != cls.TYPE:
            raise DecodeError(f"not a packet of type {cls.TYPE}")
        if data[2:4] != _ZERO2:
            raise DecodeError("reserved bytes are not zero")
        if side not in (Side.MN, Side.CN):
            raise DecodeError(f"unknown relay side {side}")
        return cls(Side(side), session_id, timestamp_ms, data[BIND.size :])

    def pack(self) -> bytes:
        """Encode to 36 bytes."""
        return self.head + self.mac


@dataclass(frozen=True, slots=True)
class RelayBindAck(RelayBind):
    """TRS -> node: the bind was accepted (same fields, type 6, MAC under the same key)."""

    TYPE: ClassVar[int] = RELAY_BIND_ACK

    @classmethod
    def answer(cls, relay_key: bytes, bind: RelayBind) -> RelayBindAck:
        return cls.create(relay_key, bind.side, bind.session_id, bind.timestamp_ms)


def data_session_id(data: BytesLike) -> bytes:
    """Hot path: the session id of a RelayData datagram without building an object.

    Checks the length and the reserved bytes; the type byte is the dispatcher's business.
    """
    if len(data) < DATA_MIN_LEN:
        raise DecodeError("relay data too short")
    if data[1:4] != _ZERO3:
        raise DecodeError("reserved bytes are not zero")
    return bytes(data[4:DATA_HEADER_LEN])


@dataclass(frozen=True, slots=True)
class RelayData:
    """A tunnel datagram wrapped for the relay: 12-byte header then the payload."""

    session_id: bytes
    payload: bytes

    def __post_init__(self) -> None:
        if len(self.session_id) != SESSION_ID_LEN:
            raise ValueError("session_id must be 8 bytes")
        if not self.payload:
            raise ValueError("payload must not be empty")

    @classmethod
    def parse(cls, data: BytesLike) -> RelayData:
        """Decode 13 bytes or more; DecodeError otherwise."""
        data = bytes(data)
        if not data or data[0] != RELAY_DATA:
            raise DecodeError("not a relay data packet")
        session_id = data_session_id(data)
        return cls(session_id, data[DATA_HEADER_LEN:])

    @staticmethod
    def wrap(session_id: bytes, payload: bytes) -> bytes:
        """Hot path for senders: header || payload, no object built."""
        return DATA_HEADER.pack(RELAY_DATA, session_id) + payload

    def pack(self) -> bytes:
        return self.wrap(self.session_id, self.payload)


# -- NMS <-> TRS control --------------------------------------------------------------------


@dataclass(frozen=True)
class ControlHeader:
    """The 16-byte header of a TRS control datagram (type 8)."""

    direction: sig.Direction  # TO_NMS = from the TRS, TO_NODE = from NMS to the TRS
    key_id: int  # the TRS's trs_id
    counter: int

    def pack(self) -> bytes:
        return sig.HEADER.pack(TRS_CONTROL, self.direction, self.key_id, self.counter)

    @classmethod
    def parse(cls, data: BytesLike) -> ControlHeader:
        if len(data) < sig.HEADER_LEN + sig.TAG_LEN:
            raise DecodeError("TRS control datagram too short")
        ptype, direction, key_id, counter = sig.HEADER.unpack_from(data, 0)
        if ptype != TRS_CONTROL:
            raise DecodeError("not a TRS control datagram")
        if direction not in (0, 1):
            raise DecodeError("bad TRS control direction")
        return cls(sig.Direction(direction), key_id, counter)


class ControlType(IntEnum):
    TRS_HELLO = 32
    TRS_HELLO_ACK = 33
    RELAY_REQUEST = 34
    RELAY_RESPONSE = 35


@dataclass(frozen=True)
class ControlMessage(Message):
    """Base of the NMS <-> TRS messages (the signaling TLV machinery, other type codes)."""

    TYPE: ClassVar[ControlType]  # type: ignore[assignment]


@dataclass(frozen=True)
class TrsHello(ControlMessage):
    """TRS -> NMS every 5 s: who I am, where nodes reach me, how loaded I am."""

    TYPE: ClassVar[ControlType] = ControlType.TRS_HELLO
    FIELDS: ClassVar[tuple[FieldSpec, ...]] = (
        FieldSpec("trs_id", 1, Kind.U32),
        FieldSpec("endpoints", 2, Kind.ENDPOINT, repeated=True),
        FieldSpec("active_sessions", 3, Kind.U32),
        FieldSpec("capacity", 4, Kind.U32),
    )
    trs_id: int = 0
    endpoints: tuple[Endpoint, ...] = ()
    active_sessions: int = 0
    capacity: int = 0


@dataclass(frozen=True)
class TrsHelloAck(ControlMessage):
    """NMS -> TRS: hello received (the TRS shows when each NMS last answered)."""

    TYPE: ClassVar[ControlType] = ControlType.TRS_HELLO_ACK


def _check_session(session_id: bytes) -> None:
    if len(session_id) != SESSION_ID_LEN:
        raise ValueError("session_id must be 8 bytes")


@dataclass(frozen=True)
class RelayRequest(ControlMessage):
    """NMS -> TRS: open (or renew) relayed session ``session_id`` for ``lifetime`` seconds."""

    TYPE: ClassVar[ControlType] = ControlType.RELAY_REQUEST
    FIELDS: ClassVar[tuple[FieldSpec, ...]] = (
        FieldSpec("session_id", 1, Kind.BYTES),
        FieldSpec("relay_key", 2, Kind.BYTES),
        FieldSpec("lifetime", 3, Kind.U32),
    )
    session_id: bytes = b""
    relay_key: bytes = b""
    lifetime: int = 0

    def __post_init__(self) -> None:
        _check_session(self.session_id)
        if len(self.relay_key) != KEY_LEN:
            raise ValueError("relay_key must be 32 bytes")

    def __repr__(self) -> str:  # never print the key
        return (
            f"RelayRequest(txid={self.txid}, session_id={self.session_id.hex()}, "
            f"lifetime={self.lifetime})"
        )


@dataclass(frozen=True)
class RelayResponse(ControlMessage):
    """TRS -> NMS: the session is open (``ok`` = 1) at ``endpoints``, or refused (0)."""

    TYPE: ClassVar[ControlType] = ControlType.RELAY_RESPONSE
    FIELDS: ClassVar[tuple[FieldSpec, ...]] = (
        FieldSpec("session_id", 1, Kind.BYTES),
        FieldSpec("ok", 2, Kind.U8),
        FieldSpec("endpoints", 3, Kind.ENDPOINT, repeated=True),
    )
    session_id: bytes = b""
    ok: int = 1
    endpoints: tuple[Endpoint, ...] = ()

    def __post_init__(self) -> None:
        _check_session(self.session_id)
        if self.ok not in (0, 1):
            raise ValueError("ok must be 0 or 1")


CONTROL_MESSAGES: dict[int, type[ControlMessage]] = {
    cls.TYPE: cls for cls in (TrsHello, TrsHelloAck, RelayRequest, RelayResponse)
}

_PLAIN_HEAD = struct.Struct("!BI")


def parse_control(data: bytes) -> ControlMessage:
    """Decode a TRS control plaintext; ``DecodeError`` on anything malformed."""
    if len(data) < _PLAIN_HEAD.size:
        raise DecodeError("TRS control message shorter than its header")
    if len(data) > sig.MAX_PLAINTEXT:
        raise DecodeError("TRS control message too long")
    mtype, txid = _PLAIN_HEAD.unpack_from(data, 0)
    cls = CONTROL_MESSAGES.get(mtype)
    if cls is None:
        raise DecodeError(f"unknown TRS control message type {mtype}")
    return sig._build(cls, txid, data, _PLAIN_HEAD.size)
