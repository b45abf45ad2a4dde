"""Replay window: edges, reorders, jumps, and a property test against a reference model."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cyphonic.dataplane.replay import DEFAULT_BITMAP_BITS, ReplayWindow
from cyphonic.errors import ReplayError


class Model:
    """The specification: a set of seen counters and the maximum."""

    def __init__(self, window_size: int) -> None:
        self.window_size = window_size
        self.seen: set[int] = set()
        self.top = -1

    def check(self, counter: int) -> bool:
        if counter in self.seen:
            return False
        return counter > self.top or self.top - counter <= self.window_size

    def update(self, counter: int) -> None:
        self.seen.add(counter)
        self.top = max(self.top, counter)


def test_defaults() -> None:
    w = ReplayWindow()
    assert w.bitmap_bits == DEFAULT_BITMAP_BITS == 8192
    assert w.window_size == 8192 - 64
    assert w.top == -1


@pytest.mark.parametrize("bits", [0, 64, 100, 129, 8191])
def test_bad_sizes(bits: int) -> None:
    with pytest.raises(ValueError):
        ReplayWindow(bits)


def test_first_counter_is_zero_and_duplicates_rejected() -> None:
    w = ReplayWindow()
    assert w.check(0)
    assert w.check_and_update(0)
    assert not w.check(0)
    assert not w.check_and_update(0)
    assert w.check_and_update(1)
    assert not w.check_and_update(1)
    assert not w.check(-1)


def test_check_does_not_mutate() -> None:
    w = ReplayWindow()
    for _ in range(3):
        assert w.check(5)
    assert w.top == -1
    w.update(5)
    assert w.top == 5


def test_reorder_within_window_accepted_exactly_once() -> None:
    w = ReplayWindow()
    order = [10, 3, 7, 0, 9, 1, 2, 8, 4, 6, 5]
    assert [w.check_and_update(c) for c in order] == [True] * len(order)
    assert [w.check_and_update(c) for c in order] == [False] * len(order)


@pytest.mark.parametrize("bits", [128, 1024, 8192])
def test_exactly_at_window_edge(bits: int) -> None:
    w = ReplayWindow(bits)
    top = 100_000
    w.update(top)
    edge = top - w.window_size
    assert w.check(edge)  # exactly window_size behind: accepted
    assert not w.check(edge - 1)  # one further: too old
    assert w.check_and_update(edge)
    assert not w.check(edge)
    with pytest.raises(ReplayError):
        w.update(edge - 1)


def test_jump_far_ahead_forgets_old_bits() -> None:
    w = ReplayWindow(128)
    for c in range(64):
        w.update(c)
    w.update(10**12)  # far beyond a full turn of the ring
    assert w.top == 10**12
    # Everything inside the new window is fresh, including ring slots the old counters used.
    for c in range(10**12 - w.window_size, 10**12):
        assert w.check(c)
    assert not w.check(10**12)
    assert not w.check(63)


def test_jump_by_less_than_a_ring_keeps_recent_bits() -> None:
    w = ReplayWindow(256)  # 4 blocks, window 192
    w.update(200)
    w.update(300)  # moves two blocks
    assert not w.check(200)
    assert w.check(199) and w.check(250)


def test_update_rejects_duplicates_and_too_old() -> None:
    w = ReplayWindow(128)
    w.update(500)
    with pytest.raises(ReplayError):
        w.update(500)
    with pytest.raises(ReplayError):
        w.update(500 - 65)
    with pytest.raises(ReplayError):
        w.update(-1)


def test_near_u64_limit() -> None:
    w = ReplayWindow()
    big = 2**64 - 2**13 - 2
    assert w.check_and_update(big)
    assert w.check_and_update(big - 1)
    assert not w.check_and_update(big)
    assert not w.check(0)


def test_block_boundaries() -> None:
    w = ReplayWindow(128)
    for c in (63, 64, 127, 128, 191, 192):
        assert w.check_and_update(c)
    for c in (63, 64, 127, 128, 191, 192):
        assert not w.check(c)
    assert w.check(130) and w.check(129)
    assert not w.check(126)  # 66 behind top 192: outside the 64-counter window


# --- property test --------------------------------------------------------------------------

# Mostly small steps around the top (reorders, duplicates), some jumps well past the window.
_steps = st.lists(
    st.one_of(
        st.integers(-300, 300),
        st.integers(-20_000, 20_000),
        st.integers(0, 2**40),
    ),
    max_size=300,
)


@settings(max_examples=3000, deadline=None)
@given(st.sampled_from([128, 256, 1024, 8192]), _steps, st.lists(st.booleans(), max_size=300))
def test_matches_reference_model(bits: int, steps: list[int], verified: list[bool]) -> None:
    """Counters are generated relative to the current top; ``verified`` False simulates a
    packet whose AEAD tag failed (checked but never updated)."""
    w, model = ReplayWindow(bits), Model(bits - 64)
    for i, step in enumerate(steps):
        counter = max(0, model.top + step)
        expected = model.check(counter)
        assert w.check(counter) == expected, (counter, model.top)
        tag_ok = verified[i] if i < len(verified) else True
        if expected and tag_ok:
            w.update(counter)
            model.update(counter)
        elif not expected:
            with pytest.raises(ReplayError):
                w.update(counter)
        assert w.top == model.top


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.integers(0, 400), max_size=400))
def test_check_and_update_accepts_each_counter_once(counters: list[int]) -> None:
    w, model = ReplayWindow(128), Model(64)
    for c in counters:
        expected = model.check(c)
        assert w.check_and_update(c) == expected
        if expected:
            model.update(c)
