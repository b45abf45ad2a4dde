"""The node-NMS AEAD channel: directions, tampering, replays, restart floor."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cyphonic.crypto.channel import SignalingChannel
from cyphonic.errors import CryptoError, DecodeError, ReplayError
from cyphonic.wire.signaling import Direction

KEY = bytes(range(32))


def pair() -> tuple[SignalingChannel, SignalingChannel]:
    return SignalingChannel(9, KEY, Direction.TO_NMS), SignalingChannel(9, KEY, Direction.TO_NODE)


def test_both_directions() -> None:
    node, nms = pair()
    assert nms.open(node.seal(b"hello")) == b"hello"
    assert node.open(nms.seal(b"world")) == b"world"


def test_directions_use_different_keys() -> None:
    node, _nms = pair()
    d = node.seal(b"x")
    # a node->NMS datagram reflected back to the node is refused
    with pytest.raises(CryptoError):
        node.open(d)


def test_replay_refused() -> None:
    node, nms = pair()
    d = node.seal(b"x")
    nms.open(d)
    with pytest.raises(ReplayError):
        nms.open(d)


def test_reordered_accepted_once() -> None:
    node, nms = pair()
    d1, d2 = node.seal(b"1"), node.seal(b"2")
    assert nms.open(d2) == b"2"
    assert nms.open(d1) == b"1"
    with pytest.raises(ReplayError):
        nms.open(d1)


def test_tampered_and_wrong_key() -> None:
    node, nms = pair()
    d = bytearray(node.seal(b"payload"))
    d[-1] ^= 1
    with pytest.raises(CryptoError):
        nms.open(bytes(d))
    other = SignalingChannel(9, bytes(32), Direction.TO_NODE)
    with pytest.raises(CryptoError):
        other.open(node.seal(b"x"))


def test_floor_after_restart() -> None:
    node, nms = pair()
    old = [node.seal(b"a"), node.seal(b"b")]
    for d in old:
        nms.open(d)
    restarted = SignalingChannel(9, KEY, Direction.TO_NODE)
    restarted.set_floor(nms.high_counter)
    for d in old:
        with pytest.raises(ReplayError):
            restarted.open(d)
    assert restarted.open(node.seal(b"c")) == b"c"


@settings(max_examples=3000)
@given(st.binary(max_size=200))
def test_fuzz_open(data: bytes) -> None:
    _, nms = pair()
    with contextlib.suppress(CryptoError, DecodeError):
        nms.open(data)
