"""Naming, address planning and command plans of the test bed; no root needed.

A recording fake stands in for the command runner, so these tests see exactly what the
builder would run without running it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from cyphonic.errors import CyphonicError
from cyphonic.testbed.topology import (
    IFNAMSIZ,
    CommandError,
    Segment,
    Topology,
    TopologyError,
    WaitTimeout,
    check_prefix,
    destroy_prefix,
    host_sysctls,
    interface_mac,
    nat_ruleset,
    ns_name,
    parse_subnet4,
    parse_subnet6,
    plan_address,
    run_command,
    segment_sysctls,
    sysctl_script,
    wait_for,
)


class FakeRunner:
    """Records every command; ``ip netns list`` answers from ``namespaces``."""

    def __init__(self, namespaces: Sequence[str] = ()) -> None:
        self.namespaces = list(namespaces)
        self.calls: list[tuple[list[str], str | None]] = []

    def __call__(self, argv: Sequence[str], *, stdin: str | None = None) -> str:
        argv = list(argv)
        self.calls.append((argv, stdin))
        if argv == ["ip", "netns", "list"]:
            return "".join(f"{ns} (id: {i})\n" for i, ns in enumerate(self.namespaces))
        if argv[:3] == ["ip", "netns", "add"]:
            self.namespaces.append(argv[3])
        if argv[:3] == ["ip", "-force", "-batch"] and stdin:
            for line in stdin.splitlines():
                self.namespaces.remove(line.split()[-1])
        return ""

    def batches(self, ns: str) -> list[str]:
        """Every line of every ``ip -n ns -batch`` script, in order."""
        return [
            line
            for argv, stdin in self.calls
            if argv[:3] == ["ip", "-n", ns] and stdin
            for line in stdin.splitlines()
        ]

    def argvs(self) -> list[list[str]]:
        return [argv for argv, _ in self.calls]


@pytest.fixture
def fake() -> FakeRunner:
    return FakeRunner()


@pytest.fixture
def topo(fake: FakeRunner, tmp_path: Path) -> Iterator[Topology]:
    t = Topology("ut", runner=fake, etc_netns=tmp_path / "etc", run_netns=tmp_path / "run")
    yield t
    t.destroy()


# -- names -------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["c", "cyt1", "abcdefgh"])
def test_good_prefixes(prefix: str) -> None:
    assert check_prefix(prefix) == prefix


@pytest.mark.parametrize("prefix", ["", "1ab", "Cyt", "cy-t", "cy_t", "abcdefghi", "a b"])
def test_bad_prefixes(prefix: str) -> None:
    with pytest.raises(TopologyError, match="bad prefix"):
        check_prefix(prefix)


def test_ns_name_joins_prefix_and_name() -> None:
    assert ns_name("cyt1", "inet") == "cyt1-inet"
    assert ns_name("cyt1", "lan-a") == "cyt1-lan-a"


def test_ns_name_respects_ifnamsiz() -> None:
    assert len(ns_name("cyt1", "a" * (IFNAMSIZ - 5))) == IFNAMSIZ
    with pytest.raises(TopologyError, match="limited to 15"):
        ns_name("cyt1", "a" * (IFNAMSIZ - 4))


@pytest.mark.parametrize("name", ["", "-a", "A", "a b", "a/b", "a.b", "1a"])
def test_bad_names(name: str) -> None:
    with pytest.raises(TopologyError, match="bad name"):
        ns_name("cyt1", name)


def test_interface_mac_is_stable_local_unicast() -> None:
    mac = interface_mac("cyt1", "a", "inet")
    assert mac == interface_mac("cyt1", "a", "inet")
    assert mac != interface_mac("cyt1", "a", "lana")
    assert mac != interface_mac("cyt2", "a", "inet")
    first = int(mac.split(":")[0], 16)
    assert first & 0b10 and not first & 0b1  # locally administered, unicast
    assert len(mac.split(":")) == 6


# -- address planning --------------------------------------------------------------------------


def test_subnets_parse_and_reject_host_bits() -> None:
    assert str(parse_subnet4("198.51.100.0/24", "inet")) == "198.51.100.0/24"
    assert str(parse_subnet6("2001:db8:100::/64", "inet")) == "2001:db8:100::/64"
    assert parse_subnet4(None, "inet") is None
    with pytest.raises(TopologyError, match="bad IPv4 subnet"):
        parse_subnet4("198.51.100.1/24", "inet")
    with pytest.raises(TopologyError, match="not an IPv6 subnet"):
        parse_subnet6("198.51.100.0/24", "inet")


def test_plan_address_adds_prefix_length() -> None:
    net4 = parse_subnet4("198.51.100.0/24", "inet")
    net6 = parse_subnet6("2001:db8:100::/64", "inet")
    assert plan_address(net4, "198.51.100.10", 4, segment="inet", who="a") == "198.51.100.10/24"
    assert plan_address(net6, "2001:db8:100::10", 6, segment="inet", who="a") == (
        "2001:db8:100::10/64"
    )
    assert plan_address(net4, None, 4, segment="inet", who="a") is None


@pytest.mark.parametrize(
    ("address", "match"),
    [
        ("203.0.113.1", "outside segment inet"),
        ("198.51.100.0", "network or broadcast"),
        ("198.51.100.255", "network or broadcast"),
        ("2001:db8:100::1", "not an IPv4 address"),
        ("198.51.100.1/24", "not an IP address"),
        ("bogus", "not an IP address"),
    ],
)
def test_plan_address_rejects(address: str, match: str) -> None:
    net4 = parse_subnet4("198.51.100.0/24", "inet")
    with pytest.raises(TopologyError, match=match):
        plan_address(net4, address, 4, segment="inet", who="a")


def test_plan_address_needs_a_subnet() -> None:
    with pytest.raises(TopologyError, match="has no IPv6 subnet"):
        plan_address(None, "2001:db8::1", 6, segment="v4only", who="a")


def test_segment_nth_addresses() -> None:
    seg = Segment(
        "inet",
        "ut-inet",
        "ut-inet",
        parse_subnet4("198.51.100.0/24", "inet"),
        parse_subnet6("2001:db8:100::/64", "inet"),
    )
    assert seg.addr4(10) == "198.51.100.10"
    assert seg.addr6(16) == "2001:db8:100::10"
    with pytest.raises(TopologyError, match=r"outside 1\.\.254"):
        seg.addr4(255)
    with pytest.raises(TopologyError, match="outside"):
        seg.addr4(0)
    v6only = Segment("v6", "ut-v6", "ut-v6", None, parse_subnet6("2001:db8:6::/64", "v6"))
    with pytest.raises(TopologyError, match="no IPv4 subnet"):
        v6only.addr4(1)


# -- kernel settings and rulesets --------------------------------------------------------------


def test_host_sysctls_turn_off_dad_and_ra_and_forwarding() -> None:
    s = host_sysctls()
    assert s["net.ipv6.conf.default.accept_dad"] == "0"
    assert s["net.ipv6.conf.default.accept_ra"] == "0"
    assert s["net.ipv6.conf.default.router_solicitations"] == "0"
    assert s["net.ipv4.conf.all.forwarding"] == "0"
    assert "net.ipv6.conf.all.forwarding" not in s


def test_router_sysctls_forward_both_families() -> None:
    s = host_sysctls(router=True)
    for key in (
        "net.ipv4.conf.all.forwarding",
        "net.ipv6.conf.all.forwarding",
        "net.ipv6.conf.default.forwarding",
    ):
        assert s[key] == "1"


def test_autoconf_keeps_kernel_ra_defaults_and_extra_wins() -> None:
    s = host_sysctls(autoconf=True, extra={"net.ipv6.conf.default.accept_dad": "1"})
    assert not any("accept_ra" in k or "solicitations" in k for k in s)
    assert s["net.ipv6.conf.default.accept_dad"] == "1"


def test_segment_sysctls_disable_br_netfilter_when_loaded() -> None:
    assert "net.bridge.bridge-nf-call-iptables" not in segment_sysctls(br_netfilter=False)
    s = segment_sysctls(br_netfilter=True)
    assert s["net.bridge.bridge-nf-call-iptables"] == "0"
    assert s["net.bridge.bridge-nf-call-ip6tables"] == "0"
    assert s["net.ipv6.conf.all.disable_ipv6"] == "1"


def test_sysctl_script_writes_proc_sys() -> None:
    script = sysctl_script({"net.ipv6.conf.all.accept_dad": "0"})
    assert script == "set -e\necho 0 > /proc/sys/net/ipv6/conf/all/accept_dad\n"
    with pytest.raises(TopologyError, match="bad sysctl key"):
        sysctl_script({"net/../../etc/passwd": "0"})
    with pytest.raises(TopologyError, match="bad sysctl key"):
        sysctl_script({"net..x": "0"})


def test_nat_ruleset_masquerades_out_of_wan_and_filters_in() -> None:
    rules = nat_ruleset("ut-inet")
    assert "table inet " in rules  # one table for IPv4 and IPv6
    assert 'oifname "ut-inet" masquerade\n' in rules
    assert 'iifname "ut-inet" ct state established,related accept' in rules
    assert 'iifname "ut-inet" drop' in rules
    assert "fully-random" not in rules
    assert 'oifname "ut-inet" masquerade fully-random' in nat_ruleset("ut-inet", symmetric=True)


# -- the builder, against the fake runner -----------------------------------------------------


def test_segment_is_a_quiet_bridge_in_its_namespace(topo: Topology, fake: FakeRunner) -> None:
    inet = topo.add_segment("inet", v4="198.51.100.0/24", v6="2001:db8:100::/64")
    assert (inet.ns, inet.bridge) == ("ut-inet", "ut-inet")
    assert ["ip", "netns", "add", "ut-inet"] in fake.argvs()
    lines = fake.batches("ut-inet")
    assert "link set lo up" in lines
    (add,) = [x for x in lines if x.startswith("link add ut-inet type bridge")]
    for option in ("stp_state 0", "forward_delay 0", "mcast_snooping 0", "nf_call_iptables 0"):
        assert option in add


def test_host_gets_veth_addresses_and_lo(topo: Topology, fake: FakeRunner) -> None:
    inet = topo.add_segment("inet", v4="198.51.100.0/24", v6="2001:db8:100::/64")
    a = topo.add_host("a", inet, v4="198.51.100.11", v6="2001:db8:100::11")
    assert (a.ns, a.ifname, a.v4, a.v6) == ("ut-a", "ut-inet", "198.51.100.11", "2001:db8:100::11")
    assert a.mac == interface_mac("ut", "a", "inet")
    assert topo.host("a") is a
    assert fake.batches("ut-inet")[-2:] == [
        f"link add ut-a type veth peer name ut-inet address {a.mac} netns ut-a",
        "link set ut-a master ut-inet up",
    ]
    assert fake.batches("ut-a") == [
        "link set lo up",
        "link set ut-inet up",
        "address add 198.51.100.11/24 dev ut-inet",
        "address add 2001:db8:100::11/64 dev ut-inet nodad",
    ]
    # the kernel settings were written before the veth existed, so it inherits them
    order = [argv[:4] for argv in fake.argvs()]
    sysctl_at = order.index(["ip", "netns", "exec", "ut-a"])
    veth_at = max(i for i, (argv, s) in enumerate(fake.calls) if s and "peer name" in s)
    assert sysctl_at < veth_at


def test_single_family_hosts(topo: Topology, fake: FakeRunner) -> None:
    inet = topo.add_segment("inet", v4="198.51.100.0/24", v6="2001:db8:100::/64")
    v4 = topo.add_host("four", inet, v4="198.51.100.4")
    v6 = topo.add_host("six", inet, v6="2001:db8:100::6")
    assert (v4.v4, v4.v6, v6.v4, v6.v6) == ("198.51.100.4", None, None, "2001:db8:100::6")
    assert not any("nodad" in x for x in fake.batches("ut-four"))
    assert not any(x.startswith("address add 198") for x in fake.batches("ut-six"))


def test_bad_requests_fail_before_any_command(topo: Topology, fake: FakeRunner) -> None:
    inet = topo.add_segment("inet", v4="198.51.100.0/24")
    topo.add_host("a", inet, v4="198.51.100.11")
    before = len(fake.calls)
    with pytest.raises(TopologyError, match="already used by a"):
        topo.add_host("b", inet, v4="198.51.100.11")
    with pytest.raises(TopologyError, match="has no IPv6 subnet"):
        topo.add_host("b", inet, v6="2001:db8::1")
    with pytest.raises(TopologyError, match="already used in topology"):
        topo.add_host("a", inet, v4="198.51.100.12")
    with pytest.raises(TopologyError, match="already used in topology"):
        topo.add_host("inet", inet, v4="198.51.100.12")
    with pytest.raises(TopologyError, match="limited to 15"):
        topo.add_host("averyverylongname", inet)
    with pytest.raises(TopologyError, match="no segment 'nope'"):
        topo.add_host("b", "nope")
    assert len(fake.calls) == before


def test_router_becomes_gateway_of_lan_hosts(topo: Topology, fake: FakeRunner) -> None:
    inet = topo.add_segment("inet", v4="198.51.100.0/24", v6="2001:db8:100::/64")
    lan = topo.add_segment("lana", v4="10.10.1.0/24", v6="fd00:10:1::/64")
    early = topo.add_host("early", lan, v4="10.10.1.9", v6="fd00:10:1::9")
    assert not any("route" in x for x in fake.batches(early.ns))
    r = topo.add_router(
        "ra",
        wan=inet,
        wan_v4="198.51.100.2",
        wan_v6="2001:db8:100::2",
        lan=lan,
        lan_v4="10.10.1.1",
        lan_v6="fd00:10:1::1",
    )
    assert r.router and r.v4 == "198.51.100.2"
    assert r.interface("lana").v4 == "10.10.1.1"
    assert (lan.gateway_v4, lan.gateway_v6) == ("10.10.1.1", "fd00:10:1::1")
    assert inet.gateway_v4 is None
    late = topo.add_host("late", lan, v4="10.10.1.10", v6="fd00:10:1::10")
    for host in (early, late):
        assert fake.batches(host.ns)[-2:] == [
            "route replace default via 10.10.1.1 dev ut-lana",
            "route replace default via fd00:10:1::1 dev ut-lana",
        ]
    # the router has no default route (inet has no gateway), its NAT is in its namespace
    assert not any("route" in x for x in fake.batches("ut-ra"))
    (nft_stdin,) = [s for argv, s in fake.calls if argv[-3:] == ["nft", "-f", "-"]]
    assert nft_stdin == nat_ruleset("ut-inet")
    sysctls = [argv[-1] for argv in fake.argvs() if argv[:4] == ["ip", "netns", "exec", "ut-ra"]]
    assert "echo 1 > /proc/sys/net/ipv6/conf/all/forwarding" in sysctls[0]


def test_router_rules(topo: Topology) -> None:
    inet = topo.add_segment("inet", v4="198.51.100.0/24")
    lan = topo.add_segment("lana", v4="10.10.1.0/24")
    with pytest.raises(TopologyError, match="same segment"):
        topo.add_router("ra", wan=inet, lan=inet)
    with pytest.raises(TopologyError, match="symmetric_nat needs nat"):
        topo.add_router("ra", wan=inet, lan=lan, nat=False, symmetric_nat=True)
    topo.add_router("ra", wan=inet, wan_v4="198.51.100.2", lan=lan, lan_v4="10.10.1.1")
    with pytest.raises(TopologyError, match="already has a router"):
        topo.add_router("rb", wan=inet, wan_v4="198.51.100.3", lan=lan, lan_v4="10.10.1.2")


def test_no_nat_router_runs_no_nft(topo: Topology, fake: FakeRunner) -> None:
    inet = topo.add_segment("inet", v4="198.51.100.0/24")
    lan = topo.add_segment("lana", v4="10.10.1.0/24")
    topo.add_router("ra", wan=inet, wan_v4="198.51.100.2", lan=lan, lan_v4="10.10.1.1", nat=False)
    assert not any("nft" in argv for argv in fake.argvs())


def test_autoconf_host_gets_no_static_route(topo: Topology, fake: FakeRunner) -> None:
    inet = topo.add_segment("inet", v4="198.51.100.0/24")
    lan = topo.add_segment("lana", v4="10.10.1.0/24")
    topo.add_router("ra", wan=inet, wan_v4="198.51.100.2", lan=lan, lan_v4="10.10.1.1")
    g = topo.add_host("gn", lan, autoconf=True)
    assert (g.v4, g.v6) == (None, None)
    assert fake.batches("ut-gn") == ["link set lo up", "link set ut-lana up"]


def test_connect_and_disconnect_move_a_host(topo: Topology, fake: FakeRunner) -> None:
    inet = topo.add_segment("inet", v4="198.51.100.0/24")
    lana = topo.add_segment("lana", v4="10.10.1.0/24")
    lanb = topo.add_segment("lanb", v4="10.10.2.0/24")
    topo.add_router("ra", wan=inet, wan_v4="198.51.100.2", lan=lana, lan_v4="10.10.1.1")
    topo.add_router("rb", wan=inet, wan_v4="198.51.100.3", lan=lanb, lan_v4="10.10.2.1")
    m = topo.add_host("m", lana, v4="10.10.1.10")
    iface = topo.connect("m", lanb, v4="10.10.2.10")
    assert iface.ifname == "ut-lanb"
    assert fake.batches("ut-m")[-1] == "route replace default via 10.10.2.1 dev ut-lanb"
    topo.disconnect("m", lana)
    assert fake.batches("ut-m")[-1] == "link delete ut-lana"
    assert (m.v4, m.ifname) == ("10.10.2.10", "ut-lanb")
    assert "10.10.1.10" not in lana.used  # free for the next host
    with pytest.raises(TopologyError, match="not on segment lana"):
        topo.disconnect("m", lana)
    with pytest.raises(TopologyError, match="already on segment lanb"):
        topo.connect("m", lanb)
    with pytest.raises(TopologyError, match="is a router"):
        topo.connect("ra", lanb)


def test_set_resolver_writes_etc_netns(topo: Topology, tmp_path: Path) -> None:
    inet = topo.add_segment("inet", v4="198.51.100.0/24")
    topo.add_host("a", inet, v4="198.51.100.11")
    path = topo.set_resolver("a", ["127.0.0.1", "::1"], search=["cyphonic.test"])
    assert path == tmp_path / "etc" / "ut-a" / "resolv.conf"
    assert path.read_text() == "nameserver 127.0.0.1\nnameserver ::1\nsearch cyphonic.test\n"
    with pytest.raises(TopologyError, match="bad nameserver"):
        topo.set_resolver("a", "localhost")
    topo.destroy()
    assert not (tmp_path / "etc" / "ut-a").exists()


def test_exec_argv_and_lookups(topo: Topology) -> None:
    inet = topo.add_segment("inet", v4="198.51.100.0/24")
    topo.add_host("a", inet, v4="198.51.100.11")
    assert topo.exec_argv("a", ["ping", "x"]) == ["ip", "netns", "exec", "ut-a", "ping", "x"]
    assert topo.ns("inet") == "ut-inet"
    with pytest.raises(TopologyError, match=r"no host 'b' \(hosts: a\)"):
        topo.host("b")


def test_destroy_deletes_namespaces_once(topo: Topology, fake: FakeRunner) -> None:
    inet = topo.add_segment("inet", v4="198.51.100.0/24")
    topo.add_host("a", inet, v4="198.51.100.11")
    topo.destroy()
    deletes = [s for argv, s in fake.calls if argv[:3] == ["ip", "-force", "-batch"]]
    assert deletes == ["netns delete ut-a\nnetns delete ut-inet\n"]
    assert fake.namespaces == []
    topo.destroy()  # idempotent: nothing left to delete
    assert len([argv for argv in fake.argvs() if argv[:3] == ["ip", "-force", "-batch"]]) == 1
    assert topo.hosts == {}


def test_stale_prefix_fails_clearly_or_is_replaced(tmp_path: Path) -> None:
    fake = FakeRunner(["ut2-a", "ut2-inet", "other-a"])
    with pytest.raises(TopologyError, match=r"down --prefix ut2` or pass replace_stale=True"):
        Topology("ut2", runner=fake, run_netns=tmp_path)
    topo = Topology("ut2", runner=fake, run_netns=tmp_path, replace_stale=True)
    assert fake.namespaces == ["other-a"]
    topo.destroy()


def test_one_live_topology_per_prefix(fake: FakeRunner, tmp_path: Path) -> None:
    first = Topology("ut3", runner=fake, run_netns=tmp_path)
    with pytest.raises(TopologyError, match="another live Topology"):
        Topology("ut3", runner=fake, run_netns=tmp_path)
    with pytest.raises(TopologyError, match="live Topology"):
        destroy_prefix("ut3", runner=fake, run_netns=tmp_path)
    first.destroy()
    Topology("ut3", runner=fake, run_netns=tmp_path).destroy()


def test_destroy_prefix_matches_whole_prefix_only(tmp_path: Path) -> None:
    fake = FakeRunner(["ut4-a", "ut4-inet", "ut40-a", "ut4x"])
    (tmp_path / "etc" / "ut4-gone").mkdir(parents=True)
    removed = destroy_prefix("ut4", runner=fake, etc_netns=tmp_path / "etc", run_netns=tmp_path)
    assert removed == ["ut4-a", "ut4-inet", "ut4-gone"]
    assert fake.namespaces == ["ut40-a", "ut4x"]
    assert not (tmp_path / "etc" / "ut4-gone").exists()


# -- errors and helpers -------------------------------------------------------------------------


def test_command_error_carries_command_stderr_and_input() -> None:
    with pytest.raises(CommandError) as info:
        run_command(["sh", "-c", "cat >/dev/null; echo boom >&2; exit 3"], stdin="line one\n")
    err = info.value
    assert isinstance(err, CyphonicError)
    assert err.returncode == 3
    text = str(err)
    assert "exit 3" in text and "sh -c" in text
    assert "stderr: boom" in text
    assert "1 | line one" in text


def test_missing_program_is_a_topology_error() -> None:
    with pytest.raises(TopologyError, match="not found"):
        run_command(["/nonexistent/ip", "netns", "list"])


def test_wait_for() -> None:
    calls = iter([0, 0, 7])
    assert wait_for(lambda: next(calls), timeout=1.0, interval=0.001) == 7
    with pytest.raises(WaitTimeout, match="waiting for nothing"):
        wait_for(lambda: None, timeout=0.01, interval=0.001, what="nothing")
    with pytest.raises(TimeoutError):
        wait_for(lambda: False, timeout=0.0)
