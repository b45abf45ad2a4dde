"""Issue [2/6] rows of the decision table across NAPT routers (nftables masquerade).

    inet (198.51.100.0/24, 2001:db8:100::/64): cloud, p (public, dual stack)
    ra (NAPT, WAN 198.51.100.2) -- LAN 10.10.1.0/24: a1, a2   (IPv4 only)
    rb (NAPT, WAN 198.51.100.3) -- LAN 10.10.2.0/24: b1       (IPv4 only)
"""

from __future__ import annotations

import os
import subprocess
import sys
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
]
ROUTERS = [
    RouterSpec("ra", "198.51.100.2", None, lan_v4="10.10.1.0/24"),
    RouterSpec("rb", "198.51.100.3", None, lan_v4="10.10.2.0/24"),
]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OverlayLab]:
    lab = OverlayLab(
        prefix=f"cyi{os.getpid() % 10000}",
        workdir=tmp_path_factory.mktemp("interconnect"),
        nodes=NODES,
        routers=ROUTERS,
        replace_stale=True,
        log=lambda m: print(m, file=sys.stderr),
    )
    try:
        lab.build()
        yield lab
    except BaseException:
        for name in ("cloud", *(n.name for n in NODES)):
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
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5002)); s.listen(1); print('ready', flush=True)
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
    vip = lab.status(dst)["vip4"]
    server = lab.topo.popen(dst, [sys.executable, "-c", SERVER, vip], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        sent = run(lab, src, sys.executable, "-c", CLIENT, vip, str(size)).split()
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
