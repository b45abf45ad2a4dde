"""Issue [2/6] rows of the decision table across NAPT routers (nftables masquerade).

inet (198.51.100.0/24, 2001:db8:100::/64): cloud (AS, NMS, TRS), p (public, dual stack),
                                            v6o (IPv6 only)
ra (NAPT, WAN 198.51.100.2) -- LAN 10.10.1.0/24: a1, a2   (IPv4 only)
rb (NAPT, WAN 198.51.100.3) -- LAN 10.10.2.0/24: b1       (IPv4 only)
rc (NAPT, WAN 198.51.100.4) -- LAN 10.10.3.0/24: c1       (IPv4 only)
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from cyphonic.testbed.overlay import NodeSpec, OverlayLab, RouterSpec

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="e2e tests need root (network namespaces)"),
]

NODES = [
    NodeSpec("p", "198.51.100.50", "2001:db8:100::50"),
    NodeSpec("a1", "10.10.1.10", None, lan="ra"),
    NodeSpec("a2", "10.10.1.11", None, lan="ra"),
    NodeSpec("b1", "10.10.2.10", None, lan="rb"),
    NodeSpec("c1", "10.10.3.10", None, lan="rc"),
    NodeSpec("v6o", None, "2001:db8:100::60"),
]
ROUTERS = [
    RouterSpec("ra", "198.51.100.2", None, lan_v4="10.10.1.0/24"),
    RouterSpec("rb", "198.51.100.3", None, lan_v4="10.10.2.0/24"),
    RouterSpec("rc", "198.51.100.4", None, lan_v4="10.10.3.0/24"),
]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OverlayLab]:
    lab = OverlayLab(
        prefix=f"cyi{os.getpid() % 10000}",
        workdir=tmp_path_factory.mktemp("interconnect"),
        nodes=NODES,
        routers=ROUTERS,
        replace_stale=True,
        trs=True,
        log=lambda m: print(m, file=sys.stderr),
    )
    try:
        lab.build()
        yield lab
    except BaseException:
        for name in ("cloud", "trs", *(n.name for n in NODES)):
            print(f"--- {name} log ---\n{lab.tail(name)}", file=sys.stderr)
        raise
    finally:
        lab.destroy()


def run(lab: OverlayLab, host: str, *cmd: str, timeout: float = 60) -> str:
    return lab.topo.run(host, list(cmd), check=True, timeout=timeout).stdout


def peer(status: dict[str, Any], fqdn: str) -> Any:
    for p in status["peers"]:
        if p["fqdn"] == fqdn:
            return p
    raise AssertionError(f"{fqdn} not in peers: {status['peers']}")


SERVER = r"""
import hashlib, socket, sys
s = socket.socket(socket.AF_INET6); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # VIPv4 and VIPv6
s.bind(("::", 5002)); s.listen(1); print('ready', flush=True)
c, _ = s.accept(); h = hashlib.sha256(); n = 0
while (d := c.recv(1 << 16)):
    h.update(d); n += len(d)
print(n, h.hexdigest(), flush=True)
"""
CLIENT = r"""
import hashlib, os, socket, sys
data = os.urandom(int(sys.argv[2]))
s = socket.create_connection((sys.argv[1], 5002), timeout=30); s.sendall(data); s.close()
print(len(data), hashlib.sha256(data).hexdigest(), flush=True)
"""


def transfer(lab: OverlayLab, src: str, dst: str, size: int = 4 << 20) -> None:
    """A sha256-checked TCP transfer to ``dst`` by its FQDN (the system resolver)."""
    server = lab.topo.popen(dst, [sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        name = f"{dst}.cyphonic.test"
        sent = run(lab, src, sys.executable, "-c", CLIENT, name, str(size)).split()
        assert server.stdout.readline().split() == sent
    finally:
        if server.poll() is None:
            server.kill()


@pytest.mark.parametrize(
    ("mn", "cn", "path", "reason"),
    [
        ("a1", "p", "direct", "mn_behind_napt"),
        ("p", "b1", "punched", "cn_behind_napt"),
        ("a1", "b1", "punched", "both_behind_napt"),
        ("a1", "a2", "local", "same_napt"),
    ],
)
def test_decision_table_row(lab: OverlayLab, mn: str, cn: str, path: str, reason: str) -> None:
    run(lab, mn, "ping", "-c", "2", "-i", "0.2", "-W", "2", f"{cn}.cyphonic.test")
    p = peer(lab.status(mn), f"{cn}.cyphonic.test")
    assert (p["path"], p["reason"]) == (path, reason)
    q = peer(lab.status(cn), f"{mn}.cyphonic.test")
    assert (q["path"], q["reason"]) == (path, reason)
    if path == "local":
        assert p["endpoint"].startswith("10.10.1.")
    # back the other way over the same tunnel, and a checked TCP transfer
    run(lab, cn, "ping", "-c", "2", "-i", "0.2", "-W", "2", lab.status(mn)["vip4"])
    transfer(lab, mn, cn)


def test_nms_sees_the_napt_mapping(lab: OverlayLab) -> None:
    st = lab.status("a1")
    assert st["observed"]["4"].startswith("198.51.100.2:")


PACED_CLIENT = r"""
import hashlib, random, socket, sys, time
rnd = random.Random(7); h = hashlib.sha256(); total = int(sys.argv[2]); secs = float(sys.argv[3])
s = socket.create_connection((sys.argv[1], 5003), timeout=60)
sent = 0; t0 = time.monotonic()
while sent < total:
    chunk = rnd.randbytes(min(1 << 15, total - sent))
    s.sendall(chunk); h.update(chunk); sent += len(chunk)
    ahead = sent / total * secs - (time.monotonic() - t0)
    if ahead > 0: time.sleep(ahead)
s.shutdown(socket.SHUT_WR); s.recv(1); s.close()
print(sent, h.hexdigest(), flush=True)
"""


def max_gap(ping_output: str) -> float:
    """Largest gap (ms) between consecutive replies in `ping -D` output."""
    stamps = [
        float(line[1 : line.index("]")])
        for line in ping_output.splitlines()
        if line.startswith("[") and "bytes from" in line
    ]
    return max((b - a for a, b in itertools.pairwise(stamps)), default=0.0) * 1000


def test_mobility_tcp_survives_moves(lab: OverlayLab) -> None:
    """a1 moves from behind NAT A to the IPv6-only network and back during a TCP transfer."""
    p_vip = lab.status("p")["vip4"]
    a1_vip = lab.status("a1")["vip4"]
    run(lab, "a1", "ping", "-c", "1", "-W", "2", "p.cyphonic.test")
    server = lab.topo.popen(
        "p",
        [sys.executable, "-c", SERVER.replace("5002", "5003"), p_vip],
        stdout=subprocess.PIPE,
        text=True,
    )
    # to a file: a pipe read only at the end fills up after ~700 lines and stalls ping
    ping_file = lab.workdir / "mobility-ping.txt"
    pinger = lab.topo.popen(
        "p", ["ping", "-D", "-i", "0.01", "-W", "1", a1_vip], stdout=ping_file.open("w")
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        client = lab.topo.popen(
            "a1",
            [sys.executable, "-c", PACED_CLIENT, p_vip, str(40 << 20), "8"],
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(2)
        lab.topo.disconnect("a1", "lra")  # leaves NAT A ...
        lab.topo.connect("a1", "inet", v6="2001:db8:100::99")  # ... joins the IPv6-only net
        wait_path(lab, "a1", "p.cyphonic.test", lambda p: p["endpoint"].startswith("[2001"))
        time.sleep(2)
        lab.topo.disconnect("a1", "inet")  # and back behind NAT A (IPv4 only)
        lab.topo.connect("a1", "lra", v4="10.10.1.10")
        wait_path(lab, "a1", "p.cyphonic.test", lambda p: not p["endpoint"].startswith("["))
        assert client.wait(60) == 0
        assert client.stdout is not None
        sent = client.stdout.readline().split()
        assert server.stdout.readline().split() == sent, "transfer corrupted or reset"
    finally:
        if server.poll() is None:
            server.terminate()
        if pinger.poll() is None:
            pinger.send_signal(signal.SIGINT)  # ping flushes its output and exits
        pinger.wait(timeout=10)
    gap = max_gap(ping_file.read_text())
    st = lab.status("a1")
    assert st["moves"] >= 2
    print(f"mobility: 2 moves, longest gap in 10 ms pings {gap:.0f} ms", file=sys.stderr)
    (lab.workdir / "handover_gap_ms").write_text(f"{gap:.1f}\n")


def wait_path(lab: OverlayLab, name: str, fqdn: str, pred: Any, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = peer(lab.status(name), fqdn)
            if last["established"] and pred(last):
                return
        except (AssertionError, subprocess.CalledProcessError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"path of {name} to {fqdn} never became as expected: {last}")


def test_expired_nat_mappings_recover(lab: OverlayLab) -> None:
    """Both NAPT routers forget every mapping (conntrack flushed): the punched tunnel between
    a1 and b1 comes back on its own (keepalives re-open NMS paths, the silent peer gets a new
    route direction and a new punch)."""
    run(lab, "a1", "ping", "-c", "1", "-W", "2", "b1.cyphonic.test")
    b1_vip = lab.status("b1")["vip4"]
    for router in ("ra", "rb"):
        lab.topo.run(router, ["conntrack", "-F"], check=False)
    t0 = time.monotonic()
    out = lab.topo.run(
        "a1", ["ping", "-c", "1", "-W", "1", "-w", "45", b1_vip], check=False, timeout=60
    )
    assert out.returncode == 0, out.stdout
    print(f"NAT mappings flushed: tunnel back after {time.monotonic() - t0:.1f} s", file=sys.stderr)


def test_no_common_family_goes_through_trs(lab: OverlayLab) -> None:
    """IPv4-only a1 (behind NAT A) and IPv6-only v6o: relayed by the dual-stack TRS."""
    run(lab, "a1", "ping", "-c", "2", "-i", "0.2", "-W", "2", "v6o.cyphonic.test")
    p = peer(lab.status("a1"), "v6o.cyphonic.test")
    assert (p["path"], p["reason"]) == ("relayed", "no_common_family")
    assert p["endpoint"] == "198.51.100.10:4503" and p["relay_bound"]
    q = peer(lab.status("v6o"), "a1.cyphonic.test")
    assert (q["path"], q["endpoint"]) == ("relayed", "[2001:db8:100::10]:4503")
    run(lab, "v6o", "ping", "-c", "2", "-i", "0.2", "-W", "2", lab.status("a1")["vip4"])
    transfer(lab, "a1", "v6o")
    trs = lab.status("trs")
    assert trs["counters"]["relayed_packets"] > 0


def _block(lab: OverlayLab, router: str, peer_wan: str, on: bool) -> None:
    """A filter on ``router`` that drops everything to/from ``peer_wan``: punching fails."""
    if on:
        rules = (
            "table inet cyblock {\n chain blockfwd {\n"
            "  type filter hook forward priority -10; policy accept;\n"
            f"  ip saddr {peer_wan} drop\n  ip daddr {peer_wan} drop\n }}\n}}\n"
        )
        lab.topo.run(router, ["nft", "-f", "-"], input=rules)
    else:
        lab.topo.run(router, ["nft", "delete", "table", "inet", "cyblock"])


def test_punch_failure_falls_back_to_trs_then_optimises(lab: OverlayLab) -> None:
    _block(lab, "rc", "198.51.100.2", on=True)
    try:
        run(lab, "a2", "ping", "-c", "2", "-i", "0.2", "-W", "2", "c1.cyphonic.test")
        p = peer(lab.status("a2"), "c1.cyphonic.test")
        assert (p["path"], p["reason"]) == ("relayed", "punch_failed")
        assert p["fallback_ms"] is not None
        transfer(lab, "a2", "c1")
    finally:
        _block(lab, "rc", "198.51.100.2", on=False)
    # the punch succeeds later: both sides leave the relay without dropping the tunnel
    wait_path(lab, "a2", "c1.cyphonic.test", lambda q: q["path"] == "punched", timeout=20)
    wait_path(lab, "c1", "a2.cyphonic.test", lambda q: q["path"] == "punched", timeout=20)
    p = peer(lab.status("a2"), "c1.cyphonic.test")
    assert p["endpoint"].startswith("198.51.100.4:")
    print(
        f"fallback to TRS after {p['fallback_ms']:.0f} ms; optimised to direct "
        f"{p['optimised_ms']:.0f} ms after relaying began",
        file=sys.stderr,
    )
    (lab.workdir / "fallback_ms").write_text(f"{p['fallback_ms']:.1f} {p['optimised_ms']:.1f}\n")
    transfer(lab, "c1", "a2")


CANARY = b"CYPHONIC-PLAINTEXT-CANARY-"
CANARY_CLIENT = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], 5004), timeout=30)
s.sendall(b"CYPHONIC-PLAINTEXT-CANARY-" * 40000); s.close()
"""
CANARY_SERVER = r"""
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5004)); s.listen(1); print('ready', flush=True)
c, _ = s.accept(); data = b''
while (d := c.recv(1 << 16)):
    data += d
print(len(data), flush=True)
time.sleep(30)  # keep the plaintext in memory: the positive control of the scan
"""
CAPTURE_ALL = r"""
import signal, socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
s.bind((sys.argv[1], 0)); s.settimeout(0.5)
total = 0; seen = 0; stop = False
def _stop(*_):
    global stop; stop = True
signal.signal(signal.SIGTERM, _stop)
print('ready', flush=True)
while not stop:
    try:
        f = s.recv(65535)
    except (TimeoutError, InterruptedError):
        continue
    total += len(f)
    if b"CYPHONIC-PLAINTEXT-CANARY-" in f:
        seen += 1
print(total, seen, flush=True)
"""


def _memory_contains(pid: int, needle: bytes) -> bool:
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            addr, perms = line.split()[:2]
            if "r" not in perms:
                continue
            start, end = (int(x, 16) for x in addr.split("-"))
            try:
                mem.seek(start)
                chunk = mem.read(end - start)
            except (OSError, OverflowError, ValueError):
                continue
            if needle in chunk:
                return True
    return False


def test_trs_never_sees_plaintext(lab: OverlayLab) -> None:
    """A known payload crosses the TRS: neither the TRS process memory nor the traffic on
    the cloud host contains it (while the receiving process does: the scan works)."""
    run(lab, "a1", "ping", "-c", "1", "-W", "2", "v6o.cyphonic.test")  # relayed tunnel up
    vip = lab.status("v6o")["vip4"]
    cloud_if = lab.topo.host("cloud").ifname
    cap = lab.topo.popen(
        "cloud", [sys.executable, "-c", CAPTURE_ALL, cloud_if], stdout=subprocess.PIPE, text=True
    )
    server = lab.topo.popen(
        "v6o", [sys.executable, "-c", CANARY_SERVER, vip], stdout=subprocess.PIPE, text=True
    )
    try:
        assert cap.stdout is not None and cap.stdout.readline().strip() == "ready"
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        run(lab, "a1", sys.executable, "-c", CANARY_CLIENT, vip)
        assert int(server.stdout.readline()) == len(CANARY) * 40000
        assert _memory_contains(server.pid, CANARY), "positive control failed"
        assert not _memory_contains(lab.procs["trs"].pid, CANARY)
    finally:
        server.kill()
        cap.terminate()
    out, _ = cap.communicate(timeout=10)
    captured, canary_seen = (int(x) for x in out.split())
    assert captured > len(CANARY) * 40000  # the transfer did cross the cloud host
    assert canary_seen == 0


def test_relay_junk_dropped_and_counted(lab: OverlayLab) -> None:
    before = lab.status("trs")["counters"]
    code = (
        "import os, socket\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "for p in [b'\\x07\\x00\\x00\\x00' + os.urandom(8) + b'x' * 50,"
        " b'\\x05' + os.urandom(35), os.urandom(3)]:\n"
        "    s.sendto(p, ('198.51.100.10', 4503))\n"
    )
    run(lab, "p", sys.executable, "-c", code)
    time.sleep(0.3)
    after = lab.status("trs")["counters"]
    assert after["unknown_session"] > before["unknown_session"]
    dropped = ("bad_mac", "malformed", "unknown_session")
    assert sum(after[k] for k in dropped) >= sum(before[k] for k in dropped) + 2


def test_trs_restart_recovers(lab: OverlayLab) -> None:
    run(lab, "a1", "ping", "-c", "1", "-W", "2", "v6o.cyphonic.test")
    vip = lab.status("v6o")["vip4"]
    lab.stop("trs")
    lab.start_trs()
    t0 = time.monotonic()
    out = lab.topo.run(
        "a1", ["ping", "-c", "1", "-W", "1", "-w", "45", vip], check=False, timeout=60
    )
    assert out.returncode == 0, out.stdout
    print(
        f"TRS restarted: relayed tunnel back after {time.monotonic() - t0:.1f} s", file=sys.stderr
    )
