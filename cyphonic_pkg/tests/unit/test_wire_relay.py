"""TRS codecs: exact bytes, round trips, malformed input, and fuzzing of every parser."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cyphonic.errors import DecodeError
from cyphonic.wire import relay
from cyphonic.wire import signaling as sig
from cyphonic.wire.relay import Side

KEY = bytes(range(32))
SID = bytes.fromhex("0102030405060708")
BIND = relay.RelayBind.create(KEY, Side.CN, SID, 0x0000018F0A0B0C0D)

CONTROL_SAMPLES: list[relay.ControlMessage] = [
    relay.TrsHello(
        1,
        trs_id=7,
        endpoints=(("192.0.2.1", 4503), ("2001:db8::1", 4503)),
        active_sessions=2,
        capacity=100,
    ),
    relay.TrsHelloAck(2),
    relay.RelayRequest(3, session_id=SID, relay_key=KEY, lifetime=3600),
    relay.RelayResponse(3, session_id=SID, ok=1, endpoints=(("192.0.2.1", 4503),)),
    relay.RelayResponse(4, session_id=SID, ok=0),
]


def test_packet_type_codes_continue_the_tunnel_numbering() -> None:
    from cyphonic.wire.tunnel import PacketType

    assert (relay.RELAY_BIND, relay.RELAY_BIND_ACK, relay.RELAY_DATA, relay.TRS_CONTROL) == (
        5,
        6,
        7,
        8,
    )
    assert PacketType.DATA < relay.RELAY_BIND
    for name in ("RELAY_BIND", "RELAY_BIND_ACK", "RELAY_DATA", "TRS_CONTROL"):
        if hasattr(PacketType, name):  # the enum mirrors the constants defined here
            assert PacketType[name] == getattr(relay, name)


def test_mac_is_truncated_hmac_sha256() -> None:
    # RFC 4231 §4.6, test case 5: HMAC-SHA-256 truncated to 128 bits.
    mac = relay.bind_mac(b"\x0c" * 20, b"Test With Truncation")
    assert mac.hex() == "a3b6167473100ee06e0c796c2955552b"


def test_exact_bytes_of_a_relay_bind() -> None:
    # type 5 | side 1 (CN) | reserved 0000 | session id | timestamp_ms u64 | mac (16)
    raw = BIND.pack()
    assert len(raw) == relay.BIND_LEN == 36
    fields = ["05", "01", "0000", "0102030405060708", "0000018f0a0b0c0d"]
    assert raw.hex() == "".join([*fields, "25c62c13570d27ace5950945abf74cd6"])
    assert raw[20:] == relay.bind_mac(KEY, raw[:20])
    assert relay.RelayBind.parse(raw) == BIND
    assert BIND.verify(KEY)


def test_bind_ack_is_the_same_layout_with_type_6() -> None:
    ack = relay.RelayBindAck.answer(KEY, BIND)
    raw = ack.pack()
    fields = ["06", "01", "0000", "0102030405060708", "0000018f0a0b0c0d"]
    assert raw.hex() == "".join([*fields, "afa0aec5e246b4571c4edea967cf304e"])
    assert relay.RelayBindAck.parse(raw) == ack and ack.verify(KEY)
    # the type byte is under the MAC: a bind cannot pass for an ack or the other way round
    forged = relay.RelayBindAck.parse(b"\x06" + BIND.pack()[1:])
    assert not forged.verify(KEY)
    with pytest.raises(DecodeError):
        relay.RelayBind.parse(raw)
    with pytest.raises(DecodeError):
        relay.RelayBindAck.parse(BIND.pack())


def test_bind_mac_depends_on_key_and_every_field() -> None:
    assert not BIND.verify(bytes(32))
    for changed in (
        relay.RelayBind(Side.MN, BIND.session_id, BIND.timestamp_ms, BIND.mac),
        relay.RelayBind(BIND.side, b"\x09" * 8, BIND.timestamp_ms, BIND.mac),
        relay.RelayBind(BIND.side, BIND.session_id, BIND.timestamp_ms + 1, BIND.mac),
    ):
        assert not changed.verify(KEY)


def test_relay_data_round_trip_and_layout() -> None:
    payload = b"\x04\x00\x00\x00" + b"\xaa" * 40
    raw = relay.RelayData.wrap(SID, payload)
    assert raw[:12].hex() == "07" + "000000" + "0102030405060708"
    assert raw[12:] == payload
    assert relay.RelayData.parse(raw) == relay.RelayData(SID, payload)
    assert relay.RelayData(SID, payload).pack() == raw
    assert relay.data_session_id(raw) == SID
    assert relay.data_session_id(memoryview(raw)) == SID


def test_control_header_layout() -> None:
    h = relay.ControlHeader(sig.Direction.TO_NODE, 0xAABBCCDD, 5)
    raw = h.pack()
    assert raw.hex() == "08010000aabbccdd0000000000000005"
    assert relay.ControlHeader.parse(raw + b"\0" * 16) == h
    with pytest.raises(DecodeError):
        relay.ControlHeader.parse(sig.Header(sig.Direction.TO_NODE, 1, 5).pack() + b"\0" * 16)


@pytest.mark.parametrize("msg", CONTROL_SAMPLES, ids=lambda m: type(m).__name__)
def test_control_round_trip(msg: relay.ControlMessage) -> None:
    assert relay.parse_control(msg.pack()) == msg


def test_exact_bytes_of_a_trs_hello() -> None:
    raw = CONTROL_SAMPLES[0].pack()
    # msg_type 0x20, txid 1, trs_id (tag 1) = 7, endpoint (tag 2) 192.0.2.1:4503 ...
    assert raw.hex().startswith("200000000101000400000007020006c00002011197")


def test_control_types_do_not_overlap_signaling() -> None:
    assert not set(relay.CONTROL_MESSAGES) & set(sig.MESSAGE_CLASSES)
    with pytest.raises(DecodeError):
        relay.parse_control(sig.KeepAlive(1).pack())
    with pytest.raises(DecodeError):
        sig.parse_message(relay.TrsHelloAck(1).pack())


def test_relay_request_never_shows_its_key() -> None:
    assert KEY.hex() not in repr(CONTROL_SAMPLES[2]) and str(KEY) not in repr(CONTROL_SAMPLES[2])


@pytest.mark.parametrize(
    ("parser", "raw"),
    [
        (relay.RelayBind.parse, b""),
        (relay.RelayBind.parse, BIND.pack()[:-1]),  # short
        (relay.RelayBind.parse, BIND.pack() + b"\0"),  # long
        (relay.RelayBind.parse, BIND.pack()[:1] + b"\x02" + BIND.pack()[2:]),  # side 2
        (relay.RelayBind.parse, BIND.pack()[:2] + b"\x00\x01" + BIND.pack()[4:]),  # reserved
        (relay.RelayData.parse, b""),
        (relay.RelayData.parse, relay.RelayData.wrap(SID, b"x")[:-1]),  # empty payload
        (relay.RelayData.parse, b"\x07\x00\x01\x00" + SID + b"x"),  # reserved
        (relay.RelayData.parse, b"\x04\x00\x00\x00" + SID + b"x"),  # not type 7
        (relay.ControlHeader.parse, b"\x08" * 31),
        (relay.ControlHeader.parse, b"\x08\x02" + b"\0" * 30),  # bad direction
        (relay.parse_control, b"\x20\x00\x00"),  # shorter than its header
        (relay.parse_control, b"\x63\x00\x00\x00\x01"),  # unknown type
        (relay.parse_control, b"\x22\x00\x00\x00\x01"),  # request without fields
        (relay.parse_control, CONTROL_SAMPLES[2].pack()[:-1]),  # truncated lifetime
        (
            relay.parse_control,
            relay.RelayResponse(1, session_id=SID)
            .pack()
            .replace(b"\x02\x00\x01\x01", b"\x02\x00\x01\x05"),
        ),  # ok = 5
        (
            relay.parse_control,
            relay.RelayRequest(1, session_id=SID, relay_key=KEY, lifetime=1)
            .pack()
            .replace(b"\x02\x00\x20" + KEY, b"\x02\x00\x10" + KEY[:16]),
        ),  # 16-byte key
    ],
)
def test_malformed_is_decode_error(parser: object, raw: bytes) -> None:
    with pytest.raises(DecodeError):
        parser(raw)  # type: ignore[operator]


def test_constructors_refuse_bad_values() -> None:
    with pytest.raises(ValueError):
        relay.RelayBind(Side.MN, b"short", 0, b"\0" * 16)
    with pytest.raises(ValueError):
        relay.RelayBind(Side.MN, SID, -1, b"\0" * 16)
    with pytest.raises(ValueError):
        relay.RelayData(SID, b"")
    with pytest.raises(ValueError):
        relay.RelayRequest(1, session_id=SID, relay_key=b"k", lifetime=1)


PARSERS = [
    relay.RelayBind.parse,
    relay.RelayBindAck.parse,
    relay.RelayData.parse,
    relay.data_session_id,
    relay.ControlHeader.parse,
    relay.parse_control,
]


@pytest.mark.parametrize("parser", PARSERS, ids=lambda p: p.__qualname__)
@settings(max_examples=3000, deadline=None)
@given(data=st.binary(max_size=80))
def test_fuzz_parsers(parser: object, data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        parser(data)  # type: ignore[operator]


@settings(max_examples=3000, deadline=None)
@given(
    st.sampled_from([BIND.pack(), relay.RelayBindAck.answer(KEY, BIND).pack()]),
    st.integers(0, 35),
    st.binary(min_size=1, max_size=4),
)
def test_fuzz_mutated_binds(raw: bytes, pos: int, junk: bytes) -> None:
    buf = bytearray(raw)
    buf[pos : pos + len(junk)] = junk
    for parser in (relay.RelayBind.parse, relay.RelayBindAck.parse):
        try:
            parsed = parser(bytes(buf))
        except DecodeError:
            continue
        # a change anywhere in the MAC'd bytes or the MAC makes verification fail
        assert parsed.verify(KEY) == (bytes(buf) == raw)


@settings(max_examples=3000, deadline=None)
@given(st.sampled_from(CONTROL_SAMPLES), st.integers(0, 400), st.binary(min_size=1, max_size=4))
def test_fuzz_mutated_control(msg: relay.ControlMessage, pos: int, junk: bytes) -> None:
    raw = bytearray(msg.pack())
    pos %= len(raw)
    raw[pos : pos + len(junk)] = junk
    with contextlib.suppress(DecodeError):
        relay.parse_control(bytes(raw))
