"""The AEAD channel that protects node <-> NMS signaling with the common key.

AS hands each node a 32-byte common key (and its ``key_id``) at login.  Two
directional AES-256-GCM keys are derived from it with HKDF-SHA256 so that the
node and NMS never use the same (key, nonce) pair::

    k_to_nms  = HKDF(common_key, salt="", info="cyphonic nms v1 to-nms")
    k_to_node = HKDF(common_key, salt="", info="cyphonic nms v1 to-node")

The nonce is 4 zero bytes || the 64-bit counter from the header; the header is
the associated data.  Receivers keep a sliding replay window per direction.
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cyphonic.dataplane.replay import ReplayWindow
from cyphonic.errors import CryptoError, ReplayError
from cyphonic.wire.signaling import HEADER_LEN, Direction, Header

_NONCE = struct.Struct("!4xQ")


def _derive(key: bytes, info: bytes) -> AESGCM:
    return AESGCM(HKDF(hashes.SHA256(), 32, salt=None, info=info).derive(key))


class SignalingChannel:
    """One side of the channel for one ``key_id``.

    ``local`` is the direction this side *sends* in (``TO_NMS`` on a node,
    ``TO_NODE`` on NMS); it accepts only the opposite direction.
    """

    def __init__(
        self, key_id: int, common_key: bytes, local: Direction, first_counter: int = 1
    ) -> None:
        if len(common_key) != 32:
            raise CryptoError("common key must be 32 bytes")
        self.key_id = key_id
        self.local = local
        self.remote = Direction.TO_NODE if local is Direction.TO_NMS else Direction.TO_NMS
        to_nms = _derive(common_key, b"cyphonic nms v1 to-nms")
        to_node = _derive(common_key, b"cyphonic nms v1 to-node")
        self._send, self._recv = (
            (to_nms, to_node) if local is Direction.TO_NMS else (to_node, to_nms)
        )
        self.send_counter = first_counter
        self.window = ReplayWindow()
        self._floor = -1
        self._high = -1

    def seal(self, plaintext: bytes) -> bytes:
        """Encrypt one message into a full signaling datagram."""
        counter = self.send_counter
        self.send_counter += 1
        header = Header(self.local, self.key_id, counter).pack()
        return header + self._send.encrypt(_NONCE.pack(counter), plaintext, header)

    def open(self, datagram: bytes, header: Header | None = None) -> bytes:
        """Authenticate and decrypt; ``CryptoError``/``ReplayError`` otherwise."""
        if header is None:
            header = Header.parse(datagram)
        if header.key_id != self.key_id or header.direction is not self.remote:
            raise CryptoError("signaling datagram for another key or direction")
        if header.counter <= self._floor or not self.window.check(header.counter):
            raise ReplayError("replayed signaling counter")
        try:
            plain = self._recv.decrypt(
                _NONCE.pack(header.counter), datagram[HEADER_LEN:], datagram[:HEADER_LEN]
            )
        except InvalidTag as exc:
            raise CryptoError("signaling datagram failed authentication") from exc
        self.window.update(header.counter)
        if header.counter > self._high:
            self._high = header.counter
        return plain

    def set_floor(self, counter: int) -> None:
        """After a restart: refuse every counter up to ``counter`` (persisted mark)."""
        self._floor = max(self._floor, counter)

    @property
    def high_counter(self) -> int:
        """Highest counter accepted so far (or the floor): what NMS persists."""
        return max(self._floor, self._high)
