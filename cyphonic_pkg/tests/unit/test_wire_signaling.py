"""Signaling codec: round trips, exact bytes, and fuzzing of the parser."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cyphonic.errors import DecodeError
from cyphonic.wire import signaling as sig

RD = sig.RouteDirection(
    7,
    session_id=b"\x01" * 8,
    peer_fqdn="b.cyphonic.test",
    peer_vip4="10.64.0.3",
    peer_vip6="fd43:5950::3",
    endpoints=(("198.51.100.20", 30000), ("2001:db8:100::20", 30000)),
    tunnel_key=b"\x02" * 32,
    peer_cert=b"\x30\x82cert",
    path=sig.Path.DIRECT,
    reason=sig.Reason.COMMON_FAMILY_PUBLIC,
    role=sig.Role.RESPONDER,
)

SAMPLES: list[sig.Message] = [
    sig.Registration(1, ("198.51.100.20", "2001:db8:100::20"), 30000),
    sig.RegistrationAck(2, ("203.0.113.5", 41000), "10.64.0.2", "fd43:5950::2", 20),
    sig.KeepAlive(3),
    sig.KeepAliveAck(4, ("2001:db8::5", 30000)),
    sig.DirectionRequest(5, "b.cyphonic.test"),
    RD,
    sig.Confirmation(8, b"\x01" * 8),
    sig.Error(9, sig.ErrorCode.UNKNOWN_FQDN, "unknown FQDN x.cyphonic.test"),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: sig.Message) -> None:
    assert sig.parse_message(msg.pack()) == msg


def test_exact_bytes_of_a_keepalive_ack() -> None:
    # msg_type 4, txid 0x01020304, TLV tag 1 len 6: 192.0.2.1 port 30000 (0x7530)
    raw = sig.KeepAliveAck(0x01020304, ("192.0.2.1", 30000)).pack()
    assert raw.hex() == "0401020304010006c00002017530"


def test_header_layout() -> None:
    h = sig.Header(sig.Direction.TO_NODE, 0xAABBCCDD, 5)
    raw = h.pack()
    assert raw.hex() == "01010000aabbccdd0000000000000005"
    assert sig.Header.parse(raw + b"\0" * 16) == h


def test_unknown_tags_are_ignored() -> None:
    raw = sig.DirectionRequest(1, "a.cyphonic.test").pack() + b"\x63\x00\x02hi"
    assert sig.parse_message(raw) == sig.DirectionRequest(1, "a.cyphonic.test")


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x05\x00\x00\x00",  # shorter than the header
        b"\x63\x00\x00\x00\x01",  # unknown type
        b"\x05\x00\x00\x00\x01",  # DirectionRequest without fqdn
        b"\x05\x00\x00\x00\x01\x01\x00\x05ab",  # truncated TLV value
        b"\x05\x00\x00\x00\x01\x01\x00",  # truncated TLV header
        b"\x05\x00\x00\x00\x01\x01\x00\x01a\x01\x00\x01b",  # repeated field
        b"\x05\x00\x00\x00\x01\x01\x00\x02\xff\xfe",  # not UTF-8
        b"\x04\x00\x00\x00\x01\x01\x00\x03abc",  # endpoint of wrong size
        RD.pack().replace(b"\x08\x00\x01\x01", b"\x08\x00\x01\x09"),  # unknown path
    ],
)
def test_malformed_is_decode_error(raw: bytes) -> None:
    with pytest.raises(DecodeError):
        sig.parse_message(raw)


def test_endpoint_text() -> None:
    assert sig.parse_endpoint("[2001:db8::1]:4502") == ("2001:db8::1", 4502)
    assert sig.parse_endpoint("192.0.2.1:4502") == ("192.0.2.1", 4502)
    assert sig.format_endpoint(("2001:db8::1", 1)) == "[2001:db8::1]:1"
    for bad in ("192.0.2.1", "x:1", "192.0.2.1:0", "[::1]:70000", ""):
        with pytest.raises(DecodeError):
            sig.parse_endpoint(bad)


@settings(max_examples=5000)
@given(st.binary(max_size=300))
def test_fuzz_parse_message(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        sig.parse_message(data)


@settings(max_examples=3000)
@given(st.sampled_from(SAMPLES), st.integers(0, 400), st.binary(min_size=1, max_size=4))
def test_fuzz_mutated_messages(msg: sig.Message, pos: int, junk: bytes) -> None:
    raw = bytearray(msg.pack())
    pos %= len(raw)
    raw[pos : pos + len(junk)] = junk
    with contextlib.suppress(DecodeError):
        sig.parse_message(bytes(raw))


@settings(max_examples=3000)
@given(st.binary(max_size=64))
def test_fuzz_header(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        sig.Header.parse(data)
