"""The test bed itself, for real: namespaces, bridges, NAT, cleanup.  Needs root.

Every address lives only inside the namespaces these tests create (documentation and private
ranges).  Prefixes are ``cte<n>``; a crashed run is cleaned with
``python -m cyphonic.testbed down --prefix cte<n>``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest

from cyphonic.testbed.topology import (
    CommandError,
    Topology,
    TopologyError,
    destroy_prefix,
    list_namespaces,
    wait_for,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        os.geteuid() != 0, reason="needs root: creates network namespaces, veths and bridges"
    ),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2 (the ip command)"),
]

INET4, INET6 = "198.51.100.0/24", "2001:db8:100::/64"
CLOUD4, CLOUD6 = "198.51.100.10", "2001:db8:100::10"

# Answers every datagram with the source address and port it saw ("addr port").
ECHO_SERVER = textwrap.dedent(
    """
    import selectors, socket, sys
    sel = selectors.DefaultSelector()
    for spec in sys.argv[1:]:
        host, port = spec.rsplit(",", 1)
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((host, int(port)))
        sel.register(s, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            data, addr = key.fileobj.recvfrom(2048)
            key.fileobj.sendto(f"{addr[0]} {addr[1]}".encode(), addr)
    """
)

# From one socket per family bound to port argv[1], asks each "host,port" target what it sees;
# retries until the server is up.  Prints one "addr port" line per target.
ECHO_CLIENT = textwrap.dedent(
    """
    import socket, sys, time
    socks = {}
    for spec in sys.argv[2:]:
        host, port = spec.rsplit(",", 1)
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        if fam not in socks:
            socks[fam] = socket.socket(fam, socket.SOCK_DGRAM)
            if fam == socket.AF_INET6:
                socks[fam].setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            socks[fam].bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", int(sys.argv[1])))
            socks[fam].settimeout(0.1)
        deadline = time.monotonic() + 10
        while True:
            socks[fam].sendto(b"?", (host, int(port)))
            try:
                print(socks[fam].recv(2048).decode(), flush=True)
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    sys.exit(f"no answer from {spec}")
    """
)


def echo_server(topo: Topology, host: str, *binds: str) -> subprocess.Popen[str]:
    return topo.popen(
        host,
        [sys.executable, "-c", ECHO_SERVER, *binds],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def observed(topo: Topology, host: str, src_port: int, *targets: str) -> list[tuple[str, int]]:
    out = topo.run(host, [sys.executable, "-c", ECHO_CLIENT, str(src_port), *targets], timeout=20)
    return [(a, int(p)) for a, p in (line.split() for line in out.stdout.splitlines())]


def ping(topo: Topology, host: str, address: str) -> subprocess.CompletedProcess[str]:
    return topo.run(host, ["ping", "-c1", "-W2", address], check=False)


def ours(prefix: str) -> list[str]:
    return [ns for ns in list_namespaces() if ns.startswith(prefix + "-")]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def topo(request: pytest.FixtureRequest) -> Iterator[Topology]:
    prefix = str(request.param)
    with Topology(prefix, replace_stale=True) as t:
        yield t
    assert ours(prefix) == []


def with_internet(topo: Topology) -> None:
    inet = topo.add_segment("inet", v4=INET4, v6=INET6)
    topo.add_host("cloud", inet, v4=CLOUD4, v6=CLOUD6)


def with_lan(topo: Topology, n: int, *, symmetric: bool = False) -> None:
    """Router r<n> on inet (198.51.100.<n>) with LAN lan<n> (10.10.<n>.0/24, fd00:10:<n>::/64)."""
    lan = topo.add_segment(f"lan{n}", v4=f"10.10.{n}.0/24", v6=f"fd00:10:{n}::/64")
    topo.add_router(
        f"r{n}",
        wan="inet",
        wan_v4=f"198.51.100.{n}",
        wan_v6=f"2001:db8:100::{n}",
        lan=lan,
        lan_v4=f"10.10.{n}.1",
        lan_v6=f"fd00:10:{n}::1",
        symmetric_nat=symmetric,
    )


@pytest.mark.parametrize("topo", ["cte1"], indirect=True)
def test_hosts_on_inet_reach_each_other_over_v4_and_v6(topo: Topology) -> None:
    t0 = time.perf_counter()
    inet = topo.add_segment("inet", v4=INET4, v6=INET6)
    topo.add_host("cloud", inet, v4=CLOUD4, v6=CLOUD6)
    topo.add_host("a", inet, v4="198.51.100.11", v6="2001:db8:100::11")
    topo.add_host("b", inet, v4="198.51.100.12", v6="2001:db8:100::12")
    elapsed = time.perf_counter() - t0
    print(f"segment + 3 hosts up in {elapsed * 1000:.0f} ms")
    assert elapsed < 2.0
    # no DAD: nothing is tentative, the very first ping works
    assert topo.run("a", ["ip", "-6", "address", "show", "tentative"]).stdout == ""
    for src, dst in [("a", "cloud"), ("cloud", "a"), ("a", "b")]:
        for address in (topo.host(dst).v4, topo.host(dst).v6):
            assert address
            assert ping(topo, src, address).returncode == 0, f"{src} -> {dst} {address}"
    assert topo.run("a", ["cat", "/proc/sys/net/ipv4/conf/all/forwarding"]).stdout == "0\n"


@pytest.mark.parametrize("topo", ["cte2"], indirect=True)
def test_napt_router_masquerades_v4_and_v6(topo: Topology) -> None:
    with_internet(topo)
    with_lan(topo, 2)
    n = topo.add_host("n", "lan2", v4="10.10.2.10", v6="fd00:10:2::10")
    r = topo.host("r2")
    echo_server(topo, "cloud", f"{CLOUD4},7001", f"{CLOUD6},7001")
    seen = observed(topo, "n", 40000, f"{CLOUD4},7001", f"{CLOUD6},7001")
    assert [addr for addr, _ in seen] == [r.v4, r.v6]
    # the LAN is not reachable from the Internet, and forwarding is on only in the router
    assert n.v4 and ping(topo, "cloud", n.v4).returncode != 0
    assert ping(topo, "n", CLOUD4).returncode == 0
    assert topo.run("r2", ["cat", "/proc/sys/net/ipv6/conf/all/forwarding"]).stdout == "1\n"


@pytest.mark.parametrize("topo", ["cte3"], indirect=True)
def test_plain_masquerade_keeps_port_symmetric_nat_does_not(topo: Topology) -> None:
    with_internet(topo)
    with_lan(topo, 3)
    with_lan(topo, 4, symmetric=True)
    topo.add_host("cone", "lan3", v4="10.10.3.10")
    topo.add_host("sym", "lan4", v4="10.10.4.10")
    echo_server(topo, "cloud", f"{CLOUD4},7001", f"{CLOUD4},7002")
    targets = (f"{CLOUD4},7001", f"{CLOUD4},7002")
    cone = observed(topo, "cone", 40000, *targets)
    assert cone == [("198.51.100.3", 40000)] * 2  # one mapping for every destination
    sym = observed(topo, "sym", 40000, *targets)
    assert {addr for addr, _ in sym} == {"198.51.100.4"}
    assert sym[0][1] != sym[1][1]  # a new mapping per destination


@pytest.mark.parametrize("topo", ["cte4"], indirect=True)
def test_single_family_hosts(topo: Topology) -> None:
    with_internet(topo)
    topo.add_host("v4only", "inet", v4="198.51.100.40")
    topo.add_host("v6only", "inet", v6="2001:db8:100::60")
    assert ping(topo, "v4only", CLOUD4).returncode == 0
    assert ping(topo, "v6only", CLOUD6).returncode == 0
    assert ping(topo, "v6only", CLOUD4).returncode != 0
    assert ping(topo, "v4only", CLOUD6).returncode != 0


@pytest.mark.parametrize("topo", ["cte5"], indirect=True)
def test_host_moves_between_lans(topo: Topology) -> None:
    with_internet(topo)
    with_lan(topo, 5)
    with_lan(topo, 6)
    topo.add_host("m", "lan5", v4="10.10.5.10", v6="fd00:10:5::10")
    echo_server(topo, "cloud", f"{CLOUD4},7001")
    assert observed(topo, "m", 40000, f"{CLOUD4},7001")[0][0] == "198.51.100.5"
    topo.connect("m", "lan6", v4="10.10.6.10", v6="fd00:10:6::10")
    topo.disconnect("m", "lan5")
    assert observed(topo, "m", 40000, f"{CLOUD4},7001")[0][0] == "198.51.100.6"
    assert ping(topo, "m", CLOUD6).returncode == 0


@pytest.mark.parametrize("topo", ["cte6"], indirect=True)
def test_set_resolver_is_seen_by_ip_netns_exec(topo: Topology) -> None:
    with_internet(topo)
    with open("/etc/resolv.conf") as f:
        before = f.read()
    topo.set_resolver("cloud", "127.0.0.1", search=["cyphonic.test"])
    conf = topo.run("cloud", ["cat", "/etc/resolv.conf"]).stdout
    assert conf == "nameserver 127.0.0.1\nsearch cyphonic.test\n"
    with open("/etc/resolv.conf") as f:
        assert f.read() == before  # the machine's own resolver is untouched


@pytest.mark.parametrize("topo", ["cte7"], indirect=True)
def test_bridge_namespace_is_quiet(topo: Topology) -> None:
    with_internet(topo)
    if os.path.isdir("/proc/sys/net/bridge"):
        nf = topo.run("inet", ["cat", "/proc/sys/net/bridge/bridge-nf-call-iptables"])
        assert nf.stdout == "0\n"
    link = topo.run("inet", ["ip", "-d", "link", "show", "cte7-inet"]).stdout
    assert "stp_state 0" in link and "mcast_snooping 0" in link


@pytest.mark.parametrize("topo", ["cte8"], indirect=True)
def test_run_errors_carry_command_and_stderr(topo: Topology) -> None:
    with_internet(topo)
    with pytest.raises(CommandError) as info:
        topo.run("cloud", ["sh", "-c", "echo nope >&2; exit 4"])
    assert "exit 4" in str(info.value) and "nope" in str(info.value)
    assert "ip netns exec cte8-cloud sh -c" in str(info.value)
    assert topo.run("cloud", ["sh", "-c", "exit 4"], check=False).returncode == 4


def test_failing_setup_command_is_reported() -> None:
    destroy_prefix("cte9")
    with Topology("cte9") as topo:
        inet = topo.add_segment("inet", v4=INET4)
        subprocess.run(["ip", "netns", "add", "cte9-b"], check=True)  # in the way
        try:
            with pytest.raises(CommandError) as info:
                topo.add_host("b", inet, v4="198.51.100.20")
            assert "ip netns add cte9-b" in str(info.value)
            assert "File exists" in str(info.value)
        finally:
            subprocess.run(["ip", "netns", "delete", "cte9-b"], check=True)


def test_destroy_ends_processes_and_leaves_nothing() -> None:
    destroy_prefix("cte10")
    topo = Topology("cte10")
    with_internet(topo)
    topo.set_resolver("cloud", "127.0.0.1")
    tracked = topo.popen("cloud", ["sh", "-c", "sleep 300 & wait"])
    # a daemon that forked away from us: found by its namespace
    out = topo.run("cloud", ["sh", "-c", "sleep 300 >/dev/null 2>&1 & echo $!"]).stdout
    daemon = int(out)
    child = wait_for(
        lambda: [p for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == tracked.pid],
        what="the tracked shell's sleep",
    )
    t0 = time.perf_counter()
    topo.destroy()
    print(f"destroy in {(time.perf_counter() - t0) * 1000:.0f} ms")
    assert ours("cte10") == []
    assert not os.path.exists("/etc/netns/cte10-cloud")
    assert tracked.returncode is not None
    assert not alive(daemon)
    assert not alive(int(child[0]))
    topo.destroy()  # idempotent


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


CRASHING_RUN = textwrap.dedent(
    """
    import os, subprocess, sys
    from cyphonic.testbed.topology import Topology
    t = Topology("cte11")
    inet = t.add_segment("inet", v4="198.51.100.0/24", v6="2001:db8:100::/64")
    t.add_host("a", inet, v4="198.51.100.11", v6="2001:db8:100::11")
    t.set_resolver("a", "127.0.0.1")
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}  # keep no pipe open
    print(t.popen("a", ["sleep", "300"], **quiet).pid, flush=True)
    os._exit(1)  # no destroy, no atexit: a crash
    """
)


def test_destroy_prefix_cleans_a_crashed_run() -> None:
    destroy_prefix("cte11")
    crashed = subprocess.run(
        [sys.executable, "-c", CRASHING_RUN],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert crashed.returncode == 1, crashed.stderr
    leftover = int(crashed.stdout)
    assert sorted(ours("cte11")) == ["cte11-a", "cte11-inet"]
    assert alive(leftover)
    # building on top of the leftovers fails clearly ...
    with pytest.raises(TopologyError, match="down --prefix cte11"):
        Topology("cte11")
    # ... the CLI shows and removes them ...
    cli = [sys.executable, "-m", "cyphonic.testbed"]
    listed = subprocess.run([*cli, "list", "--prefix", "cte11"], capture_output=True, text=True)
    assert listed.returncode == 0 and "cte11-a" in listed.stdout and "1 processes" in listed.stdout
    down = subprocess.run([*cli, "down", "--prefix", "cte11"], capture_output=True, text=True)
    assert down.returncode == 0, down.stderr
    assert "removed 2 namespaces" in down.stdout
    assert ours("cte11") == []
    assert not os.path.exists("/etc/netns/cte11-a")
    assert wait_for(lambda: not alive(leftover), timeout=5, what="the leftover sleep to end")
    # ... and the prefix is free again
    with Topology("cte11") as again:
        again.add_segment("inet", v4=INET4)


def test_same_prefix_twice_fails_clearly() -> None:
    destroy_prefix("cte12")
    with Topology("cte12") as first:
        first.add_segment("inet", v4=INET4)
        with pytest.raises(TopologyError, match="another live Topology"):
            Topology("cte12")
    with Topology("cte12") as second:  # free again after destroy
        second.add_segment("inet", v4=INET4)


def test_replace_stale_cleans_first() -> None:
    destroy_prefix("cte13")
    subprocess.run(["ip", "netns", "add", "cte13-old"], check=True)
    with Topology("cte13", replace_stale=True) as topo:
        assert ours("cte13") == []
        topo.add_segment("inet", v4=INET4)
    assert ours("cte13") == []
