"""The CYPHONIC resolver: CYPHONIC names to VIPs, every other name to the normal resolvers.

A DNS server (UDP and TCP) that the node daemon runs on its local addresses (and that the
adapter runs for its general nodes). Names under the CYPHONIC domain -- the apex itself and
anything below it, compared case-insensitively -- are answered by an async ``lookup`` callback
supplied by the daemon; that callback is where route selection happens and where the daemon
waits for the tunnel, so it may take seconds. Everything else is forwarded, unchanged, to the
upstream resolvers.

Answers for the CYPHONIC domain
    ``A`` and ``AAAA`` (and ``ANY``, answered with the ``A`` records as RFC 8482 allows) call
    ``lookup(fqdn, 4)`` or ``lookup(fqdn, 6)``. ``fqdn`` is lower case without the trailing dot
    (``"host1.cyphonic.test"``). ``OK`` with addresses -> NOERROR with one record per address and
    the configured TTL; ``OK`` without addresses -> NOERROR without answers (NODATA: the name
    exists but has no VIP of that family); ``NXDOMAIN`` -> NXDOMAIN; ``SERVFAIL``, an exception,
    a malformed address or the deadline (``lookup_timeout``) -> SERVFAIL.

    Any other type (MX, TXT, ...) asks whether the name exists: through the optional
    ``exists(fqdn) -> LookupStatus`` callback when the daemon supplies one (so that, say, an MX
    query does not trigger route selection), otherwise through ``lookup(fqdn, 4)``. An existing
    name gets NODATA, a missing one NXDOMAIN. Zone transfers (AXFR/IXFR) and classes other than
    IN/ANY are REFUSED. A label outside ``[A-Za-z0-9_-]`` cannot be a CYPHONIC name and gets
    NXDOMAIN without calling the daemon. Negative answers carry no SOA: they are not meant to be
    cached, since a node may register a moment later.

    Concurrent queries for the same ``(fqdn, want)`` share one call (coalescing; without an
    ``exists`` callback an existence check shares the A query's ``lookup(fqdn, 4)``). The shared
    call is cancelled when ``lookup_timeout`` expires (counted from the first query) and every
    query waiting on it gets SERVFAIL; a daemon that wants tunnel set-up to go on past that
    should run it in its own task and ``await asyncio.shield(...)`` it inside ``lookup``. While
    the callback runs, :data:`query_source` holds the (host, port) of the client that started
    it; with ``coalesce_per_source=True`` queries from different client hosts are not merged
    (the adapter looks names up under each general node's own identity).

Forwarding
    UDP queries go to the upstreams over UDP, TCP queries over TCP; upstreams are tried in order,
    ``upstream_tries`` rounds, each try bounded by ``upstream_timeout``. The query is sent with a
    fresh random id from a fresh socket (source port randomisation) and the reply is accepted
    only if its id and question match; the client gets the reply byte for byte with its own id
    restored, so a truncated (TC=1) upstream answer reaches the client as such and the client
    retries over TCP. No usable upstream -> SERVFAIL. Nothing is cached.

Malformed input
    Fewer than 12 bytes or a response (QR=1): dropped. Other unparseable queries, zero or several
    questions, compressed or over-long question names, several OPT records, queries longer than
    :data:`MAX_QUERY_SIZE`: FORMERR (header only). Opcodes other than QUERY: NOTIMP. Over TCP a
    length prefix below 12 or above :data:`MAX_QUERY_SIZE` closes the connection. All of these
    count as ``malformed``; logging about them is at debug level and rate-limited per source.

Counters (``CyphonicResolver.counters``)
    ``queries``: every message received (including malformed ones); ``cyphonic_queries``:
    well-formed queries under the CYPHONIC domain; ``forwarded``: queries sent upstream;
    ``nxdomain`` / ``servfail``: NXDOMAIN / SERVFAIL answers the resolver itself produced
    (upstream answers passed through are not inspected); ``malformed``: see above;
    ``upstream_failures``: upstream tries that failed (timeout, refused, bad reply);
    ``overloaded``: queries answered SERVFAIL because ``max_inflight`` queries were pending.

Layering: :class:`ResolverCore` is pure (bytes in, a :data:`Decision` out; responses built from
a decision and a :class:`LookupResult`), :class:`DnsServer` is the asyncio edge (listeners,
tasks, TCP framing), :class:`CyphonicResolver` joins them with the callbacks and the upstreams.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import ipaddress
import logging
import re
import secrets
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Final, cast

from dnslib import AAAA, EDNS0, RR, A, DNSHeader, DNSRecord

from cyphonic.errors import ConfigError, CyphonicError, DecodeError

log = logging.getLogger(__name__)

DEFAULT_TTL: Final = 60
#: No real query comes close; the cap bounds the parser's work on hostile input.
MAX_QUERY_SIZE: Final = 4096
#: Classic DNS limit for UDP answers to clients without EDNS (RFC 1035 section 4.2.1).
MIN_UDP_PAYLOAD: Final = 512
#: The UDP payload size we advertise and never exceed (DNS Flag Day 2020: no fragmentation).
EDNS_UDP_PAYLOAD: Final = 1232
MAX_TCP_MESSAGE: Final = 0xFFFF

COUNTER_NAMES: Final = (
    "queries",
    "cyphonic_queries",
    "forwarded",
    "nxdomain",
    "servfail",
    "malformed",
    "upstream_failures",
    "overloaded",
)

_HEADER: Final = struct.Struct("!HHHHHH")
_QR: Final = 0x8000
_OPCODE_MASK: Final = 0x7800
_AA: Final = 0x0400
_TC: Final = 0x0200
_RD: Final = 0x0100
_RA: Final = 0x0080
_RCODE_MASK: Final = 0x000F

_QTYPE_A: Final = 1
_QTYPE_AAAA: Final = 28
_QTYPE_OPT: Final = 41
_QTYPE_IXFR: Final = 251
_QTYPE_AXFR: Final = 252
_QTYPE_ANY: Final = 255
_CLASS_IN: Final = 1
_CLASS_ANY: Final = 255

_LABEL_RE: Final = re.compile(rb"[a-z0-9_-]{1,63}")


class Rcode(IntEnum):
    """DNS response codes (RFC 1035 section 4.1.1, RFC 6891 section 9 for BADVERS)."""

    NOERROR = 0
    FORMERR = 1
    SERVFAIL = 2
    NXDOMAIN = 3
    NOTIMP = 4
    REFUSED = 5
    BADVERS = 16


class LookupStatus(IntEnum):
    """Outcome of the daemon's lookup; the values are the DNS rcodes they turn into."""

    OK = 0
    SERVFAIL = 2
    NXDOMAIN = 3


@dataclass(frozen=True, slots=True)
class LookupResult:
    """What the daemon's lookup returns: a status and the VIPs (strings) of the wanted family."""

    status: LookupStatus
    addresses: tuple[str, ...] = ()


LookupFn = Callable[[str, int], Awaitable[LookupResult]]
ExistsFn = Callable[[str], Awaitable[LookupStatus]]
Address = tuple[str, int]

#: The (host, port) of the client whose query started the running lookup.
query_source: contextvars.ContextVar[Address | None] = contextvars.ContextVar(
    "cyphonic_query_source", default=None
)


# --------------------------------------------------------------------------------------------
# Pure part: decisions and responses
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Drop:
    """Send nothing (no readable header, or the message is a response)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Respond:
    """Send ``data`` at once. ``malformed``: the query was bad; ``local``: under our domain."""

    data: bytes
    rcode: Rcode
    reason: str
    malformed: bool = False
    local: bool = False


@dataclass(frozen=True, slots=True)
class Resolve:
    """A query under the CYPHONIC domain that needs the daemon.

    ``want`` is 4 or 6 for address queries and 0 when only the name's existence matters.
    """

    request: Any  # dnslib.DNSRecord
    fqdn: str
    qtype: int
    want: int
    edns: bool
    dnssec_ok: bool
    udp_payload: int


@dataclass(frozen=True, slots=True)
class Forward:
    """A query for the upstream resolvers; ``data`` is the client's message, unchanged."""

    data: bytes
    question_end: int
    qname: str

    @property
    def query_id(self) -> int:
        return int.from_bytes(self.data[:2], "big")

    def wire(self, upstream_id: int) -> bytes:
        """The message to send upstream, carrying ``upstream_id`` instead of the client's id."""
        return upstream_id.to_bytes(2, "big") + self.data[2:]

    def accept(self, reply: bytes, upstream_id: int) -> bytes | None:
        """The reply to hand the client (its id restored), or None if it does not match."""
        if len(reply) < _HEADER.size:
            return None
        rid, flags, qdcount = struct.unpack_from("!HHH", reply)
        if rid != upstream_id or not flags & _QR or flags & _OPCODE_MASK:
            return None
        if qdcount:
            question = reply[_HEADER.size : self.question_end]
            if len(question) != self.question_end - _HEADER.size or _fold(question) != _fold(
                self.data[_HEADER.size : self.question_end]
            ):
                return None
        elif not flags & (_TC | _RCODE_MASK):
            return None  # an empty NOERROR answer that does not even echo the question
        return self.data[:2] + reply[2:]

    def servfail(self) -> bytes:
        qid, flags = struct.unpack_from("!HH", self.data)
        out = _QR | (flags & (_OPCODE_MASK | _RD)) | _RA | Rcode.SERVFAIL
        header = _HEADER.pack(qid, out, 1, 0, 0, 0)
        return header + self.data[_HEADER.size : self.question_end]


Decision = Drop | Respond | Resolve | Forward


@dataclass(frozen=True, slots=True)
class Answer:
    data: bytes
    rcode: Rcode


def _fold(question: bytes) -> bytes:
    """Question section compared case-insensitively: lower the name, keep type and class.

    Label length octets are below 64 and so untouched by ``bytes.lower``.
    """
    return question[:-4].lower() + question[-4:]


def _header_only(data: bytes, rcode: Rcode) -> bytes:
    """A reply carrying only a header (id, opcode and RD copied from the query)."""
    qid, flags = struct.unpack_from("!HH", data)
    out = _QR | (flags & (_OPCODE_MASK | _RD)) | _RA | (rcode & _RCODE_MASK)
    return _HEADER.pack(qid, out, 0, 0, 0, 0)


def _question_end(data: bytes) -> int | None:
    """Offset just past the first question, or None if its name is compressed or too long."""
    offset = _HEADER.size
    name_length = 0
    while True:
        if offset >= len(data):
            return None
        length = data[offset]
        if length == 0:
            offset += 1
            break
        if length & 0xC0:
            return None  # compression (or reserved label types) in a query's only question
        offset += 1 + length
        name_length += 1 + length
        if name_length > 254:
            return None  # RFC 1035 section 2.3.4: 255 octets including the root label
    offset += 4
    return offset if offset <= len(data) else None


def _parse(data: bytes) -> Any:
    """dnslib's parse with every failure turned into ``DecodeError``."""
    try:
        return DNSRecord.parse(data)
    except Exception as exc:  # dnslib raises assorted types (DNSError, RecursionError, ...)
        raise DecodeError(f"not a DNS message: {exc}") from exc


def normalize_domain(domain: str) -> tuple[bytes, ...]:
    """The CYPHONIC domain as lower-case labels; ConfigError if it is not a host name."""
    text = domain.strip().rstrip(".").lower()
    try:
        labels = tuple(text.encode("ascii").split(b".")) if text else ()
    except UnicodeEncodeError:
        labels = ()
    if not labels or not all(_LABEL_RE.fullmatch(label) for label in labels):
        raise ConfigError(f"invalid CYPHONIC domain {domain!r}")
    return labels


class ResolverCore:
    """The pure half of the resolver: classify queries, build answers. No I/O, no clock."""

    def __init__(self, domain: str, *, ttl: int = DEFAULT_TTL) -> None:
        if not 0 <= ttl <= 0x7FFFFFFF:
            raise ConfigError(f"invalid DNS TTL {ttl}")
        self.domain = normalize_domain(domain)
        self.ttl = ttl

    def in_domain(self, labels: Sequence[bytes]) -> bool:
        n = len(self.domain)
        return len(labels) >= n and tuple(x.lower() for x in labels[-n:]) == self.domain

    def classify(self, data: bytes) -> Decision:
        """Decide what to do with one received message. Never raises."""
        if len(data) < _HEADER.size:
            return Drop("shorter than a DNS header")
        _, flags, qdcount = struct.unpack_from("!HHH", data)
        if flags & _QR:
            return Drop("a response (QR=1), not a query")
        if len(data) > MAX_QUERY_SIZE:
            return _malformed(data, Rcode.FORMERR, f"oversized query ({len(data)} bytes)")
        if flags & _OPCODE_MASK:
            opcode = (flags & _OPCODE_MASK) >> 11
            return _malformed(data, Rcode.NOTIMP, f"opcode {opcode} is not QUERY")
        if qdcount != 1:
            return _malformed(data, Rcode.FORMERR, f"{qdcount} questions")
        question_end = _question_end(data)
        if question_end is None:
            return _malformed(data, Rcode.FORMERR, "compressed, truncated or over-long qname")
        try:
            request = _parse(data)
        except DecodeError as exc:
            return _malformed(data, Rcode.FORMERR, str(exc))
        options = [rr for rr in request.ar if rr.rtype == _QTYPE_OPT]
        if len(options) > 1:
            return _malformed(data, Rcode.FORMERR, "several OPT records")
        question = request.q
        labels: tuple[bytes, ...] = tuple(question.qname.label)
        if not self.in_domain(labels):
            return Forward(data, question_end, _printable(labels))
        return self._classify_local(request, labels, options[0] if options else None)

    def _classify_local(self, request: Any, labels: tuple[bytes, ...], opt: Any) -> Decision:
        question = request.q
        qtype = int(question.qtype)
        edns = opt is not None
        dnssec_ok = bool(edns and int(opt.ttl) & 0x8000)
        udp_payload = MIN_UDP_PAYLOAD
        if edns:
            udp_payload = max(MIN_UDP_PAYLOAD, min(int(opt.rclass), EDNS_UDP_PAYLOAD))
        resolve = Resolve(request, "", qtype, 0, edns, dnssec_ok, udp_payload)
        if edns and (int(opt.ttl) >> 16) & 0xFF:
            return self._respond(resolve, Rcode.BADVERS, "EDNS version is not 0")
        if int(question.qclass) not in (_CLASS_IN, _CLASS_ANY):
            return self._respond(resolve, Rcode.REFUSED, "class is not IN")
        if qtype in (_QTYPE_AXFR, _QTYPE_IXFR):
            return self._respond(resolve, Rcode.REFUSED, "zone transfers are not offered")
        lowered = [label.lower() for label in labels]
        if not all(_LABEL_RE.fullmatch(label) for label in lowered):
            return self._respond(resolve, Rcode.NXDOMAIN, "not a host name")
        fqdn = b".".join(lowered).decode("ascii")
        want = {_QTYPE_A: 4, _QTYPE_ANY: 4, _QTYPE_AAAA: 6}.get(qtype, 0)
        return Resolve(request, fqdn, qtype, want, edns, dnssec_ok, udp_payload)

    def _respond(self, resolve: Resolve, rcode: Rcode, reason: str) -> Respond:
        data = self._reply(resolve, rcode, [], tcp=False)
        return Respond(data, rcode, reason, malformed=False, local=True)

    def answer(self, resolve: Resolve, result: LookupResult, *, tcp: bool) -> Answer:
        """The response to ``resolve`` given the daemon's ``result``. Never raises."""
        rcode = Rcode.SERVFAIL
        records: list[Any] = []
        if result.status == LookupStatus.OK:
            rcode = Rcode.NOERROR
            if resolve.want:
                try:
                    records = [self._address_record(resolve, a) for a in result.addresses]
                except (ValueError, TypeError):
                    log.warning(
                        "lookup of %s returned a bad address in %r", resolve.fqdn, result.addresses
                    )
                    rcode, records = Rcode.SERVFAIL, []
        elif result.status == LookupStatus.NXDOMAIN:
            rcode = Rcode.NXDOMAIN
        return Answer(self._reply(resolve, rcode, records, tcp=tcp), rcode)

    def servfail(self, decision: Resolve | Forward) -> bytes:
        if isinstance(decision, Forward):
            return decision.servfail()
        return self._reply(decision, Rcode.SERVFAIL, [], tcp=False)

    def _address_record(self, resolve: Resolve, address: str) -> Any:
        qname = resolve.request.q.qname
        if resolve.want == 4:
            v4 = ipaddress.IPv4Address(address)
            return RR(qname, _QTYPE_A, _CLASS_IN, self.ttl, A(str(v4)))
        v6 = ipaddress.IPv6Address(address)
        return RR(qname, _QTYPE_AAAA, _CLASS_IN, self.ttl, AAAA(str(v6)))

    def _reply(self, resolve: Resolve, rcode: Rcode, records: list[Any], *, tcp: bool) -> bytes:
        request = resolve.request
        header = DNSHeader(
            id=request.header.id, qr=1, aa=1, ra=1, rd=request.header.rd, rcode=rcode & 0xF
        )
        reply = DNSRecord(header, q=request.q)
        for record in records:
            reply.add_answer(record)
        if resolve.edns:
            reply.add_ar(
                EDNS0(
                    udp_len=EDNS_UDP_PAYLOAD,
                    ext_rcode=rcode >> 4,
                    flags="do" if resolve.dnssec_ok else "",
                )
            )
        data = bytes(reply.pack())
        limit = MAX_TCP_MESSAGE if tcp else resolve.udp_payload
        if len(data) > limit:
            reply.rr = []
            reply.header.tc = 1
            data = bytes(reply.pack())
        return data


def _malformed(data: bytes, rcode: Rcode, reason: str) -> Respond:
    return Respond(_header_only(data, rcode), rcode, reason, malformed=True)


def _printable(labels: Sequence[bytes]) -> str:
    return ".".join(label.decode("ascii", "backslashreplace") for label in labels) + "."


class LogLimiter:
    """At most one message per ``interval`` seconds per source (python-zeroconf style)."""

    def __init__(
        self,
        interval: float = 10.0,
        *,
        max_sources: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._interval = interval
        self._max_sources = max_sources
        self._clock = clock
        self._last: dict[str, float] = {}

    def allow(self, source: str) -> bool:
        now = self._clock()
        last = self._last.get(source)
        if last is not None and now - last < self._interval:
            return False
        if last is None and len(self._last) >= self._max_sources:
            self._last.clear()  # bounded memory; a flood of sources just gets logged again
        self._last[source] = now
        return True


# --------------------------------------------------------------------------------------------
# I/O edge: UDP and TCP listeners
# --------------------------------------------------------------------------------------------

HandlerResult = bytes | None | Awaitable[bytes | None]
#: ``handler(message, source, over_tcp)``: bytes to answer now, None for no answer, or an
#: awaitable of either, which the server runs as a task.
DnsHandler = Callable[[bytes, Address, bool], HandlerResult]


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _UdpServerProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self._server = server
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if self._transport is not None:
            self._server.on_datagram(self._transport, data, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("%s: UDP error: %s", self._server.name, exc)


class DnsServer:
    """UDP and TCP listeners on several addresses, all driving one handler.

    Replies are sent as the handler returns them; awaitable results run as tasks (so a slow
    answer never blocks the next query, and TCP queries pipelined on one connection are
    answered as they complete, RFC 7766 section 6.2.1.1).
    """

    def __init__(
        self,
        handler: DnsHandler,
        *,
        name: str = "dns",
        tcp_idle_timeout: float = 10.0,
        max_tcp_clients: int = 128,
        max_tcp_pending: int = 32,
        max_tcp_message: int = MAX_QUERY_SIZE,
        on_bad_frame: Callable[[Address, str], None] | None = None,
    ) -> None:
        self.name = name
        self._handler = handler
        self._tcp_idle_timeout = tcp_idle_timeout
        self._max_tcp_clients = max_tcp_clients
        self._max_tcp_pending = max_tcp_pending
        self._max_tcp_message = max_tcp_message
        self._on_bad_frame = on_bad_frame
        self._udp: list[asyncio.DatagramTransport] = []
        self._tcp: list[asyncio.Server] = []
        self._connections: set[asyncio.Task[None]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._errors = LogLimiter()
        self.bound: list[Address] = []

    @property
    def inflight(self) -> int:
        """Handler results still being awaited."""
        return len(self._tasks)

    async def start(self, listen: Sequence[Address]) -> None:
        """Listen on every (host, port), UDP and TCP on the same port (port 0: one is chosen).

        Raises CyphonicError naming the address when a socket cannot be bound.
        """
        try:
            for host, port in listen:
                await self._bind(host, port)
        except BaseException:
            await self.stop()
            raise

    async def _bind(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        attempts = 20 if port == 0 else 1
        for attempt in range(attempts):
            where = format_address(host, port)
            try:
                udp, _ = await loop.create_datagram_endpoint(
                    lambda: _UdpServerProtocol(self), local_addr=(host, port)
                )
            except OSError as exc:
                raise CyphonicError(f"{self.name}: cannot listen on {where}/udp: {exc}") from exc
            sockname = udp.get_extra_info("sockname")
            actual = int(sockname[1])
            try:
                server = await asyncio.start_server(
                    self._serve_tcp, host=host, port=actual, reuse_address=True
                )
            except OSError as exc:
                udp.close()
                if attempt + 1 < attempts:
                    continue  # the port chosen for UDP is taken for TCP: choose again
                where = format_address(host, actual)
                raise CyphonicError(f"{self.name}: cannot listen on {where}/tcp: {exc}") from exc
            self._udp.append(udp)
            self._tcp.append(server)
            self.bound.append((str(sockname[0]), actual))
            return

    async def stop(self) -> None:
        """Close every listener and connection and cancel pending answers."""
        for udp in self._udp:
            udp.close()
        for server in self._tcp:
            server.close()
        pending = [*self._connections, *self._tasks]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        for server in self._tcp:
            await server.wait_closed()
        self._udp.clear()
        self._tcp.clear()
        self.bound.clear()

    def on_datagram(
        self, transport: asyncio.DatagramTransport, data: bytes, addr: tuple[Any, ...]
    ) -> None:
        def send(reply: bytes) -> None:
            if not transport.is_closing():
                transport.sendto(reply, addr)

        self._dispatch(data, (str(addr[0]), int(addr[1])), False, send)

    def _dispatch(
        self, data: bytes, source: Address, tcp: bool, send: Callable[[bytes], None]
    ) -> asyncio.Task[None] | None:
        try:
            result = self._handler(data, source, tcp)
        except Exception:
            self._log_error(source, "handler failed")
            return None
        if result is None:
            return None
        if isinstance(result, bytes):
            send(result)
            return None
        task = asyncio.get_running_loop().create_task(self._finish(result, source, send))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _finish(
        self, result: Awaitable[bytes | None], source: Address, send: Callable[[bytes], None]
    ) -> None:
        try:
            reply = await result
        except Exception:
            self._log_error(source, "handler failed")
            return
        if reply is not None:
            send(reply)

    def _log_error(self, source: Address, what: str) -> None:
        if self._errors.allow(source[0]):
            log.warning(
                "%s: %s for a query from %s",
                self.name,
                what,
                format_address(*source),
                exc_info=True,
            )

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        source: Address = (str(peer[0]), int(peer[1])) if peer else ("?", 0)
        me = asyncio.current_task()
        if me is None or len(self._connections) >= self._max_tcp_clients:
            writer.close()
            return
        self._connections.add(me)
        pending: set[asyncio.Task[None]] = set()

        def send(reply: bytes) -> None:
            if len(reply) <= MAX_TCP_MESSAGE and not writer.is_closing():
                writer.write(len(reply).to_bytes(2, "big") + reply)

        try:
            while True:
                try:
                    async with asyncio.timeout(self._tcp_idle_timeout):
                        length = int.from_bytes(await reader.readexactly(2), "big")
                        if length < _HEADER.size or length > self._max_tcp_message:
                            if self._on_bad_frame is not None:
                                self._on_bad_frame(source, f"TCP length prefix {length}")
                            break
                        data = await reader.readexactly(length)
                except (TimeoutError, asyncio.IncompleteReadError, OSError):
                    break
                task = self._dispatch(data, source, True, send)
                if task is not None:
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                if len(pending) >= self._max_tcp_pending:
                    await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                try:
                    await writer.drain()
                except OSError:
                    break
            if pending:  # the client may half-close after its last query: still answer it
                await asyncio.wait(pending)
                await writer.drain()
        except OSError:
            pass
        except asyncio.CancelledError:
            # Only stop() cancels this task. Ending normally keeps CPython 3.11's stream
            # callback (task.exception() on a cancelled task) from logging a traceback.
            pass
        finally:
            for task in pending:
                task.cancel()
            writer.close()
            self._connections.discard(me)


# --------------------------------------------------------------------------------------------
# Upstream exchanges
# --------------------------------------------------------------------------------------------


class _UdpExchange(asyncio.DatagramProtocol):
    def __init__(self, done: asyncio.Future[bytes], accept: Callable[[bytes], bytes | None]):
        self._done = done
        self._accept = accept

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if not self._done.done():
            reply = self._accept(data)
            if reply is not None:
                self._done.set_result(reply)

    def error_received(self, exc: Exception) -> None:
        if not self._done.done():
            self._done.set_exception(exc)  # e.g. ICMP port unreachable: fail over at once

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._done.done():
            self._done.set_exception(exc or ConnectionError("UDP socket closed"))


async def udp_exchange(
    upstream: Address, message: bytes, accept: Callable[[bytes], bytes | None]
) -> bytes:
    """Send ``message`` from a fresh UDP socket; the first reply ``accept`` maps to non-None."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[bytes] = loop.create_future()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _UdpExchange(done, accept), remote_addr=upstream
    )
    try:
        transport.sendto(message)
        return await done
    finally:
        transport.close()


async def tcp_exchange(
    upstream: Address, message: bytes, accept: Callable[[bytes], bytes | None]
) -> bytes | None:
    """One query over a fresh TCP connection (RFC 7766 framing); ``accept`` checks the reply."""
    reader, writer = await asyncio.open_connection(*upstream)
    try:
        writer.write(len(message).to_bytes(2, "big") + message)
        await writer.drain()
        length = int.from_bytes(await reader.readexactly(2), "big")
        return accept(await reader.readexactly(length))
    finally:
        writer.close()


# --------------------------------------------------------------------------------------------
# The resolver
# --------------------------------------------------------------------------------------------


class CyphonicResolver:
    """The node's DNS server: the CYPHONIC domain through ``lookup``, the rest upstream."""

    def __init__(
        self,
        domain: str,
        lookup: LookupFn,
        upstreams: Sequence[Address],
        *,
        exists: ExistsFn | None = None,
        ttl: int = DEFAULT_TTL,
        lookup_timeout: float = 5.0,
        upstream_timeout: float = 2.0,
        upstream_tries: int = 2,
        max_inflight: int = 1024,
        coalesce_per_source: bool = False,
    ) -> None:
        if lookup_timeout <= 0 or upstream_timeout <= 0:
            raise ConfigError("resolver timeouts must be positive")
        if upstream_tries < 1 or max_inflight < 1:
            raise ConfigError("upstream_tries and max_inflight must be at least 1")
        self._core = ResolverCore(domain, ttl=ttl)
        self._lookup = lookup
        self._exists = exists
        self._upstreams = [(str(host), int(port)) for host, port in upstreams]
        self._lookup_timeout = lookup_timeout
        self._upstream_timeout = upstream_timeout
        self._upstream_tries = upstream_tries
        self._max_inflight = max_inflight
        self._coalesce_per_source = coalesce_per_source
        self._counters = dict.fromkeys(COUNTER_NAMES, 0)
        self._lookups: dict[tuple[str, int, str], asyncio.Task[LookupResult]] = {}
        self._debug_limiter = LogLimiter()
        self._warn_limiter = LogLimiter(60.0)
        self._server = DnsServer(self._on_message, name="resolver", on_bad_frame=self._bad_frame)

    @property
    def bound(self) -> list[Address]:
        """The (host, port) actually listened on, port 0 replaced by the chosen port."""
        return list(self._server.bound)

    @property
    def counters(self) -> dict[str, int]:
        return dict(self._counters)

    async def start(self, listen: Sequence[Address]) -> None:
        """Listen on every (host, port), UDP and TCP; CyphonicError names a failing address."""
        await self._server.start(listen)
        log.info(
            "CYPHONIC resolver for %s listening on %s, upstreams %s",
            ".".join(x.decode() for x in self._core.domain),
            ", ".join(format_address(*a) for a in self.bound),
            ", ".join(format_address(*a) for a in self._upstreams) or "none",
        )

    async def stop(self) -> None:
        await self._server.stop()
        lookups = list(self._lookups.values())
        for task in lookups:
            task.cancel()
        if lookups:
            await asyncio.gather(*lookups, return_exceptions=True)

    # -- message handling (called by DnsServer) ----------------------------------------------

    def _on_message(self, data: bytes, source: Address, tcp: bool) -> HandlerResult:
        self._counters["queries"] += 1
        decision = self._core.classify(data)
        if isinstance(decision, Drop):
            self._counters["malformed"] += 1
            self._debug(source, "dropped a message: %s", decision.reason)
            return None
        if isinstance(decision, Respond):
            if decision.malformed:
                self._counters["malformed"] += 1
                self._debug(source, "%s: %s", decision.rcode.name, decision.reason)
            if decision.local:
                self._counters["cyphonic_queries"] += 1
            self._count_rcode(decision.rcode)
            return decision.data
        if isinstance(decision, Resolve):
            self._counters["cyphonic_queries"] += 1
        else:
            self._counters["forwarded"] += 1
        if self._server.inflight >= self._max_inflight:
            self._counters["overloaded"] += 1
            self._counters["servfail"] += 1
            self._debug(source, "%d queries pending: SERVFAIL", self._max_inflight)
            return self._core.servfail(decision)
        if isinstance(decision, Resolve):
            return self._resolve(decision, source, tcp)
        return self._forward(decision, source, tcp)

    def _bad_frame(self, source: Address, reason: str) -> None:
        self._counters["queries"] += 1
        self._counters["malformed"] += 1
        self._debug(source, "closed a TCP connection: %s", reason)

    def _count_rcode(self, rcode: Rcode) -> None:
        if rcode == Rcode.NXDOMAIN:
            self._counters["nxdomain"] += 1
        elif rcode == Rcode.SERVFAIL:
            self._counters["servfail"] += 1

    def _debug(self, source: Address, message: str, *args: object) -> None:
        """Debug logging, at most one message per source host every ten seconds."""
        if log.isEnabledFor(logging.DEBUG) and self._debug_limiter.allow(source[0]):
            log.debug(message + " (from %s)", *args, format_address(*source))

    # -- CYPHONIC names ----------------------------------------------------------------------

    async def _resolve(self, resolve: Resolve, source: Address, tcp: bool) -> bytes:
        query_source.set(source)  # this task's own context; the shared lookup copies it
        # kind: 4 or 6 = lookup(fqdn, kind); 0 = exists(fqdn). Without an exists callback an
        # existence check is an IPv4 lookup, shared with concurrent A queries for the name.
        kind = resolve.want or (0 if self._exists is not None else 4)
        result = await self._shared_lookup(resolve.fqdn, kind, source)
        answer = self._core.answer(resolve, result, tcp=tcp)
        self._count_rcode(answer.rcode)
        return answer.data

    async def _shared_lookup(self, fqdn: str, kind: int, source: Address) -> LookupResult:
        key = (fqdn, kind, source[0] if self._coalesce_per_source else "")
        task = self._lookups.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(
                self._run_lookup(fqdn, kind), name=f"cyphonic-lookup {fqdn}/{kind}"
            )
            self._lookups[key] = task
            task.add_done_callback(functools.partial(self._lookup_done, key))
        return await asyncio.shield(task)

    def _lookup_done(self, key: tuple[str, int, str], task: asyncio.Task[LookupResult]) -> None:
        if self._lookups.get(key) is task:
            del self._lookups[key]

    async def _run_lookup(self, fqdn: str, kind: int) -> LookupResult:
        what = "existence" if kind == 0 else f"IPv{kind}"
        try:
            async with asyncio.timeout(self._lookup_timeout):
                if kind == 0 and self._exists is not None:
                    return LookupResult(LookupStatus(await self._exists(fqdn)))
                result = await self._lookup(fqdn, kind)
        except TimeoutError:
            if self._warn_limiter.allow(fqdn):
                log.info(
                    "lookup of %s (%s) missed its %.1f s deadline: SERVFAIL",
                    fqdn,
                    what,
                    self._lookup_timeout,
                )
            return LookupResult(LookupStatus.SERVFAIL)
        except Exception:
            if self._warn_limiter.allow(fqdn):
                log.warning("lookup of %s (%s) failed: SERVFAIL", fqdn, what, exc_info=True)
            return LookupResult(LookupStatus.SERVFAIL)
        if not isinstance(result, LookupResult):
            log.warning("lookup of %s returned %r, not a LookupResult", fqdn, result)
            return LookupResult(LookupStatus.SERVFAIL)
        return result

    # -- everything else ---------------------------------------------------------------------

    async def _forward(self, forward: Forward, source: Address, tcp: bool) -> bytes:
        for _ in range(self._upstream_tries):
            for upstream in self._upstreams:
                upstream_id = secrets.randbelow(0x10000)

                def accept(reply: bytes, upstream_id: int = upstream_id) -> bytes | None:
                    return forward.accept(reply, upstream_id)

                try:
                    async with asyncio.timeout(self._upstream_timeout):
                        if tcp:
                            reply = await tcp_exchange(upstream, forward.wire(upstream_id), accept)
                        else:
                            reply = await udp_exchange(upstream, forward.wire(upstream_id), accept)
                except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
                    reason = type(exc).__name__ if isinstance(exc, TimeoutError) else str(exc)
                    reply = None
                else:
                    reason = "reply does not match the query"
                if reply is not None:
                    return reply
                self._counters["upstream_failures"] += 1
                if log.isEnabledFor(logging.DEBUG) and self._debug_limiter.allow(upstream[0]):
                    log.debug(
                        "upstream %s failed for %s over %s: %s",
                        format_address(*upstream),
                        forward.qname,
                        "TCP" if tcp else "UDP",
                        reason,
                    )
        self._counters["servfail"] += 1
        return forward.servfail()
