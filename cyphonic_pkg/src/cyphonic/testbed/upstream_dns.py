"""A tiny authoritative DNS server standing in for "the normal resolver" in tests and the lab.

It answers A/AAAA (and ANY) queries from a static table ``{name: [addresses]}`` over UDP and
TCP, NODATA for other types of a known name and NXDOMAIN otherwise. ``force_tc`` makes every UDP
answer truncated (TC=1, no answers) so that clients must retry over TCP; answers that do not fit
the client's UDP size are truncated anyway. ``delay`` holds every answer back (timeout tests).
Every query seen is recorded in ``UpstreamDns.queries``.

Command line (the lab runs it inside a network namespace)::

    python -m cyphonic.testbed.upstream_dns --listen 198.51.100.10:53 \\
        --record www.example.test=198.51.100.80 --record www.example.test=2001:db8::80

In-process::

    upstream = UpstreamDns({"www.example.test": ["198.51.100.80"]})
    await upstream.start([("127.0.0.1", 0)])
    ...  # upstream.bound[0] is the (host, port) chosen
    await upstream.stop()
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import signal
import struct
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dnslib import AAAA, EDNS0, RR, A, DNSHeader, DNSRecord

from cyphonic.errors import CyphonicError, DecodeError
from cyphonic.node.resolver import (
    EDNS_UDP_PAYLOAD,
    MIN_UDP_PAYLOAD,
    Address,
    DnsServer,
    HandlerResult,
    Rcode,
    format_address,
)

log = logging.getLogger(__name__)

_QTYPE_A = 1
_QTYPE_AAAA = 28
_QTYPE_OPT = 41
_QTYPE_ANY = 255


def _name(text: str) -> str:
    return text.strip().rstrip(".").lower()


@dataclass(frozen=True, slots=True)
class SeenQuery:
    """One query as the server received it."""

    transport: str  # "udp" or "tcp"
    id: int
    qname: str  # lower case, no trailing dot
    qtype: int


class StaticZone:
    """The pure part: a query in, the answer (or None: no answer) out."""

    def __init__(self, records: Mapping[str, Sequence[str]], *, ttl: int = 300) -> None:
        self.ttl = ttl
        self._v4: dict[str, list[str]] = {}
        self._v6: dict[str, list[str]] = {}
        for name, addresses in records.items():
            key = _name(name)
            self._v4.setdefault(key, [])
            self._v6.setdefault(key, [])
            for text in addresses:
                address = ipaddress.ip_address(text)
                family = self._v4 if address.version == 4 else self._v6
                family[key].append(str(address))

    def parse(self, data: bytes) -> Any:
        """The query as a dnslib record; DecodeError if it is not one we answer."""
        if len(data) < 12 or data[2] & 0x80:
            raise DecodeError("not a DNS query")
        try:
            request = DNSRecord.parse(data)
        except Exception as exc:  # dnslib raises assorted types on bad input
            raise DecodeError(f"not a DNS message: {exc}") from exc
        if len(request.questions) != 1:
            raise DecodeError(f"{len(request.questions)} questions")
        return request

    def answer(self, data: bytes, *, tcp: bool, force_tc: bool = False) -> bytes | None:
        try:
            request = self.parse(data)
        except DecodeError:
            if len(data) < 12 or data[2] & 0x80:
                return None
            qid, flags = struct.unpack_from("!HH", data)
            return struct.pack(
                "!HHHHHH", qid, 0x8000 | (flags & 0x7900) | Rcode.FORMERR, 0, 0, 0, 0
            )
        question = request.q
        name = _name(str(question.qname))
        qtype = int(question.qtype)
        header = DNSHeader(id=request.header.id, qr=1, aa=1, rd=request.header.rd)
        reply = DNSRecord(header, q=question)
        if name not in self._v4:
            reply.header.rcode = Rcode.NXDOMAIN
        else:
            if qtype in (_QTYPE_A, _QTYPE_ANY):
                for v4 in self._v4[name]:
                    reply.add_answer(RR(question.qname, _QTYPE_A, 1, self.ttl, A(v4)))
            if qtype in (_QTYPE_AAAA, _QTYPE_ANY):
                for v6 in self._v6[name]:
                    reply.add_answer(RR(question.qname, _QTYPE_AAAA, 1, self.ttl, AAAA(v6)))
        options = [rr for rr in request.ar if rr.rtype == _QTYPE_OPT]
        limit = MIN_UDP_PAYLOAD
        if options:
            reply.add_ar(EDNS0(udp_len=EDNS_UDP_PAYLOAD))
            limit = max(MIN_UDP_PAYLOAD, min(int(options[0].rclass), EDNS_UDP_PAYLOAD))
        packed = bytes(reply.pack())
        if not tcp and (force_tc or len(packed) > limit):
            reply.rr = []
            reply.header.tc = 1
            packed = bytes(reply.pack())
        return packed


class UpstreamDns:
    """The server: a :class:`StaticZone` behind UDP and TCP listeners."""

    def __init__(
        self,
        records: Mapping[str, Sequence[str]],
        *,
        ttl: int = 300,
        force_tc: bool = False,
        delay: float = 0.0,
    ) -> None:
        self.zone = StaticZone(records, ttl=ttl)
        self.force_tc = force_tc
        self.delay = delay
        self.queries: list[SeenQuery] = []
        self._server = DnsServer(self._on_message, name="upstream-dns")

    @property
    def bound(self) -> list[Address]:
        return list(self._server.bound)

    async def start(self, listen: Sequence[Address]) -> None:
        await self._server.start(listen)

    async def stop(self) -> None:
        await self._server.stop()

    def _on_message(self, data: bytes, source: Address, tcp: bool) -> HandlerResult:
        try:
            request = self.zone.parse(data)
        except DecodeError:
            pass
        else:
            seen = SeenQuery(
                "tcp" if tcp else "udp",
                int(request.header.id),
                _name(str(request.q.qname)),
                int(request.q.qtype),
            )
            self.queries.append(seen)
            log.debug(
                "%s query %s/%d from %s",
                seen.transport,
                seen.qname,
                seen.qtype,
                format_address(*source),
            )
        reply = self.zone.answer(data, tcp=tcp, force_tc=self.force_tc)
        if self.delay > 0:
            return self._later(reply)
        return reply

    async def _later(self, reply: bytes | None) -> bytes | None:
        await asyncio.sleep(self.delay)
        return reply


def parse_listen(text: str) -> Address:
    """``HOST:PORT`` or ``[V6HOST]:PORT``."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 0xFFFF:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT or [V6HOST]:PORT, not {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def parse_record(text: str) -> tuple[str, list[str]]:
    """``NAME=ADDRESS[,ADDRESS...]``."""
    name, sep, values = text.partition("=")
    addresses = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not _name(name) or not addresses:
        raise argparse.ArgumentTypeError(f"expected NAME=ADDRESS[,ADDRESS...], not {text!r}")
    for address in addresses:
        try:
            ipaddress.ip_address(address)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc
    return _name(name), addresses


async def _serve(server: UpstreamDns, listen: Sequence[Address]) -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    await server.start(listen)
    log.info("upstream DNS listening on %s", ", ".join(format_address(*a) for a in server.bound))
    try:
        await stopping.wait()
    finally:
        await server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cyphonic.testbed.upstream_dns",
        description="Static authoritative DNS server (UDP and TCP) for tests and the lab.",
    )
    parser.add_argument(
        "--listen",
        type=parse_listen,
        action="append",
        required=True,
        metavar="HOST:PORT",
        help="address to listen on (repeatable)",
    )
    parser.add_argument(
        "--record",
        type=parse_record,
        action="append",
        default=[],
        metavar="NAME=ADDR[,ADDR]",
        help="A/AAAA record(s) (repeatable)",
    )
    parser.add_argument("--ttl", type=int, default=300, help="TTL of the answers")
    parser.add_argument(
        "--force-tc",
        action="store_true",
        help="truncate every UDP answer (TC=1) so clients retry over TCP",
    )
    parser.add_argument(
        "--delay", type=float, default=0.0, help="seconds to hold every answer back"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every query")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
    )
    records: dict[str, list[str]] = {}
    for name, addresses in args.record:
        records.setdefault(name, []).extend(addresses)
    server = UpstreamDns(records, ttl=args.ttl, force_tc=args.force_tc, delay=args.delay)
    try:
        asyncio.run(_serve(server, args.listen))
    except CyphonicError as exc:
        print(f"upstream_dns: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
