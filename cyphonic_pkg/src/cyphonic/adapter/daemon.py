"""The adapter daemon: CYPHONIC for unmodified general nodes on a downlink.

What it does (GCCE 2022 slides 15-17, DESIGN.md §2.7):

1. Asks AS for its general nodes (the paper's Information Request, ``gn_list``,
   authenticated by the adapter's own certificate) and repeats that every
   ``refresh_interval``; enrolls each GN (``gn_enroll``: the GN's keys are made
   here, in ``state_dir/general-nodes/<mac>/``, and never leave).
2. Runs one :class:`~cyphonic.node.daemon.NodeDaemon` per GN, each logged in and
   registered under the GN's own identity with its own keys, UDP port and TUN
   device, so GNs' keys and tunnels stay apart.  Packets *from* a GN's VIPs are
   policy-routed into its TUN; what its tunnels deliver goes back to the GN over
   the downlink's connected routes.
3. Configures the GNs: DHCPv4 (+ ARP proxy) and IPv6 Router Advertisements
   (M=1, O=1, prefix without SLAAC, RDNSS/DNSSL) + stateful DHCPv6 (+ ND proxy),
   all over AF_PACKET on the downlink, identifying a GN by the MAC of its frames.
4. Serves the GNs' DNS on its downlink addresses: CYPHONIC names trigger route
   selection under the identity of the GN that asked; the rest goes upstream.
5. Lets only registered MAC/VIP pairs send (nftables ingress filter on the downlink).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import logging
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from cryptography import x509

from cyphonic.adapter.arp_proxy import ArpProxy
from cyphonic.adapter.dhcpv4 import Dhcp4Server
from cyphonic.adapter.dhcpv6 import Dhcp6Server
from cyphonic.adapter.gn import AdapterAddressing, GeneralNode, GnTable
from cyphonic.adapter.leases import LeaseStore
from cyphonic.adapter.nd_proxy import NdProxy
from cyphonic.adapter.packet_io import (
    RawLink,
    UdpSink,
    ethertype_filter,
    ipv6_filter,
    serve,
    udp4_dst_port_filter,
)
from cyphonic.adapter.router_advertisement import RaSender
from cyphonic.auth.client import gn_enroll, gn_list, login
from cyphonic.config import AdapterConfig
from cyphonic.errors import ConfigError, CyphonicError
from cyphonic.netlink import LinuxNetlink
from cyphonic.node.daemon import GeneralNodeMode, NodeDaemon
from cyphonic.node.resolver import CyphonicResolver, LookupResult, LookupStatus, query_source
from cyphonic.node.signaling import cancel

log = logging.getLogger(__name__)

ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
TABLE_BASE = 20000  # policy-routing tables/rule priorities: TABLE_BASE + GN index
NFT_TABLE = "cyphonic_adapter"


GN_START_TIMEOUT = 20.0
CERT_RENEW_BEFORE = 30 * 86400.0


def _cert_usable(path: Path, now: float) -> bool:
    """A GN certificate that exists and is not within 30 days of expiry."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return False
    return cert.not_valid_after_utc.timestamp() - now > CERT_RENEW_BEFORE


def _sysctl(name: str, value: str) -> None:
    path = Path("/proc/sys") / name.replace(".", "/")
    try:
        path.write_text(value)
    except OSError as exc:
        raise CyphonicError(f"cannot set {name}={value}: {exc.strerror}") from exc


def _run(cmd: list[str], stdin: str | None = None) -> None:
    res = subprocess.run(cmd, input=stdin, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise CyphonicError(f"{' '.join(cmd[:3])} failed: {res.stderr.strip()[:300]}")


class AdapterDaemon:
    def __init__(self, cfg: AdapterConfig) -> None:
        self.cfg = cfg
        node = cfg.node
        if not (node.state_dir / "node.crt").exists():
            raise ConfigError(
                f"{node.path}: [node] state_dir: no certificate at {node.state_dir / 'node.crt'};"
                " enroll the adapter itself first (`cyphonic enroll`)"
            )
        mac_path = Path("/sys/class/net") / cfg.downlink / "address"
        try:
            self.downlink_mac = mac_path.read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"{node.path}: [adapter] downlink: no interface {cfg.downlink!r}"
            ) from exc
        self.table = GnTable()
        self.leases = LeaseStore(node.state_dir / "leases.json")
        self.gn_daemons: dict[str, NodeDaemon] = {}
        self.gn_index: dict[str, int] = self._load_index()
        self.generation = -1
        self.netlink = LinuxNetlink()
        self.addressing: AdapterAddressing | None = None
        self.resolver: CyphonicResolver | None = None
        self.links: list[RawLink] = []
        self.sinks: list[UdpSink] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.services: dict[str, Any] = {}
        self.started = time.time()
        self.refresh_errors = 0

    # -- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        node = self.cfg.node
        delay = 1.0
        while True:
            try:
                lr = await login(
                    node.as_host, node.as_port, node.ca_cert, node.state_dir, node.fqdn, node.domain
                )
                break
            except CyphonicError as exc:
                log.warning("adapter login to AS failed (retrying in %.0f s): %s", delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        self.addressing = AdapterAddressing.from_pools(
            self.downlink_mac, lr.vip4_pool, lr.vip6_pool, node.domain
        )
        await asyncio.to_thread(self._setup_downlink)
        self._start_services()
        await self.refresh()
        a = self.addressing
        self.resolver = CyphonicResolver(
            node.domain,
            self._lookup,
            node.resolver_upstream,
            ttl=node.resolver_ttl,
            lookup_timeout=node.lookup_timeout,
            coalesce_per_source=True,
        )
        await self.resolver.start([(str(a.router4), 53), (str(a.dns6), 53)])
        self._tasks.append(asyncio.create_task(self._refresh_loop()))
        log.info(
            "adapter %s up on %s: %d general nodes",
            node.fqdn,
            self.cfg.downlink,
            len(self.table.all()),
        )

    async def stop(self) -> None:
        ra = self.services.get("ra")
        link6 = self.services.get("link6")
        if isinstance(ra, RaSender) and isinstance(link6, RawLink):
            for frame in ra.withdraw():  # GNs drop the prefix at once
                with contextlib.suppress(OSError):
                    link6.send(frame)
        for t in self._tasks:
            await cancel(t)
        if self.resolver:
            await self.resolver.stop()
        for d in list(self.gn_daemons.values()):
            await d.stop()
        for link in self.links:
            link.close()
        for sink in self.sinks:
            sink.close()
        for i in self.gn_index.values():
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.netlink.remove_gn_rules, TABLE_BASE + i)

    # -- downlink ---------------------------------------------------------------------

    def _setup_downlink(self) -> None:
        a = self.addressing
        assert a is not None
        dl = self.cfg.downlink
        # the GNs' packets are routed (policy rules) into their TUNs: forwarding on;
        # accept_ra=2 keeps SLAAC working on uplinks although we forward
        _sysctl("net.ipv4.ip_forward", "1")
        for iface in sorted(p.name for p in Path("/proc/sys/net/ipv6/conf").iterdir()):
            if iface not in ("all", "default", "lo", dl):
                with contextlib.suppress(CyphonicError):
                    if (
                        Path(f"/proc/sys/net/ipv6/conf/{iface}/accept_ra").read_text().strip()
                        == "1"
                    ):
                        _sysctl(f"net.ipv6.conf.{iface}.accept_ra", "2")
        _sysctl("net.ipv6.conf.all.forwarding", "1")
        _sysctl(f"net.ipv6.conf.{dl}.accept_ra", "0")
        _sysctl(f"net.ipv6.conf.{dl}.router_solicitations", "0")
        _sysctl(f"net.ipv4.conf.{dl}.send_redirects", "0")
        # ARP on the downlink is the ARP proxy's: the kernel must not answer unknown MACs
        _sysctl(f"net.ipv4.conf.{dl}.arp_ignore", "8")
        _sysctl("net.ipv4.conf.all.send_redirects", "0")
        # strict reverse-path filtering would drop what the tunnels deliver (the peer VIPs'
        # route points at the downlink, not at the GN's TUN): loose mode
        if Path("/proc/sys/net/ipv4/conf/all/rp_filter").read_text().strip() == "1":
            _sysctl("net.ipv4.conf.all.rp_filter", "2")
        _run(["ip", "link", "set", dl, "up", "allmulticast", "on"])  # RS, NS, DHCPv6 groups
        _run(["ip", "addr", "replace", f"{a.router4}/{a.pool4.prefixlen}", "dev", dl])
        _run(["ip", "addr", "replace", f"{a.dns6}/{a.pool6.prefixlen}", "dev", dl, "nodad"])
        ll = f"{a.router6_ll}/64"
        subprocess.run(
            ["ip", "addr", "add", ll, "dev", dl, "nodad"], capture_output=True, check=False
        )  # present already when the kernel made it (EUI-64)

    def _start_services(self) -> None:
        a = self.addressing
        assert a is not None
        dl = self.cfg.downlink
        dhcp4 = Dhcp4Server(
            self.table,
            a,
            self.leases,
            lease_time=self.cfg.lease_time,
            domain=self.cfg.node.domain,
            mtu=self.cfg.node.mtu,
        )
        arp = ArpProxy(self.table, a)
        ra = RaSender(
            a, interval=(0.33 * self.cfg.ra_interval, self.cfg.ra_interval), mtu=self.cfg.node.mtu
        )
        nd = NdProxy(self.table, a, answer_dns6=False)
        dhcp6 = Dhcp6Server(
            self.table, a, self.leases, preferred=self.cfg.lease_time, valid=2 * self.cfg.lease_time
        )
        link_arp = RawLink(dl, [ETH_P_ARP], bpf=ethertype_filter([ETH_P_ARP]))
        link_dhcp4 = RawLink(dl, [0x0800], bpf=udp4_dst_port_filter(67))
        # only RS (133), NS (135) and DHCPv6 (547) reach Python, not the GNs' data packets
        link6 = RawLink(dl, [ETH_P_IPV6], bpf=ipv6_filter((133, 135), (547,)))
        self.links = [link_arp, link_dhcp4, link6]
        # the services read through packet sockets; these keep the kernel from answering
        # unicast DHCP(v6) with ICMP port unreachable
        self.sinks = [UdpSink(dl, 67).open(), UdpSink(dl, 547, socket.AF_INET6).open()]
        self.services = {
            "dhcp4": dhcp4,
            "arp": arp,
            "ra": ra,
            "nd": nd,
            "dhcp6": dhcp6,
            "link6": link6,
        }
        self._tasks += [
            asyncio.create_task(serve(link_arp, [arp.handle], clock=time.monotonic)),
            asyncio.create_task(serve(link_dhcp4, [dhcp4.handle])),
            asyncio.create_task(serve(link6, [ra.handle, nd.handle, dhcp6.handle])),
            asyncio.create_task(self._advertise(ra, link6)),
        ]

    async def _advertise(self, ra: RaSender, link: RawLink) -> None:
        while True:
            for frame in ra.periodic(time.time()):
                with contextlib.suppress(OSError):
                    link.send(frame)
            await asyncio.sleep(0.25)

    # -- general nodes ----------------------------------------------------------------

    def _load_index(self) -> dict[str, int]:
        path = self.cfg.node.state_dir / "general-nodes" / "index.json"
        try:
            data = json.loads(path.read_text())
            return {str(k): int(v) for k, v in data.items()}
        except (OSError, ValueError, AttributeError):
            return {}

    def _save_index(self) -> None:
        d = self.cfg.node.state_dir / "general-nodes"
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = d / "index.json.tmp"
        tmp.write_text(json.dumps(self.gn_index))
        tmp.replace(d / "index.json")

    def _gn_dir(self, mac: str) -> Path:
        return self.cfg.node.state_dir / "general-nodes" / mac.replace(":", "")

    async def refresh(self) -> None:
        """Information Request: fetch this adapter's GNs; start/stop their identities."""
        node = self.cfg.node
        generation, infos = await gn_list(
            node.as_host, node.as_port, node.ca_cert, node.state_dir, node.domain
        )
        if generation == self.generation:
            return
        nodes = [GeneralNode(i.mac, i.fqdn, i.vip4, i.vip6) for i in infos]
        wanted = {n.mac: n for n in nodes}
        for mac in list(self.gn_daemons):
            old = self.gn_daemons[mac]
            if mac not in wanted or wanted[mac].fqdn != old.cfg.fqdn:
                log.info("general node %s (%s) removed", mac, old.cfg.fqdn)
                await old.stop()
                del self.gn_daemons[mac]
                # its certificate died with the record on AS: enroll afresh if re-added
                (self._gn_dir(mac) / "node.crt").unlink(missing_ok=True)
        self.table.replace(nodes)
        await asyncio.to_thread(self._apply_filter)
        failed = 0
        for gn in nodes:
            if gn.mac not in self.gn_daemons:
                try:
                    await self._start_gn(gn)
                except (CyphonicError, TimeoutError) as exc:
                    failed += 1
                    log.warning("general node %s (%s) not started: %s", gn.mac, gn.fqdn, exc)
        if not failed:  # otherwise the next refresh tries the failed ones again
            self.generation = generation

    async def _start_gn(self, gn: GeneralNode) -> None:
        node = self.cfg.node
        gdir = self._gn_dir(gn.mac)
        if not _cert_usable(gdir / "node.crt", time.time()):
            await gn_enroll(
                node.as_host, node.as_port, node.ca_cert, node.state_dir, gdir, gn.fqdn, node.domain
            )
            log.info("enrolled general node %s as %s", gn.mac, gn.fqdn)
        if gn.mac not in self.gn_index:
            used = set(self.gn_index.values())
            self.gn_index[gn.mac] = next(i for i in range(1, 10000) if i not in used)
            self._save_index()
        i = self.gn_index[gn.mac]
        cfg = dataclasses.replace(
            node,
            fqdn=gn.fqdn,
            state_dir=gdir,
            port=self.cfg.gn_port_base + i - 1,
            tun_name=f"cyg{i}",
            resolver_listen=[],
            status_socket=gdir / "unused.sock",
        )
        daemon = NodeDaemon(cfg, general_node=GeneralNodeMode(self.cfg.downlink, TABLE_BASE + i))
        try:
            # one GN that cannot log in must not hold up the others (or the resolver)
            await asyncio.wait_for(daemon.start(), GN_START_TIMEOUT)
        except (TimeoutError, CyphonicError):
            await daemon.stop()
            (gdir / "node.crt").unlink(missing_ok=True)  # e.g. superseded: re-enroll next time
            raise
        self.gn_daemons[gn.mac] = daemon

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.refresh_interval)
            try:
                await self.refresh()
            except CyphonicError as exc:
                self.refresh_errors += 1
                log.warning("general-node refresh failed: %s", exc)

    def _apply_filter(self) -> None:
        """nftables on the downlink's ingress: only registered MAC/VIP pairs may send."""
        dl = self.cfg.downlink
        gns = self.table.all()
        e4 = ", ".join(f"{g.mac} . {g.vip4}" for g in gns)
        e6 = ", ".join(f"{g.mac} . {g.vip6}" for g in gns)
        sets = (
            "  set gn4 { type ether_addr . ipv4_addr; "
            + (f"elements = {{ {e4} }}; " if e4 else "")
            + "}\n  set gn6 { type ether_addr . ipv6_addr; "
            + (f"elements = {{ {e6} }}; " if e6 else "")
            + "}\n"
        )
        rules = (
            f"table netdev {NFT_TABLE}\ndelete table netdev {NFT_TABLE}\n"
            f"table netdev {NFT_TABLE} {{\n{sets}"
            f'  chain ingress {{\n    type filter hook ingress device "{dl}" priority 0; '
            "policy accept;\n"
            "    ether type arp arp saddr ether . arp saddr ip @gn4 accept\n"
            "    ether type arp arp saddr ip 0.0.0.0 accept\n"
            "    ether type arp counter name spoofed_arp drop\n"
            "    ip saddr 0.0.0.0 udp dport 67 accept\n"
            "    ether saddr . ip saddr @gn4 accept\n"
            "    ether type ip counter name spoofed_ip drop\n"
            "    ip6 saddr :: accept\n"
            "    ip6 saddr fe80::/10 accept\n"
            "    ether saddr . ip6 saddr @gn6 accept\n"
            "    ether type ip6 counter name spoofed_ip6 drop\n"
            "  }\n"
            "  counter spoofed_arp { }\n  counter spoofed_ip { }\n  counter spoofed_ip6 { }\n"
            "}\n"
        )
        _run(["nft", "-f", "-"], stdin=rules)

    # -- DNS on behalf of the asking GN ------------------------------------------------

    async def _lookup(self, fqdn: str, want: int) -> LookupResult:
        src = query_source.get()
        gn = None
        if src is not None:
            with contextlib.suppress(ValueError):
                ip = ipaddress.ip_address(src[0].split("%")[0])
                gn = self.table.by_vip4(ip) if ip.version == 4 else self.table.by_vip6(ip)
        daemon = self.gn_daemons.get(gn.mac) if gn is not None else None
        if daemon is None:
            return LookupResult(LookupStatus.SERVFAIL, ())
        return await daemon._lookup(fqdn, want)

    # -- status -----------------------------------------------------------------------

    def _filter_counters(self) -> dict[str, int]:
        res = subprocess.run(
            ["nft", "-j", "list", "counters", "table", "netdev", NFT_TABLE],
            capture_output=True,
            text=True,
            check=False,
        )
        out: dict[str, int] = {}
        with contextlib.suppress(ValueError, KeyError, TypeError):
            for item in json.loads(res.stdout)["nftables"]:
                c = item.get("counter")
                if c:
                    out[c["name"]] = int(c["packets"])
        return out

    def status(self) -> dict[str, Any]:
        gns = []
        for g in self.table.all():
            d = self.gn_daemons.get(g.mac)
            st = d.status() if d else {}
            gns.append(
                {
                    "mac": g.mac,
                    "fqdn": g.fqdn,
                    "vip4": str(g.vip4),
                    "vip6": str(g.vip6),
                    "lease4": self.leases.get("dhcp4", g.mac),
                    "lease6": self.leases.get("dhcp6", g.mac),
                    "registered": st.get("registered", False),
                    "peers": st.get("peers", []),
                    "counters": st.get("counters", {}),
                }
            )
        services: dict[str, Any] = {}
        for name in ("dhcp4", "arp", "ra", "nd", "dhcp6"):
            svc = self.services.get(name)
            stats: Any = getattr(svc, "counters", None) or getattr(svc, "stats", None)
            if stats is not None and hasattr(stats, "as_dict"):
                stats = stats.as_dict()
            elif dataclasses.is_dataclass(stats) and not isinstance(stats, type):
                stats = dataclasses.asdict(stats)
            services[name] = stats
        return {
            "role": "adapter",
            "fqdn": self.cfg.node.fqdn,
            "downlink": self.cfg.downlink,
            "registered": self.generation >= 0
            and all(d.registered for d in self.gn_daemons.values()),
            "generation": self.generation,
            "refresh_errors": self.refresh_errors,
            "general_nodes": gns,
            "services": services,
            "filter": self._filter_counters(),
            "uptime": round(time.time() - self.started, 1),
        }
