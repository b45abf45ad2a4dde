"""End to end, as root: cloud + three nodes in namespaces, talking by FQDN.

Covers issue [1/6]'s evidence: resolution through the system resolver, ping over
VIPv4/VIPv6 both ways, a 50 MB sha256-checked TCP transfer, status JSON, NMS/AS
restart without losing registrations, and bad datagrams dropped and counted.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cyphonic.testbed.overlay import CLOUD_V4, UPSTREAM_RECORDS, NodeSpec, OverlayLab

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="e2e tests need root (network namespaces)"),
]

NODES = [
    # a rekeys every 3 s, so every test also exercises rekeying under traffic
    NodeSpec("a", "198.51.100.20", "2001:db8:100::20", extra="[tunnel]\nrekey_after = 3\n"),
    NodeSpec("b", "198.51.100.30", "2001:db8:100::30"),
    NodeSpec("c", "198.51.100.40", "2001:db8:100::40"),
]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OverlayLab]:
    lab = OverlayLab(
        prefix=f"cye{os.getpid() % 10000}",
        replace_stale=True,
        workdir=tmp_path_factory.mktemp("overlay"),
        nodes=NODES,
        log=lambda m: print(m, file=sys.stderr),
    )
    try:
        lab.build()
        yield lab
    except BaseException:
        for name in ("cloud", "a", "b", "c"):
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


def test_identity_and_registration(lab: OverlayLab) -> None:
    st = lab.status("a")
    assert st["fqdn"] == "a.cyphonic.test"
    assert st["registered"] is True
    assert st["vip4"].startswith("10.64.")
    assert st["vip6"].startswith("fd43:5950::")
    assert lab.status("b")["vip4"] != st["vip4"]


def test_system_resolver_resolves_peer_to_vips(lab: OverlayLab) -> None:
    b = lab.status("b")
    out = run(lab, "a", "getent", "ahosts", "b.cyphonic.test")
    addrs = {line.split()[0] for line in out.splitlines()}
    assert b["vip4"] in addrs and b["vip6"] in addrs
    assert run(lab, "a", "dig", "+short", "b.cyphonic.test", "A").strip() == b["vip4"]
    assert run(lab, "a", "dig", "+short", "b.cyphonic.test", "AAAA").strip() == b["vip6"]


def test_unknown_name_is_nxdomain(lab: OverlayLab) -> None:
    out = run(lab, "a", "dig", "nosuch.cyphonic.test", "A")
    assert "status: NXDOMAIN" in out


def test_other_names_go_upstream_udp_and_tcp(lab: OverlayLab) -> None:
    want = UPSTREAM_RECORDS["www.example.test"]
    assert run(lab, "a", "dig", "+short", "www.example.test").strip() == want
    assert run(lab, "a", "dig", "+tcp", "+short", "www.example.test").strip() == want


@pytest.mark.parametrize(("src", "dst"), [("a", "b"), ("b", "a")])
def test_ping_both_families_both_ways(lab: OverlayLab, src: str, dst: str) -> None:
    run(lab, src, "getent", "ahosts", f"{dst}.cyphonic.test")  # route selection + tunnel
    d = lab.status(dst)
    run(lab, src, "ping", "-c", "3", "-i", "0.2", "-W", "2", d["vip4"])
    run(lab, src, "ping", "-6", "-c", "3", "-i", "0.2", "-W", "2", d["vip6"])
    run(lab, src, "ping", "-c", "1", "-W", "2", f"{dst}.cyphonic.test")


SERVER = r"""
import hashlib, socket, sys
s = socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5001)); s.listen(1)
print('ready', flush=True)
c, _ = s.accept(); h = hashlib.sha256(); n = 0
while True:
    d = c.recv(1 << 16)
    if not d: break
    h.update(d); n += len(d)
print(n, h.hexdigest(), flush=True)
"""

CLIENT = r"""
import hashlib, random, socket, sys
rnd = random.Random(42); h = hashlib.sha256(); total = int(sys.argv[2])
s = socket.create_connection((sys.argv[1], 5001), timeout=30)
sent = 0
while sent < total:
    chunk = rnd.randbytes(min(1 << 16, total - sent))
    s.sendall(chunk); h.update(chunk); sent += len(chunk)
s.shutdown(socket.SHUT_WR); s.recv(1); s.close()
print(sent, h.hexdigest(), flush=True)
"""


@pytest.mark.parametrize("family", ["vip4", "vip6"])
def test_tcp_transfer_sha256(lab: OverlayLab, family: str) -> None:
    size = 50 * 1024 * 1024 if family == "vip4" else 5 * 1024 * 1024
    dst = lab.status("b")[family]
    server = lab.topo.popen(
        "b", [sys.executable, "-c", SERVER, dst], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ready"
        t0 = time.monotonic()
        sent = run(lab, "a", sys.executable, "-c", CLIENT, dst, str(size), timeout=120).split()
        took = time.monotonic() - t0
        received = server.stdout.readline().split()
        server.wait(30)
    finally:
        if server.poll() is None:
            server.kill()
    assert sent == received
    assert int(sent[0]) == size
    print(
        f"{size / 1e6:.0f} MB over {family} in {took:.2f} s ({size * 8 / took / 1e6:.0f} Mbit/s)",
        file=sys.stderr,
    )


def test_status_reports_peer_path_and_bytes(lab: OverlayLab) -> None:
    run(lab, "a", "ping", "-c", "1", "-W", "2", "b.cyphonic.test")
    p = peer(lab.status("a"), "b.cyphonic.test")
    assert p["path"] == "direct"
    assert p["reason"] == "common_family_public"
    assert p["endpoint"] in ("[2001:db8:100::30]:30000", "198.51.100.30:30000")
    assert p["rx_bytes"] > 0 and p["tx_bytes"] > 0
    assert p["last_handshake"] is not None
    assert p["route_selection_ms"] is not None and p["tunnel_establishment_ms"] is not None
    text = run(lab, "a", *lab_cmd(lab, "a"))
    assert "b.cyphonic.test" in text and "direct" in text


def lab_cmd(lab: OverlayLab, name: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cyphonic.cli",
        "status",
        "--socket",
        str(lab.status_socket(name)),
    ]


def _udp(lab: OverlayLab, host: str, dst: str, port: int, payloads: list[bytes]) -> None:
    fam = "AF_INET6" if ":" in dst else "AF_INET"
    code = (
        "import socket,sys\n"
        f"s=socket.socket(socket.{fam},socket.SOCK_DGRAM)\n"
        f"for p in {payloads!r}: s.sendto(p,({dst!r},{port}))\n"
    )
    run(lab, host, sys.executable, "-c", code)


def test_garbage_is_dropped_and_counted(lab: OverlayLab) -> None:
    before = lab.status("b")["counters"]
    nms_before = lab.status("cloud")["nms"]
    junk = [
        b"",
        b"\x04",
        b"\x04" + os.urandom(40),
        b"\x02" + os.urandom(123),
        b"\x03" + os.urandom(59),
        b"\x01" + os.urandom(50),
        b"\xff" * 30,
        os.urandom(1400),
    ]
    _udp(lab, "cloud", "198.51.100.30", 30000, junk)
    _udp(lab, "a", CLOUD_V4, 4502, junk)
    time.sleep(0.5)
    after = lab.status("b")["counters"]
    dropped = sum(
        after[k] - before[k]
        for k in ("malformed", "unknown_index", "handshake_failed", "auth_failed")
    )
    dropped += after["signaling"]["dropped"] - before["signaling"]["dropped"]
    assert dropped >= 6
    nms_after = lab.status("cloud")["nms"]
    assert (nms_after["malformed"] + nms_after["unknown_key"]) > (
        nms_before["malformed"] + nms_before["unknown_key"]
    )
    # still working
    run(lab, "a", "ping", "-c", "1", "-W", "2", "b.cyphonic.test")


CAPTURE = r"""
import socket, struct, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
s.bind((sys.argv[1], 0)); s.settimeout(1)
print('ready', flush=True)
deadline = time.time() + 20
while time.time() < deadline:
    try:
        f = s.recv(65535)
    except TimeoutError:
        continue
    eth = struct.unpack('!H', f[12:14])[0]
    if eth == 0x0800:
        ip = f[14:]; proto = ip[9]; udp = ip[(ip[0] & 15) * 4:]
    elif eth == 0x86DD:
        ip = f[14:]; proto = ip[6]; udp = ip[40:]
    else:
        continue
    if proto != 17 or struct.unpack('!H', udp[2:4])[0] != 30000:
        continue
    if udp[8] == 4 and len(udp) > 8 + 100:
        print('6' if eth == 0x86DD else '4', udp[8:].hex(), flush=True); break
"""


def test_replayed_and_tampered_data_are_refused(lab: OverlayLab) -> None:
    """Capture a real data datagram to b, replay it and a tampered copy from elsewhere."""
    b_if = lab.topo.host("b").ifname
    cap = lab.topo.popen(
        "b", [sys.executable, "-c", CAPTURE, b_if], stdout=subprocess.PIPE, text=True
    )
    try:
        assert cap.stdout is not None
        assert cap.stdout.readline().strip() == "ready"
        run(lab, "a", "ping", "-c", "2", "-s", "200", "-W", "2", lab.status("b")["vip4"])
        family, hexdata = cap.stdout.readline().split()
        datagram = bytes.fromhex(hexdata)
    finally:
        if cap.poll() is None:
            cap.kill()
    before = lab.status("b")["counters"]
    # a fresh counter (so the replay check passes) on a modified ciphertext / header
    counter = int.from_bytes(datagram[8:16], "big") + 100000
    fresh = datagram[:8] + counter.to_bytes(8, "big") + datagram[16:]
    tampered = bytearray(fresh)
    tampered[-5] ^= 0x40
    dst = "2001:db8:100::30" if family == "6" else "198.51.100.30"
    _udp(lab, "cloud", dst, 30000, [datagram, datagram, fresh, bytes(tampered)])
    time.sleep(0.5)
    after = lab.status("b")["counters"]
    assert after["replayed"] - before["replayed"] >= 2
    assert after["auth_failed"] - before["auth_failed"] >= 2
    # the peer's endpoint did not move to the attacker's address
    p = peer(lab.status("b"), "a.cyphonic.test")
    assert "198.51.100.10" not in p["endpoint"] and "::10]" not in p["endpoint"]


def test_cloud_restart_keeps_registrations(lab: OverlayLab) -> None:
    """Restart AS+NMS; a *new* direction right after needs both registrations from the store."""
    run(lab, "a", "ping", "-c", "1", "-W", "2", "b.cyphonic.test")
    lab.stop("cloud")
    # the data plane does not need the cloud
    run(lab, "a", "ping", "-c", "2", "-i", "0.2", "-W", "2", lab.status("b")["vip4"])
    lab.start_cloud()
    cloud = lab.status("cloud")
    assert cloud["registrations"] == 3 and cloud["nodes"] == 3
    c = lab.status("c")
    out = run(lab, "a", "getent", "ahosts", "c.cyphonic.test")
    assert c["vip4"] in out
    run(lab, "a", "ping", "-c", "2", "-i", "0.2", "-W", "2", c["vip4"])
    run(lab, "c", "ping", "-6", "-c", "2", "-i", "0.2", "-W", "2", lab.status("a")["vip6"])


def test_enrollment_token_reuse_refused(lab: OverlayLab) -> None:
    token = lab.cli(
        "cloud", "token", "create", "--config", str(lab.cloud_config), "--fqdn", "d.cyphonic.test"
    ).stdout.strip()
    cfg = Path(lab.node_config("a")).read_text().replace("a.cyphonic.test", "d.cyphonic.test")
    state = lab.workdir / "d"
    cfg = cfg.replace(str(lab.workdir / "a" / "state"), str(state / "state"))
    state.mkdir()
    (state / "node.toml").write_text(cfg)
    ok = lab.cli("a", "enroll", "--config", str(state / "node.toml"), "--token", token)
    assert "enrolled d.cyphonic.test" in ok.stdout
    again = lab.cli(
        "a", "enroll", "--config", str(state / "node.toml"), "--token", token, check=False
    )
    assert again.returncode == 1
    assert "already used" in again.stderr
    assert "Traceback" not in again.stderr
    forged = lab.cli(
        "a", "enroll", "--config", str(state / "node.toml"), "--token", "x" * 43, check=False
    )
    assert forged.returncode == 1 and "Traceback" not in forged.stderr


def test_nms_port_closed_to_plain_udp_probe(lab: OverlayLab) -> None:
    # a probe without a valid key gets no answer (no oracle for attackers)
    code = (
        "import socket\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.settimeout(1)\n"
        f"s.sendto(b'\\x01\\x00\\x00\\x00' + b'\\x00'*40, ({CLOUD_V4!r}, 4502))\n"
        "try:\n    s.recv(100); print('answered')\n"
        "except OSError:\n    print('silent')\n"
    )
    assert run(lab, "a", sys.executable, "-c", code).strip() == "silent"


def test_rekey_under_traffic_loses_nothing(lab: OverlayLab) -> None:
    run(lab, "a", "getent", "ahosts", "b.cyphonic.test")
    before = peer(lab.status("a"), "b.cyphonic.test")["handshakes"]
    out = run(
        lab, "a", "ping", "-c", "50", "-i", "0.2", "-W", "2", lab.status("b")["vip4"], timeout=60
    )
    assert " 0% packet loss" in out
    after = peer(lab.status("a"), "b.cyphonic.test")
    assert after["handshakes"] >= before + 2  # ~10 s of traffic, rekey every 3 s


def test_node_restart_recovers_without_dns(lab: OverlayLab) -> None:
    """b restarts (new keys, no peers): a keeps pinging b's VIP and the tunnel comes back
    on its own (a notices the silence; b asks NMS by VIP for replies)."""
    run(lab, "a", "ping", "-c", "1", "-W", "2", "b.cyphonic.test")
    b_vip = lab.status("b")["vip4"]
    lab.stop("b")
    lab.start_node(next(n for n in NODES if n.name == "b"))
    lab.wait_registered("b")
    t0 = time.monotonic()
    out = lab.topo.run(
        "a", ["ping", "-c", "1", "-W", "1", "-w", "40", b_vip], check=False, timeout=60
    )
    assert out.returncode == 0, out.stdout
    print(f"tunnel back {time.monotonic() - t0:.1f} s after b's restart", file=sys.stderr)
    # and from b's side, to a VIP it never resolved since its restart
    run(lab, "b", "ping", "-c", "1", "-W", "2", lab.status("a")["vip4"])


def test_simultaneous_lookups_both_ways(lab: OverlayLab) -> None:
    """b and c resolve each other at the same moment: two sessions, both tunnels usable."""
    p1 = lab.topo.popen("b", ["getent", "ahosts", "c.cyphonic.test"], stdout=subprocess.PIPE)
    p2 = lab.topo.popen("c", ["getent", "ahosts", "b.cyphonic.test"], stdout=subprocess.PIPE)
    assert p1.wait(20) == 0 and p2.wait(20) == 0
    run(lab, "b", "ping", "-c", "3", "-i", "0.2", "-W", "2", lab.status("c")["vip4"])
    run(lab, "c", "ping", "-6", "-c", "3", "-i", "0.2", "-W", "2", lab.status("b")["vip6"])


def test_node_logs_in_again_when_nms_forgets_it(lab: OverlayLab) -> None:
    """The cloud comes back without the nodes' keys and registrations (a restored backup):
    nodes notice their keepalives go unanswered, log in to AS again and re-register."""
    import sqlite3

    lab.stop("cloud")
    db = lab.workdir / "cloud" / "state" / "cyphonic.db"
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM registrations")
        conn.execute("DELETE FROM common_keys")
    lab.start_cloud()
    t0 = time.monotonic()
    lab.wait(lambda: lab.status("cloud")["registrations"] == 3, 60, "nodes registered again")
    print(f"nodes re-registered {time.monotonic() - t0:.1f} s after NMS lost them", file=sys.stderr)
    run(lab, "a", "ping", "-c", "1", "-W", "2", "c.cyphonic.test")
