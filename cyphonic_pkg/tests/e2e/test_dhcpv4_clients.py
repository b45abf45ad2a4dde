"""DHCPv4 server and ARP proxy against unmodified clients (ISC dhclient, dhcpcd).  Needs root.

The test bed (prefix ``cyd4``): segment ``lan`` is the adapter's downlink with the VIPv4 pool
10.64.0.0/16; host ``adapter`` holds router4 10.64.0.1 with ``arp_ignore=8`` (its kernel answers
no ARP on the downlink: the ARP proxy answers for router4 and the peers); ``gn1`` (dhclient) and
``gn2`` (dhcpcd) are general nodes with fixed MACs and no IPv4 address; ``stranger`` has a MAC the
adapter does not know.  The server runs as ``python -m cyphonic.adapter.dhcpv4 --arp-proxy`` in
the adapter's namespace; dumpcap records the downlink's DHCP and ARP traffic for tshark to judge.

The clients configure the namespaces for real (dhclient through the stock
``/sbin/dhclient-script``, dhcpcd itself).  They only touch their namespace: ``ip netns exec``
bind-mounts ``/etc/netns/<ns>/*`` over ``/etc/*``, so the GN gets a private ``/etc/dhcp`` (with
empty hook directories, and one enter hook that writes ``resolv.conf`` in place) and a private
``/etc/resolv.conf``; dhcpcd runs with tmpfs over ``/run`` and ``/var/lib/dhcpcd`` in the mount
namespace of its own command and with ``--script /bin/true`` (no hooks).  The Topology removes
``/etc/netns/cyd4-*`` and every process left in the namespaces.

The tests of this module run in order against one server (a lease renewal, an init-reboot and
a release follow the first binding); the last one stops the server and the capture and checks
the counters and the pcap.  Timings (client start to configured address) are printed; run with
``-s`` to see them.  Clean up after a crash: ``python -m cyphonic.testbed down --prefix cyd4``.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cyphonic.testbed.topology import Topology, wait_for

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces, AF_PACKET"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2 (the ip command)"),
    pytest.mark.skipif(shutil.which("dhclient") is None, reason="needs ISC dhclient"),
]

PREFIX = "cyd4"
POOL4, POOL6 = "10.64.0.0/16", "fd00:64::/64"
ROUTER4 = "10.64.0.1"
DOMAIN = "cyphonic.test"
LEASE_TIME = 20  # T1 = 10 s: the renewal happens during the run
PEER_VIP = "10.64.0.99"  # in the pool, no GN's: the adapter answers ARP for it
GNS = {
    "gn1": ("02:c4:d4:00:00:10", "10.64.0.10", "fd00:64::10"),
    "gn2": ("02:c4:d4:00:00:11", "10.64.0.11", "fd00:64::11"),
}
STRANGER_MAC = "02:c4:d4:00:00:99"
CAPTURE_FILTER = "arp or udp port 67 or udp port 68"

# Sourced by dhclient-script (Debian): write resolv.conf in place -- it is the namespace's own
# file, bind-mounted by ip netns exec -- instead of a temporary file beside the host's.
RESOLV_HOOK = """\
make_resolv_conf() {
    {
        if [ -n "$new_domain_search" ]; then echo "search $new_domain_search"
        elif [ -n "$new_domain_name" ]; then echo "search $new_domain_name"; fi
        for ns in $new_domain_name_servers; do echo "nameserver $ns"; done
    } > /etc/resolv.conf
}
"""
DHCLIENT_CONF = """\
timeout {timeout};
retry 1;
request subnet-mask, broadcast-address, routers, domain-name, domain-name-servers,
        domain-search, interface-mtu;
"""
DHCPCD_CONF = """\
# DHCPv4 only; the client id is the MAC (RFC 2132 §9.14 type 1).
ipv4only
noipv6rs
noipv4ll
clientid
option subnet_mask, routers, domain_name_servers, domain_name, domain_search, interface_mtu
option rapid_commit
require dhcp_server_identifier
persistent
{extra}
"""


@dataclass
class Bed:
    topo: Topology
    tmp: Path
    ifname: str
    adapter_mac: str
    server: subprocess.Popen[str]
    dumpcap: subprocess.Popen[str] | None
    pcap: Path
    leases: Path
    timings: dict[str, float] = field(default_factory=dict)
    final: dict[str, Any] | None = None

    def ns(self, host: str) -> str:
        return self.topo.ns(host)

    def addresses(self, host: str) -> list[str]:
        out = subprocess.run(
            ["ip", "-n", self.ns(host), "-4", "-o", "addr", "show", "dev", self.ifname],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return [line.split()[3] for line in out.splitlines()]

    def lease(self, mac: str) -> dict[str, Any]:
        if not self.leases.exists():
            return {}
        return dict(json.loads(self.leases.read_text())["leases"].get("dhcp4", {}).get(mac, {}))

    def stop(self) -> dict[str, Any]:
        """Stop the server (its last stdout line has the counters) and the capture; once."""
        if self.final is None:
            self.server.send_signal(signal.SIGTERM)
            out, err = self.server.communicate(timeout=10)
            lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
            assert lines and lines[-1].get("stopped"), f"server stdout {out!r}\nstderr {err}"
            self.final = lines[-1]
            self.final["stderr"] = err
            if self.dumpcap is not None:
                self.dumpcap.send_signal(signal.SIGTERM)
                self.dumpcap.wait(timeout=10)
        return self.final


def _wait_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        proc.kill()
        raise AssertionError(f"no output within {timeout} s: {proc.args}")
    return proc.stdout.readline()


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    tmp = tmp_path_factory.mktemp("dhcpv4")
    with Topology(PREFIX, replace_stale=True) as topo:
        lan = topo.add_segment("lan", v4=POOL4)
        adapter = topo.add_host("adapter", lan, v4=ROUTER4)
        for name, (mac, _, _) in GNS.items():
            topo.add_host(name, lan, mac=mac)
        topo.add_host("stranger", lan, mac=STRANGER_MAC)
        ifname = adapter.ifname
        topo.run("adapter", ["sh", "-c", f"echo 8 > /proc/sys/net/ipv4/conf/{ifname}/arp_ignore"])

        pcap = tmp / "downlink.pcap"
        dumpcap = None
        if shutil.which("dumpcap"):
            dumpcap = topo.popen(
                "adapter",
                ["dumpcap", "-q", "-P", "-i", ifname, "-f", CAPTURE_FILTER, "-w", str(pcap)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            wait_for(
                lambda: pcap.exists() and pcap.stat().st_size >= 24,
                timeout=10,
                what="dumpcap to start",
            )

        leases = tmp / "state" / "leases.json"
        argv = [
            sys.executable,
            "-m",
            "cyphonic.adapter.dhcpv4",
            "--interface",
            ifname,
            "--pool4",
            POOL4,
            "--pool6",
            POOL6,
            "--domain",
            DOMAIN,
            "--lease-file",
            str(leases),
            "--lease-time",
            str(LEASE_TIME),
            "--arp-proxy",
            "-v",
        ]
        for name, (mac, vip4, vip6) in GNS.items():
            argv += ["--gn", f"{mac},{name}.{DOMAIN},{vip4},{vip6}"]
        server = topo.popen(
            "adapter", argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        ready = json.loads(_wait_line(server, 15))
        assert ready["ready"] and ready["mac"] == adapter.mac
        b = Bed(topo, tmp, ifname, adapter.mac, server, dumpcap, pcap, leases)
        yield b
        if b.final is None:
            b.stop()
        if b.timings:
            print("\nDHCPv4 timings (client start -> address configured):")
            for what, seconds in b.timings.items():
                print(f"  {what:<44} {seconds * 1000:8.1f} ms")


# --------------------------------------------------------------------------------------------
# Clients


def dhclient_setup(bed: Bed, host: str, *, timeout: int = 10) -> list[str]:
    """Private /etc/dhcp and resolv.conf for ``host``; returns the dhclient argv (without -r/-x)."""
    etc = Path("/etc/netns") / bed.ns(host)
    bed.topo.set_resolver(host, "127.0.0.1")  # replaced by dhclient-script's make_resolv_conf
    dhcp = etc / "dhcp"
    (dhcp / "dhclient-enter-hooks.d").mkdir(parents=True, exist_ok=True)
    (dhcp / "dhclient-exit-hooks.d").mkdir(exist_ok=True)
    (dhcp / "dhclient-enter-hooks.d" / "cyd4-resolv").write_text(RESOLV_HOOK)
    (dhcp / "dhclient.conf").write_text(DHCLIENT_CONF.format(timeout=timeout))
    state = bed.tmp / host
    state.mkdir(exist_ok=True)
    return [
        "dhclient",
        "-4",
        "-v",
        "-cf",
        "/etc/dhcp/dhclient.conf",
        "-lf",
        str(state / "dhclient.leases"),
        "-pf",
        str(state / "dhclient.pid"),
    ]


def run_until_address(
    bed: Bed, host: str, argv: list[str], want: str, label: str
) -> subprocess.Popen[str]:
    """Start ``argv`` in ``host`` and time it until ``want`` (addr/len) is on the interface."""
    log = open(bed.tmp / f"{host}-{len(bed.timings)}.log", "w")  # noqa: SIM115 - child's output
    start = time.perf_counter()
    proc = bed.topo.popen(host, argv, stdout=log, stderr=subprocess.STDOUT, text=True)
    log.close()
    try:
        wait_for(
            lambda: want in bed.addresses(host),
            timeout=30,
            interval=0.002,
            what=f"{want} on {host}",
        )
    except Exception:
        print(Path(log.name).read_text())
        raise
    bed.timings[label] = time.perf_counter() - start
    return proc


def test_dhclient_gets_its_vip(bed: Bed) -> None:
    mac, vip4, _ = GNS["gn1"]
    argv = dhclient_setup(bed, "gn1")
    proc = run_until_address(
        bed, "gn1", [*argv, "-1", bed.ifname], f"{vip4}/16", "dhclient (DISCOVER/OFFER/REQUEST/ACK)"
    )
    assert proc.wait(timeout=15) == 0  # the parent exits once the daemon is bound
    out = bed.topo.run("gn1", ["ip", "-4", "-o", "addr", "show", "dev", bed.ifname]).stdout
    assert f"inet {vip4}/16 brd 10.64.255.255" in out
    route = bed.topo.run("gn1", ["ip", "-4", "route", "show", "default"]).stdout
    assert f"default via {ROUTER4} dev {bed.ifname}" in route
    resolv = (Path("/etc/netns") / bed.ns("gn1") / "resolv.conf").read_text()
    assert f"nameserver {ROUTER4}" in resolv and f"search {DOMAIN}" in resolv
    lease = bed.lease(mac)
    assert lease["state"] == "bound" and lease["vip4"] == vip4


def test_dhclient_renews_by_unicast(bed: Bed) -> None:
    """At T1 the client unicasts a REQUEST to router4 (RFC 2131 §4.4.5): it needs the ARP
    proxy's answer for router4, and the UDP sink keeps the kernel from sending port
    unreachable."""
    mac, _, _ = GNS["gn1"]
    granted = bed.lease(mac)["granted"]
    wait_for(
        lambda: bed.lease(mac).get("granted", 0) > granted,
        timeout=LEASE_TIME,
        interval=0.2,
        what="the lease renewal",
    )


def test_arp_proxy_answers_for_peers_and_router(bed: Bed) -> None:
    bed.topo.run("gn1", ["ping", "-c", "1", "-W", "1", PEER_VIP], check=False)  # nobody forwards
    neigh = bed.topo.run("gn1", ["ip", "neigh", "show", PEER_VIP, "dev", bed.ifname]).stdout
    assert f"lladdr {bed.adapter_mac}" in neigh, neigh
    bed.topo.run("gn1", ["ping", "-c", "1", "-W", "2", ROUTER4])  # answered: ARP by the proxy
    neigh = bed.topo.run("gn1", ["ip", "neigh", "show", ROUTER4, "dev", bed.ifname]).stdout
    assert f"lladdr {bed.adapter_mac}" in neigh, neigh


def test_dhclient_init_reboot(bed: Bed) -> None:
    """A GN that reboots with a valid lease asks for it again without DISCOVER (§3.2)."""
    _, vip4, _ = GNS["gn1"]
    pid = int((bed.tmp / "gn1" / "dhclient.pid").read_text())
    os.kill(pid, signal.SIGTERM)  # the daemon we started; SIGTERM: exit without releasing
    wait_for(
        lambda: not Path(f"/proc/{pid}").exists() or _zombie(pid),
        timeout=5,
        what="dhclient to exit",
    )
    bed.topo.run("gn1", ["ip", "-4", "addr", "flush", "dev", bed.ifname])
    argv = dhclient_setup(bed, "gn1")
    proc = run_until_address(
        bed, "gn1", [*argv, "-1", bed.ifname], f"{vip4}/16", "dhclient init-reboot (REQUEST/ACK)"
    )
    assert proc.wait(timeout=15) == 0


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def dhcpcd_run(bed: Bed, host: str, extra: str, label: str, want: str) -> None:
    conf = bed.tmp / f"dhcpcd-{len(bed.timings)}.conf"
    conf.write_text(DHCPCD_CONF.format(extra=extra))
    # tmpfs over /run and dhcpcd's database: only in this command's mount namespace.
    script = (
        "mount -t tmpfs cyd4 /run && mount -t tmpfs cyd4 /var/lib/dhcpcd && "
        f"exec dhcpcd -4 -B -1 --script /bin/true -f {conf} -t 20 {bed.ifname}"
    )
    proc = run_until_address(bed, host, ["sh", "-c", script], want, label)
    assert proc.wait(timeout=30) == 0


@pytest.mark.skipif(shutil.which("dhcpcd") is None, reason="dhcpcd is not installed")
def test_dhcpcd_gets_its_vip(bed: Bed) -> None:
    _, vip4, _ = GNS["gn2"]
    dhcpcd_run(bed, "gn2", "noarp", "dhcpcd, rapid commit, no ARP probe", f"{vip4}/16")
    route = bed.topo.run("gn2", ["ip", "-4", "route", "show", "default"]).stdout
    assert f"default via {ROUTER4}" in route
    bed.topo.run("gn2", ["ip", "-4", "addr", "flush", "dev", bed.ifname])
    bed.topo.run("gn2", ["ip", "-4", "route", "flush", "dev", bed.ifname])
    # With RFC 5227 probing: the proxy must not answer the probes, or dhcpcd would DECLINE.
    dhcpcd_run(bed, "gn2", "", "dhcpcd, rapid commit + RFC 5227 ARP probe", f"{vip4}/16")
    assert bed.lease(GNS["gn2"][0])["state"] == "bound"


def test_gn_vip_is_answered_by_the_gn_itself(bed: Bed) -> None:
    gn2_mac, gn2_vip, _ = GNS["gn2"]
    bed.topo.run("gn1", ["ping", "-c", "1", "-W", "2", gn2_vip])
    neigh = bed.topo.run("gn1", ["ip", "neigh", "show", gn2_vip, "dev", bed.ifname]).stdout
    assert f"lladdr {gn2_mac}" in neigh, neigh


def test_unknown_mac_gets_nothing(bed: Bed) -> None:
    argv = dhclient_setup(bed, "stranger", timeout=3)
    proc = bed.topo.run("stranger", [*argv, "-1", bed.ifname], check=False, timeout=30)
    assert proc.returncode == 2, proc.stdout + proc.stderr  # "Unable to obtain a lease"
    assert "No DHCPOFFERS received" in proc.stderr and "DHCPOFFER of" not in proc.stderr
    assert bed.addresses("stranger") == []


def test_dhclient_release(bed: Bed) -> None:
    mac, _, _ = GNS["gn1"]
    argv = dhclient_setup(bed, "gn1")
    bed.topo.run("gn1", [*argv, "-r", bed.ifname], timeout=30)  # also stops the daemon
    assert bed.addresses("gn1") == []
    wait_for(lambda: bed.lease(mac).get("state") == "released", timeout=5, what="the release")


SNIFF = """
import json, sys, time
from cyphonic.adapter.packet_io import ETH_P_IPV6, RawLink, ipv6_filter
link = RawLink(sys.argv[1], [ETH_P_IPV6], bpf=ipv6_filter((133, 135), (547,))).open()
print("ready", flush=True)
seen, end = [], time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    for f in link.receive():
        seen.append([f[20], f[54] if f[20] == 58 else int.from_bytes(f[56:58], "big")])
    time.sleep(0.005)
print(json.dumps({"seen": seen, "stats": link.stats}), flush=True)
"""


def test_ipv6_filter_in_the_kernel(bed: Bed) -> None:
    """The classic BPF of :func:`ipv6_filter` as the kernel runs it: a GN's Neighbor
    Solicitation reaches the socket, its echo requests (GN data) and our own frames do not."""
    out = bed.topo.run(
        "adapter", ["ip", "-6", "-o", "addr", "show", "dev", bed.ifname, "scope", "link"]
    ).stdout
    adapter_ll = out.split()[3].split("/")[0]
    sniffer = bed.topo.popen(
        "adapter",
        [sys.executable, "-c", SNIFF, bed.ifname, "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert _wait_line(sniffer, 10).strip() == "ready"
    bed.topo.run("gn1", ["ip", "-6", "neigh", "flush", "dev", bed.ifname])
    bed.topo.run(
        "gn1", ["ping", "-6", "-c", "3", "-i", "0.2", "-W", "1", f"{adapter_ll}%{bed.ifname}"]
    )
    out, err = sniffer.communicate(timeout=15)
    result = json.loads(out.splitlines()[-1])
    seen = {tuple(x) for x in result["seen"]}
    assert (58, 135) in seen, (result, err)  # the GN's NS for the adapter's address
    assert not {x for x in seen if x[0] == 58 and x[1] in (128, 129)}, result  # echo: kernel's
    assert result["stats"]["rx_outgoing"] == result["stats"]["rx_ethertype"] == 0


def test_counters_and_capture(bed: Bed) -> None:
    final = bed.stop()
    dhcp, arp = final["dhcp4"], final["arp"]
    print("\nserver counters:", json.dumps({k: v for k, v in dhcp.items() if v}))
    print("ARP proxy counters:", json.dumps({k: v for k, v in arp.items() if v}))
    print("ARP proxy handle() latency:", json.dumps(final["arp_latency"]))
    assert dhcp["internal_errors"] == 0 and arp["internal_errors"] == 0
    assert dhcp["malformed"] == 0 and dhcp["nak"] == 0 and dhcp["chaddr_mismatch"] == 0
    assert dhcp["unknown_mac"] >= 1 and dhcp["offer"] >= 1
    assert dhcp["request_selecting"] >= 1 and dhcp["request_renewing"] >= 1
    assert dhcp["request_init_reboot"] >= 1 and dhcp["release"] >= 1
    if shutil.which("dhcpcd"):
        assert dhcp["rapid_commit"] >= 2
        assert arp["probes"] >= 3 and dhcp["decline"] == 0
    assert arp["answered_peer"] >= 1 and arp["answered_router"] >= 1
    assert final["dhcp4_link"]["handler_errors"] == final["arp_link"]["handler_errors"] == 0
    assert final["lease_states"][GNS["gn1"][0]] == "released"

    if bed.dumpcap is None or shutil.which("tshark") is None:
        pytest.skip("dumpcap/tshark (Wireshark) not installed: the capture is not checked")
    expert = _tshark(bed.pcap, "-q", "-z", "expert")
    assert "Errors" not in expert and "Warnings" not in expert, expert
    assert _tshark(bed.pcap, "-Y", "_ws.malformed || _ws.expert.severity >= warning").strip() == ""
    rows = [
        line.split("\t")
        for line in _tshark(
            bed.pcap,
            "-Y",
            "dhcp",
            "-T",
            "fields",
            "-e",
            "frame.time_relative",
            "-e",
            "eth.src",
            "-e",
            "eth.dst",
            "-e",
            "dhcp.option.dhcp",
            "-e",
            "dhcp.id",
            "-e",
            "dhcp.ip.your",
        ).splitlines()
    ]
    assert not [r for r in rows if r[2] == STRANGER_MAC], "a reply went to the stranger"
    assert [r for r in rows if r[1] == STRANGER_MAC], "the stranger's DISCOVER is missing"
    replies = [r for r in rows if r[1] == bed.adapter_mac]
    assert all(r[5] in ("0.0.0.0", GNS["gn1"][1], GNS["gn2"][1]) for r in replies)
    # On the wire: first DISCOVER of each GN to the ACK of the same transaction.
    for name, (mac, _, _) in GNS.items():
        discover = next((r for r in rows if r[1] == mac and r[3] == "1"), None)
        if discover is None:
            continue
        ack = next(r for r in rows if r[2] == mac and r[3] == "5" and r[4] == discover[4])
        bed.timings[f"{name}: DISCOVER -> ACK on the wire"] = float(ack[0]) - float(discover[0])
    # The ARP proxy's answer time on the wire (the paper's "ARP process time", slide 20).
    arp_rows = [
        line.split("\t")
        for line in _tshark(
            bed.pcap,
            "-Y",
            "arp",
            "-T",
            "fields",
            "-e",
            "frame.time_relative",
            "-e",
            "arp.opcode",
            "-e",
            "arp.src.proto_ipv4",
            "-e",
            "arp.dst.proto_ipv4",
            "-e",
            "arp.src.hw_mac",
        ).splitlines()
    ]
    ask = next(r for r in arp_rows if r[1] == "1" and r[3] == PEER_VIP)
    answer = next(r for r in arp_rows if r[1] == "2" and r[2] == PEER_VIP)
    assert answer[4] == bed.adapter_mac and float(answer[0]) >= float(ask[0])
    bed.timings["ARP who-has peer -> proxy reply on the wire"] = float(answer[0]) - float(ask[0])


def _tshark(pcap: Path, *args: str) -> str:
    proc = subprocess.run(
        ["tshark", "-r", str(pcap), *args], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout
