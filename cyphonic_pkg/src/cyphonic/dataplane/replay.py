"""Sliding anti-replay window for data packet counters (RFC 6479 style).

The window remembers the highest counter accepted so far (``top``) and one bit per counter
in a ring of ``bitmap_bits // 64`` blocks of 64 bits.  When a counter ahead of ``top``
arrives, only the blocks between the old and the new ``top`` are cleared (at most the whole
ring), so the cost per packet does not depend on how far ahead it is -- the point of RFC 6479
compared with shifting one big bitmap.

One block of the ring is always the partially filled block of ``top``, so the guaranteed
window is ``window_size = bitmap_bits - 64`` counters behind ``top`` (8128 for the default
8192-bit bitmap, as in WireGuard).  A counter ``c`` is accepted when it was never accepted
before and either ``c > top`` or ``top - c <= window_size``.

The receive path is: :meth:`ReplayWindow.check` (cheap, before the AEAD), then the AEAD, then
:meth:`ReplayWindow.update` only if the tag verified -- so forged packets can never move the
window.  :meth:`check_and_update` does both for callers that have nothing in between.
"""

from __future__ import annotations

from typing import Final

from cyphonic.errors import ReplayError

__all__ = ["DEFAULT_BITMAP_BITS", "ReplayWindow"]

DEFAULT_BITMAP_BITS: Final = 8192
_BLOCK_BITS: Final = 64
_BLOCK_SHIFT: Final = 6  # log2(_BLOCK_BITS)
_BIT_MASK: Final = _BLOCK_BITS - 1


class ReplayWindow:
    """Counters seen on one receive key.  Counters are non-negative and start at 0."""

    __slots__ = ("_blocks", "_mask", "_top", "bitmap_bits", "window_size")

    def __init__(self, bitmap_bits: int = DEFAULT_BITMAP_BITS) -> None:
        if bitmap_bits < 2 * _BLOCK_BITS or bitmap_bits & (bitmap_bits - 1):
            raise ValueError("bitmap_bits must be a power of two and at least 128")
        self.bitmap_bits = bitmap_bits
        self.window_size = bitmap_bits - _BLOCK_BITS
        n_blocks = bitmap_bits >> _BLOCK_SHIFT
        self._mask = n_blocks - 1
        self._blocks = [0] * n_blocks
        self._top = -1  # highest accepted counter; -1 = nothing accepted yet

    @property
    def top(self) -> int:
        """Highest counter accepted so far, or -1."""
        return self._top

    def check(self, counter: int) -> bool:
        """Would ``counter`` be accepted?  Does not change the window."""
        top = self._top
        if counter > top:
            return True
        if counter < 0 or top - counter > self.window_size:
            return False
        block = self._blocks[(counter >> _BLOCK_SHIFT) & self._mask]
        return not (block >> (counter & _BIT_MASK)) & 1

    def update(self, counter: int) -> None:
        """Mark ``counter`` as seen (after its AEAD tag verified).

        Raises ReplayError if ``counter`` would not pass :meth:`check` -- with the
        check -> decrypt -> update sequence on one event loop that cannot happen.
        """
        if counter < 0:
            raise ReplayError("negative counter")
        blocks = self._blocks
        mask = self._mask
        top = self._top
        index = counter >> _BLOCK_SHIFT
        if counter > top:
            # Clear every block between the old top's block (exclusive) and the new one
            # (inclusive); beyond a full turn of the ring they are all cleared already.
            current = top >> _BLOCK_SHIFT  # -1 when nothing was accepted yet
            for i in range(current + 1, current + 1 + min(index - current, mask + 1)):
                blocks[i & mask] = 0
            self._top = counter
        elif top - counter > self.window_size:
            raise ReplayError("counter too old for the replay window")
        slot = index & mask
        bit = 1 << (counter & _BIT_MASK)
        if blocks[slot] & bit:
            raise ReplayError("counter already seen")
        blocks[slot] |= bit

    def check_and_update(self, counter: int) -> bool:
        """Accept ``counter`` (and remember it) or return False."""
        if not self.check(counter):
            return False
        self.update(counter)
        return True
