"""TUN device: the node's virtual interface carrying its VIPs.

``TunDevice`` is the small interface the data plane uses; ``LinuxTun`` is the
real one (``/dev/net/tun``, IFF_TUN | IFF_NO_PI: every read is one IP packet)
and ``FakeTun`` an in-memory one for logic tests.
"""

from __future__ import annotations

import fcntl
import os
import struct
from collections import deque
from typing import Protocol

from cyphonic.errors import CyphonicError

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000


class TunDevice(Protocol):
    name: str

    def fileno(self) -> int: ...
    def read(self) -> bytes | None: ...
    def write(self, packet: bytes) -> None: ...
    def close(self) -> None: ...


class LinuxTun:
    def __init__(self, name: str) -> None:
        try:
            self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise CyphonicError(
                f"cannot open /dev/net/tun: {exc.strerror} (needs CAP_NET_ADMIN and the tun module)"
            ) from exc
        try:
            ifr = struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI)
            res = fcntl.ioctl(self.fd, TUNSETIFF, ifr)
        except OSError as exc:
            os.close(self.fd)
            raise CyphonicError(f"cannot create TUN device {name}: {exc.strerror}") from exc
        self.name = res[:16].rstrip(b"\0").decode()

    def fileno(self) -> int:
        return self.fd

    def read(self) -> bytes | None:
        """One packet, or ``None`` when nothing is waiting (non-blocking)."""
        try:
            return os.read(self.fd, 65536)
        except BlockingIOError:
            return None

    def write(self, packet: bytes) -> None:
        try:
            os.write(self.fd, packet)
        except BlockingIOError:
            pass  # the kernel queue is full: drop, as a NIC would
        except OSError as exc:
            # EIO before the link is up, EINVAL for a packet the kernel refuses
            raise CyphonicError(f"TUN write failed: {exc.strerror}") from exc

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class FakeTun:
    """In-memory TUN for tests: ``inject`` what the kernel would send, read ``written``."""

    def __init__(self, name: str = "fake0") -> None:
        self.name = name
        self.inbound: deque[bytes] = deque()
        self.written: list[bytes] = []
        self._r, self._w = os.pipe()

    def fileno(self) -> int:
        return self._r

    def inject(self, packet: bytes) -> None:
        self.inbound.append(packet)
        os.write(self._w, b"x")

    def read(self) -> bytes | None:
        if not self.inbound:
            return None
        os.read(self._r, 1)
        return self.inbound.popleft()

    def write(self, packet: bytes) -> None:
        self.written.append(packet)

    def close(self) -> None:
        os.close(self._r)
        os.close(self._w)
