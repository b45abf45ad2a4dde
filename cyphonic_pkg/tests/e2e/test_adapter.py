"""The CYPHONIC adapter end to end, as root, with unmodified general nodes.

    inet: cloud (AS, NMS, TRS), n1 (a node, public dual stack), ad1 (adapter, public)
    ra (NAPT) -- LAN: ad2 (adapter behind NAT A)        rb (NAPT) -- LAN: ad3 (behind NAT B)
    ad1 downlink: g4 (ISC dhclient -4), g6 (ISC dhclient -6, kernel RA handling)
    ad2 downlink: ga (dhclient -4)                       ad3 downlink: gb (dhclient -4)

General nodes run nothing of ours: the kernel, ISC dhclient with the stock dhclient-script,
the system resolver (resolv.conf written by dhclient), ping and a plain Python TCP socket.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from cyphonic.testbed.overlay import (
    AdapterSpec,
    GeneralNodeSpec,
    NodeSpec,
    OverlayLab,
    RouterSpec,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="e2e tests need root (network namespaces)"),
    pytest.mark.skipif(shutil.which("dhclient") is None, reason="needs ISC dhclient"),
]

AD1 = AdapterSpec(
    "ad1",
    "198.51.100.30",
    "2001:db8:100::30",
    general_nodes=[
        GeneralNodeSpec("g4", "02:00:00:00:04:01"),
        GeneralNodeSpec("g6", "02:00:00:00:06:01"),
        GeneralNodeSpec("gx", "02:00:00:00:0f:01"),
        GeneralNodeSpec("gd", "02:00:00:00:0d:01"),
    ],
)
AD2 = AdapterSpec(
    "ad2", "10.10.1.30", None, lan="ra", general_nodes=[GeneralNodeSpec("ga", "02:00:00:00:0a:01")]
)
AD3 = AdapterSpec(
    "ad3", "10.10.2.30", None, lan="rb", general_nodes=[GeneralNodeSpec("gb", "02:00:00:00:0b:01")]
)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OverlayLab]:
    lab = OverlayLab(
        prefix=f"cya{os.getpid() % 10000}",
        workdir=tmp_path_factory.mktemp("adapter"),
        nodes=[NodeSpec("n1", "198.51.100.20", "2001:db8:100::20")],
        routers=[
            RouterSpec("ra", "198.51.100.2", None, lan_v4="10.10.1.0/24"),
            RouterSpec("rb", "198.51.100.3", None, lan_v4="10.10.2.0/24"),
        ],
        adapters=[AD1, AD2, AD3],
        replace_stale=True,
        trs=True,
        log=lambda m: print(m, file=sys.stderr),
    )
    try:
        lab.build()
        yield lab
    except BaseException:
        for name in ("cloud", "n1", "ad1", "ad2", "ad3"):
            print(f"--- {name} log ---\n{lab.tail(name)}", file=sys.stderr)
        raise
    finally:
        lab.destroy()


def run(lab: OverlayLab, host: str, *cmd: str, timeout: float = 60) -> str:
    return lab.topo.run(host, list(cmd), check=True, timeout=timeout).stdout


def dhclient(lab: OverlayLab, gn: str, family: int, want: str, timeout: float = 30) -> float:
    """Start ISC dhclient (foreground, stock dhclient-script) and wait for ``want`` on the
    interface; the seconds from start to configured address."""
    lab.topo.set_resolver(gn, "192.0.2.53")  # dhclient-script rewrites it in place (cat >)
    d = lab.workdir / f"dhclient-{gn}-{family}"
    d.mkdir(exist_ok=True)
    ifname = lab.topo.host(gn).ifname
    t0 = time.monotonic()
    lab.topo.popen(
        gn,
        [
            "dhclient",
            f"-{family}",
            "-d",
            "-v",
            "-lf",
            str(d / "leases"),
            "-pf",
            str(d / "pid"),
            ifname,
        ],
        stdout=(d / "log").open("w"),
        stderr=subprocess.STDOUT,
    )
    deadline = t0 + timeout
    while time.monotonic() < deadline:
        addrs = run(lab, gn, "ip", f"-{family}", "-o", "addr", "show", "dev", ifname)
        if f" {want}/" in addrs:
            took = time.monotonic() - t0
            dns = "10.64.0.1" if family == 4 else "fd43:5950::1"
            while time.monotonic() < deadline:  # dhclient-script writes resolv.conf next
                if f"nameserver {dns}" in run(lab, gn, "cat", "/etc/resolv.conf"):
                    return took
                time.sleep(0.02)
        time.sleep(0.02)
    raise AssertionError(f"{gn} got no {want}: {(d / 'log').read_text()[-1500:]}")


def gn_status(lab: OverlayLab, adapter: str, name: str) -> Any:
    for g in lab.status(adapter)["general_nodes"]:
        if g["fqdn"] == f"{name}.cyphonic.test":
            return g
    raise AssertionError(f"{name} unknown to {adapter}")


SERVER = r"""
import hashlib, socket, sys
s = socket.socket(socket.AF_INET6); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", 5005)); s.listen(1); print('ready', flush=True)
c, _ = s.accept(); h = hashlib.sha256(); n = 0
while (d := c.recv(1 << 16)):
    h.update(d); n += len(d)
print(n, h.hexdigest(), flush=True)
"""
CLIENT = r"""
import hashlib, os, socket, sys
data = os.urandom(int(sys.argv[3]))
fam = socket.AF_INET6 if sys.argv[2] == "6" else socket.AF_INET
addr = socket.getaddrinfo(sys.argv[1], 5005, fam, socket.SOCK_STREAM)[0][4]
s = socket.socket(fam); s.settimeout(30); s.connect(addr); s.sendall(data); s.close()
print(len(data), hashlib.sha256(data).hexdigest(), flush=True)
"""


def transfer(lab: OverlayLab, src: str, dst: str, family: int, size: int = 4 << 20) -> None:
    """sha256-checked TCP from ``src`` to ``dst`` by FQDN over the given family."""
    server = lab.topo.popen(dst, [sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        sent = run(
            lab, src, sys.executable, "-c", CLIENT, f"{dst}.cyphonic.test", str(family), str(size)
        ).split()
        assert server.stdout.readline().split() == sent
    finally:
        if server.poll() is None:
            server.kill()


def test_dhclient4_general_node_reaches_node_by_fqdn(lab: OverlayLab) -> None:
    g = gn_status(lab, "ad1", "g4")
    took = dhclient(lab, "g4", 4, g["vip4"])
    print(f"g4: link-up -> VIPv4 configured in {took * 1000:.0f} ms", file=sys.stderr)
    resolv = run(lab, "g4", "cat", "/etc/resolv.conf")
    assert "nameserver 10.64.0.1" in resolv and "cyphonic.test" in resolv
    t0 = time.monotonic()
    out = run(lab, "g4", "getent", "ahostsv4", "n1.cyphonic.test")
    first = time.monotonic() - t0
    assert lab.status("n1")["vip4"] in out
    run(lab, "g4", "ping", "-c", "3", "-i", "0.2", "-W", "2", "n1.cyphonic.test")
    transfer(lab, "g4", "n1", 4)
    peer = gn_status(lab, "ad1", "g4")["peers"][0]
    assert peer["fqdn"] == "n1.cyphonic.test" and peer["path"] == "direct"
    assert gn_status(lab, "ad1", "g4")["lease4"] is not None
    print(
        f"g4: first DNS answer for a CYPHONIC name {first * 1000:.1f} ms (incl. getent)",
        file=sys.stderr,
    )


def test_dhclient6_general_node_reaches_node_by_fqdn(lab: OverlayLab) -> None:
    g = gn_status(lab, "ad1", "g6")
    took = dhclient(lab, "g6", 6, g["vip6"])
    print(f"g6: link-up -> VIPv6 configured in {took * 1000:.0f} ms", file=sys.stderr)
    routes = run(lab, "g6", "ip", "-6", "route")
    assert "fd43:5950::/64" in routes  # on-link prefix from the RA (no SLAAC address)
    out = run(lab, "g6", "getent", "ahostsv6", "n1.cyphonic.test")
    assert lab.status("n1")["vip6"] in out
    run(lab, "g6", "ping", "-6", "-c", "3", "-i", "0.2", "-W", "2", "n1.cyphonic.test")
    neigh = run(lab, "g6", "ip", "-6", "neigh")
    assert lab.status("n1")["vip6"] in neigh  # resolved by the adapter's ND proxy
    transfer(lab, "g6", "n1", 6)


def test_node_reaches_general_node_by_fqdn(lab: OverlayLab) -> None:
    """Inbound session: a node asks for the general node's FQDN."""
    g = gn_status(lab, "ad1", "g4")
    out = run(lab, "n1", "getent", "ahostsv4", "g4.cyphonic.test")
    assert g["vip4"] in out
    run(lab, "n1", "ping", "-4", "-c", "2", "-i", "0.2", "-W", "2", "g4.cyphonic.test")
    transfer(lab, "n1", "g4", 4)


def test_general_nodes_behind_two_adapters_behind_two_nats(lab: OverlayLab) -> None:
    ga = gn_status(lab, "ad2", "ga")
    gb = gn_status(lab, "ad3", "gb")
    dhclient(lab, "ga", 4, ga["vip4"])
    dhclient(lab, "gb", 4, gb["vip4"])
    run(lab, "ga", "ping", "-4", "-c", "3", "-i", "0.2", "-W", "2", "gb.cyphonic.test")
    transfer(lab, "ga", "gb", 4)
    peer = gn_status(lab, "ad2", "ga")["peers"][0]
    assert peer["path"] in ("punched", "relayed")


def test_spoofed_vip_or_mac_is_dropped(lab: OverlayLab) -> None:
    """gx (registered MAC, no lease) puts g4's VIP on its interface: its packets never pass
    the adapter; nor do packets from an unregistered MAC."""
    g4 = gn_status(lab, "ad1", "g4")
    ifname = lab.topo.host("gx").ifname
    lab.topo.run("gx", ["ip", "addr", "add", f"{g4['vip4']}/16", "dev", ifname, "nodad"])
    before = lab.status("ad1")["filter"]
    out = lab.topo.run("gx", ["ping", "-c", "2", "-W", "1", lab.status("n1")["vip4"]], check=False)
    assert out.returncode != 0
    after = lab.status("ad1")["filter"]
    dropped = sum(after.values()) - sum(before.values())
    assert dropped > 0
    lab.topo.run("gx", ["ip", "addr", "del", f"{g4['vip4']}/16", "dev", ifname])


def test_general_node_added_later_is_picked_up(lab: OverlayLab) -> None:
    """The Information Request is repeated: a GN added on AS while the adapter runs gets an
    identity and a lease; removing it stops its identity."""
    mac = "02:00:00:00:04:02"
    lab.topo.add_host("g4b", "dad1", mac=mac, autoconf=True)
    lab.cli(
        "cloud",
        "general-node",
        "add",
        "--config",
        str(lab.cloud_config),
        "--mac",
        mac,
        "--fqdn",
        "g4b.cyphonic.test",
        "--adapter",
        "ad1.cyphonic.test",
    )
    lab.wait(
        lambda: any(
            g["fqdn"] == "g4b.cyphonic.test" and g["registered"]
            for g in lab.status("ad1")["general_nodes"]
        ),
        30,
        "g4b registered",
    )
    g = gn_status(lab, "ad1", "g4b")
    dhclient(lab, "g4b", 4, g["vip4"])
    run(lab, "g4b", "ping", "-c", "1", "-W", "3", "n1.cyphonic.test")
    lab.cli("cloud", "general-node", "remove", "--config", str(lab.cloud_config), mac)
    lab.wait(
        lambda: all(g["fqdn"] != "g4b.cyphonic.test" for g in lab.status("ad1")["general_nodes"]),
        30,
        "g4b removed",
    )


def test_adapter_restart_keeps_general_nodes_working(lab: OverlayLab) -> None:
    """Leases, keys and identities survive an adapter restart; the GN keeps its address and
    reaches the node again without doing anything."""
    g = gn_status(lab, "ad1", "g4")
    lab.stop("ad1")
    lab.start_adapter(AD1)
    lab.wait_registered("ad1", timeout=60)
    assert gn_status(lab, "ad1", "g4")["lease4"] is not None
    assert g["vip4"] in run(lab, "g4", "ip", "-4", "-o", "addr")
    out = lab.topo.run(
        "g4",
        ["ping", "-c", "1", "-W", "1", "-w", "20", "n1.cyphonic.test"],
        check=False,
        timeout=30,
    )
    assert out.returncode == 0, out.stdout


DHCPCD_CONF = """\
noipv4ll
ipv6rs
ia_na 1
duid ll
clientid
option rapid_commit
option domain_name_servers, domain_name, domain_search
require dhcp_server_identifier
nohook hostname
"""


@pytest.mark.skipif(shutil.which("dhcpcd") is None, reason="needs dhcpcd")
def test_dhcpcd_dual_stack_general_node(lab: OverlayLab) -> None:
    """dhcpcd configures both families (DHCPv4; RA + stateful DHCPv6) and the resolver."""
    g = gn_status(lab, "ad1", "gd")
    lab.topo.set_resolver("gd", "192.0.2.53")
    conf = lab.workdir / "dhcpcd-gd.conf"
    conf.write_text(DHCPCD_CONF)
    ifname = lab.topo.host("gd").ifname
    # dhcpcd keeps state under /run and /var/lib/dhcpcd: private tmpfs in its mount namespace
    script = (
        "mount -t tmpfs cya /run && mount -t tmpfs cya /var/lib/dhcpcd && "
        f"exec dhcpcd -B -t 30 -f {conf} {ifname}"
    )
    log = (lab.workdir / "dhcpcd-gd.log").open("w")
    lab.topo.popen("gd", ["sh", "-c", script], stdout=log, stderr=subprocess.STDOUT)
    t0 = time.monotonic()

    def configured() -> bool:
        addrs = run(lab, "gd", "ip", "-o", "addr", "show", "dev", ifname)
        return f" {g['vip4']}/" in addrs and f" {g['vip6']}/" in addrs

    lab.wait(configured, 40, "dhcpcd to configure both VIPs")
    print(f"gd (dhcpcd): both VIPs in {(time.monotonic() - t0) * 1000:.0f} ms", file=sys.stderr)
    lab.wait(
        lambda: "10.64.0.1" in run(lab, "gd", "cat", "/etc/resolv.conf"),
        20,
        "dhcpcd to write resolv.conf",
    )
    run(lab, "gd", "ping", "-4", "-c", "2", "-i", "0.2", "-W", "2", "n1.cyphonic.test")
    run(lab, "gd", "ping", "-6", "-c", "2", "-i", "0.2", "-W", "2", "n1.cyphonic.test")
    transfer(lab, "gd", "n1", 6)
