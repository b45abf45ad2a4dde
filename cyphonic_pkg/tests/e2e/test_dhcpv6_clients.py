"""The adapter's DHCPv6 server against real clients: ISC dhclient and dhcpcd.  Needs root.

One link (namespace prefix ``cyd7``): the adapter runs :class:`~cyphonic.adapter.dhcpv6.Dhcp6Server`
and the :class:`~cyphonic.adapter.router_advertisement.RaSender` (M=1, O=1, prefix L=1 A=0) over
AF_PACKET (:mod:`cyphonic.adapter.packet_io`) in its own process; three general-node namespaces
with fixed MACs and the kernel's own RA handling run unmodified clients:

* ``gn1``: ``dhclient -6 -v -1`` (DUID-LLT, Solicit/Advertise/Request/Reply), the default
  dhclient-script configuring the address and writing resolv.conf;
* ``gn2``: ``dhcpcd -6`` in the foreground with a temporary configuration (DUID-LL, Rapid Commit);
* ``unk``: a MAC that is no general node: it must get nothing.

Then the server is restarted twice (new process, same lease file) while dhclient renews and
rebinds, dhcpcd is restarted (Confirm), and ``dhclient -6 -r`` releases.  A capture taken in the
adapter namespace is checked with tshark at the end: no expert errors or warnings, nothing
malformed, good UDP checksums on every frame the adapter sent, every client message answered
except while no server ran, nothing sent to the unknown MAC.  Timings are printed (``-s``).

Tests run in file order and share the link (module fixture).  A crashed run is cleaned with
``python -m cyphonic.testbed down --prefix cyd7``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import pytest

from cyphonic.testbed.topology import Topology, wait_for

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        os.geteuid() != 0, reason="needs root: creates network namespaces, AF_PACKET sockets"
    ),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2 (the ip command)"),
    pytest.mark.skipif(shutil.which("tshark") is None, reason="needs tshark for the capture"),
]
needs_dhclient = pytest.mark.skipif(
    shutil.which("dhclient") is None, reason="needs ISC dhclient (isc-dhcp-client)"
)
needs_dhcpcd = pytest.mark.skipif(shutil.which("dhcpcd") is None, reason="needs dhcpcd")

PREFIX = "cyd7"
IFNAME = f"{PREFIX}-lan"  # in every namespace: the interface leading to segment "lan"
ADAPTER_MAC = "02:c7:00:00:00:01"
ADAPTER_LL = "fe80::c7:ff:fe00:1"  # modified EUI-64 of ADAPTER_MAC (the kernel's default)
GN1_MAC, GN1_VIP = "02:c7:00:00:00:11", "fd43:5950::11"
GN2_MAC, GN2_VIP = "02:c7:00:00:00:12", "fd43:5950::12"
STRANGER_MAC = "02:c7:00:00:00:66"
POOL6, DNS6, DOMAIN = "fd43:5950::/64", "fd43:5950::1", "cyphonic.test"
# Short timers so that Renew (T1) and Rebind (T2) happen within the test.
TIMERS = {"preferred": 30, "valid": 60, "t1": 2, "t2": 4}
DHCPCD_STATE = Path("/var/lib/dhcpcd")
DHCPCD_RUN = Path("/run/dhcpcd")

# The adapter side, as the daemon wires it: one AF_PACKET link for IPv6 feeding the DHCPv6
# server and the RA sender, a UDP socket holding port 547 (so unicast DHCPv6 meets no ICMP port
# unreachable) and membership of ff02::1:2 (a real NIC filters multicast it has not joined).
# Prints "ready", then one JSON line per DHCPv6 message handled, then the final counters.
SERVER = textwrap.dedent(
    """
    import asyncio, json, logging, signal, socket, sys, time
    from cyphonic.adapter.dhcpv6 import ALL_DHCP_RELAY_AGENTS_AND_SERVERS, Dhcp6Server
    from cyphonic.adapter.gn import AdapterAddressing, GeneralNode, GnTable
    from cyphonic.adapter.leases import LeaseStore
    from cyphonic.adapter.packet_io import ETH_P_IPV6, RawLink, UdpSink, serve
    from cyphonic.adapter.router_advertisement import RaSender

    cfg = json.loads(sys.argv[1])
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    addressing = AdapterAddressing.from_pools(cfg["mac"], "10.77.0.0/24", cfg["pool6"],
                                              cfg["domain"])
    table = GnTable(GeneralNode(**gn) for gn in cfg["gns"])
    dhcp = Dhcp6Server(table, addressing, LeaseStore(cfg["leases"]), **cfg["timers"])
    ra = RaSender(addressing, interval=(3.0, 4.0))
    QUIET = {"ignored", "own_frame", "not_for_us"}

    def handle(frame, now):
        before = dhcp.stats.as_dict()
        start = time.perf_counter()
        out = dhcp.handle(frame, now)
        took = time.perf_counter() - start
        events = [k for k, v in dhcp.stats.as_dict().items() if v != before[k]]
        if set(events) - QUIET:
            print(json.dumps({"t": now, "mac": frame[6:12].hex(":"), "events": events,
                              "answered": bool(out), "us": round(took * 1e6, 1)}), flush=True)
        return out

    async def main():
        loop = asyncio.get_running_loop()
        ifname = cfg["ifname"]
        link = RawLink(ifname, [ETH_P_IPV6]).open()
        sink = UdpSink(ifname, 547, socket.AF_INET6).open()
        group = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        index = socket.if_nametoindex(ifname).to_bytes(4, sys.byteorder)
        group.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP,
                         ALL_DHCP_RELAY_AGENTS_AND_SERVERS.packed + index)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)

        async def advertise():
            while True:
                for frame in ra.periodic(time.time()):
                    link.send(frame)
                await asyncio.sleep(0.05)

        tasks = [asyncio.create_task(advertise()),
                 asyncio.create_task(serve(link, [handle, ra.handle]))]
        print("ready", flush=True)
        await stop.wait()
        for task in tasks:
            task.cancel()
        print(json.dumps({"final": dhcp.stats.as_dict(), "link": link.stats}), flush=True)
        sink.close()
        link.close()
        group.close()

    asyncio.run(main())
    """
)

DHCPCD_CONF = textwrap.dedent(
    """\
    # dhcpcd for the e2e test: IPv6 only, RAs handled by dhcpcd, one IA_NA, DUID-LL,
    # Rapid Commit; no hostname hook (it would rename this machine).
    ipv6only
    noipv4ll
    ipv6rs
    ia_na 1
    duid ll
    option rapid_commit
    nohook hostname
    """
)


def _reader(stream: TextIO, sink: list[str]) -> None:
    for line in stream:
        sink.append(line.rstrip("\n"))


class Server:
    """One run of the adapter-side server process, its output collected by a thread."""

    def __init__(self, bed: Bed, name: str) -> None:
        self.name = name
        self.lines: list[str] = []
        self.log = bed.tmp / f"server-{name}.log"
        cfg = {
            "mac": ADAPTER_MAC,
            "pool6": POOL6,
            "domain": DOMAIN,
            "ifname": IFNAME,
            "leases": str(bed.tmp / "leases.json"),
            "timers": TIMERS,
            "gns": [
                {"mac": GN1_MAC, "fqdn": f"gn1.{DOMAIN}", "vip4": "10.77.0.17", "vip6": GN1_VIP},
                {"mac": GN2_MAC, "fqdn": f"gn2.{DOMAIN}", "vip4": "10.77.0.18", "vip6": GN2_VIP},
            ],
        }
        with self.log.open("w") as err:
            self.proc = bed.topo.popen(
                "adapter",
                [sys.executable, "-c", SERVER, json.dumps(cfg)],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        assert self.proc.stdout is not None
        self.thread = threading.Thread(target=_reader, args=(self.proc.stdout, self.lines))
        self.thread.start()
        wait_for(lambda: "ready" in self.lines or self.proc.poll() is not None, 15)
        assert "ready" in self.lines, f"server {name} did not start:\n{self.log.read_text()}"
        self.started = time.time()
        self.stopped: float | None = None
        self.final: dict[str, Any] = {}

    def events(self, mac: str | None = None) -> list[dict[str, Any]]:
        out = [json.loads(x) for x in list(self.lines) if x.startswith('{"t"')]
        return [e for e in out if mac is None or e["mac"] == mac]

    def answered(self, mac: str, event: str) -> bool:
        return any(event in e["events"] and e["answered"] for e in self.events(mac))

    def stop(self) -> dict[str, Any]:
        if self.stopped is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)
            self.thread.join(5)
            self.stopped = time.time()
            finals = [json.loads(x) for x in self.lines if x.startswith('{"final"')]
            assert finals, f"server {self.name} ended badly:\n{self.log.read_text()}"
            self.final = finals[0]
            errors = [x for x in self.log.read_text().splitlines() if "Traceback" in x]
            assert not errors, self.log.read_text()
        return self.final


class Bed:
    def __init__(self, topo: Topology, tmp: Path) -> None:
        self.topo = topo
        self.tmp = tmp
        self.pcap = tmp / "dhcpv6.pcapng"
        self.servers: list[Server] = []
        self.timings: dict[str, float] = {}
        self.cap_lines: list[str] = []
        self.cap: subprocess.Popen[str] | None = None

    @property
    def server(self) -> Server:
        return self.servers[-1]

    def start_server(self, name: str) -> Server:
        self.servers.append(Server(self, name))
        return self.server

    def addresses(self, host: str) -> str:
        return subprocess.run(
            ["ip", "-n", self.topo.ns(host), "-6", "addr", "show", "dev", IFNAME],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    def has_vip(self, host: str, vip: str) -> bool:
        return (
            re.search(rf"inet6 {re.escape(vip)}/\d+ scope global", self.addresses(host)) is not None
        )

    def no_server_windows(self) -> list[tuple[float, float]]:
        """Times when no server process ran (client messages then go unanswered)."""
        windows = []
        for before, after in zip(self.servers, self.servers[1:], strict=False):
            assert before.stopped is not None
            windows.append((before.stopped - 0.05, after.started + 0.05))
        return windows


@pytest.fixture(scope="module")
def bed() -> Iterator[Bed]:
    created = [p for p in (DHCPCD_STATE / "duid", DHCPCD_RUN) if not p.exists()]
    tmp = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-"))
    with Topology(PREFIX, replace_stale=True) as topo:
        topo.add_segment("lan")
        topo.add_host("adapter", "lan", mac=ADAPTER_MAC)
        topo.add_host("gn1", "lan", mac=GN1_MAC, autoconf=True)
        topo.add_host("gn2", "lan", mac=GN2_MAC, autoconf=True)
        topo.add_host("unk", "lan", mac=STRANGER_MAC, autoconf=True)
        b = Bed(topo, tmp)
        cap = topo.popen(
            "adapter",
            ["tshark", "-i", IFNAME, "-w", str(b.pcap), "-f", "ip6"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        b.cap = cap
        assert cap.stderr is not None
        threading.Thread(target=_reader, args=(cap.stderr, b.cap_lines), daemon=True).start()
        wait_for(lambda: any("Capturing on" in x for x in b.cap_lines), 20, what="tshark")
        b.start_server("A")
        try:
            yield b
        finally:
            for server in b.servers:
                with contextlib.suppress(Exception):
                    server.stop()
            if cap.poll() is None:
                cap.send_signal(signal.SIGINT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    cap.wait(10)
    # dhcpcd keeps state outside the namespaces: remove what this test created
    for path in DHCPCD_STATE.glob(f"{IFNAME}*"):
        path.unlink()
    for path in created:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)


def timed_until(pred: Any, timeout: float) -> float:
    start = time.monotonic()
    wait_for(pred, timeout, 0.005)
    return time.monotonic() - start


# --------------------------------------------------------------------------------------------
# First contact: each client gets its VIPv6, DNS server and search domain.


@needs_dhclient
def test_dhclient_gets_its_vip_dns_and_domain(bed: Bed) -> None:
    topo = bed.topo
    resolv = topo.set_resolver("gn1", "192.0.2.53")  # dhclient-script rewrites it (cat >)
    start = time.monotonic()
    dh = topo.popen(
        "gn1",
        [
            "dhclient", "-6", "-v", "-1", "-d",  # -d: stay in the foreground, keep logging
            "-lf", str(bed.tmp / "gn1.leases"), "-pf", str(bed.tmp / "gn1.pid"), IFNAME,
        ],
        stdout=subprocess.DEVNULL,
        stderr=(bed.tmp / "gn1.log").open("w"),
    )  # fmt: skip
    try:
        wait_for(lambda: bed.has_vip("gn1", GN1_VIP) or dh.poll() is not None, 30, 0.005)
    finally:
        log = (bed.tmp / "gn1.log").read_text()
    assert dh.poll() is None, f"dhclient ended:\n{log}"
    bed.timings["dhclient"] = time.monotonic() - start
    assert bed.has_vip("gn1", GN1_VIP), bed.addresses("gn1")
    # The kernel took the on-link prefix from the RA (an expiring prefix route; A=0: no SLAAC
    # address), and the address from DHCPv6.
    routes = topo.run("gn1", ["ip", "-6", "route"]).stdout
    assert re.search(r"fd43:5950::/64 dev \S+ proto kernel .*expires", routes), routes
    assert "fd43:5950::" not in bed.addresses("gn1").replace(GN1_VIP, "")
    text = wait_for(lambda: "fd43:5950::1" in resolv.read_text() and resolv.read_text(), 5)
    assert f"nameserver {DNS6}" in text and f"search {DOMAIN}." in text, text
    lease = (bed.tmp / "gn1.leases").read_text()
    assert f"option dhcp6.name-servers {DNS6};" in lease, lease
    assert f'option dhcp6.domain-search "{DOMAIN}.";' in lease, lease
    assert bed.server.answered(GN1_MAC, "rx_request")
    print(f"\ndhclient: start -> {GN1_VIP} configured in {bed.timings['dhclient'] * 1000:.0f} ms")


@needs_dhcpcd
def test_dhcpcd_gets_its_vip_dns_and_domain(bed: Bed) -> None:
    topo = bed.topo
    conf = bed.tmp / "dhcpcd.conf"
    conf.write_text(DHCPCD_CONF)
    resolv = topo.set_resolver("gn2", "192.0.2.53")
    start = time.monotonic()
    dh = topo.popen(
        "gn2",
        ["dhcpcd", "-6", "-B", "-d", "-f", str(conf), IFNAME],
        stdout=subprocess.DEVNULL,
        stderr=(bed.tmp / "gn2.log").open("w"),
    )
    wait_for(lambda: bed.has_vip("gn2", GN2_VIP) or dh.poll() is not None, 30, 0.005)
    log = (bed.tmp / "gn2.log").read_text()
    assert dh.poll() is None, f"dhcpcd ended:\n{log}"
    bed.timings["dhcpcd"] = time.monotonic() - start
    # dhcpcd's view of the DHCPv6 lease (-U dumps it): the options came by DHCPv6, not the RA
    dump = topo.run("gn2", ["dhcpcd", "-6", "-U", "-f", str(conf), IFNAME]).stdout
    assert f"dhcp6_ia_na1_ia_addr1={GN2_VIP}" in dump, dump
    assert f"dhcp6_name_servers={DNS6}" in dump and f"dhcp6_domain_search={DOMAIN}" in dump, dump
    assert "dhcp6_rapid_commit" in dump, dump  # Solicit + Rapid Commit -> Reply (§18.3.1)
    text = wait_for(lambda: DNS6 in resolv.read_text() and resolv.read_text(), 5)
    assert f"nameserver {DNS6}" in text and f"search {DOMAIN}" in text, text
    assert bed.server.answered(GN2_MAC, "rx_solicit")
    assert bed.server.events(GN2_MAC)[0]["events"] == ["rx_solicit", "tx_reply"]
    print(f"\ndhcpcd: start -> {GN2_VIP} configured in {bed.timings['dhcpcd'] * 1000:.0f} ms")


@needs_dhclient
def test_unknown_mac_gets_nothing(bed: Bed) -> None:
    conf = bed.tmp / "unk.conf"
    conf.write_text("timeout 4;\n")
    start = time.monotonic()
    proc = bed.topo.run(
        "unk",
        [
            "dhclient", "-6", "-v", "-1", "-d", "-cf", str(conf),
            "-lf", str(bed.tmp / "unk.leases"), "-pf", str(bed.tmp / "unk.pid"), IFNAME,
        ],
        check=False,
        timeout=30,
    )  # fmt: skip
    took = time.monotonic() - start
    assert proc.returncode != 0, proc.stderr  # -1: gave up
    assert "XMT: Solicit" in proc.stderr
    assert "RCV:" not in proc.stderr, proc.stderr
    assert "scope global" not in bed.addresses("unk")
    events = bed.server.events(STRANGER_MAC)
    assert events, "the server saw no Solicit from the unknown MAC"
    for e in events:
        assert {"rx_solicit", "unknown_mac"} <= set(e["events"]) and not e["answered"], e
        assert not {"tx_advertise", "tx_reply"} & set(e["events"]), e
    print(f"\nunknown MAC: {len(events)} Solicits unanswered, dhclient gave up after {took:.1f} s")


# --------------------------------------------------------------------------------------------
# Restarts: a new server process with the same lease file answers Renew, Rebind, Confirm, and
# Release.


@needs_dhclient
def test_restarted_server_answers_renew_rebind_and_release(bed: Bed) -> None:
    log = bed.tmp / "gn1.log"
    if not bed.has_vip("gn1", GN1_VIP):
        pytest.skip("dhclient did not get its address (see the first test)")
    bed.server.stop()
    b = bed.start_server("B")
    wait_for(lambda: b.answered(GN1_MAC, "rx_renew"), 15, what="Renew answered by server B")
    assert not b.events(GN1_MAC)[0]["events"].count("binding_recreated")
    b.stop()
    # Without a server the next Renew goes unanswered; at T2 dhclient Rebinds (§18.2.5).
    renews = log.read_text().count("XMT: Renew on")
    wait_for(lambda: log.read_text().count("XMT: Renew on") > renews, 15, what="unanswered Renew")
    c = bed.start_server("C")
    wait_for(lambda: c.answered(GN1_MAC, "rx_rebind"), 30, what="Rebind answered by server C")
    assert "binding_recreated" not in {x for e in c.events(GN1_MAC) for x in e["events"]}
    assert bed.has_vip("gn1", GN1_VIP)
    # dhclient -6 -r: Release (§18.2.7), answered, the address removed by dhclient-script.
    rel = bed.topo.run(
        "gn1",
        [
            "dhclient", "-6", "-v", "-r",
            "-lf", str(bed.tmp / "gn1.leases"), "-pf", str(bed.tmp / "gn1.pid"), IFNAME,
        ],
        check=False,
        timeout=30,
    )  # fmt: skip
    assert rel.returncode == 0, rel.stderr
    assert "XMT: Release on" in rel.stderr
    wait_for(lambda: c.answered(GN1_MAC, "rx_release"), 10, what="Release answered")
    assert not bed.has_vip("gn1", GN1_VIP)
    lease = json.loads((bed.tmp / "leases.json").read_text())["leases"]["dhcp6"][GN1_MAC]
    assert lease["state"] == "released" and lease["vip6"] == GN1_VIP
    assert lease["duid_type"] == "LLT"


@needs_dhcpcd
def test_restarted_dhcpcd_confirms_with_the_restarted_server(bed: Bed) -> None:
    """dhcpcd keeps its lease on disk; started again it sends Confirm (§18.2.3), which the
    third server process (same lease file) answers with Success."""
    if not bed.has_vip("gn2", GN2_VIP):
        pytest.skip("dhcpcd did not get its address (see the second test)")
    topo, conf = bed.topo, bed.tmp / "dhcpcd.conf"
    topo.run("gn2", ["dhcpcd", "-6", "-x", "-f", str(conf), IFNAME], check=False)
    wait_for(lambda: not bed.has_vip("gn2", GN2_VIP), 10, what="dhcpcd stopped")
    start = time.monotonic()
    topo.popen(
        "gn2",
        ["dhcpcd", "-6", "-B", "-d", "-f", str(conf), IFNAME],
        stdout=subprocess.DEVNULL,
        stderr=(bed.tmp / "gn2-again.log").open("w"),
    )
    restarted = time.time()
    wait_for(lambda: bed.has_vip("gn2", GN2_VIP), 30, 0.005)
    bed.timings["dhcpcd-restart"] = time.monotonic() - start
    confirms = [
        e for e in bed.server.events(GN2_MAC) if e["t"] >= restarted and "rx_confirm" in e["events"]
    ]
    assert confirms and confirms[0]["answered"], bed.server.events(GN2_MAC)
    print(
        f"\ndhcpcd restarted: Confirm answered, {GN2_VIP} configured again in "
        f"{bed.timings['dhcpcd-restart'] * 1000:.0f} ms"
    )


# --------------------------------------------------------------------------------------------
# The capture


def tshark(pcap: Path, *args: str) -> str:
    proc = subprocess.run(
        ["tshark", "-r", str(pcap), *args], capture_output=True, text=True, check=True, timeout=60
    )
    return proc.stdout


def test_capture_is_clean(bed: Bed) -> None:
    for server in bed.servers:
        server.stop()
    assert bed.cap is not None
    bed.cap.send_signal(signal.SIGINT)
    bed.cap.wait(20)
    pcap = bed.pcap
    expert = tshark(pcap, "-q", "-z", "expert")
    assert "Errors (" not in expert and "Warns (" not in expert, expert
    assert tshark(pcap, "-Y", "_ws.malformed") == ""
    ours = tshark(
        pcap,
        "-o", "udp.check_checksum:TRUE",
        "-Y", f"eth.src == {ADAPTER_MAC} && udp.srcport == 547",
        "-T", "fields", "-e", "udp.checksum.status", "-e", "dhcpv6.msgtype",
    ).split("\n")  # fmt: skip
    statuses = [line.split("\t") for line in ours if line]
    assert statuses and all(s == "1" for s, _ in statuses), statuses  # 1: good checksum
    # Every client message was answered, unless it was sent while no server ran.
    rows = tshark(
        pcap,
        "-Y", "dhcpv6 && !icmpv6",
        "-T", "fields", "-E", "separator=|",
        "-e", "frame.time_epoch", "-e", "eth.src", "-e", "eth.dst", "-e", "dhcpv6.msgtype",
        "-e", "dhcpv6.xid", "-e", "dhcpv6.dns_server", "-e", "dhcpv6.search_list_entry",
    ).splitlines()  # fmt: skip
    sent: dict[tuple[str, str], tuple[float, str]] = {}
    answered: set[tuple[str, str]] = set()
    replies = 0
    for row in rows:
        when, src, dst, mtype, xid, dns, search = row.split("|")
        if src == ADAPTER_MAC:
            answered.add((dst, xid))
            replies += 1
            assert dst != STRANGER_MAC, row
            if mtype in ("2", "7") and dns:  # Advertise / Reply with configuration
                assert dns == DNS6 and search == f"{DOMAIN}.", row
        else:
            sent.setdefault((src, xid), (float(when), mtype))
    windows = bed.no_server_windows()
    for (mac, xid), (when, mtype) in sent.items():
        if mac == STRANGER_MAC or (mac, xid) in answered:
            continue
        assert any(a <= when <= b for a, b in windows), (mac, xid, mtype, when, windows)
    assert any(mac == STRANGER_MAC for mac, _ in sent)
    # On the wire: first Solicit of each GN -> the Reply that gave it its address.
    print(f"\ncapture: {len(rows)} DHCPv6 frames, {replies} from the adapter, checksums good")
    for mac, client in ((GN1_MAC, "dhclient"), (GN2_MAC, "dhcpcd")):
        solicits = [w for (m, _), (w, t) in sent.items() if m == mac and t == "1"]
        done = [float(r.split("|")[0]) for r in rows if r.split("|")[2] == mac and "|7|" in r]
        if solicits and done:
            print(f"  {client}: first Solicit -> Reply {(done[0] - min(solicits)) * 1000:.2f} ms")
    for key, value in bed.timings.items():
        print(f"  {key}: client start -> address configured {value * 1000:.0f} ms")
    # Server-side cost of one message, measured around Dhcp6Server.handle in the server.
    costs: dict[str, list[float]] = {}
    for e in (e for server in bed.servers for e in server.events() if e["answered"]):
        kind = next(k for k in e["events"] if k.startswith("rx_"))
        costs.setdefault(
            f"{kind[3:]}->{'advertise' if 'tx_advertise' in e['events'] else 'reply'}", []
        ).append(e["us"])
    for kind, values in sorted(costs.items()):
        values.sort()
        print(f"  handle {kind}: median {values[len(values) // 2]:.0f} us over {len(values)}")
