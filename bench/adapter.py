#!/usr/bin/env python3
"""Benchmark of the CYPHONIC adapter (issue [3/6]) beside the paper's slide 20.

One run of the namespace test bed (cloud, node n1, adapter ad1 with general
nodes on its downlink that run ISC dhclient) measures, at the general node:

* time from link-up (client start) to a configured VIPv4 / VIPv6;
* DNS response time for a CYPHONIC name via the adapter, first query (route
  selection + tunnel establishment under the GN's identity) and repeated;
* ARP and NS->NA proxy response time (request sent by the GN until the answer);
* ping RTT GN -> node through the adapter and the overlay.

``--quick`` is the smoke run used by ``make test``.  Results go to
``bench/results/<date>-adapter.{md,json}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cyphonic.testbed.overlay import AdapterSpec, GeneralNodeSpec, NodeSpec, OverlayLab

HERE = Path(__file__).resolve().parent
PAPER = {  # GCCE 2022 slide 20 (Raspberry Pi 4 adapter; other hardware): IPv6 / IPv4
    "dns_first_ms": "23.57 / 28.00",
    "proxy_ms": "0.14 (NDP) / 0.32 (ARP)",
    "rtt_ms": "3.45 / 3.47",
}

DNS_PROBE = r"""
import socket, struct, sys, time, random
server, name, qtype, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
fam = socket.AF_INET6 if ":" in server else socket.AF_INET
out = []
for i in range(n):
    qid = random.randrange(65536)
    q = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    q += struct.pack("!HH", qtype, 1)
    s = socket.socket(fam, socket.SOCK_DGRAM); s.settimeout(10)
    t0 = time.perf_counter(); s.sendto(q, (server, 53)); s.recv(4096)
    out.append((time.perf_counter() - t0) * 1000); s.close()
print(" ".join(f"{x:.3f}" for x in out))
"""

NS_PROBE = r"""
import socket, struct, sys, time, ipaddress
ifname, target, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 255)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
s.settimeout(2)
mac = bytes.fromhex(open(f"/sys/class/net/{ifname}/address").read().strip().replace(":", ""))
t = ipaddress.IPv6Address(target)
snm = "ff02::1:ff" + t.exploded[-7:].replace(":", "")[:2] + ":" + t.exploded[-4:]
idx = socket.if_nametoindex(ifname)
out = []
for i in range(n):
    ns = struct.pack("!BBHI", 135, 0, 0, 0) + t.packed + bytes([1, 1]) + mac
    t0 = time.perf_counter(); s.sendto(ns, (snm, 0, 0, idx))
    while True:
        data, _ = s.recvfrom(2048)
        if data[0] == 136 and data[8:24] == t.packed:
            break
    out.append((time.perf_counter() - t0) * 1000)
    time.sleep(0.05)
print(" ".join(f"{x:.3f}" for x in out))
"""

ARP_PROBE = r"""
import socket, struct, sys, time, ipaddress
ifname, sender, target, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
s.bind((ifname, 0)); s.settimeout(2)
mac = bytes.fromhex(open(f"/sys/class/net/{ifname}/address").read().strip().replace(":", ""))
tip = ipaddress.IPv4Address(target).packed
req = (b"\xff" * 6 + mac + b"\x08\x06" + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac
       + ipaddress.IPv4Address(sender).packed + bytes(6) + tip)
out = []
for i in range(n):
    t0 = time.perf_counter(); s.send(req)
    while True:
        f = s.recv(2048)
        if f[12:14] == b"\x08\x06" and f[20:22] == b"\x00\x02" and f[28:32] == tip:
            break
    out.append((time.perf_counter() - t0) * 1000)
    time.sleep(0.05)
print(" ".join(f"{x:.3f}" for x in out))
"""


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def nums(text: str) -> list[float]:
    return [float(x) for x in text.split()]


def dhclient(lab: OverlayLab, gn: str, family: int, want: str) -> float:
    lab.topo.set_resolver(gn, "192.0.2.53")
    d = lab.workdir / f"dh-{gn}-{family}"
    d.mkdir(exist_ok=True)
    ifname = lab.topo.host(gn).ifname
    t0 = time.monotonic()
    lab.topo.popen(
        gn,
        ["dhclient", f"-{family}", "-d", "-lf", str(d / "leases"), "-pf", str(d / "pid"), ifname],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while time.monotonic() - t0 < 30:
        if f" {want}/" in lab.topo.run(gn, ["ip", f"-{family}", "-o", "addr"]).stdout:
            return (time.monotonic() - t0) * 1000
        time.sleep(0.005)
    raise TimeoutError(f"{gn}: no {want}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        log("needs root (network namespaces)")
        return 1
    reps = 3 if args.quick else 10
    gns = [GeneralNodeSpec(f"g{i}", f"02:00:00:00:10:{i:02x}") for i in range(1, 3)]
    lab = OverlayLab(
        prefix=f"cyq{os.getpid() % 10000}",
        replace_stale=True,
        workdir=Path(tempfile.mkdtemp(prefix="cyphonic-bench-")),
        nodes=[
            NodeSpec(f"n{i}", f"198.51.100.{20 + i}", f"2001:db8:100::{20 + i:x}")
            for i in range(1, 1 + (2 if args.quick else 6))
        ],
        adapters=[AdapterSpec("ad1", "198.51.100.30", "2001:db8:100::30", general_nodes=gns)],
        log=log,
    )
    r: dict[str, Any] = {}
    try:
        lab.build()
        st = {g["fqdn"]: g for g in lab.status("ad1")["general_nodes"]}
        g4, g6 = st["g1.cyphonic.test"], st["g2.cyphonic.test"]
        log("link-up -> configured address (ISC dhclient -4 / -6)")
        up4 = dhclient(lab, "g1", 4, g4["vip4"])
        up6 = dhclient(lab, "g2", 6, g6["vip6"])
        log("DNS at the general node: first query per peer (route selection) and repeated")
        first4, first6, again4, again6 = [], [], [], []
        nodes = [n for n in lab.nodes]
        for n in nodes:
            first4 += nums(
                lab.topo.run(
                    "g1", [sys.executable, "-c", DNS_PROBE, "10.64.0.1", n.fqdn, "1", "1"]
                ).stdout
            )
            again4 += nums(
                lab.topo.run(
                    "g1", [sys.executable, "-c", DNS_PROBE, "10.64.0.1", n.fqdn, "1", str(reps)]
                ).stdout
            )
            first6 += nums(
                lab.topo.run(
                    "g2", [sys.executable, "-c", DNS_PROBE, "fd43:5950::1", n.fqdn, "28", "1"]
                ).stdout
            )
            again6 += nums(
                lab.topo.run(
                    "g2", [sys.executable, "-c", DNS_PROBE, "fd43:5950::1", n.fqdn, "28", str(reps)]
                ).stdout
            )
        log("ARP and NS -> NA proxy response times")
        n1 = lab.status(nodes[0].name)
        arp = nums(
            lab.topo.run(
                "g1",
                [
                    sys.executable,
                    "-c",
                    ARP_PROBE,
                    lab.topo.host("g1").ifname,
                    g4["vip4"],
                    n1["vip4"],
                    str(reps * 3),
                ],
            ).stdout
        )
        nd = nums(
            lab.topo.run(
                "g2",
                [
                    sys.executable,
                    "-c",
                    NS_PROBE,
                    lab.topo.host("g2").ifname,
                    n1["vip6"],
                    str(reps * 3),
                ],
            ).stdout
        )
        log("ping RTT general node -> node")
        out4 = lab.topo.run(
            "g1", ["ping", "-c", str(reps * 5), "-i", "0.05", "-q", n1["vip4"]]
        ).stdout
        out6 = lab.topo.run(
            "g2", ["ping", "-6", "-c", str(reps * 5), "-i", "0.05", "-q", n1["vip6"]]
        ).stdout
        rtt4 = float(re.search(r"= [\d.]+/([\d.]+)/", out4).group(1))  # type: ignore[union-attr]
        rtt6 = float(re.search(r"= [\d.]+/([\d.]+)/", out6).group(1))  # type: ignore[union-attr]
        med = statistics.median
        r = {
            "date": dt.date.today().isoformat(),
            "quick": args.quick,
            "link_up_to_address_ms": {"v4": up4, "v6": up6},
            "dns_first_ms": {"v4": med(first4), "v6": med(first6)},
            "dns_repeated_ms": {"v4": med(again4), "v6": med(again6)},
            "proxy_ms": {"arp": med(arp), "nd": med(nd)},
            "rtt_ms": {"v4": rtt4, "v6": rtt6},
        }
    except BaseException:
        for name in ("cloud", "ad1"):
            print(f"--- {name} ---\n{lab.tail(name)}", file=sys.stderr)
        raise
    finally:
        lab.destroy()
    table = "\n".join(
        [
            "| figure (at the general node) | this machine, IPv6 / IPv4 (median) | paper, RPi 4 |",
            "|---|---|---|",
            f"| link-up -> configured VIP | {r['link_up_to_address_ms']['v6']:.0f} / "
            f"{r['link_up_to_address_ms']['v4']:.0f} ms | - |",
            f"| DNS, first query (route selection + tunnel) | {r['dns_first_ms']['v6']:.2f} / "
            f"{r['dns_first_ms']['v4']:.2f} ms | {PAPER['dns_first_ms']} ms |",
            f"| DNS, repeated | {r['dns_repeated_ms']['v6']:.2f} / "
            f"{r['dns_repeated_ms']['v4']:.2f} ms | - |",
            f"| NS->NA / ARP proxy | {r['proxy_ms']['nd']:.3f} / {r['proxy_ms']['arp']:.3f} ms | "
            f"{PAPER['proxy_ms']} ms |",
            f"| ping RTT GN -> node | {r['rtt_ms']['v6']:.3f} / {r['rtt_ms']['v4']:.3f} ms | "
            f"{PAPER['rtt_ms']} ms |",
        ]
    )
    print(table)
    if not args.quick:
        out = HERE / "results"
        out.mkdir(exist_ok=True)
        stem = out / f"{r['date']}-adapter"
        stem.with_suffix(".json").write_text(json.dumps(r, indent=2) + "\n")
        stem.with_suffix(".md").write_text(
            f"# Adapter benchmark, {r['date']}\n\nMeasured at the general node (a namespace "
            "running ISC dhclient); the paper's column is a Raspberry Pi 4 adapter (other "
            f"hardware).  Proxy times include the GN's own socket round trip.\n\n{table}\n"
        )
        log(f"wrote {stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
