#!/usr/bin/env python3
"""Benchmark of inter-connectivity and mobility (issue [2/6]).

One run of the namespace test bed (cloud with AS/NMS/TRS, a public dual-stack
node, an IPv6-only node, nodes behind three NAPT routers) measures:

* time to fall back to TRS when hole punching fails (a filter on one NAPT);
* time until such a relayed tunnel is optimised to a direct path once the
  filter is lifted;
* the handover gap during a move (longest silence in a 10 ms ping stream while a
  node moves from behind NAT A to the IPv6-only network and back);
* iperf3 TCP throughput direct vs relayed.

Medians of the repetitions.  ``--quick`` is the smoke run used by ``make test``.
Results go to ``bench/results/<date>-interconnect.{md,json}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cyphonic.testbed.overlay import NodeSpec, OverlayLab, RouterSpec

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from overlay_core import iperf_servers, iperf_tcp  # noqa: E402


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def peer(lab: OverlayLab, name: str, fqdn: str) -> Any:
    for p in lab.status(name)["peers"]:
        if p["fqdn"] == fqdn:
            return p
    return None


def wait(pred: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise TimeoutError("condition not reached")


def block(lab: OverlayLab, router: str, wan: str, on: bool) -> None:
    if on:
        rules = (
            "table inet cyblock {\n chain blockfwd {\n"
            "  type filter hook forward priority -10; policy accept;\n"
            f"  ip saddr {wan} drop\n  ip daddr {wan} drop\n }}\n}}\n"
        )
        lab.topo.run(router, ["nft", "-f", "-"], input=rules)
    else:
        lab.topo.run(router, ["nft", "delete", "table", "inet", "cyblock"])


def fallback_and_optimise(lab: OverlayLab, mn: str, cn: str) -> tuple[float, float]:
    block(lab, "rc", "198.51.100.2", on=True)
    try:
        lab.topo.run(mn, ["ping", "-c", "1", "-W", "3", f"{cn}.cyphonic.test"])
        p = peer(lab, mn, f"{cn}.cyphonic.test")
        assert p["path"] == "relayed", p
    finally:
        block(lab, "rc", "198.51.100.2", on=False)
    wait(lambda: peer(lab, mn, f"{cn}.cyphonic.test")["path"] == "punched", 30)
    p = peer(lab, mn, f"{cn}.cyphonic.test")
    return float(p["fallback_ms"]), float(p["optimised_ms"])


def handover_gaps(lab: OverlayLab, moves: int) -> list[float]:
    lab.topo.run("a1", ["ping", "-c", "1", "-W", "2", "p.cyphonic.test"])
    vip = lab.status("a1")["vip4"]
    # ping writes to a file: a pipe nobody reads fills up after ~700 lines and stalls ping
    out_file = lab.workdir / "handover-ping.txt"
    pinger = lab.topo.popen(
        "p", ["ping", "-D", "-i", "0.01", "-W", "1", vip], stdout=out_file.open("w"), text=True
    )
    marks = []
    try:
        time.sleep(1)
        for i in range(moves):
            marks.append(time.time())
            if i % 2 == 0:
                lab.topo.disconnect("a1", "lra")
                lab.topo.connect("a1", "inet", v6="2001:db8:100::99")
            else:
                lab.topo.disconnect("a1", "inet")
                lab.topo.connect("a1", "lra", v4="10.10.1.10")
            time.sleep(3)
    finally:
        pinger.send_signal(signal.SIGINT)  # ping flushes its output and exits
        pinger.wait(timeout=10)
    out = out_file.read_text()
    stamps = [
        float(line[1 : line.index("]")])
        for line in out.splitlines()
        if line.startswith("[") and "bytes from" in line
    ]
    gaps = []
    for m in marks:  # the longest silence in the 3 s after each move
        window = [s for s in stamps if m - 0.5 <= s <= m + 3]
        gaps.append(max((b - a for a, b in itertools.pairwise(window)), default=3.0) * 1000)
    return gaps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        log("needs root (network namespaces)")
        return 1
    reps = 1 if args.quick else 3
    secs = 1 if args.quick else 5
    nodes = [
        NodeSpec("p", "198.51.100.50", "2001:db8:100::50"),
        NodeSpec("v6o", None, "2001:db8:100::60"),
        NodeSpec("a1", "10.10.1.10", None, lan="ra"),
        NodeSpec("a2", "10.10.1.11", None, lan="ra"),
        NodeSpec("c1", "10.10.3.10", None, lan="rc"),
        NodeSpec("c2", "10.10.3.11", None, lan="rc"),
    ]
    routers = [
        RouterSpec("ra", "198.51.100.2", None, lan_v4="10.10.1.0/24"),
        RouterSpec("rc", "198.51.100.4", None, lan_v4="10.10.3.0/24"),
    ]
    lab = OverlayLab(
        prefix=f"cyn{os.getpid() % 10000}",
        replace_stale=True,
        trs=True,
        workdir=Path(tempfile.mkdtemp(prefix="cyphonic-bench-")),
        nodes=nodes,
        routers=routers,
        log=log,
    )
    r: dict[str, Any] = {}
    try:
        lab.build()
        pairs = [("a2", "c1"), ("a2", "c2"), ("c2", "a1")][: 1 if args.quick else 3]
        log(f"fallback to TRS and route optimisation over {len(pairs)} pairs")
        fo = [fallback_and_optimise(lab, mn, cn) for mn, cn in pairs]
        log("throughput direct (a1 -> p, NAPT'd MN) vs relayed (a1 -> v6o, IPv4 <-> IPv6)")
        lab.topo.run("a1", ["ping", "-c", "1", "-W", "3", "v6o.cyphonic.test"])
        p_vip, v6o_vip = lab.status("p")["vip4"], lab.status("v6o")["vip4"]
        servers = iperf_servers(lab, "p", [p_vip]) + iperf_servers(lab, "v6o", [v6o_vip])
        try:
            lab.topo.run("a1", ["ping", "-c", "1", "-W", "3", p_vip])
            direct = statistics.median(iperf_tcp(lab, "a1", p_vip, secs) for _ in range(reps))
            relayed = statistics.median(iperf_tcp(lab, "a1", v6o_vip, secs) for _ in range(reps))
        finally:
            for s in servers:
                s.terminate()
                s.wait(10)
        log("handover gap: a1 moves NAT A -> IPv6-only -> NAT A ...")
        gaps = handover_gaps(lab, 2 if args.quick else 6)
        r = {
            "date": dt.date.today().isoformat(),
            "quick": args.quick,
            "fallback_ms": statistics.median(f for f, _ in fo),
            "optimise_ms": statistics.median(o for _, o in fo),
            "handover_gap_ms": statistics.median(gaps),
            "handover_gap_ms_max": max(gaps),
            "tcp_mbit": {"direct": direct, "relayed": relayed, "ratio": relayed / direct},
            "samples": {"fallback_optimise": fo, "gaps": gaps},
        }
    except BaseException:
        for name in ("cloud", "trs", *(n.name for n in nodes)):
            print(f"--- {name} ---\n{lab.tail(name)}", file=sys.stderr)
        raise
    finally:
        lab.destroy()
    table = "\n".join(
        [
            "| figure | this machine (median) |",
            "|---|---|",
            f"| time to fall back to TRS (punch fails) | {r['fallback_ms']:.0f} ms |",
            f"| relayed -> direct once the punch works | {r['optimise_ms']:.0f} ms |",
            f"| handover gap (move, 10 ms pings) | {r['handover_gap_ms']:.0f} ms "
            f"(max {r['handover_gap_ms_max']:.0f}) |",
            f"| TCP direct | {r['tcp_mbit']['direct']:.0f} Mbit/s |",
            f"| TCP relayed (TRS) | {r['tcp_mbit']['relayed']:.0f} Mbit/s "
            f"({r['tcp_mbit']['ratio']:.2f}x direct) |",
        ]
    )
    print(table)
    if not args.quick:
        out = HERE / "results"
        out.mkdir(exist_ok=True)
        stem = out / f"{r['date']}-interconnect"
        stem.with_suffix(".json").write_text(json.dumps(r, indent=2) + "\n")
        stem.with_suffix(".md").write_text(
            f"# Inter-connectivity benchmark, {r['date']}\n\nAll namespaces on one 2-core "
            f"machine; route optimisation probes every 2 s, punch timeout 1 s.\n\n{table}\n"
        )
        log(f"wrote {stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
