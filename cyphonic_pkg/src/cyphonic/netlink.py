"""Netlink edge (pyroute2): addresses, links and routes of the node.

Kept behind ``Netlink`` so logic can be tested with ``FakeNetlink``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from typing import Protocol

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from cyphonic.errors import CyphonicError

log = logging.getLogger(__name__)


class Netlink(Protocol):
    def configure_tun(
        self,
        ifname: str,
        mtu: int,
        vip4: str,
        pool4: ipaddress.IPv4Network,
        vip6: str,
        pool6: ipaddress.IPv6Network,
    ) -> None: ...

    def real_addresses(self, exclude: set[str]) -> list[str]: ...

    def configure_gn_tun(
        self,
        ifname: str,
        mtu: int,
        downlink: str,
        vip4: str,
        pool4: ipaddress.IPv4Network,
        vip6: str,
        pool6: ipaddress.IPv6Network,
        table: int,
    ) -> None: ...


class LinuxNetlink:
    def configure_tun(
        self,
        ifname: str,
        mtu: int,
        vip4: str,
        pool4: ipaddress.IPv4Network,
        vip6: str,
        pool6: ipaddress.IPv6Network,
    ) -> None:
        """Put the VIPs on the TUN with the pools' prefix lengths (which routes the
        pools through it) and bring it up; idempotent across restarts."""
        try:
            with IPRoute() as ipr:
                idx = ipr.link_lookup(ifname=ifname)[0]
                ipr.link("set", index=idx, mtu=mtu)
                ipr.flush_addr(index=idx)
                ipr.addr("add", index=idx, address=vip4, prefixlen=pool4.prefixlen)
                # nodad: a VIP is unique by allocation; don't wait 1-2 s for DAD
                ipr.addr(
                    "add",
                    index=idx,
                    address=vip6,
                    prefixlen=pool6.prefixlen,
                    flags=0x02,  # IFA_F_NODAD
                )
                ipr.link("set", index=idx, state="up")
        except (NetlinkError, IndexError, OSError) as exc:
            raise CyphonicError(f"cannot configure {ifname}: {exc}") from exc

    def configure_gn_tun(
        self,
        ifname: str,
        mtu: int,
        downlink: str,
        vip4: str,
        pool4: ipaddress.IPv4Network,
        vip6: str,
        pool6: ipaddress.IPv6Network,
        table: int,
    ) -> None:
        """A general node's TUN on the adapter: no address of its own; packets *from* the
        general node's VIPs arriving on the downlink are policy-routed into it
        (``ip rule from VIP iif downlink lookup TABLE``, ``TABLE: pool dev TUN``).
        Replies written to the TUN reach the general node over the downlink's
        connected route.  Idempotent."""
        try:
            with IPRoute() as ipr:
                idx = ipr.link_lookup(ifname=ifname)[0]
                ipr.link("set", index=idx, mtu=mtu, state="up")
                for family, vip, pool in ((2, vip4, pool4), (10, vip6, pool6)):
                    for rule in ipr.get_rules(family=family, priority=table):
                        ipr.rule(
                            "del",
                            family=family,
                            priority=table,
                            table=rule.get_attr("FRA_TABLE") or table,
                        )
                    ipr.rule(
                        "add",
                        family=family,
                        priority=table,
                        table=table,
                        src=vip,
                        src_len=32 if family == 2 else 128,
                        iifname=downlink,
                    )
                    ipr.route("replace", dst=str(pool), oif=idx, table=table, family=family)
                    # anything else from the GN stops here (no VIP-sourced packets leak
                    # to the uplink): ICMP unreachable back to the GN
                    ipr.route(
                        "replace",
                        dst="0.0.0.0/0" if family == 2 else "::/0",
                        type="unreachable",
                        table=table,
                        family=family,
                    )
        except (NetlinkError, IndexError, OSError) as exc:
            raise CyphonicError(f"cannot configure {ifname} for a general node: {exc}") from exc

    def remove_gn_rules(self, table: int) -> None:
        with IPRoute() as ipr:
            for family in (2, 10):
                for _rule in ipr.get_rules(family=family, priority=table):
                    with contextlib.suppress(NetlinkError):
                        ipr.rule("del", family=family, priority=table, table=table)

    def real_addresses(self, exclude: set[str]) -> list[str]:
        """Global unicast addresses of the host, except those on ``exclude`` links."""
        out: list[str] = []
        with IPRoute() as ipr:
            names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
            for a in ipr.get_addr():
                if names.get(a["index"]) in exclude:
                    continue
                addr = a.get_attr("IFA_ADDRESS")
                if addr is None:
                    continue
                ip = ipaddress.ip_address(addr)
                if ip.is_loopback or ip.is_link_local or ip.is_multicast:
                    continue
                out.append(str(ip))
        return out


class FakeNetlink:
    def __init__(self, addresses: list[str] | None = None) -> None:
        self.addresses = addresses or []
        self.tun: dict[str, object] = {}

    def configure_tun(
        self,
        ifname: str,
        mtu: int,
        vip4: str,
        pool4: ipaddress.IPv4Network,
        vip6: str,
        pool6: ipaddress.IPv6Network,
    ) -> None:
        self.tun = {"ifname": ifname, "mtu": mtu, "vip4": vip4, "vip6": vip6}

    def real_addresses(self, exclude: set[str]) -> list[str]:
        return list(self.addresses)

    def configure_gn_tun(
        self,
        ifname: str,
        mtu: int,
        downlink: str,
        vip4: str,
        pool4: ipaddress.IPv4Network,
        vip6: str,
        pool6: ipaddress.IPv6Network,
        table: int,
    ) -> None:
        self.tun = {"ifname": ifname, "downlink": downlink, "vip4": vip4, "table": table}
