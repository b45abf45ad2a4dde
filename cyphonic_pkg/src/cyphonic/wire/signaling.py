"""Node <-> NMS signaling messages (pure codec, no I/O, no clocks).

Every signaling datagram on the wire is::

    0      1      2      4              8                      16
    +------+------+------+--------------+----------------------+----------------
    | type | dir  | rsvd | key_id (u32) | counter (u64)        | AEAD ciphertext
    +------+------+------+--------------+----------------------+----------------

``type`` is ``PacketType.SIGNALING`` (1), ``dir`` is 0 node->NMS and 1 NMS->node,
``key_id`` names the node-NMS common key handed out by AS at login, ``counter``
is the sender's message counter (AES-256-GCM nonce = 4 zero bytes || counter,
replay window on the receiver).  The 16-byte header is the associated data.

The plaintext inside is::

    msg_type (u8) | txid (u32) | TLV*        TLV = tag (u8) | length (u16) | value

Unknown tags are ignored (forward compatibility); a non-repeated tag that
appears twice, a missing required tag or a value of the wrong size raise
``DecodeError``.  Each message class lists its fields as ``FieldSpec``s; the
generic ``pack``/``parse`` below do the rest.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar, TypeVar

from cyphonic.errors import DecodeError

SIGNALING_TYPE = 1
HEADER = struct.Struct("!BBxxIQ")
HEADER_LEN = HEADER.size  # 16
TAG_LEN = 16
MAX_PLAINTEXT = 8192

_PLAIN_HEAD = struct.Struct("!BI")
_TLV_HEAD = struct.Struct("!BH")


class Direction(IntEnum):
    TO_NMS = 0
    TO_NODE = 1


class MsgType(IntEnum):
    REGISTRATION = 1
    REGISTRATION_ACK = 2
    KEEPALIVE = 3
    KEEPALIVE_ACK = 4
    DIRECTION_REQUEST = 5
    ROUTE_DIRECTION = 6
    CONFIRMATION = 7
    ERROR = 8


class Path(IntEnum):
    """How the two peers reach each other (``cyphonic status`` shows the name)."""

    DIRECT = 1
    PUNCHED = 2
    LOCAL = 3
    RELAYED = 4


class Reason(IntEnum):
    """Why NMS chose the path; shown by ``cyphonic status``."""

    COMMON_FAMILY_PUBLIC = 1  # both reachable in a common address family
    CN_BEHIND_NAPT = 2  # hole punching coordinated by NMS
    BOTH_BEHIND_NAPT = 3
    SAME_NAPT = 4  # local addresses behind the same NAPT
    NO_COMMON_FAMILY = 5  # IPv4-only <-> IPv6-only: relay
    PUNCH_FAILED = 6  # hole punching did not complete in time: relayed
    MN_BEHIND_NAPT = 7  # the MN's own packets open its mapping: direct


class Role(IntEnum):
    INITIATOR = 1  # the MN: sends the Tunnel Request (Noise message 1)
    RESPONDER = 2  # the CN


class ErrorCode(IntEnum):
    UNKNOWN_FQDN = 1
    NOT_AUTHORIZED = 2
    NOT_REGISTERED = 3  # the asking node, or the peer, has no registration
    NO_PATH = 4
    PEER_UNREACHABLE = 5
    UNKNOWN_KEY = 6  # key_id expired or unknown: log in to AS again
    BAD_REQUEST = 7


class Kind(IntEnum):
    U8 = 1
    U16 = 2
    U32 = 3
    BYTES = 4
    STR = 5
    IP = 6  # 4 or 16 bytes
    ENDPOINT = 7  # ip (4 or 16 bytes) + port (u16)


@dataclass(frozen=True)
class FieldSpec:
    name: str
    tag: int
    kind: Kind
    repeated: bool = False
    optional: bool = False


Endpoint = tuple[str, int]  # (ip string, port)


def format_endpoint(ep: Endpoint) -> str:
    host, port = ep
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_endpoint(text: str) -> Endpoint:
    """Parse ``1.2.3.4:5`` or ``[2001:db8::1]:5``; ``DecodeError`` otherwise."""
    try:
        if text.startswith("["):
            host, _, port = text[1:].partition("]:")
        else:
            host, _, port = text.rpartition(":")
        addr = ipaddress.ip_address(host)
        p = int(port)
    except ValueError as exc:
        raise DecodeError(f"bad endpoint {text!r}: expected ip:port or [ip6]:port") from exc
    if not 0 < p < 65536:
        raise DecodeError(f"bad endpoint {text!r}: port out of range")
    return (str(addr), p)


def _enc(kind: Kind, value: Any) -> bytes:
    if kind is Kind.U8:
        return struct.pack("!B", value)
    if kind is Kind.U16:
        return struct.pack("!H", value)
    if kind is Kind.U32:
        return struct.pack("!I", value)
    if kind is Kind.BYTES:
        return bytes(value)
    if kind is Kind.STR:
        return str(value).encode()
    if kind is Kind.IP:
        return ipaddress.ip_address(value).packed
    host, port = value
    return ipaddress.ip_address(host).packed + struct.pack("!H", port)


def _dec(kind: Kind, raw: bytes) -> Any:
    n = len(raw)
    if kind is Kind.U8:
        if n != 1:
            raise DecodeError("u8 field of wrong size")
        return raw[0]
    if kind is Kind.U16:
        if n != 2:
            raise DecodeError("u16 field of wrong size")
        return struct.unpack("!H", raw)[0]
    if kind is Kind.U32:
        if n != 4:
            raise DecodeError("u32 field of wrong size")
        return struct.unpack("!I", raw)[0]
    if kind is Kind.BYTES:
        return raw
    if kind is Kind.STR:
        try:
            return raw.decode()
        except UnicodeDecodeError as exc:
            raise DecodeError("string field is not UTF-8") from exc
    if kind is Kind.IP:
        if n not in (4, 16):
            raise DecodeError("address field of wrong size")
        return str(ipaddress.ip_address(raw))
    if n not in (6, 18):
        raise DecodeError("endpoint field of wrong size")
    return (str(ipaddress.ip_address(raw[:-2])), struct.unpack("!H", raw[-2:])[0])


@dataclass(frozen=True)
class Message:
    """Base of every signaling message; ``txid`` pairs requests and answers."""

    TYPE: ClassVar[MsgType]
    FIELDS: ClassVar[tuple[FieldSpec, ...]] = ()
    txid: int

    def pack(self) -> bytes:
        out = [_PLAIN_HEAD.pack(self.TYPE, self.txid)]
        for spec in self.FIELDS:
            value = getattr(self, spec.name)
            if value is None:
                continue
            values = value if spec.repeated else (value,)
            for v in values:
                raw = _enc(spec.kind, v)
                if len(raw) > 0xFFFF:
                    raise ValueError(f"field {spec.name} too long")
                out.append(_TLV_HEAD.pack(spec.tag, len(raw)))
                out.append(raw)
        return b"".join(out)


M = TypeVar("M", bound=Message)


def _iter_tlv(data: bytes, offset: int) -> Iterator[tuple[int, bytes]]:
    n = len(data)
    while offset < n:
        if offset + 3 > n:
            raise DecodeError("truncated TLV header")
        tag, length = _TLV_HEAD.unpack_from(data, offset)
        offset += 3
        if offset + length > n:
            raise DecodeError("truncated TLV value")
        yield tag, data[offset : offset + length]
        offset += length


def _build(cls: type[M], txid: int, body: bytes, offset: int) -> M:
    by_tag = {spec.tag: spec for spec in cls.FIELDS}
    values: dict[str, Any] = {}
    for tag, raw in _iter_tlv(body, offset):
        spec = by_tag.get(tag)
        if spec is None:
            continue
        v = _dec(spec.kind, raw)
        if spec.repeated:
            values.setdefault(spec.name, []).append(v)
        elif spec.name in values:
            raise DecodeError(f"{cls.__name__}: field {spec.name} repeated")
        else:
            values[spec.name] = v
    for spec in cls.FIELDS:
        if spec.repeated:
            values[spec.name] = tuple(values.get(spec.name, ()))
        elif spec.name not in values:
            if not spec.optional:
                raise DecodeError(f"{cls.__name__}: missing field {spec.name}")
            values[spec.name] = None
    try:
        return cls(txid=txid, **values)
    except (TypeError, ValueError) as exc:
        raise DecodeError(f"{cls.__name__}: {exc}") from exc


def _enum(enum: type[IntEnum], value: int, what: str) -> None:
    try:
        enum(value)
    except ValueError as exc:
        raise ValueError(f"unknown {what} {value}") from exc


@dataclass(frozen=True)
class Registration(Message):
    """Node -> NMS: the node's real addresses and its UDP port."""

    TYPE: ClassVar[MsgType] = MsgType.REGISTRATION
    FIELDS: ClassVar[tuple[FieldSpec, ...]] = (
        FieldSpec("addresses", 1, Kind.IP, repeated=True),
        FieldSpec("port", 2, Kind.U16),
    )
    addresses: tuple[str, ...] = ()
    port: int = 0


@dataclass(frozen=True)
class RegistrationAck(Message):
    """NMS -> node: what NMS observed (NAPT detection) and the node's VIPs."""

    TYPE: ClassVar[MsgType] = MsgType.REGISTRATION_ACK
    FIELDS: ClassVar[tuple[FieldSpec, ...]] = (
        FieldSpec("observed", 1, Kind.ENDPOINT),
        FieldSpec("vip4", 2, Kind.IP),
        FieldSpec("vip6", 3, Kind.IP),
        FieldSpec("keepalive_interval", 4, Kind.U16),
    )
    observed: Endpoint = ("0.0.0.0", 0)
    vip4: str = "0.0.0.0"
    vip6: str = "::"
    keepalive_interval: int = 20


@dataclass(frozen=True)
class KeepAlive(Message):
    TYPE: ClassVar[MsgType] = MsgType.KEEPALIVE


@dataclass(frozen=True)
class KeepAliveAck(Message):
    TYPE: ClassVar[MsgType] = MsgType.KEEPALIVE_ACK
    FIELDS: ClassVar[tuple[FieldSpec, ...]] = (FieldSpec("observed", 1, Kind.ENDPOINT),)
    observed: Endpoint = ("0.0.0.0", 0)


@dataclass(frozen=True)
class DirectionRequest(Message):
    """MN -> NMS: "I want to talk to this FQDN" (triggered by a DNS query).

    Instead of the FQDN the MN may name the peer's VIP (``vip``): a node that
    restarted, or whose peer restarted, still has packets for VIPs an
    application resolved earlier.
    """

    TYPE: ClassVar[MsgType] = MsgType.DIRECTION_REQUEST
    FIELDS: ClassVar[tuple[FieldSpec, ...]] = (
        FieldSpec("fqdn", 1, Kind.STR, optional=True),
        FieldSpec("vip", 2, Kind.IP, optional=True),
    )
    fqdn: str | None = None
    vip: str | None = None

    def __post_init__(self) -> None:
        if (self.fqdn is None) == (self.vip is None):
            raise ValueError("exactly one of fqdn and vip")


@dataclass(frozen=True)
class RouteDirection(Message):
    """NMS -> CN (then NMS -> MN as the answer to the Direction Request).

    ``endpoints`` are the peer's candidate endpoints in order of preference;
    ``tunnel_key`` is the Noise PSK; ``peer_cert`` the peer's DER certificate,
    which carries its static X25519 key.
    """

    TYPE: ClassVar[MsgType] = MsgType.ROUTE_DIRECTION
    FIELDS: ClassVar[tuple[FieldSpec, ...]] = (
        FieldSpec("session_id", 1, Kind.BYTES),
        FieldSpec("peer_fqdn", 2, Kind.STR),
        FieldSpec("peer_vip4", 3, Kind.IP),
        FieldSpec("peer_vip6", 4, Kind.IP),
        FieldSpec("endpoints", 5, Kind.ENDPOINT, repeated=True),
        FieldSpec("tunnel_key", 6, Kind.BYTES),
        FieldSpec("peer_cert", 7, Kind.BYTES),
        FieldSpec("path", 8, Kind.U8),
        FieldSpec("reason", 9, Kind.U8),
        FieldSpec("role", 10, Kind.U8),
        FieldSpec("relay_endpoint", 11, Kind.ENDPOINT, optional=True),
        FieldSpec("relay_key", 12, Kind.BYTES, optional=True),
        FieldSpec("relay_side", 13, Kind.U8, optional=True),
    )
    session_id: bytes = b""
    peer_fqdn: str = ""
    peer_vip4: str = "0.0.0.0"
    peer_vip6: str = "::"
    endpoints: tuple[Endpoint, ...] = ()
    tunnel_key: bytes = b""
    peer_cert: bytes = b""
    path: int = Path.DIRECT
    reason: int = Reason.COMMON_FAMILY_PUBLIC
    role: int = Role.INITIATOR
    # the TRS relay session (same session id): for RELAYED, and as the fallback of PUNCHED
    relay_endpoint: Endpoint | None = None
    relay_key: bytes | None = None  # authenticates RELAY_BIND; never the tunnel key
    relay_side: int | None = None  # 0 = MN, 1 = CN

    def __post_init__(self) -> None:
        relay = (self.relay_endpoint, self.relay_key, self.relay_side)
        if any(v is not None for v in relay) and (
            any(v is None for v in relay)
            or len(self.relay_key or b"") != 32
            or self.relay_side not in (0, 1)
        ):
            raise ValueError("relay_endpoint, relay_key (32 bytes) and relay_side go together")
        if len(self.session_id) != 8:
            raise ValueError("session_id must be 8 bytes")
        if len(self.tunnel_key) != 32:
            raise ValueError("tunnel_key must be 32 bytes")
        _enum(Path, self.path, "path")
        _enum(Reason, self.reason, "reason")
        _enum(Role, self.role, "role")


@dataclass(frozen=True)
class Confirmation(Message):
    TYPE: ClassVar[MsgType] = MsgType.CONFIRMATION
    FIELDS: ClassVar[tuple[FieldSpec, ...]] = (FieldSpec("session_id", 1, Kind.BYTES),)
    session_id: bytes = b""


@dataclass(frozen=True)
class Error(Message):
    TYPE: ClassVar[MsgType] = MsgType.ERROR
    FIELDS: ClassVar[tuple[FieldSpec, ...]] = (
        FieldSpec("code", 1, Kind.U16),
        FieldSpec("text", 2, Kind.STR),
    )
    code: int = ErrorCode.BAD_REQUEST
    text: str = ""


MESSAGE_CLASSES: dict[int, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Registration,
        RegistrationAck,
        KeepAlive,
        KeepAliveAck,
        DirectionRequest,
        RouteDirection,
        Confirmation,
        Error,
    )
}


def parse_message(data: bytes) -> Message:
    """Decode a signaling plaintext; ``DecodeError`` on anything malformed."""
    if len(data) < _PLAIN_HEAD.size:
        raise DecodeError("signaling message shorter than its header")
    if len(data) > MAX_PLAINTEXT:
        raise DecodeError("signaling message too long")
    mtype, txid = _PLAIN_HEAD.unpack_from(data, 0)
    cls = MESSAGE_CLASSES.get(mtype)
    if cls is None:
        raise DecodeError(f"unknown signaling message type {mtype}")
    return _build(cls, txid, data, _PLAIN_HEAD.size)


@dataclass(frozen=True)
class Header:
    direction: Direction
    key_id: int
    counter: int

    def pack(self) -> bytes:
        return HEADER.pack(SIGNALING_TYPE, self.direction, self.key_id, self.counter)

    @classmethod
    def parse(cls, data: bytes) -> Header:
        if len(data) < HEADER_LEN + TAG_LEN:
            raise DecodeError("signaling datagram too short")
        ptype, direction, key_id, counter = HEADER.unpack_from(data, 0)
        if ptype != SIGNALING_TYPE:
            raise DecodeError("not a signaling datagram")
        if direction not in (0, 1):
            raise DecodeError("bad signaling direction")
        return cls(Direction(direction), key_id, counter)


def replace(msg: M, **changes: Any) -> M:
    """``dataclasses.replace`` with the message's type preserved (typed helper)."""
    return dataclasses.replace(msg, **changes)
