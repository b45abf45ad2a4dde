#!/usr/bin/env python3
"""First benchmark of the overlay core (issue [1/6]).

Builds the namespace test bed (cloud + N nodes on one bridge), then measures, in
one run:

* route selection time (GCCE 2022 slide 19: the node receives the DNS query,
  then obtains the path from NMS = Direction Request -> Route Direction), one
  sample per ordered node pair;
* tunnel establishment time (generating the keys and exchanging them with the
  peer = Tunnel Request -> Tunnel Response, Noise IKpsk2);
* ping RTT over the overlay (VIPv4) vs the underlay (real IPv4);
* iperf3 TCP throughput over the overlay vs the underlay.

Every figure is the median of repeated runs.  ``--quick`` (used by
``make test``) runs few repetitions and asserts nothing about speed.  Results go
to ``bench/results/<date>-overlay-core.{md,json}``.
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

from cyphonic.testbed.overlay import NodeSpec, OverlayLab

HERE = Path(__file__).resolve().parent
PAPER = {  # GCCE 2022 slide 20, Raspberry Pi 4 (other hardware), CYPHONIC adapter v6 / v4
    "route_selection_ms": "14.21 / 19.74",
    "tunnel_establishment_ms": "2.38 / 2.75",
    "rtt_ms": "3.45 / 3.47",
    "tcp_mbit": "32.6 / 33.3",
}


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def ping_avg(lab: OverlayLab, host: str, dst: str, count: int) -> float:
    out = lab.topo.run(
        host, ["ping", "-c", str(count), "-i", "0.05", "-q", dst], check=True, timeout=120
    ).stdout
    m = re.search(r"= [\d.]+/([\d.]+)/", out)
    if not m:
        raise RuntimeError(f"cannot parse ping output: {out}")
    return float(m.group(1))


def iperf_tcp(lab: OverlayLab, client: str, dst: str, seconds: int) -> float:
    """One iperf3 TCP run against the server already listening on ``dst``."""
    last = ""
    for _ in range(50):
        r = lab.topo.run(
            client,
            ["iperf3", "-c", dst, "-t", str(seconds), "-J"],
            check=False,
            timeout=seconds + 60,
        )
        try:
            data = json.loads(r.stdout)
        except ValueError:
            data = {"error": r.stdout[-300:] + r.stderr[-300:]}
        if r.returncode == 0 and "error" not in data:
            return float(data["end"]["sum_received"]["bits_per_second"]) / 1e6
        last = str(data.get("error"))
        time.sleep(0.2)  # server not listening yet, or busy
    raise RuntimeError(f"iperf3 failed: {last}")


def iperf_servers(lab: OverlayLab, host: str, addrs: list[str]) -> list[subprocess.Popen[bytes]]:
    return [
        lab.topo.popen(
            host, ["iperf3", "-s", "-B", a], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        for a in addrs
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: few repetitions")
    ap.add_argument("--nodes", type=int, default=0, help="nodes (default 3 quick, 5 full)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        log("needs root (network namespaces)")
        return 1
    n_nodes = args.nodes or (3 if args.quick else 5)
    reps = 1 if args.quick else 3
    secs = 1 if args.quick else 5
    pings = 10 if args.quick else 100
    names = "abcdefghij"[:n_nodes]
    nodes = [
        NodeSpec(x, f"198.51.100.{20 + i}", f"2001:db8:100::{20 + i:x}")
        for i, x in enumerate(names)
    ]
    lab = OverlayLab(
        prefix=f"cyb{os.getpid() % 10000}",
        replace_stale=True,
        workdir=Path(tempfile.mkdtemp(prefix="cyphonic-bench-")),
        nodes=nodes,
        log=log,
    )
    results: dict[str, Any] = {}
    try:
        lab.build()
        route, tunnel = [], []
        log(f"route selection + tunnel establishment over {n_nodes * (n_nodes - 1) // 2} pairs")
        for i, src in enumerate(names):
            for dst in names[i + 1 :]:
                lab.topo.run(src, ["getent", "ahosts", f"{dst}.cyphonic.test"], check=True)
                for p in lab.status(src)["peers"]:
                    if p["fqdn"] == f"{dst}.cyphonic.test":
                        route.append(p["route_selection_ms"])
                        tunnel.append(p["tunnel_establishment_ms"])
        a, b = names[0], names[1]
        b_vip, b_real = lab.status(b)["vip4"], nodes[1].v4
        assert b_real is not None
        log("ping RTT overlay vs underlay")
        rtt_o = statistics.median(ping_avg(lab, a, b_vip, pings) for _ in range(reps))
        rtt_u = statistics.median(ping_avg(lab, a, b_real, pings) for _ in range(reps))
        log("iperf3 TCP overlay vs underlay")
        servers = iperf_servers(lab, b, [b_vip, b_real])
        try:
            tcp_o = statistics.median(iperf_tcp(lab, a, b_vip, secs) for _ in range(reps))
            tcp_u = statistics.median(iperf_tcp(lab, a, b_real, secs) for _ in range(reps))
        finally:
            for srv in servers:
                srv.terminate()
                srv.wait(10)
        results = {
            "date": dt.date.today().isoformat(),
            "quick": args.quick,
            "nodes": n_nodes,
            "route_selection_ms": {
                "median": statistics.median(route),
                "max": max(route),
                "samples": len(route),
            },
            "tunnel_establishment_ms": {
                "median": statistics.median(tunnel),
                "max": max(tunnel),
                "samples": len(tunnel),
            },
            "rtt_ms": {"overlay": rtt_o, "underlay": rtt_u, "added": rtt_o - rtt_u},
            "tcp_mbit": {"overlay": tcp_o, "underlay": tcp_u, "ratio": tcp_o / tcp_u},
        }
    except BaseException:
        for name in ("cloud", *names):
            print(f"--- {name} ---\n{lab.tail(name)}", file=sys.stderr)
        raise
    finally:
        lab.destroy()

    r = results
    table = "\n".join(
        [
            "| figure | this machine (median) | underlay / limit | paper, RPi 4 (v6 / v4) |",
            "|---|---|---|---|",
            f"| route selection time | {r['route_selection_ms']['median']:.2f} ms "
            f"(n={r['route_selection_ms']['samples']}) | - | {PAPER['route_selection_ms']} ms |",
            f"| tunnel establishment time | {r['tunnel_establishment_ms']['median']:.2f} ms | - | "
            f"{PAPER['tunnel_establishment_ms']} ms |",
            f"| ping RTT | {r['rtt_ms']['overlay']:.3f} ms | {r['rtt_ms']['underlay']:.3f} ms "
            f"(added {r['rtt_ms']['added']:.3f} ms) | {PAPER['rtt_ms']} ms |",
            f"| iperf3 TCP | {r['tcp_mbit']['overlay']:.0f} Mbit/s | "
            f"{r['tcp_mbit']['underlay']:.0f} Mbit/s ({r['tcp_mbit']['ratio']:.3f}x) | "
            f"{PAPER['tcp_mbit']} Mbit/s |",
        ]
    )
    print(table)
    if not args.quick:
        out = HERE / "results"
        out.mkdir(exist_ok=True)
        stem = out / f"{r['date']}-overlay-core"
        stem.with_suffix(".json").write_text(json.dumps(r, indent=2) + "\n")
        stem.with_suffix(".md").write_text(
            f"# Overlay core benchmark, {r['date']}\n\nThe paper's column was measured on "
            "Raspberry Pi 4 boards (other hardware); ours on a 2-core VM, all namespaces on one "
            f"machine.\n\n{table}\n"
        )
        log(f"wrote {stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
