"""ARP proxy of the adapter's downlink: answer ARP requests for peer VIPv4s with the adapter's MAC.

A general node (GN) has its VIPv4 with the whole VIPv4 pool as its subnet (DHCPv4,
:mod:`cyphonic.adapter.dhcpv4`), so the VIPv4s of its peers -- in the same pool -- look on-link
to it and it resolves them with ARP (RFC 826).  The adapter answers for them with its own MAC
address (proxy ARP, RFC 1027), receives the GN's packets for the peer and tunnels them through
the overlay (GCCE 2022 paper, slides 17 and 19-20: "NDP/ARP process time", 0.32 ms for IPv4 in
the paper; :meth:`ArpProxy.latency_summary` measures ours).

:class:`ArpProxy` is the pure core: ``handle(frame, now)`` takes one whole received Ethernet
frame and returns the frames to send -- here at most one ARP reply.

What is answered, checked in this order; each outcome is counted under the name given:

* not an untagged ARP frame: ``not_arp``; shorter than an Ethernet ARP packet: ``malformed``;
  ARP for other hardware/protocol types (RFC 826 ``ar$hrd`` != 1, ``ar$pro`` != 0x0800):
  ``unsupported``; opcodes other than request/reply: ``unsupported``; ARP replies: ``replies``;
* a unicast Ethernet destination that is not the adapter (a request flooded by the bridge on its
  way to someone else): ``not_for_us``;
* an Ethernet source that differs from the ARP sender hardware address: ``mac_mismatch``;
* a sender MAC that is no registered GN: ``unknown_mac`` (logged at INFO, rate-limited);
* ARP probes (sender IP 0.0.0.0, RFC 5227 §2.1.1): ``probes`` -- never answered, so a GN's
  duplicate-address check (dhcpcd, NetworkManager) can never fail because of the proxy;
* gratuitous ARP / announcements (sender IP == target IP, RFC 5227 §2.3): ``gratuitous``;
* a sender IP that is not the GN's own VIPv4 (a GN with a stale or hand-made address):
  ``wrong_sender_ip`` (logged, rate-limited);
* a target that is ``router4``: answered (``answered_router``) unless the proxy was built with
  ``answer_router4=False`` (``router_left_to_kernel``): see "Wiring" below;
* a target outside the VIPv4 pool: ``outside_pool``; the pool's network or broadcast address:
  ``special_target``; a GN's own VIPv4 (the asking GN's, or another GN's on this link, which
  answers for itself): ``gn_target``;
* anything else -- a peer VIPv4 (:meth:`AdapterAddressing.is_peer_vip4`): answered,
  ``answered_peer``.

The reply (RFC 826, "Packet Reception") swaps sender and target, puts the adapter's MAC and the
requested address in the sender fields, and goes to the requester's MAC, padded to the 60-byte
Ethernet minimum (RFC 894).  ``internal_errors`` counts bugs (never raised out of ``handle``).

Wiring
    The adapter's kernel owns ``router4`` on the downlink, so it would answer ARP for it too
    (the same MAC, but twice, and for any host).  Either set ``net.ipv4.conf.<downlink>
    .arp_ignore=8`` (the kernel answers no ARP on the downlink; the proxy answers ``router4``,
    for registered GNs only -- the recommended setting, and what the tests use), or keep the
    kernel's answers and pass ``answer_router4=False``.  The proxy receives ARP through an
    AF_PACKET socket (:class:`~cyphonic.adapter.packet_io.RawLink` with ``ETH_P_ARP``).

Codec: hand-written with ``struct``; scapy needs ~0.11 ms just to dissect one ARP frame, more
than the whole handling here.  The tests check the replies with scapy's dissector.
"""

from __future__ import annotations

import logging
import statistics
import struct
import time
from collections import deque
from enum import IntEnum
from ipaddress import IPv4Address
from typing import Final

from cyphonic.adapter.gn import AdapterAddressing, GnTable, LogThrottle, mac_str

log = logging.getLogger(__name__)

__all__ = ["COUNTER_NAMES", "ETH_P_ARP", "ArpOp", "ArpProxy", "build_arp"]

ETH_P_ARP: Final = 0x0806
ARP_FRAME_LEN: Final = 42  # 14 Ethernet + 28 ARP (Ethernet/IPv4)
MIN_FRAME_LEN: Final = 60  # RFC 894: padded to the Ethernet minimum (without FCS)
BROADCAST_MAC: Final = b"\xff" * 6
_ARP_HEAD: Final = struct.Struct("!HHBBH")
_ETH_IPV4_ARP: Final = b"\x00\x01\x08\x00\x06\x04"  # hrd=1 (Ethernet), pro=0x0800, hln=6, pln=4
_ZERO4: Final = bytes(4)
LATENCY_SAMPLES: Final = 4096


class ArpOp(IntEnum):
    """ARP opcodes (RFC 826)."""

    REQUEST = 1
    REPLY = 2


COUNTER_NAMES: Final = (
    "received",
    "not_arp",
    "malformed",
    "unsupported",
    "requests",
    "replies",
    "not_for_us",
    "mac_mismatch",
    "unknown_mac",
    "probes",
    "gratuitous",
    "wrong_sender_ip",
    "outside_pool",
    "special_target",
    "gn_target",
    "router_left_to_kernel",
    "answered_router",
    "answered_peer",
    "internal_errors",
)


def build_arp(
    op: int, eth_dst: bytes, eth_src: bytes, sha: bytes, spa: bytes, tha: bytes, tpa: bytes
) -> bytes:
    """An Ethernet/IPv4 ARP frame (RFC 826), padded to 60 bytes."""
    frame = (
        eth_dst
        + eth_src
        + b"\x08\x06"
        + _ETH_IPV4_ARP
        + op.to_bytes(2, "big")
        + sha
        + spa
        + tha
        + tpa
    )
    return frame.ljust(MIN_FRAME_LEN, b"\0")


class ArpProxy:
    """Answers ARP requests from registered GNs for peer VIPv4s (see module docstring)."""

    def __init__(
        self,
        table: GnTable,
        addressing: AdapterAddressing,
        *,
        answer_router4: bool = True,
        log_interval: float = 60.0,
    ) -> None:
        self.table = table
        self.addressing = addressing
        self.answer_router4 = answer_router4
        self.counters: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)
        self.latency_ns: deque[int] = deque(maxlen=LATENCY_SAMPLES)
        """Time ``handle`` took for each recent answered request, in nanoseconds."""
        self._mac = addressing.downlink_mac_bytes
        self._router4 = addressing.router4.packed
        pool = addressing.pool4
        self._net = int(pool.network_address)
        self._mask = int(pool.netmask)
        self._special = {pool.network_address.packed, pool.broadcast_address.packed}
        self._throttle = LogThrottle(log_interval)

    def handle(self, frame: bytes, now: float) -> list[bytes]:
        """Answer one received Ethernet frame; returns the ARP reply to send, if any."""
        start = time.perf_counter_ns()
        counters = self.counters
        counters["received"] += 1
        try:
            outcome, reply = self._decide(frame, now)
        except Exception:  # never let a bug escape into the event loop; tests assert 0
            counters["internal_errors"] += 1
            if self._throttle.allow("internal", now):
                log.exception("ARP proxy failed on a frame (%s)", frame[:64].hex())
            return []
        counters[outcome] += 1
        if reply is None:
            return []
        self.latency_ns.append(time.perf_counter_ns() - start)
        return [reply]

    def _decide(self, frame: bytes, now: float) -> tuple[str, bytes | None]:
        if frame[12:14] != b"\x08\x06":
            return "not_arp", None
        if len(frame) < ARP_FRAME_LEN:
            return "malformed", None
        if frame[14:20] != _ETH_IPV4_ARP:
            return "unsupported", None
        op = int.from_bytes(frame[20:22], "big")
        if op == ArpOp.REPLY:
            return "replies", None
        if op != ArpOp.REQUEST:
            return "unsupported", None
        self.counters["requests"] += 1
        eth_dst = frame[0:6]
        if eth_dst != BROADCAST_MAC and eth_dst != self._mac:
            return "not_for_us", None
        sha, spa, tpa = frame[22:28], frame[28:32], frame[38:42]
        if frame[6:12] != sha:
            self._note(
                "mac_mismatch",
                sha,
                now,
                "ARP request from %s claims sender MAC %s",
                mac_str(frame[6:12]),
                mac_str(sha),
            )
            return "mac_mismatch", None
        gn = self.table.by_mac(sha)
        if gn is None:
            self._note(
                "unknown_mac",
                sha,
                now,
                "ARP request from unknown MAC %s for %s",
                mac_str(sha),
                IPv4Address(tpa),
            )
            return "unknown_mac", None
        if spa == _ZERO4:
            return "probes", None
        if spa == tpa:
            return "gratuitous", None
        if spa != gn.vip4.packed:
            self._note(
                "wrong_sender_ip",
                sha,
                now,
                "ARP request from %s (%s) with sender IP %s, not its VIP %s",
                gn.mac,
                gn.fqdn,
                IPv4Address(spa),
                gn.vip4,
            )
            return "wrong_sender_ip", None
        if tpa == self._router4:
            if not self.answer_router4:
                return "router_left_to_kernel", None
            return "answered_router", self._reply(sha, spa, tpa)
        if int.from_bytes(tpa, "big") & self._mask != self._net:
            return "outside_pool", None
        if tpa in self._special:
            return "special_target", None
        if self.table.by_vip4(tpa) is not None:
            return "gn_target", None
        return "answered_peer", self._reply(sha, spa, tpa)

    def _reply(self, sha: bytes, spa: bytes, tpa: bytes) -> bytes:
        return build_arp(ArpOp.REPLY, sha, self._mac, self._mac, tpa, sha, spa)

    def _note(self, kind: str, mac: bytes, now: float, fmt: str, *args: object) -> None:
        key = (kind, mac)
        if self._throttle.allow(key, now):
            more = self._throttle.suppressed(key)
            log.info(fmt + (f" (and {more} more)" if more else ""), *args)

    def latency_summary(self) -> dict[str, float]:
        """``handle`` time of recent answered requests: count, mean, p50, p99, max in µs."""
        samples = sorted(self.latency_ns)
        if not samples:
            return {"count": 0}
        n = len(samples)
        return {
            "count": n,
            "mean_us": statistics.fmean(samples) / 1000,
            "p50_us": samples[n // 2] / 1000,
            "p99_us": samples[min(n - 1, (n * 99) // 100)] / 1000,
            "max_us": samples[-1] / 1000,
        }
