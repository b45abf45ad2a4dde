"""General nodes configured by the adapter's RAs and resolved through its ND proxy, for real.

Two general nodes (GNs) with fixed MACs run the kernel's own RA and ND handling (``autoconf``
hosts: accept_ra=1, IPv6 forwarding off) on one segment with an adapter namespace, where
:class:`~cyphonic.adapter.router_advertisement.RaSender` and
:class:`~cyphonic.adapter.nd_proxy.NdProxy` serve the link through
:class:`~cyphonic.adapter.packet_io.RawLink`.  Checked with the GNs' kernels and a tshark capture
in the adapter namespace:

* after the RA a GN has an on-link route for the VIP /64, no default route (router lifetime 0),
  no SLAAC address from the prefix (A=0) and the advertised MTU; the RA's flags and options as
  tshark decodes them (M=1, O=1, PIO L=1 A=0, RDNSS, DNSSL, source link-layer address), and a
  Router Solicitation answered with a unicast RA;
* a GN's ping to a peer VIPv6 (which fails: nothing forwards yet) resolves the peer to the
  adapter's MAC; so does the adapter's DNS address; a ping between the two GNs' VIPv6s resolves
  each to the other's real MAC (the proxy never answers for a GN);
* ``tshark -z expert`` finds no warning or error on the RA and NA packets, nothing is malformed;
* on shutdown the final RA (all lifetimes 0) removes the on-link route from the GNs.

The NS->NA latency is printed twice: inside ``handle()`` and on the wire (capture timestamps of
the NS arriving and the NA leaving the adapter's interface).  Prefix ``cyd6``; a crashed run is
cleaned with ``python -m cyphonic.testbed down --prefix cyd6``.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from functools import partial
from pathlib import Path

import pytest

from cyphonic.testbed.topology import Topology, wait_for

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        os.geteuid() != 0, reason="needs root: creates network namespaces and packet sockets"
    ),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2 (the ip command)"),
    pytest.mark.skipif(shutil.which("tshark") is None, reason="needs tshark for the capture"),
    pytest.mark.skipif(shutil.which("ping") is None, reason="needs ping (iputils)"),
]

PREFIX = "cyd6"
IFNAME = f"{PREFIX}-lan"  # in every host namespace: the interface to segment "lan"
POOL4, POOL6, DOMAIN = "10.77.0.0/24", "fd43:5950::/64", "cyphonic.test"
DNS6 = "fd43:5950::1"
MTU = 1420
ADAPTER_MAC = "02:cd:6e:00:00:01"
GNS = {
    "gn1": ("02:cd:6e:00:00:11", "fd43:5950::11", "10.77.0.11"),
    "gn2": ("02:cd:6e:00:00:12", "fd43:5950::12", "10.77.0.12"),
}
PEERS = [f"fd43:5950::{n:x}" for n in range(0x100, 0x108)]  # overlay peers, not on this link
SEQ_PEERS = [f"fd43:5950::{n:x}" for n in range(0x200, 0x214)]  # resolved one at a time
NO_FORWARDING = {"net.ipv6.conf.all.forwarding": "0", "net.ipv6.conf.default.forwarding": "0"}

# The adapter side: RA sender + ND proxy on a RawLink, as the adapter daemon will run them.
# Timers: serve() only dispatches frames, so a small task sends the RAs due at ra.deadline and is
# woken when a solicitation brings the deadline forward.  SIGTERM: the final RA (twice, §6.2.5),
# then the counters and latencies as JSON.
ADAPTER = textwrap.dedent(
    """
    import asyncio, contextlib, json, signal, sys, time
    from cyphonic.adapter.gn import AdapterAddressing, GeneralNode, GnTable
    from cyphonic.adapter.nd_proxy import NdProxy
    from cyphonic.adapter.packet_io import ETH_P_IPV6, RawLink, serve
    from cyphonic.adapter.router_advertisement import RaSender

    cfg = json.loads(sys.argv[1])

    async def main():
        addressing = AdapterAddressing.from_pools(
            cfg["mac"], cfg["pool4"], cfg["pool6"], cfg["domain"]
        )
        table = GnTable(GeneralNode(*gn) for gn in cfg["gns"])
        proxy = NdProxy(table, addressing)
        ra = RaSender(addressing, mtu=cfg["mtu"])
        link = RawLink(cfg["ifname"], [ETH_P_IPV6]).open()
        assert link.mac == addressing.downlink_mac_bytes, link.mac_str
        wake = asyncio.Event()

        def on_rs(frame, now):
            before = ra.deadline
            out = ra.handle(frame, now)
            if ra.deadline < before:
                wake.set()
            return out

        async def advertise():
            while True:
                for frame in ra.periodic(time.monotonic()):
                    link.send(frame)
                wake.clear()
                timeout = min(3600.0, max(0.0, ra.deadline - time.monotonic()))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), timeout)

        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        tasks = [
            asyncio.create_task(serve(link, [proxy.handle, on_rs], clock=time.monotonic)),
            asyncio.create_task(advertise()),
        ]
        print("ready", flush=True)
        await stop.wait()
        for task in tasks:
            task.cancel()
        final = ra.withdraw()
        for _ in range(2):
            for frame in final:
                link.send(frame)
            await asyncio.sleep(0.1)
        with open(cfg["stats"], "w") as f:
            json.dump(
                {
                    "nd": proxy.stats.as_dict(),
                    "ra": ra.stats.as_dict(),
                    "handle": proxy.answer_latency.summary(),
                    "link": link.stats,
                },
                f,
            )
        link.close()

    asyncio.run(main())
    """
)


def readline(proc: subprocess.Popen[str], stream: str, timeout: float) -> str:
    """One line from ``proc``'s stdout/stderr within ``timeout`` s, or fail with its stderr."""
    pipe = proc.stdout if stream == "stdout" else proc.stderr
    assert pipe is not None
    ready, _, _ = select.select([pipe], [], [], timeout)
    if not ready:
        proc.kill()
        _, err = proc.communicate(timeout=5)
        pytest.fail(f"no output from {proc.args!r} within {timeout} s; stderr: {err}")
    return pipe.readline()


def tshark_fields(pcap: Path, display_filter: str, *fields: str) -> list[list[str]]:
    argv = ["tshark", "-r", str(pcap), "-Y", display_filter, "-T", "fields", "-E", "separator=|"]
    for field in fields:
        argv += ["-e", field]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60).stdout
    return [line.split("|") for line in out.splitlines() if line]


def neighbours(topo: Topology, host: str) -> dict[str, str]:
    """``ip -6 neigh`` of ``host`` as {address: lladdr} (entries with a link-layer address)."""
    out = topo.run(host, ["ip", "-6", "-j", "neigh", "show", "dev", IFNAME]).stdout
    return {e["dst"]: e["lladdr"] for e in json.loads(out or "[]") if "lladdr" in e}


def onlink_route(topo: Topology, host: str) -> list[dict[str, object]]:
    out = topo.run(host, ["ip", "-6", "-j", "route", "show", POOL6, "dev", IFNAME]).stdout
    return list(json.loads(out or "[]"))


def no_onlink_route(topo: Topology, host: str) -> bool:
    return not onlink_route(topo, host)


def ping_all(topo: Topology, host: str, targets: list[str]) -> None:
    """One ping to each target, in parallel (most fail: nothing forwards yet)."""
    script = " ".join(f"ping -6 -n -c1 -W1 {t} >/dev/null 2>&1 &" for t in targets) + " wait"
    topo.run(host, ["sh", "-c", script], check=False)


def ping_each(topo: Topology, host: str, targets: list[str]) -> None:
    """One ping to each target, one after the other: NS->NA on an otherwise idle link."""
    script = "; ".join(f"ping -6 -n -c1 -W0.1 {t} >/dev/null 2>&1" for t in targets)
    topo.run(host, ["sh", "-c", script], check=False)


def test_ra_configures_gns_and_nd_proxy_answers_for_peers(tmp_path: Path) -> None:
    pcap = tmp_path / "cap.pcap"
    stats_file = tmp_path / "stats.json"
    script = tmp_path / "adapter.py"
    script.write_text(ADAPTER, encoding="utf-8")
    with Topology(PREFIX, replace_stale=True) as topo:
        lan = topo.add_segment("lan")
        topo.add_host("adapter", lan, mac=ADAPTER_MAC, sysctls=NO_FORWARDING)

        # Capture in the adapter namespace, without promiscuous mode (-p): what the adapter sees.
        cap = topo.popen(
            "adapter",
            ["tshark", "-p", "-i", IFNAME, "-F", "pcap", "-w", str(pcap), "-f", "icmp6"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        while "Capturing on" not in readline(cap, "stderr", 15):
            pass

        cfg = {
            "ifname": IFNAME,
            "mac": ADAPTER_MAC,
            "pool4": POOL4,
            "pool6": POOL6,
            "domain": DOMAIN,
            "mtu": MTU,
            "stats": str(stats_file),
            "gns": [[mac, f"{name}.{DOMAIN}", v4, v6] for name, (mac, v6, v4) in GNS.items()],
        }
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
        adapter = topo.popen(
            "adapter",
            [sys.executable, str(script), json.dumps(cfg)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert readline(adapter, "stdout", 15).strip() == "ready"

        # The GNs join after the adapter is up: their kernels' Router Solicitations get answers.
        for name, (mac, _, _) in GNS.items():
            topo.add_host(name, lan, mac=mac, autoconf=True, sysctls=NO_FORWARDING)

        for name in GNS:
            routes = wait_for(partial(onlink_route, topo, name), 10, what=f"RA route on {name}")
            # the kernel's prefix route from the PIO (addrconf_prefix_rcv): on-link, no gateway,
            # expiring with the advertised valid lifetime (30 days)
            route = routes[0]
            assert "gateway" not in route and int(str(route["expires"])) > 2_500_000, routes
            # router lifetime 0: the adapter is no default router
            default = topo.run(name, ["ip", "-6", "route", "show", "default"]).stdout
            assert default.strip() == "", default
            # A=0: no SLAAC address from the prefix
            addrs = topo.run(name, ["ip", "-6", "-o", "addr", "show", "scope", "global"]).stdout
            assert "fd43:5950" not in addrs, addrs
            # the MTU option (RFC 4861 §4.6.4) reached the kernel
            mtu = topo.run(name, ["cat", f"/proc/sys/net/ipv6/conf/{IFNAME}/mtu"]).stdout
            assert int(mtu) == MTU

        # The VIPv6s as stateful DHCPv6 would assign them (IA_NA addresses are /128).
        for name, (_, vip6, _) in GNS.items():
            topo.run(name, ["ip", "-6", "addr", "add", f"{vip6}/128", "dev", IFNAME, "nodad"])

        gn1_mac, gn1_vip, _ = GNS["gn1"]
        gn2_mac, gn2_vip, _ = GNS["gn2"]
        ping_all(topo, "gn1", [*PEERS, DNS6])
        ping_all(topo, "gn2", PEERS[:2])
        ping_each(topo, "gn1", SEQ_PEERS)
        assert (
            topo.run("gn1", ["ping", "-6", "-n", "-c1", "-W2", gn2_vip], check=False).returncode
            == 0
        )
        assert (
            topo.run("gn2", ["ping", "-6", "-n", "-c1", "-W2", gn1_vip], check=False).returncode
            == 0
        )

        seen1, seen2 = neighbours(topo, "gn1"), neighbours(topo, "gn2")
        for peer in [*PEERS, *SEQ_PEERS, DNS6]:
            assert seen1.get(peer) == ADAPTER_MAC, (peer, seen1)
        for peer in PEERS[:2]:
            assert seen2.get(peer) == ADAPTER_MAC, (peer, seen2)
        # the never-answer rule: a GN's VIPv6 resolves to that GN's own MAC
        assert seen1.get(gn2_vip) == gn2_mac, seen1
        assert seen2.get(gn1_vip) == gn1_mac, seen2
        for seen in (seen1, seen2):
            via_adapter = {a for a, mac in seen.items() if mac == ADAPTER_MAC}
            assert not via_adapter & {gn1_vip, gn2_vip}, seen

        # Shutdown: the final RA takes the on-link prefix away again (§6.2.5, §6.3.4).
        adapter.send_signal(signal.SIGTERM)
        assert adapter.wait(timeout=10) == 0, adapter.stderr.read() if adapter.stderr else ""
        for name in GNS:
            wait_for(partial(no_onlink_route, topo, name), 5, what=f"route gone on {name}")
        time.sleep(0.3)
        cap.send_signal(signal.SIGINT)
        cap.wait(timeout=15)

    stats = json.loads(stats_file.read_text())
    nd, ra = stats["nd"], stats["ra"]
    assert nd["answered"] >= len(PEERS) + len(SEQ_PEERS) + 1 + 2
    # gn1 resolving gn2, refused by the proxy (gn2 learnt gn1's MAC from that NS: no second one)
    assert nd["gn_target"] >= 1
    assert nd["malformed"] == nd["internal_error"] == ra["internal_error"] == 0
    assert ra["solicited_unicast"] >= 1, ra  # the GNs' kernels solicited at link-up
    assert ra["malformed"] == 0

    # --- the capture ---------------------------------------------------------------------
    ras = tshark_fields(
        pcap,
        "icmpv6.type == 134",
        "eth.src",
        "eth.dst",
        "ipv6.src",
        "ipv6.dst",
        "ipv6.hlim",
        "icmpv6.nd.ra.cur_hop_limit",
        "icmpv6.nd.ra.flag.m",
        "icmpv6.nd.ra.flag.o",
        "icmpv6.nd.ra.router_lifetime",
        "icmpv6.opt.prefix",
        "icmpv6.opt.prefix.length",
        "icmpv6.opt.prefix.flag.l",
        "icmpv6.opt.prefix.flag.a",
        "icmpv6.opt.prefix.valid_lifetime",
        "icmpv6.opt.rdnss",
        "icmpv6.opt.dnssl",
        "icmpv6.opt.src_linkaddr",
        "icmpv6.opt.mtu",
    )
    assert len(ras) >= 3, ras  # initial multicast, unicast answers, the final one(s)
    truthy = {"1", "True"}
    for (
        eth_src,
        eth_dst,
        ip_src,
        ip_dst,
        hlim,
        cur_hlim,
        m,
        o,
        lifetime,
        prefix,
        plen,
        flag_l,
        flag_a,
        _valid,
        rdnss,
        dnssl,
        lladdr,
        mtu,
    ) in ras:
        assert eth_src == ADAPTER_MAC and ip_src.startswith("fe80::") and hlim == "255"
        assert (cur_hlim, m in truthy, o in truthy, lifetime) == ("64", True, True, "0")
        assert (prefix, plen, flag_l in truthy, flag_a in truthy) == (
            "fd43:5950::",
            "64",
            True,
            False,
        )
        assert (rdnss, dnssl, lladdr, mtu) == (DNS6, DOMAIN, ADAPTER_MAC, str(MTU))
        assert (ip_dst == "ff02::1") == (eth_dst == "33:33:00:00:00:01")
    assert any(r[1] in {mac for mac, _, _ in GNS.values()} for r in ras), "no unicast RA"
    assert ras[-1][3] == "ff02::1" and ras[-1][13] == "0", ras[-1]  # the final RA

    nas = tshark_fields(
        pcap,
        f"icmpv6.type == 136 && eth.src == {ADAPTER_MAC}",
        "icmpv6.nd.na.flag.r",
        "icmpv6.nd.na.flag.s",
        "icmpv6.nd.na.flag.o",
        "icmpv6.opt.target_linkaddr",
        "ipv6.hlim",
    )
    assert len(nas) >= len(PEERS) + 1
    for r, s, o, tlla, hlim in nas:
        assert (r in truthy, s in truthy, o in truthy, tlla, hlim) == (
            False,
            True,
            True,
            ADAPTER_MAC,
            "255",
        )

    expert = subprocess.run(
        [
            "tshark",
            "-r",
            str(pcap),
            "-q",
            "-z",
            "expert,warn,icmpv6.type == 134 || icmpv6.type == 136",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert "Errors" not in expert and "Warns" not in expert and "Malformed" not in expert, expert
    malformed = tshark_fields(pcap, "_ws.malformed || _ws.expert.severity >= error", "frame.number")
    assert malformed == [], malformed

    # --- latency ---------------------------------------------------------------------------
    rows = tshark_fields(
        pcap,
        "icmpv6.type == 135 || icmpv6.type == 136",
        "frame.time_epoch",
        "eth.src",
        "eth.dst",
        "icmpv6.type",
        "icmpv6.nd.ns.target_address",
        "icmpv6.nd.na.target_address",
    )
    asked: dict[tuple[str, str], float] = {}  # (GN MAC, target) -> NS arrival
    burst_us: list[float] = []
    idle_us: list[float] = []
    for when, eth_src, eth_dst, kind, ns_target, na_target in rows:
        if kind == "135" and eth_src != ADAPTER_MAC:
            asked.setdefault((eth_src, ns_target), float(when))
        elif kind == "136" and eth_src == ADAPTER_MAC and (eth_dst, na_target) in asked:
            delay = (float(when) - asked.pop((eth_dst, na_target))) * 1e6
            (idle_us if na_target in SEQ_PEERS else burst_us).append(delay)
    assert len(idle_us) == len(SEQ_PEERS) and len(burst_us) >= len(PEERS) + 1
    h = stats["handle"]

    def summary(us: list[float]) -> str:
        return (
            f"median {statistics.median(us):.0f} µs, min {min(us):.0f} µs, max {max(us):.0f} µs "
            f"over {len(us)}"
        )

    print(
        f"\nNS->NA inside handle(): p50 {h['p50_us']:.1f} µs, p99 {h['p99_us']:.1f} µs, "
        f"max {h['max_us']:.1f} µs ({int(h['count'])} answers)"
        f"\nNS->NA on the wire (capture timestamps, NS in -> NA out):"
        f"\n  one at a time: {summary(idle_us)}"
        f"\n  bursts of parallel pings: {summary(burst_us)}"
    )
