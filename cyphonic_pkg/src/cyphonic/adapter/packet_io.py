"""The adapter's link-layer I/O edge: AF_PACKET sockets on the downlink, driven by asyncio.

The services on the downlink (DHCPv4, ARP proxy, Router Advertisements, ND proxy, DHCPv6) are
pure cores with one entry point, a :data:`Handler`: ``handler(frame, now) -> frames``, taking
one whole received Ethernet frame and the time, returning the whole frames to send.  This module
is everything else::

    link = RawLink("eth1", [ETH_P_IP], bpf=udp4_dst_port_filter(67)).open()
    await serve(link, [dhcp_server.handle])          # runs until cancelled

:class:`RawLink`
    One ``AF_PACKET``/``SOCK_RAW`` socket bound to one interface (packet(7)): non-blocking,
    created with protocol 0 so that it queues nothing before its filter is attached, then bound
    to the interface.  A classic BPF program (socket(7) ``SO_ATTACH_FILTER``) keeps unwanted
    frames in the kernel; :func:`ethertype_filter` (the default), :func:`udp4_dst_port_filter`
    and :func:`ipv6_filter` build the usual ones, or pass your own (:func:`assemble`).  Every
    frame the filter lets through is checked again in Python, so a missing or wrong filter
    costs time, never correctness: frames the host sent itself (``PACKET_OUTGOING``: a packet
    socket sees the host's transmissions on the interface), frames for other hosts
    (``PACKET_OTHERHOST``, seen while the interface is promiscuous, e.g. during a capture),
    VLAN-tagged frames (the kernel strips the tag and reports it in ``PACKET_AUXDATA``; the
    services serve the untagged link only), truncated frames and other ethertypes are dropped
    and counted in :attr:`RawLink.stats`.

:func:`serve`
    Registers the link with the running loop (``loop.add_reader``); on each wake-up it drains
    up to ``RawLink.batch`` frames (so one busy link cannot starve the loop; the reader fires
    again while frames are queued), passes each to every handler with ``now = clock()`` and
    sends what they return.  A handler that raises is logged (rate-limited) and counted; the
    loop goes on.

:class:`UdpSink`
    Holds a UDP port on the interface and discards what arrives.  A DHCP server that receives
    through a packet socket still needs this: a client renewing its lease sends a unicast UDP
    datagram to port 67 (RFC 2131 §4.4.5), which the adapter's kernel also receives and, with
    no socket on the port, answers with an ICMP port unreachable.  DHCPv6 (port 547) likewise.

Sending uses ``send()`` on the bound socket: frames go out on that interface unchanged (the
handler builds the Ethernet header).  A full transmit queue drops the frame (counted in
``tx_errors``): every protocol served here retransmits.

Everything here needs ``CAP_NET_RAW``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import socket
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from enum import IntEnum
from typing import Final, Self

from cyphonic.adapter.gn import LogThrottle, mac_str

log = logging.getLogger(__name__)

__all__ = [
    "ETH_P_ALL",
    "ETH_P_ARP",
    "ETH_P_IP",
    "ETH_P_IPV6",
    "BpfInsn",
    "Handler",
    "PacketType",
    "RawLink",
    "UdpSink",
    "assemble",
    "ethertype_filter",
    "ipv6_filter",
    "serve",
    "udp4_dst_port_filter",
]

Handler = Callable[[bytes, float], list[bytes]]
"""A pure service core: ``handler(frame, now)`` -> the frames to send in answer."""

ETH_P_ALL: Final = 0x0003
ETH_P_IP: Final = 0x0800
ETH_P_ARP: Final = 0x0806
ETH_P_IPV6: Final = 0x86DD

# <linux/if_packet.h>, <asm-generic/socket.h>
SOL_PACKET: Final = 263
PACKET_AUXDATA: Final = 8
PACKET_IGNORE_OUTGOING: Final = 23
SO_ATTACH_FILTER: Final = 26
TP_STATUS_VLAN_VALID: Final = 1 << 4
_AUXDATA: Final = struct.Struct("=IIIHHHH")  # struct tpacket_auxdata
MAX_FRAME: Final = 65535


class PacketType(IntEnum):
    """``sll_pkttype`` of a received frame (packet(7))."""

    HOST = 0
    BROADCAST = 1
    MULTICAST = 2
    OTHERHOST = 3
    OUTGOING = 4


# --------------------------------------------------------------------------------------------
# Classic BPF (Documentation/networking/filter.rst)

BpfInsn = tuple[int, int, int, int]
"""One ``struct sock_filter``: (code, jt, jf, k)."""

BPF_LD, BPF_LDX, BPF_JMP, BPF_RET = 0x00, 0x01, 0x05, 0x06
BPF_W, BPF_H, BPF_B = 0x00, 0x08, 0x10
BPF_K, BPF_ABS, BPF_IND, BPF_MSH = 0x00, 0x20, 0x40, 0xA0
BPF_JEQ, BPF_JSET = 0x10, 0x40
SKF_AD_PKTTYPE: Final = (-0x1000 + 4) & 0xFFFFFFFF  # SKF_AD_OFF + SKF_AD_PKTTYPE
SNAPLEN: Final = 0x40000

Target = int | str
"""A jump target: a relative offset (as in BPF) or ``"accept"`` / ``"drop"``."""


def assemble(body: Sequence[tuple[int, Target, Target, int] | str]) -> list[BpfInsn]:
    """Resolve jump targets and append the two exits.

    ``body`` holds instructions and label names (a string marks the position of the next
    instruction); a jump target is a relative offset or a label, ``"accept"`` and ``"drop"``
    being predefined.  The program returned ends with ``ret #SNAPLEN`` (accept) and ``ret #0``
    (drop).  Jumps go forward only, at most 255 instructions (classic BPF).
    """
    insns: list[tuple[int, Target, Target, int]] = []
    labels: dict[str, int] = {}
    for item in body:
        if isinstance(item, str):
            if item in labels or item in ("accept", "drop"):
                raise ValueError(f"BPF label {item!r} defined twice")
            labels[item] = len(insns)
        else:
            insns.append(item)
    labels["accept"], labels["drop"] = len(insns), len(insns) + 1

    def rel(index: int, target: Target) -> int:
        offset = target if isinstance(target, int) else labels[target] - index - 1
        if not 0 <= offset <= 255:
            raise ValueError(f"BPF jump offset {offset} out of range at instruction {index}")
        return offset

    program = [(code, rel(i, jt), rel(i, jf), k) for i, (code, jt, jf, k) in enumerate(insns)]
    return [*program, (BPF_RET | BPF_K, 0, 0, SNAPLEN), (BPF_RET | BPF_K, 0, 0, 0)]


def _pkttype_checks(accept_otherhost: bool) -> list[tuple[int, Target, Target, int]]:
    body: list[tuple[int, Target, Target, int]] = [
        (BPF_LD | BPF_W | BPF_ABS, 0, 0, SKF_AD_PKTTYPE),
        (BPF_JMP | BPF_JEQ | BPF_K, "drop", 0, PacketType.OUTGOING),
    ]
    if not accept_otherhost:
        body.append((BPF_JMP | BPF_JEQ | BPF_K, "drop", 0, PacketType.OTHERHOST))
    return body


def ethertype_filter(ethertypes: Iterable[int], *, accept_otherhost: bool = False) -> list[BpfInsn]:
    """Frames of the given ethertypes, not sent by this host (nor for others, by default)."""
    types = list(dict.fromkeys(ethertypes))
    if not types:
        raise ValueError("ethertype_filter needs at least one ethertype")
    body = _pkttype_checks(accept_otherhost)
    body.append((BPF_LD | BPF_H | BPF_ABS, 0, 0, 12))
    for i, ethertype in enumerate(types):
        last = i == len(types) - 1
        body.append((BPF_JMP | BPF_JEQ | BPF_K, "accept", "drop" if last else 0, ethertype))
    return assemble(body)


def udp4_dst_port_filter(port: int, *, accept_otherhost: bool = False) -> list[BpfInsn]:
    """Untagged IPv4 UDP datagrams (first fragments or unfragmented) to ``port``."""
    body = _pkttype_checks(accept_otherhost)
    body += [
        (BPF_LD | BPF_H | BPF_ABS, 0, 0, 12),  # ethertype
        (BPF_JMP | BPF_JEQ | BPF_K, 0, "drop", ETH_P_IP),
        (BPF_LD | BPF_B | BPF_ABS, 0, 0, 23),  # IP protocol
        (BPF_JMP | BPF_JEQ | BPF_K, 0, "drop", socket.IPPROTO_UDP),
        (BPF_LD | BPF_H | BPF_ABS, 0, 0, 20),  # flags + fragment offset
        (BPF_JMP | BPF_JSET | BPF_K, "drop", 0, 0x3FFF),  # MF or an offset: a fragment
        (BPF_LDX | BPF_B | BPF_MSH, 0, 0, 14),  # X = IP header length
        (BPF_LD | BPF_H | BPF_IND, 0, 0, 14 + 2),  # UDP destination port
        (BPF_JMP | BPF_JEQ | BPF_K, "accept", "drop", port),
    ]
    return assemble(body)


def ipv6_filter(
    icmp6_types: Iterable[int] = (),
    udp_dst_ports: Iterable[int] = (),
    *,
    accept_otherhost: bool = False,
) -> list[BpfInsn]:
    """Untagged IPv6 frames carrying ICMPv6 of ``icmp6_types`` or UDP to ``udp_dst_ports``,
    with the upper-layer header right after the fixed IPv6 header (no extension headers: ND,
    RS and DHCPv6 messages carry none), e.g. ``ipv6_filter((133, 135), (547,))`` for the
    adapter's RS/NS/DHCPv6 services -- everything else of the GNs' IPv6 traffic stays in the
    kernel instead of being copied to Python."""
    types, ports = list(dict.fromkeys(icmp6_types)), list(dict.fromkeys(udp_dst_ports))
    if not types and not ports:
        raise ValueError("ipv6_filter needs ICMPv6 types or UDP ports")
    body: list[tuple[int, Target, Target, int] | str] = [*_pkttype_checks(accept_otherhost)]
    body += [
        (BPF_LD | BPF_H | BPF_ABS, 0, 0, 12),  # ethertype
        (BPF_JMP | BPF_JEQ | BPF_K, 0, "drop", ETH_P_IPV6),
        (BPF_LD | BPF_B | BPF_ABS, 0, 0, 14 + 6),  # next header
        (BPF_JMP | BPF_JEQ | BPF_K, "icmp6" if types else "drop", 0, socket.IPPROTO_ICMPV6),
        (BPF_JMP | BPF_JEQ | BPF_K, "udp" if ports else "drop", "drop", socket.IPPROTO_UDP),
    ]
    for label, offset, values in (("icmp6", 14 + 40, types), ("udp", 14 + 40 + 2, ports)):
        if not values:
            continue
        body += [label, (BPF_LD | (BPF_B if label == "icmp6" else BPF_H) | BPF_ABS, 0, 0, offset)]
        for i, value in enumerate(values):
            last = i == len(values) - 1
            body.append((BPF_JMP | BPF_JEQ | BPF_K, "accept", "drop" if last else 0, value))
    return assemble(body)


def _attach_filter(sock: socket.socket, program: Sequence[BpfInsn]) -> None:
    if not 0 < len(program) <= 4096:
        raise ValueError(f"BPF program of {len(program)} instructions (1..4096)")
    insns = b"".join(struct.pack("=HBBI", *insn) for insn in program)
    buf = ctypes.create_string_buffer(insns, len(insns))
    fprog = struct.pack("@HP", len(program), ctypes.addressof(buf))  # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)  # the kernel copies it


# --------------------------------------------------------------------------------------------
# The link

STAT_NAMES: Final = (
    "rx",
    "tx",
    "rx_outgoing",
    "rx_otherhost",
    "rx_vlan",
    "rx_ethertype",
    "rx_truncated",
    "rx_errors",
    "tx_errors",
    "handler_errors",
)


class RawLink:
    """One AF_PACKET socket on ``ifname`` for frames of ``ethertypes`` (see module docstring).

    ``bpf``: a classic BPF program (default: :func:`ethertype_filter`); ``batch``: frames
    drained per wake-up; ``accept_otherhost``: also deliver frames addressed to other hosts.
    """

    def __init__(
        self,
        ifname: str,
        ethertypes: Iterable[int],
        *,
        bpf: Sequence[BpfInsn] | None = None,
        batch: int = 64,
        rcvbuf: int = 1 << 20,
        accept_otherhost: bool = False,
    ) -> None:
        self.ifname = ifname
        self.ethertypes = frozenset(ethertypes)
        if not self.ethertypes or not all(0x600 <= t <= 0xFFFF for t in self.ethertypes):
            raise ValueError(f"bad ethertypes {sorted(self.ethertypes)}")
        self.bpf = (
            list(bpf)
            if bpf is not None
            else ethertype_filter(sorted(self.ethertypes), accept_otherhost=accept_otherhost)
        )
        self.batch = batch
        self.rcvbuf = rcvbuf
        self.accept_otherhost = accept_otherhost
        self.stats: dict[str, int] = dict.fromkeys(STAT_NAMES, 0)
        self.mac = b""
        self.ifindex = 0
        self._ethertype_bytes = frozenset(t.to_bytes(2, "big") for t in self.ethertypes)
        self._sock: socket.socket | None = None
        self._throttle = LogThrottle(60.0)

    # -- lifecycle ---------------------------------------------------------------------------

    def open(self) -> Self:
        """Create, filter and bind the socket; raises ``OSError`` (e.g. no such interface)."""
        if self._sock is not None:
            return self
        self.ifindex = socket.if_nametoindex(self.ifname)
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # receives nothing yet
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
            with contextlib.suppress(OSError):  # Linux >= 4.20; the filter covers older ones
                sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
            _attach_filter(sock, self.bpf)
            proto = next(iter(self.ethertypes)) if len(self.ethertypes) == 1 else ETH_P_ALL
            sock.bind((self.ifname, proto))
            self.mac = bytes(sock.getsockname()[4][:6])
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        log.debug(
            "packet socket on %s (%s) for ethertypes %s",
            self.ifname,
            self.mac_str,
            ", ".join(f"0x{t:04x}" for t in sorted(self.ethertypes)),
        )
        return self

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Self:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fileno(self) -> int:
        return self._socket().fileno()

    @property
    def mac_str(self) -> str:
        """The interface's MAC as ``aa:bb:cc:dd:ee:ff`` (after :meth:`open`)."""
        return mac_str(self.mac)

    def _socket(self) -> socket.socket:
        if self._sock is None:
            raise RuntimeError(f"RawLink({self.ifname}) is not open")
        return self._sock

    # -- I/O ---------------------------------------------------------------------------------

    def receive(self) -> list[bytes]:
        """Up to :attr:`batch` queued frames that pass the checks (never blocks)."""
        sock = self._socket()
        stats = self.stats
        frames: list[bytes] = []
        ancsize = socket.CMSG_SPACE(_AUXDATA.size)
        for _ in range(self.batch):
            try:
                data, ancdata, flags, addr = sock.recvmsg(MAX_FRAME, ancsize)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # e.g. ENETDOWN while the interface goes down
                stats["rx_errors"] += 1
                if self._throttle.allow("rx", time.monotonic()):
                    log.warning("receive on %s failed: %s", self.ifname, exc)
                break
            pkttype = addr[2]
            if pkttype == PacketType.OUTGOING:
                stats["rx_outgoing"] += 1
                continue
            if pkttype == PacketType.OTHERHOST and not self.accept_otherhost:
                stats["rx_otherhost"] += 1
                continue
            if flags & socket.MSG_TRUNC:
                stats["rx_truncated"] += 1
                continue
            if _vlan_tagged(ancdata):
                stats["rx_vlan"] += 1
                continue
            if data[12:14] not in self._ethertype_bytes:
                stats["rx_ethertype"] += 1
                continue
            stats["rx"] += 1
            frames.append(data)
        return frames

    def send(self, frame: bytes) -> bool:
        """Send one whole Ethernet frame; False (counted, logged rate-limited) if it failed."""
        try:
            self._socket().send(frame)
        except OSError as exc:  # ENOBUFS / EAGAIN on a full queue, ENETDOWN, EMSGSIZE, ...
            self.stats["tx_errors"] += 1
            if self._throttle.allow("tx", time.monotonic()):
                log.warning("send on %s failed: %s", self.ifname, exc)
            return False
        self.stats["tx"] += 1
        return True

    def __repr__(self) -> str:
        state = "open" if self._sock is not None else "closed"
        return f"RawLink({self.ifname!r}, {state}, {self.stats})"


def _vlan_tagged(ancdata: list[tuple[int, int, bytes]]) -> bool:
    for level, kind, data in ancdata:
        if level == SOL_PACKET and kind == PACKET_AUXDATA and len(data) >= _AUXDATA.size:
            return bool(_AUXDATA.unpack_from(data)[0] & TP_STATUS_VLAN_VALID)
    return False


async def serve(
    link: RawLink,
    handlers: Sequence[Handler],
    *,
    clock: Callable[[], float] = time.time,
) -> None:
    """Feed every frame of ``link`` to ``handlers`` and send their answers, until cancelled.

    ``clock`` gives the ``now`` handed to the handlers (wall-clock seconds by default: the
    DHCP servers persist lease times across restarts).  Opens the link if needed; leaves it
    open on return (the caller owns it).
    """
    link.open()
    loop = asyncio.get_running_loop()
    throttle = LogThrottle(60.0)

    def on_readable() -> None:
        for frame in link.receive():
            now = clock()
            for handler in handlers:
                try:
                    replies = handler(frame, now)
                except Exception:  # a bug in one handler must not stop the link
                    link.stats["handler_errors"] += 1
                    if throttle.allow(id(handler), time.monotonic()):
                        log.exception("handler %r failed on %s", handler, link.ifname)
                    continue
                for reply in replies:
                    link.send(reply)

    fd = link.fileno()
    loop.add_reader(fd, on_readable)
    try:
        await loop.create_future()  # never completes: runs until cancelled
    finally:
        loop.remove_reader(fd)


class UdpSink:
    """A UDP socket bound to ``port`` on ``ifname`` that discards everything it receives.

    See the module docstring: it keeps the kernel from answering unicast DHCP(v6) datagrams
    with ICMP port unreachable while the service itself receives through a :class:`RawLink`.
    """

    def __init__(self, ifname: str, port: int, family: socket.AddressFamily = socket.AF_INET):
        self.ifname = ifname
        self.port = port
        self.family = family
        self.discarded = 0
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def open(self) -> Self:
        """Bind the socket and, inside a running event loop, start discarding."""
        if self._sock is None:
            sock = socket.socket(self.family, socket.SOCK_DGRAM)
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.ifname.encode())
                if self.family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(("::" if self.family == socket.AF_INET6 else "0.0.0.0", self.port))
            except BaseException:
                sock.close()
                raise
            self._sock = sock
        with contextlib.suppress(RuntimeError):
            loop = asyncio.get_running_loop()
            if self._loop is None:
                loop.add_reader(self._sock.fileno(), self._drain)
                self._loop = loop
        return self

    def _drain(self) -> None:
        assert self._sock is not None
        for _ in range(64):
            try:
                self._sock.recv(MAX_FRAME)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. a queued ICMP error; nothing to do about it
                continue
            self.discarded += 1

    def close(self) -> None:
        if self._sock is not None:
            if self._loop is not None:
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(self._sock.fileno())
                self._loop = None
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Self:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()
