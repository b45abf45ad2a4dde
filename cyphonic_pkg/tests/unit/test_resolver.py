"""The CYPHONIC resolver (node/resolver.py) and its test upstream (testbed/upstream_dns.py).

Everything runs on loopback with ports chosen by the kernel. Message layouts follow RFC 1035
section 4.1 (header, question), RFC 6891 section 6.1 (OPT) and RFC 7766 section 8 (TCP framing).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from typing import Any, TypeVar

import pytest
from dnslib import EDNS0, QTYPE, DNSHeader, DNSLabel, DNSQuestion, DNSRecord
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cyphonic.errors import ConfigError, CyphonicError
from cyphonic.node.resolver import (
    COUNTER_NAMES,
    MAX_QUERY_SIZE,
    CyphonicResolver,
    Drop,
    Forward,
    LogLimiter,
    LookupResult,
    LookupStatus,
    Rcode,
    Resolve,
    ResolverCore,
    Respond,
    normalize_domain,
    query_source,
)
from cyphonic.testbed.upstream_dns import StaticZone, UpstreamDns, parse_listen, parse_record

T = TypeVar("T")
DOMAIN = "cyphonic.test"
LOOPBACK = "127.0.0.1"
HOSTS = {
    "host1.cyphonic.test": (("10.88.0.5",), ("fd00:88::5",)),
    "cyphonic.test": (("10.88.0.1",), ()),
    "v6only.cyphonic.test": ((), ("fd00:88::6",)),
}
UPSTREAM_RECORDS = {"www.example.test": ["198.51.100.80", "2001:db8::80"]}
DIG = shutil.which("dig")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 60))


class FakeDaemon:
    """The daemon's side: a table of names, optional delay, a record of calls."""

    def __init__(self, delay: float = 0.0, hosts: dict[str, Any] | None = None) -> None:
        self.delay = delay
        self.hosts = HOSTS if hosts is None else hosts
        self.calls: list[tuple[str, int]] = []
        self.sources: list[Any] = []
        self.cancelled = 0

    async def lookup(self, fqdn: str, want: int) -> LookupResult:
        self.calls.append((fqdn, want))
        self.sources.append(query_source.get())
        if self.delay:
            try:
                await asyncio.sleep(self.delay)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        entry = self.hosts.get(fqdn)
        if entry is None:
            return LookupResult(LookupStatus.NXDOMAIN)
        return LookupResult(LookupStatus.OK, tuple(entry[0] if want == 4 else entry[1]))


@contextlib.asynccontextmanager
async def resolver_running(
    lookup: Any, upstreams: Sequence[tuple[str, int]] = (), **kwargs: Any
) -> AsyncIterator[CyphonicResolver]:
    resolver = CyphonicResolver(DOMAIN, lookup, upstreams, **kwargs)
    await resolver.start([(LOOPBACK, 0)])
    try:
        yield resolver
    finally:
        await resolver.stop()


@contextlib.asynccontextmanager
async def upstream_running(**kwargs: Any) -> AsyncIterator[UpstreamDns]:
    upstream = UpstreamDns(UPSTREAM_RECORDS, **kwargs)
    await upstream.start([(LOOPBACK, 0)])
    try:
        yield upstream
    finally:
        await upstream.stop()


# -- a small independent client -----------------------------------------------------------


class _Collect(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.replies: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.replies.put_nowait(data)


async def udp_raw(
    port: int, data: bytes, timeout: float = 3.0, host: str = LOOPBACK
) -> bytes | None:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(_Collect, remote_addr=(host, port))
    try:
        transport.sendto(data)
        try:
            return await asyncio.wait_for(proto.replies.get(), timeout)
        except TimeoutError:
            return None
    finally:
        transport.close()


async def tcp_raw(port: int, data: bytes, timeout: float = 3.0, host: str = LOOPBACK) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(len(data).to_bytes(2, "big") + data)
        async with asyncio.timeout(timeout):
            length = int.from_bytes(await reader.readexactly(2), "big")
            return await reader.readexactly(length)
    finally:
        writer.close()


def make_query(name: str, qtype: str = "A", qid: int = 0x4242, **edns: Any) -> bytes:
    q = DNSRecord.question(name, qtype)
    q.header.id = qid
    if edns:
        q.add_ar(EDNS0(**edns))
    data: bytes = q.pack()
    return data


async def query(
    port: int,
    name: str,
    qtype: str = "A",
    *,
    tcp: bool = False,
    qid: int = 0x4242,
    host: str = LOOPBACK,
) -> Any:
    data = make_query(name, qtype, qid)
    raw = await tcp_raw(port, data, host=host) if tcp else await udp_raw(port, data, host=host)
    assert raw is not None, f"no answer for {name}"
    reply = DNSRecord.parse(raw)
    assert reply.header.id == qid
    assert reply.header.qr == 1
    return reply


def addresses(reply: Any) -> list[str]:
    return [str(rr.rdata) for rr in reply.rr]


def free_port() -> int:
    """A port free for UDP and TCP right now (nothing listens there afterwards)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind((LOOPBACK, 0))
            port = int(u.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind((LOOPBACK, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port")


# -- CYPHONIC names -----------------------------------------------------------------------


def test_a_and_aaaa_answers_over_udp_and_tcp() -> None:
    async def body() -> None:
        daemon = FakeDaemon()
        async with resolver_running(daemon.lookup) as r:
            port = r.bound[0][1]
            a = await query(port, "host1.cyphonic.test", "A")
            assert a.header.rcode == Rcode.NOERROR and a.header.aa == 1 and a.header.ra == 1
            assert addresses(a) == ["10.88.0.5"]
            assert a.rr[0].ttl == 60
            aaaa = await query(port, "host1.cyphonic.test", "AAAA", tcp=True)
            assert addresses(aaaa) == ["fd00:88::5"]
            assert aaaa.rr[0].rtype == QTYPE.AAAA
            assert daemon.calls == [("host1.cyphonic.test", 4), ("host1.cyphonic.test", 6)]
            c = r.counters
            assert c["queries"] == 2 and c["cyphonic_queries"] == 2 and c["forwarded"] == 0

    run(body())


def test_ttl_case_insensitivity_and_apex() -> None:
    async def body() -> None:
        daemon = FakeDaemon()
        async with resolver_running(daemon.lookup, ttl=7) as r:
            port = r.bound[0][1]
            reply = await query(port, "HOST1.Cyphonic.TEST.", "A")
            assert str(reply.q.qname) == "HOST1.Cyphonic.TEST."  # the client's case echoed
            assert addresses(reply) == ["10.88.0.5"] and reply.rr[0].ttl == 7
            apex = await query(port, "cyphonic.test", "A")
            assert addresses(apex) == ["10.88.0.1"]
            assert daemon.calls == [("host1.cyphonic.test", 4), ("cyphonic.test", 4)]

    run(body())


def test_names_merely_ending_like_the_domain_are_not_ours() -> None:
    async def body() -> None:
        daemon = FakeDaemon()
        async with resolver_running(daemon.lookup, upstream_tries=1) as r:
            reply = await query(r.bound[0][1], "notcyphonic.test", "A")
            assert reply.header.rcode == Rcode.SERVFAIL  # forwarded, no upstreams
            assert daemon.calls == []
            assert r.counters["forwarded"] == 1

    run(body())


def test_nxdomain_and_nodata() -> None:
    async def body() -> None:
        daemon = FakeDaemon()
        async with resolver_running(daemon.lookup) as r:
            port = r.bound[0][1]
            nx = await query(port, "nobody.cyphonic.test", "A")
            assert nx.header.rcode == Rcode.NXDOMAIN and nx.rr == []
            nodata = await query(port, "v6only.cyphonic.test", "A")
            assert nodata.header.rcode == Rcode.NOERROR and nodata.rr == []
            assert r.counters["nxdomain"] == 1

    run(body())


def test_label_that_cannot_be_a_host_name_is_nxdomain_without_lookup() -> None:
    async def body() -> None:
        daemon = FakeDaemon()
        async with resolver_running(daemon.lookup) as r:
            q = DNSRecord(q=DNSQuestion(DNSLabel([b"a b", b"cyphonic", b"test"])))
            raw = await udp_raw(r.bound[0][1], q.pack())
            assert raw is not None
            assert DNSRecord.parse(raw).header.rcode == Rcode.NXDOMAIN
            assert daemon.calls == []

    run(body())


def test_other_types_nodata_or_nxdomain_through_lookup() -> None:
    async def body() -> None:
        daemon = FakeDaemon()
        async with resolver_running(daemon.lookup) as r:
            port = r.bound[0][1]
            mx = await query(port, "host1.cyphonic.test", "MX")
            assert mx.header.rcode == Rcode.NOERROR and mx.rr == []
            txt = await query(port, "ghost.cyphonic.test", "TXT")
            assert txt.header.rcode == Rcode.NXDOMAIN
            assert daemon.calls == [("host1.cyphonic.test", 4), ("ghost.cyphonic.test", 4)]
            any_ = await query(port, "host1.cyphonic.test", "ANY")  # RFC 8482: a subset
            assert addresses(any_) == ["10.88.0.5"]

    run(body())


def test_other_types_use_exists_callback_when_given() -> None:
    async def body() -> None:
        daemon = FakeDaemon()
        asked: list[str] = []

        async def exists(fqdn: str) -> LookupStatus:
            asked.append(fqdn)
            return LookupStatus.OK if fqdn in HOSTS else LookupStatus.NXDOMAIN

        async with resolver_running(daemon.lookup, exists=exists) as r:
            port = r.bound[0][1]
            assert (await query(port, "host1.cyphonic.test", "MX")).header.rcode == 0
            nx = await query(port, "ghost.cyphonic.test", "SRV")
            assert nx.header.rcode == Rcode.NXDOMAIN
            assert asked == ["host1.cyphonic.test", "ghost.cyphonic.test"]
            assert daemon.calls == []

    run(body())


def test_zone_transfer_and_foreign_class_refused() -> None:
    async def body() -> None:
        daemon = FakeDaemon()
        async with resolver_running(daemon.lookup) as r:
            port = r.bound[0][1]
            axfr = await query(port, "cyphonic.test", "AXFR", tcp=True)
            assert axfr.header.rcode == Rcode.REFUSED
            q = DNSRecord(q=DNSQuestion("host1.cyphonic.test", QTYPE.TXT, 3))  # class CH
            raw = await udp_raw(port, q.pack())
            assert raw is not None and DNSRecord.parse(raw).header.rcode == Rcode.REFUSED
            assert daemon.calls == []

    run(body())


def test_lookup_failures_become_servfail() -> None:
    async def body() -> None:
        async def broken(fqdn: str, want: int) -> LookupResult:
            if fqdn.startswith("raise"):
                raise RuntimeError("daemon bug")
            if fqdn.startswith("bad"):
                return LookupResult(LookupStatus.OK, ("not-an-address",))
            if fqdn.startswith("family"):
                return LookupResult(LookupStatus.OK, ("fd00::1",))  # v6 for an A query
            return LookupResult(LookupStatus.SERVFAIL)

        async with resolver_running(broken) as r:
            port = r.bound[0][1]
            for name in ("raise", "bad", "family", "servfail"):
                reply = await query(port, f"{name}.cyphonic.test")
                assert reply.header.rcode == Rcode.SERVFAIL, name
            assert r.counters["servfail"] == 4

    run(body())


def test_servfail_at_lookup_deadline_and_lookup_cancelled() -> None:
    async def body() -> None:
        daemon = FakeDaemon(delay=30)
        async with resolver_running(daemon.lookup, lookup_timeout=0.3) as r:
            start = time.monotonic()
            reply = await query(r.bound[0][1], "host1.cyphonic.test")
            elapsed = time.monotonic() - start
            assert reply.header.rcode == Rcode.SERVFAIL
            assert 0.25 < elapsed < 2.0
            await asyncio.sleep(0.05)
            assert daemon.cancelled == 1
            assert r.counters["servfail"] == 1

    run(body())


def test_slow_lookups_run_concurrently() -> None:
    async def body() -> None:
        hosts = {f"n{i}.cyphonic.test": ((f"10.88.1.{i}",), ()) for i in range(8)}
        daemon = FakeDaemon(delay=0.5, hosts=hosts)
        async with upstream_running() as up, resolver_running(daemon.lookup, [up.bound[0]]) as r:
            port = r.bound[0][1]
            start = time.monotonic()
            slow = [query(port, name, qid=i, tcp=i % 2 == 1) for i, name in enumerate(hosts)]
            fast_start = time.monotonic()
            fast = asyncio.ensure_future(query(port, "www.example.test", qid=99))
            replies = await asyncio.gather(*slow)
            elapsed = time.monotonic() - start
            fast_reply = await fast
            assert [addresses(x) for x in replies] == [[v[0][0]] for v in hosts.values()]
            assert elapsed < 1.5  # eight 0.5 s lookups, not 4 s
            assert addresses(fast_reply)[0] == "198.51.100.80"
            assert fast_start - start < 0.5

    run(body())


def test_identical_concurrent_queries_share_one_lookup() -> None:
    async def body() -> None:
        daemon = FakeDaemon(delay=0.3)
        async with resolver_running(daemon.lookup) as r:
            port = r.bound[0][1]
            replies = await asyncio.gather(
                *(query(port, "Host1.cyphonic.test", qid=i, tcp=i % 3 == 0) for i in range(10)),
                query(port, "host1.cyphonic.test", "AAAA", qid=77),
                query(port, "host1.cyphonic.test", "MX", qid=78),  # existence = the A lookup
            )
            assert all(addresses(x) == ["10.88.0.5"] for x in replies[:10])
            assert addresses(replies[10]) == ["fd00:88::5"]
            assert replies[11].header.rcode == Rcode.NOERROR and replies[11].rr == []
            assert sorted(daemon.calls) == [("host1.cyphonic.test", 4), ("host1.cyphonic.test", 6)]
            await query(port, "host1.cyphonic.test")  # finished lookups are not cached
            assert len(daemon.calls) == 3

    run(body())


def test_query_source_visible_to_lookup() -> None:
    async def body() -> None:
        daemon = FakeDaemon()
        async with resolver_running(daemon.lookup, coalesce_per_source=True) as r:
            await query(r.bound[0][1], "host1.cyphonic.test")
            assert daemon.sources[0][0] == LOOPBACK and daemon.sources[0][1] > 0

    run(body())


def test_overload_answers_servfail() -> None:
    async def body() -> None:
        hosts = {f"n{i}.cyphonic.test": (("10.88.1.1",), ()) for i in range(4)}
        daemon = FakeDaemon(delay=0.5, hosts=hosts)
        async with resolver_running(daemon.lookup, max_inflight=2) as r:
            port = r.bound[0][1]
            first = [asyncio.ensure_future(query(port, n, qid=i)) for i, n in enumerate(hosts)]
            replies = await asyncio.gather(*first)
            rcodes = sorted(x.header.rcode for x in replies)
            assert rcodes == [0, 0, 2, 2]
            assert r.counters["overloaded"] == 2

    run(body())


def test_large_local_answer_truncated_over_udp_only() -> None:
    async def body() -> None:
        many = tuple(f"fd00:88::{i:x}" for i in range(1, 41))
        daemon = FakeDaemon(hosts={"big.cyphonic.test": ((), many)})
        async with resolver_running(daemon.lookup) as r:
            port = r.bound[0][1]
            udp = await query(port, "big.cyphonic.test", "AAAA")
            assert udp.header.tc == 1 and udp.rr == []
            tcp = await query(port, "big.cyphonic.test", "AAAA", tcp=True)
            assert tcp.header.tc == 0 and len(tcp.rr) == 40

    run(body())


def test_edns_echoed_and_badvers() -> None:
    async def body() -> None:
        daemon = FakeDaemon()
        async with resolver_running(daemon.lookup) as r:
            port = r.bound[0][1]
            raw = await udp_raw(port, make_query("host1.cyphonic.test", udp_len=4096, flags="do"))
            assert raw is not None
            reply = DNSRecord.parse(raw)
            opt = [rr for rr in reply.ar if rr.rtype == QTYPE.OPT]
            assert len(opt) == 1 and opt[0].rclass == 1232 and opt[0].ttl & 0x8000
            raw = await udp_raw(port, make_query("host1.cyphonic.test", udp_len=1232, version=1))
            assert raw is not None
            reply = DNSRecord.parse(raw)
            opt = [rr for rr in reply.ar if rr.rtype == QTYPE.OPT]
            assert reply.header.rcode == 0 and opt[0].ttl >> 24 == 1  # BADVERS = 16
            assert reply.rr == []

    run(body())


def test_ipv6_loopback_listener() -> None:
    if not socket.has_ipv6 or not os.path.exists("/proc/net/if_inet6"):
        pytest.skip("no IPv6")

    async def body() -> None:
        daemon = FakeDaemon()
        resolver = CyphonicResolver(DOMAIN, daemon.lookup, [])
        try:
            await resolver.start([("::1", 0), (LOOPBACK, 0)])
        except CyphonicError:
            pytest.skip("cannot bind ::1")
        try:
            host, port = resolver.bound[0]
            assert host == "::1"
            assert addresses(await query(port, "host1.cyphonic.test", host="::1")) == ["10.88.0.5"]
            tcp = await query(port, "host1.cyphonic.test", "AAAA", tcp=True, host="::1")
            assert addresses(tcp) == ["fd00:88::5"]
        finally:
            await resolver.stop()

    run(body())


# -- forwarding ---------------------------------------------------------------------------


def test_forward_over_udp_preserves_id() -> None:
    async def body() -> None:
        daemon = FakeDaemon()
        async with upstream_running() as up, resolver_running(daemon.lookup, [up.bound[0]]) as r:
            port = r.bound[0][1]
            reply = await query(port, "www.example.test", qid=0x1234)
            assert addresses(reply) == ["198.51.100.80"] and reply.header.aa == 1
            nx = await query(port, "missing.example.test", "AAAA", qid=0x2345)
            assert nx.header.rcode == Rcode.NXDOMAIN
            assert [(q.transport, q.qname) for q in up.queries] == [
                ("udp", "www.example.test"),
                ("udp", "missing.example.test"),
            ]
            c = r.counters
            assert c["forwarded"] == 2 and c["cyphonic_queries"] == 0
            assert c["nxdomain"] == 0  # upstream answers are passed through, not counted
            assert daemon.calls == []

    run(body())


def test_forward_over_tcp() -> None:
    async def body() -> None:
        daemon = FakeDaemon()
        async with upstream_running() as up, resolver_running(daemon.lookup, [up.bound[0]]) as r:
            reply = await query(r.bound[0][1], "WWW.example.test", "AAAA", tcp=True, qid=7)
            assert addresses(reply) == ["2001:db8::80"]
            assert str(reply.q.qname) == "WWW.example.test."
            assert [(q.transport, q.qtype) for q in up.queries] == [("tcp", QTYPE.AAAA)]

    run(body())


def test_truncated_upstream_answer_passed_through_then_tcp() -> None:
    async def body() -> None:
        daemon = FakeDaemon()
        async with (
            upstream_running(force_tc=True) as up,
            resolver_running(daemon.lookup, [up.bound[0]]) as r,
        ):
            port = r.bound[0][1]
            udp = await query(port, "www.example.test")
            assert udp.header.tc == 1 and udp.rr == []
            tcp = await query(port, "www.example.test", tcp=True)
            assert tcp.header.tc == 0 and addresses(tcp) == ["198.51.100.80"]
            assert [q.transport for q in up.queries] == ["udp", "tcp"]

    run(body())


def test_unreachable_upstream_is_servfail() -> None:
    async def body() -> None:
        dead = (LOOPBACK, free_port())
        daemon = FakeDaemon()
        async with resolver_running(daemon.lookup, [dead], upstream_timeout=1.0) as r:
            port = r.bound[0][1]
            start = time.monotonic()
            udp = await query(port, "www.example.test")
            tcp = await query(port, "www.example.test", tcp=True)
            assert udp.header.rcode == tcp.header.rcode == Rcode.SERVFAIL
            assert str(udp.q.qname) == "www.example.test."  # the question is echoed
            assert time.monotonic() - start < 1.5  # refused at once, no waiting for timeouts
            c = r.counters
            assert c["upstream_failures"] == 4 and c["servfail"] == 2  # 2 tries x 2 queries

    run(body())


def test_upstream_timeout_is_servfail() -> None:
    async def body() -> None:
        daemon = FakeDaemon()
        async with (
            upstream_running(delay=2.0) as up,
            resolver_running(
                daemon.lookup, [up.bound[0]], upstream_timeout=0.2, upstream_tries=1
            ) as r,
        ):
            start = time.monotonic()
            reply = await query(r.bound[0][1], "www.example.test")
            assert reply.header.rcode == Rcode.SERVFAIL
            assert time.monotonic() - start < 1.0
            assert r.counters["upstream_failures"] == 1

    run(body())


def test_failover_to_second_upstream() -> None:
    async def body() -> None:
        dead = (LOOPBACK, free_port())
        daemon = FakeDaemon()
        async with (
            upstream_running() as up,
            resolver_running(daemon.lookup, [dead, up.bound[0]]) as r,
        ):
            port = r.bound[0][1]
            assert addresses(await query(port, "www.example.test")) == ["198.51.100.80"]
            assert addresses(await query(port, "www.example.test", tcp=True)) == ["198.51.100.80"]
            assert r.counters["upstream_failures"] == 2

    run(body())


def test_forward_accepts_only_matching_replies() -> None:
    core = ResolverCore(DOMAIN)
    data = make_query("Www.Example.test", "A", qid=0x0101)
    fwd = core.classify(data)
    assert isinstance(fwd, Forward) and fwd.query_id == 0x0101
    sent = fwd.wire(0xBEEF)
    assert sent[:2] == b"\xbe\xef" and sent[2:] == data[2:]
    good = DNSRecord.parse(make_query("www.example.TEST", "A", qid=0xBEEF)).reply()
    good_bytes = good.pack()
    assert fwd.accept(good_bytes, 0xBEEF) == b"\x01\x01" + good_bytes[2:]
    assert fwd.accept(good_bytes, 0xBEEE) is None  # another id
    assert fwd.accept(data, 0x0101) is None  # not a response
    other = DNSRecord.parse(make_query("www.example.test", "AAAA", qid=0xBEEF)).reply()
    assert fwd.accept(other.pack(), 0xBEEF) is None  # another question
    bare = struct.pack("!HHHHHH", 0xBEEF, 0x8180, 0, 0, 0, 0)
    assert fwd.accept(bare, 0xBEEF) is None  # NOERROR without question or TC
    assert fwd.accept(b"\xbe\xef\x81", 0xBEEF) is None
    servfail = DNSRecord.parse(fwd.servfail())
    assert servfail.header.id == 0x0101 and servfail.header.rcode == Rcode.SERVFAIL
    assert str(servfail.q.qname) == "Www.Example.test."


# -- malformed input ----------------------------------------------------------------------


def _header(qid: int, flags: int, qd: int, an: int = 0, ns: int = 0, ar: int = 0) -> bytes:
    return struct.pack("!HHHHHH", qid, flags, qd, an, ns, ar)


def test_malformed_udp_counted_and_server_keeps_answering() -> None:
    async def body() -> None:
        daemon = FakeDaemon()
        async with resolver_running(daemon.lookup) as r:
            port = r.bound[0][1]
            question = make_query("host1.cyphonic.test")[12:]
            assert await udp_raw(port, b"\x00\x01\x02", timeout=0.3) is None  # no header
            response = DNSRecord.parse(make_query("x.cyphonic.test")).reply().pack()
            assert await udp_raw(port, response, timeout=0.3) is None  # QR=1: dropped
            cases = [
                (_header(1, 0x0100, 0), Rcode.FORMERR),  # no question
                (_header(2, 0x0100, 2) + question * 2, Rcode.FORMERR),  # two questions
                (_header(3, 0x2100, 1) + question, Rcode.NOTIMP),  # opcode NOTIFY
                (_header(4, 0x0100, 1) + b"\x05ab", Rcode.FORMERR),  # truncated name
                (_header(5, 0x0100, 1) + b"\xc0\x0c\x00\x01\x00\x01", Rcode.FORMERR),
                (_header(6, 0x0100, 1, an=3) + question, Rcode.FORMERR),  # missing RRs
                (_header(7, 0x0100, 1) + question + bytes(MAX_QUERY_SIZE), Rcode.FORMERR),
            ]
            for data, rcode in cases:
                raw = await udp_raw(port, data)
                assert raw is not None, data[:2]
                reply = DNSRecord.parse(raw)
                assert reply.header.id == int.from_bytes(data[:2], "big")
                assert reply.header.qr == 1 and reply.header.rcode == rcode
            ok = await query(port, "host1.cyphonic.test")
            assert addresses(ok) == ["10.88.0.5"]
            c = r.counters
            assert c["malformed"] == 2 + len(cases)
            assert c["queries"] == 3 + len(cases)

    run(body())


def test_malformed_tcp_frames() -> None:
    async def body() -> None:
        daemon = FakeDaemon()
        async with resolver_running(daemon.lookup) as r:
            port = r.bound[0][1]
            for prefix in (b"\xff\xff", b"\x00\x05", b"\x00\x00"):  # oversized, short, empty
                reader, writer = await asyncio.open_connection(LOOPBACK, port)
                writer.write(prefix + b"\x00" * 5)
                async with asyncio.timeout(3):
                    assert await reader.read() == b""  # closed by the server
                writer.close()
            # a bad message in a good frame: FORMERR, and the connection goes on
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            try:
                for data in (_header(9, 0x0100, 0), make_query("host1.cyphonic.test", qid=10)):
                    writer.write(len(data).to_bytes(2, "big") + data)
                    async with asyncio.timeout(3):
                        length = int.from_bytes(await reader.readexactly(2), "big")
                        reply = DNSRecord.parse(await reader.readexactly(length))
                    assert reply.header.id == int.from_bytes(data[:2], "big")
                assert reply.header.rcode == 0 and addresses(reply) == ["10.88.0.5"]
            finally:
                writer.close()
            assert r.counters["malformed"] == 4

    run(body())


def test_tcp_pipelined_queries_answered_as_they_complete() -> None:
    async def body() -> None:
        hosts = {**HOSTS, "slow.cyphonic.test": (("10.88.9.9",), ())}

        async def lookup(fqdn: str, want: int) -> LookupResult:
            if fqdn.startswith("slow"):
                await asyncio.sleep(0.4)
            return LookupResult(LookupStatus.OK, hosts[fqdn][0])

        async with resolver_running(lookup) as r:
            reader, writer = await asyncio.open_connection(LOOPBACK, r.bound[0][1])
            try:
                for qid, name in ((1, "slow.cyphonic.test"), (2, "host1.cyphonic.test")):
                    data = make_query(name, qid=qid)
                    writer.write(len(data).to_bytes(2, "big") + data)
                writer.write_eof()  # half-close: the pending answers must still come
                ids = []
                async with asyncio.timeout(3):
                    for _ in range(2):
                        length = int.from_bytes(await reader.readexactly(2), "big")
                        ids.append(DNSRecord.parse(await reader.readexactly(length)).header.id)
                assert ids == [2, 1]
            finally:
                writer.close()

    run(body())


# -- lifecycle ----------------------------------------------------------------------------


def test_bind_failure_names_the_address() -> None:
    async def body() -> None:
        daemon = FakeDaemon()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
            taken.bind((LOOPBACK, 0))
            port = taken.getsockname()[1]
            resolver = CyphonicResolver(DOMAIN, daemon.lookup, [])
            with pytest.raises(CyphonicError, match=rf"127\.0\.0\.1:{port}"):
                await resolver.start([(LOOPBACK, 0), (LOOPBACK, port)])
            assert resolver.bound == []  # the first listener was closed again
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
            taken.bind((LOOPBACK, 0))
            taken.listen()
            port = taken.getsockname()[1]
            resolver = CyphonicResolver(DOMAIN, daemon.lookup, [])
            with pytest.raises(CyphonicError, match=rf"127\.0\.0\.1:{port}/tcp"):
                await resolver.start([(LOOPBACK, port)])

    run(body())


def test_stop_with_pending_lookups_is_prompt() -> None:
    async def body() -> None:
        daemon = FakeDaemon(delay=30)
        resolver = CyphonicResolver(DOMAIN, daemon.lookup, [], lookup_timeout=20)
        await resolver.start([(LOOPBACK, 0)])
        port = resolver.bound[0][1]
        pending = asyncio.ensure_future(udp_raw(port, make_query("host1.cyphonic.test"), 1))
        tcp_pending = asyncio.ensure_future(tcp_raw(port, make_query("host1.cyphonic.test"), 1))
        await asyncio.sleep(0.2)
        start = time.monotonic()
        await resolver.stop()
        assert time.monotonic() - start < 1.0
        assert daemon.cancelled == 1
        assert await pending is None
        with pytest.raises((asyncio.IncompleteReadError, ConnectionError, TimeoutError)):
            await tcp_pending

    run(body())


def test_configuration_checked() -> None:
    async def lookup(fqdn: str, want: int) -> LookupResult:
        return LookupResult(LookupStatus.NXDOMAIN)

    for bad in ("", ".", "bad domain", "ünïcode.test", "a..b"):
        with pytest.raises(ConfigError):
            CyphonicResolver(bad, lookup, [])
    with pytest.raises(ConfigError):
        CyphonicResolver(DOMAIN, lookup, [], lookup_timeout=0)
    with pytest.raises(ConfigError):
        CyphonicResolver(DOMAIN, lookup, [], ttl=-1)
    assert normalize_domain("Cyphonic.TEST.") == (b"cyphonic", b"test")
    resolver = CyphonicResolver(DOMAIN, lookup, [])
    assert set(resolver.counters) == set(COUNTER_NAMES)
    assert {
        "queries",
        "cyphonic_queries",
        "forwarded",
        "nxdomain",
        "servfail",
        "malformed",
        "upstream_failures",
    } <= set(resolver.counters)
    assert all(v == 0 for v in resolver.counters.values())


def test_log_limiter_per_source() -> None:
    now = [0.0]
    limiter = LogLimiter(10.0, max_sources=2, clock=lambda: now[0])
    assert limiter.allow("a") and not limiter.allow("a") and limiter.allow("b")
    now[0] = 10.5
    assert limiter.allow("a")
    assert limiter.allow("c")  # table full: cleared, still bounded
    assert not limiter.allow("c")


# -- real dig -----------------------------------------------------------------------------


async def dig(*args: str) -> str:
    assert DIG is not None
    proc = await asyncio.create_subprocess_exec(
        DIG,
        "+tries=1",
        "+time=3",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    return out.decode()


needs_dig = pytest.mark.skipif(DIG is None, reason="dig is not installed")


@needs_dig
def test_dig_cyphonic_names_udp_and_tcp() -> None:
    async def body() -> None:
        daemon = FakeDaemon()
        async with resolver_running(daemon.lookup) as r:
            at = ["@127.0.0.1", "-p", str(r.bound[0][1])]
            assert (await dig(*at, "host1.cyphonic.test", "A", "+short")).split() == ["10.88.0.5"]
            out = await dig(*at, "+tcp", "host1.cyphonic.test", "AAAA", "+short")
            assert out.split() == ["fd00:88::5"]
            assert "status: NXDOMAIN" in await dig(*at, "ghost.cyphonic.test", "A")
            assert "status: NOERROR" in await dig(*at, "+tcp", "host1.cyphonic.test", "MX")

    run(body())


@needs_dig
def test_dig_forwarded_and_tc_fallback() -> None:
    async def body() -> None:
        daemon = FakeDaemon()
        async with (
            upstream_running(force_tc=True) as up,
            resolver_running(daemon.lookup, [up.bound[0]]) as r,
        ):
            at = ["@127.0.0.1", "-p", str(r.bound[0][1])]
            truncated = await dig(*at, "+ignore", "www.example.test", "A")
            assert " tc" in truncated.split("flags:")[1].split(";")[0]
            # plain dig sees TC and retries over TCP by itself
            out = await dig(*at, "www.example.test", "A", "+short")
            assert out.split() == ["198.51.100.80"]
            assert [q.transport for q in up.queries] == ["udp", "udp", "tcp"]
            out = await dig(*at, "+tcp", "www.example.test", "AAAA", "+short")
            assert out.split() == ["2001:db8::80"]

    run(body())


# -- the test upstream --------------------------------------------------------------------


def test_static_zone_answers() -> None:
    zone = StaticZone(
        {"www.example.test.": ["198.51.100.80", "2001:db8::80"], "v4.test": ["192.0.2.1"]}
    )

    def ask(name: str, qtype: str, *, tcp: bool = False, force_tc: bool = False) -> Any:
        raw = zone.answer(make_query(name, qtype), tcp=tcp, force_tc=force_tc)
        assert raw is not None
        return DNSRecord.parse(raw)

    assert addresses(ask("WWW.example.test", "A")) == ["198.51.100.80"]
    assert addresses(ask("www.example.test", "AAAA")) == ["2001:db8::80"]
    assert len(ask("www.example.test", "ANY").rr) == 2
    nodata = ask("v4.test", "AAAA")
    assert nodata.header.rcode == 0 and nodata.rr == []
    assert ask("nope.test", "A").header.rcode == Rcode.NXDOMAIN
    tc = ask("www.example.test", "A", force_tc=True)
    assert tc.header.tc == 1 and tc.rr == []
    assert ask("www.example.test", "A", tcp=True, force_tc=True).header.tc == 0
    assert zone.answer(b"\x00", tcp=False) is None
    formerr = zone.answer(_header(5, 0x0100, 0), tcp=False)
    assert formerr is not None and DNSRecord.parse(formerr).header.rcode == Rcode.FORMERR
    reply = ask("www.example.test", "A")
    assert zone.answer(reply.pack(), tcp=False) is None


def test_upstream_dns_command_line() -> None:
    assert parse_listen("[::1]:53") == ("::1", 53)
    assert parse_listen("198.51.100.10:5353") == ("198.51.100.10", 5353)
    assert parse_record("WWW.example.test.=192.0.2.1,2001:db8::1") == (
        "www.example.test",
        ["192.0.2.1", "2001:db8::1"],
    )

    async def body() -> None:
        port = free_port()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cyphonic.testbed.upstream_dns",
            "--listen",
            f"127.0.0.1:{port}",
            "--record",
            "www.example.test=198.51.100.80",
            "--record",
            "www.example.test=2001:db8::80",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            reply = None
            for _ in range(100):
                raw = await udp_raw(port, make_query("www.example.test", "AAAA"), timeout=0.1)
                if raw is not None:
                    reply = DNSRecord.parse(raw)
                    break
            assert reply is not None, "upstream_dns did not come up"
            assert addresses(reply) == ["2001:db8::80"]
            tcp = DNSRecord.parse(await tcp_raw(port, make_query("www.example.test", "A")))
            assert addresses(tcp) == ["198.51.100.80"]
        finally:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 10)
        assert proc.returncode == 0

    run(body())


# -- property-based fuzzing of the pure core ----------------------------------------------

CORE = ResolverCore(DOMAIN, ttl=60)
RESULTS = st.builds(
    LookupResult,
    st.sampled_from(LookupStatus),
    st.lists(
        st.one_of(
            st.ip_addresses().map(str),
            st.text(max_size=20),
        ),
        max_size=6,
    ).map(tuple),
)


def _check_decision(data: bytes, decision: object, result: LookupResult) -> None:
    assert isinstance(decision, Drop | Respond | Resolve | Forward)
    event(type(decision).__name__)
    if isinstance(decision, Drop):
        assert len(data) < 12 or data[2] & 0x80
        return
    qid = int.from_bytes(data[:2], "big")
    if isinstance(decision, Respond):
        reply = DNSRecord.parse(decision.data)
        assert reply.header.id == qid and reply.header.qr == 1
        assert reply.header.rcode == decision.rcode & 0xF
        assert decision.malformed != decision.local
        return
    if isinstance(decision, Forward):
        assert not CORE.in_domain(DNSRecord.parse(data).q.qname.label)
        servfail = DNSRecord.parse(decision.servfail())
        assert servfail.header.id == qid and servfail.header.rcode == Rcode.SERVFAIL
        return
    assert decision.fqdn == DOMAIN or decision.fqdn.endswith("." + DOMAIN)
    assert decision.want in (0, 4, 6)
    for tcp in (False, True):
        answer = CORE.answer(decision, result, tcp=tcp)
        reply = DNSRecord.parse(answer.data)
        assert reply.header.id == qid and reply.header.qr == 1
        assert answer.rcode in (Rcode.NOERROR, Rcode.NXDOMAIN, Rcode.SERVFAIL)
        assert len(answer.data) <= (65535 if tcp else decision.udp_payload)


QUERY_HEADERS = st.builds(
    lambda qid, flags, counts: struct.pack("!HH4H", qid, flags & 0x7FFF, *counts),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(0, 2), st.integers(0, 2)),
)


@settings(max_examples=3000, deadline=None)
@given(
    st.one_of(st.binary(max_size=700), st.tuples(QUERY_HEADERS, st.binary()).map(b"".join)), RESULTS
)
def test_fuzz_random_bytes(data: bytes, result: LookupResult) -> None:
    _check_decision(data, CORE.classify(data), result)


NAMES = st.sampled_from(
    ["host1.cyphonic.test", "CYPHONIC.test", "a.b.cyphonic.test", "www.example.test", "x"]
)
QTYPES = st.sampled_from(["A", "AAAA", "MX", "TXT", "ANY", "AXFR", "SRV", "PTR", "NS"])


@st.composite
def mutated_queries(draw: st.DrawFn) -> bytes:
    """Valid queries (with or without EDNS) with a few bytes flipped, cut or appended."""
    header = DNSHeader(id=draw(st.integers(0, 0xFFFF)), rd=1)
    q = DNSRecord(header, q=DNSQuestion(draw(NAMES), getattr(QTYPE, draw(QTYPES))))
    if draw(st.booleans()):
        q.add_ar(EDNS0(udp_len=draw(st.integers(0, 0xFFFF)), version=draw(st.integers(0, 2))))
    data = bytearray(q.pack())
    for _ in range(draw(st.integers(0, 4))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    data += draw(st.binary(max_size=8))
    return bytes(data)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_queries(), RESULTS)
def test_fuzz_mutated_queries(data: bytes, result: LookupResult) -> None:
    _check_decision(data, CORE.classify(data), result)


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 0xFFFF))
def test_fuzz_upstream_replies(reply: bytes, upstream_id: int) -> None:
    fwd = CORE.classify(make_query("www.example.test", qid=0x0707))
    assert isinstance(fwd, Forward)
    accepted = fwd.accept(reply, upstream_id)
    assert accepted is None or (accepted[:2] == b"\x07\x07" and accepted[2:] == reply[2:])
