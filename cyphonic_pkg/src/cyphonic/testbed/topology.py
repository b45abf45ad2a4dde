"""Network-namespace test bed: the one topology builder for e2e tests, ``make lab`` and ``bench/``.

A :class:`Topology` builds "the Internet" and the networks hanging off it on this one machine out
of network namespaces, veth pairs and Linux bridges (DESIGN.md §5)::

    with Topology(prefix="cyt1") as topo:
        inet = topo.add_segment("inet", v4="198.51.100.0/24", v6="2001:db8:100::/64")
        topo.add_host("cloud", inet, v4="198.51.100.10", v6="2001:db8:100::10")
        lan = topo.add_segment("lana", v4="10.10.1.0/24", v6="fd00:10:1::/64")
        topo.add_router("ra", wan=inet, wan_v4="198.51.100.2", wan_v6="2001:db8:100::2",
                        lan=lan, lan_v4="10.10.1.1", lan_v6="fd00:10:1::1")
        topo.add_host("a", lan, v4="10.10.1.10", v6="fd00:10:1::10")
        topo.run("a", ["ping", "-c1", "198.51.100.10"])

Naming (what ``python -m cyphonic.testbed down --prefix P`` relies on):

* every namespace is ``<prefix>-<name>``, one per segment, host and router;
* a segment's namespace holds its bridge ``<prefix>-<segment>`` and one port ``<prefix>-<host>``
  per attached host; inside a host's namespace the interface ``<prefix>-<segment>`` leads to that
  segment.  So in any namespace, ``<prefix>-X`` is "the way to X".  Interface names are limited
  to 15 characters by the kernel, which bounds ``len(prefix) + 1 + len(name)``;
* nothing is created in the caller's namespace: veth pairs are created directly inside the
  namespaces, so deleting the namespaces removes everything, and ``/etc/netns/<ns>/`` holds the
  per-namespace ``resolv.conf`` written by :meth:`Topology.set_resolver`.

Reusing a prefix: building a :class:`Topology` whose prefix still has namespaces (a crashed run, or
another live test bed) fails at construction with a :class:`TopologyError` that says how to clean
up, unless ``replace_stale=True`` is passed, which removes the leftovers first.  Two live
``Topology`` objects of one process never share a prefix.

Kernel settings that keep tests fast and unsurprising: DAD off (IPv6 addresses usable at once),
router solicitations and RA acceptance off (except on ``autoconf`` hosts, which get the kernel's
own RA/SLAAC handling), rp_filter off, forwarding only in routers, bridges without STP, multicast
snooping or br_netfilter, and IPv6 disabled in bridge namespaces (they have no addresses).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import ipaddress
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TypeVar

from cyphonic.errors import CyphonicError

log = logging.getLogger(__name__)

__all__ = [
    "CommandError",
    "Host",
    "Interface",
    "Runner",
    "Segment",
    "Topology",
    "TopologyError",
    "WaitTimeout",
    "destroy_prefix",
    "interface_mac",
    "list_namespaces",
    "ns_name",
    "pids_in_namespaces",
    "run_command",
    "wait_for",
]

IFNAMSIZ = 15
"""Longest interface name the kernel accepts (IFNAMSIZ - 1)."""
PREFIX_RE = re.compile(r"[a-z][a-z0-9]{0,7}")
NAME_RE = re.compile(r"[a-z][a-z0-9-]*")
RUN_NETNS = Path("/run/netns")
ETC_NETNS = Path("/etc/netns")
NFT_TABLE = "cyphonic_testbed"
SETUP_TIMEOUT = 30.0

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# Errors


class TopologyError(CyphonicError):
    """A test bed that cannot be built as asked (bad name, address outside its segment, ...)."""


class CommandError(TopologyError, subprocess.CalledProcessError):
    """A command that exited non-zero; the message carries the command, stderr and any input."""

    def __init__(
        self,
        argv: Sequence[str],
        returncode: int,
        stdout: str = "",
        stderr: str = "",
        stdin: str | None = None,
    ) -> None:
        subprocess.CalledProcessError.__init__(self, returncode, list(argv), stdout, stderr)
        self.argv = list(argv)
        self.stdin = stdin

    def __str__(self) -> str:
        lines = [f"command failed (exit {self.returncode}): {shlex.join(self.argv)}"]
        if self.stderr:
            lines.append("stderr: " + _tail(str(self.stderr)))
        if self.stdout:
            lines.append("stdout: " + _tail(str(self.stdout)))
        if self.stdin:
            lines.append("input:")
            lines += [f"  {n:3} | {text}" for n, text in enumerate(self.stdin.splitlines(), 1)]
        return "\n".join(lines)


class WaitTimeout(TopologyError, TimeoutError):
    """:func:`wait_for` gave up."""


def _tail(text: str, limit: int = 2000) -> str:
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]


# --------------------------------------------------------------------------------------------
# The edge: running setup commands.  The default runs them; unit tests pass a recording fake.


class Runner(Protocol):
    """Runs one setup command and returns its stdout; raises :class:`CommandError` on failure."""

    def __call__(self, argv: Sequence[str], *, stdin: str | None = None) -> str: ...


def run_command(argv: Sequence[str], *, stdin: str | None = None) -> str:
    """The default :class:`Runner`: ``subprocess.run`` with captured output and a timeout."""
    log.debug("+ %s", shlex.join(argv))
    try:
        proc = subprocess.run(
            list(argv),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=SETUP_TIMEOUT,
            check=False,
        )
    except FileNotFoundError as exc:
        msg = f"{argv[0]} not found: the test bed needs iproute2 and nftables"
        raise TopologyError(msg) from exc
    except subprocess.TimeoutExpired as exc:
        raise TopologyError(
            f"command timed out after {SETUP_TIMEOUT:g} s: {shlex.join(argv)}"
        ) from exc
    if proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stdout, proc.stderr, stdin)
    return proc.stdout


# --------------------------------------------------------------------------------------------
# Pure planning: names, addresses, kernel settings, command scripts.


def check_prefix(prefix: str) -> str:
    """Return ``prefix`` if it is a valid test-bed prefix, else raise :class:`TopologyError`."""
    if not PREFIX_RE.fullmatch(prefix):
        raise TopologyError(
            f"bad prefix {prefix!r}: use 1-8 characters [a-z0-9] starting with a letter "
            "(no '-', so that '<prefix>-' never matches another prefix's names)"
        )
    return prefix


def ns_name(prefix: str, name: str) -> str:
    """Namespace of segment/host/router ``name``; also the interface name leading to it."""
    if not NAME_RE.fullmatch(name):
        raise TopologyError(f"bad name {name!r}: use [a-z0-9-] starting with a letter")
    full = f"{check_prefix(prefix)}-{name}"
    if len(full) > IFNAMSIZ:
        raise TopologyError(
            f"name {full!r} is {len(full)} characters but interface names are limited to "
            f"{IFNAMSIZ}: shorten the prefix {prefix!r} or the name {name!r}"
        )
    return full


def interface_mac(prefix: str, host: str, segment: str) -> str:
    """Deterministic locally administered unicast MAC of ``host``'s interface to ``segment``."""
    digest = hashlib.sha256(f"{prefix}/{host}/{segment}".encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _parse_network(text: str, version: int, segment: str) -> Network:
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise TopologyError(f"segment {segment}: bad IPv{version} subnet {text!r}: {exc}") from exc
    if net.version != version:
        raise TopologyError(f"segment {segment}: {text!r} is not an IPv{version} subnet")
    return net


def parse_subnet4(text: str | None, segment: str) -> ipaddress.IPv4Network | None:
    """The IPv4 subnet of ``segment`` (host bits must be zero)."""
    net = None if text is None else _parse_network(text, 4, segment)
    assert net is None or isinstance(net, ipaddress.IPv4Network)
    return net


def parse_subnet6(text: str | None, segment: str) -> ipaddress.IPv6Network | None:
    """The IPv6 subnet of ``segment`` (host bits must be zero)."""
    net = None if text is None else _parse_network(text, 6, segment)
    assert net is None or isinstance(net, ipaddress.IPv6Network)
    return net


def plan_address(
    network: Network | None, address: str | None, version: int, *, segment: str, who: str
) -> str | None:
    """Check ``address`` for a host on ``network``; return it as ``addr/prefixlen``."""
    if address is None:
        return None
    if network is None:
        raise TopologyError(f"{who}: segment {segment} has no IPv{version} subnet for {address}")
    try:
        addr = ipaddress.ip_address(address)
    except ValueError as exc:
        raise TopologyError(f"{who}: {address!r} is not an IP address (no /len)") from exc
    if addr.version != version:
        raise TopologyError(f"{who}: {address} is not an IPv{version} address")
    if addr not in network:
        raise TopologyError(f"{who}: {address} is outside segment {segment} ({network})")
    reserved = {network.network_address}
    if version == 4 and network.prefixlen < 31:
        reserved.add(network.broadcast_address)
    if addr in reserved:
        raise TopologyError(f"{who}: {address} is the network or broadcast address of {network}")
    return f"{addr}/{network.prefixlen}"


def _nth(network: Network | None, index: int, version: int, segment: str) -> str:
    if network is None:
        raise TopologyError(f"segment {segment} has no IPv{version} subnet")
    last = network.num_addresses - (2 if network.version == 4 else 1)
    if not 1 <= index <= last:
        raise TopologyError(f"segment {segment}: host index {index} is outside 1..{last}")
    return str(network[index])


HOST_SYSCTLS: Mapping[str, str] = {
    # IPv4 settings of a new namespace are copied from the caller's: pin the ones that matter.
    "net.ipv4.conf.all.forwarding": "0",
    "net.ipv4.conf.all.rp_filter": "0",
    "net.ipv4.conf.default.rp_filter": "0",
    # Addresses usable at once: no duplicate address detection (no 1-2 s tentative state).
    "net.ipv6.conf.all.accept_dad": "0",
    "net.ipv6.conf.default.accept_dad": "0",
    # No router solicitations and no RA processing: routes are configured, not learned.
    "net.ipv6.conf.all.accept_ra": "0",
    "net.ipv6.conf.default.accept_ra": "0",
    "net.ipv6.conf.all.router_solicitations": "0",
    "net.ipv6.conf.default.router_solicitations": "0",
}
AUTOCONF_KEYS = frozenset(k for k in HOST_SYSCTLS if "accept_ra" in k or "solicitations" in k)
ROUTER_SYSCTLS: Mapping[str, str] = {
    **HOST_SYSCTLS,
    "net.ipv4.conf.all.forwarding": "1",
    "net.ipv4.conf.default.forwarding": "1",
    "net.ipv6.conf.all.forwarding": "1",
    "net.ipv6.conf.default.forwarding": "1",
}
SEGMENT_SYSCTLS: Mapping[str, str] = {
    "net.ipv4.conf.all.forwarding": "0",
    # The bridge namespace has no addresses: no IPv6 means no RS/MLD/DAD chatter from it.
    "net.ipv6.conf.all.disable_ipv6": "1",
    "net.ipv6.conf.default.disable_ipv6": "1",
}
BR_NETFILTER_SYSCTLS: Mapping[str, str] = {
    # Only present when br_netfilter is loaded; bridged frames must not meet (ip|ip6|arp)tables.
    "net.bridge.bridge-nf-call-arptables": "0",
    "net.bridge.bridge-nf-call-iptables": "0",
    "net.bridge.bridge-nf-call-ip6tables": "0",
}


def host_sysctls(
    *, router: bool = False, autoconf: bool = False, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Kernel settings of a host or router namespace (``extra`` wins)."""
    settings = dict(ROUTER_SYSCTLS if router else HOST_SYSCTLS)
    if autoconf:
        for key in AUTOCONF_KEYS:
            del settings[key]  # the kernel's defaults: accept RAs, send solicitations
    settings.update(extra or {})
    return settings


def segment_sysctls(*, br_netfilter: bool) -> dict[str, str]:
    """Kernel settings of a bridge namespace."""
    return {**SEGMENT_SYSCTLS, **(BR_NETFILTER_SYSCTLS if br_netfilter else {})}


def sysctl_script(settings: Mapping[str, str]) -> str:
    """A ``sh`` script writing ``settings`` to /proc/sys (no dependency on procps' sysctl)."""
    lines = ["set -e"]
    for key, value in settings.items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", key) or ".." in key:
            raise TopologyError(f"bad sysctl key {key!r}")
        path = "/proc/sys/" + key.replace(".", "/")
        lines.append(f"echo {shlex.quote(value)} > {path}")
    return "\n".join(lines) + "\n"


def nat_ruleset(wan_ifname: str, *, symmetric: bool = False) -> str:
    """nftables ruleset of a NAPT router: masquerade v4 and v6 out of the WAN, drop unsolicited in.

    Plain masquerade keeps the source port where it can (endpoint-independent mapping in
    practice); ``symmetric`` picks a random port per connection (``fully-random``), so every
    destination sees another mapping: a symmetric NAT, through which hole punching fails.
    """
    masquerade = "masquerade fully-random" if symmetric else "masquerade"
    wan = nft_quote(wan_ifname)
    return (
        f"table inet {NFT_TABLE} {{\n"
        "  chain postrouting {\n"
        "    type nat hook postrouting priority srcnat; policy accept;\n"
        f"    oifname {wan} {masquerade}\n"
        "  }\n"
        "  chain forward {\n"
        "    type filter hook forward priority filter; policy accept;\n"
        f"    iifname {wan} ct state established,related accept\n"
        f"    iifname {wan} drop\n"
        "  }\n"
        # like a home router, unsolicited traffic to the router itself is dropped too
        # (ICMP and IPv6 ND excepted); otherwise a peer's hole-punching packet that hits
        # the router would create a conntrack entry that steals the port mapping
        "  chain input {\n"
        "    type filter hook input priority filter; policy accept;\n"
        f"    iifname {wan} ct state established,related accept\n"
        f"    iifname {wan} meta l4proto {{ icmp, ipv6-icmp }} accept\n"
        f"    iifname {wan} drop\n"
        "  }\n"
        "}\n"
    )


def nft_quote(text: str) -> str:
    """Double-quoted string for nft (our names never contain quotes or backslashes)."""
    if '"' in text or "\\" in text:
        raise TopologyError(f"cannot quote {text!r}")
    return f'"{text}"'


# --------------------------------------------------------------------------------------------
# The model


@dataclass(slots=True)
class Segment:
    """A layer-2 network: a bridge in namespace ``ns``.  ``gateway_*`` is set by a LAN router."""

    name: str
    ns: str
    bridge: str
    v4: ipaddress.IPv4Network | None
    v6: ipaddress.IPv6Network | None
    gateway_v4: str | None = None
    gateway_v6: str | None = None
    used: dict[str, str] = field(default_factory=dict)
    """Address (no /len) -> name of the host holding it."""

    def addr4(self, index: int) -> str:
        """The ``index``-th IPv4 address of the subnet (``addr4(10)`` of a /24 is ``x.y.z.10``)."""
        return _nth(self.v4, index, 4, self.name)

    def addr6(self, index: int) -> str:
        """The ``index``-th IPv6 address (``addr6(16)`` of ``2001:db8::/64``: ``2001:db8::10``)."""
        return _nth(self.v6, index, 6, self.name)


@dataclass(slots=True)
class Interface:
    """One veth: ``ifname`` inside the host's namespace, ``port`` on the segment's bridge."""

    segment: str
    ifname: str
    port: str
    mac: str
    v4: str | None  # address without /len
    v6: str | None


@dataclass(slots=True)
class Host:
    """A host or router namespace; ``v4``/``v6``/``ifname`` are those of its first interface."""

    name: str
    ns: str
    interfaces: list[Interface] = field(default_factory=list)
    router: bool = False
    autoconf: bool = False

    @property
    def primary(self) -> Interface:
        if not self.interfaces:
            raise TopologyError(f"host {self.name} has no interface")
        return self.interfaces[0]

    @property
    def ifname(self) -> str:
        return self.primary.ifname

    @property
    def mac(self) -> str:
        return self.primary.mac

    @property
    def v4(self) -> str | None:
        return self.interfaces[0].v4 if self.interfaces else None

    @property
    def v6(self) -> str | None:
        return self.interfaces[0].v6 if self.interfaces else None

    def interface(self, segment: str | Segment) -> Interface:
        """This host's interface on ``segment``."""
        name = segment.name if isinstance(segment, Segment) else segment
        for iface in self.interfaces:
            if iface.segment == name:
                return iface
        raise TopologyError(f"host {self.name} is not on segment {name}")


# --------------------------------------------------------------------------------------------
# Processes and namespaces on the machine


def list_namespaces(runner: Runner = run_command) -> list[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    out = runner(["ip", "netns", "list"])
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def pids_in_namespaces(namespaces: Iterable[str], run_netns: Path = RUN_NETNS) -> list[int]:
    """PIDs of processes whose network namespace is one of ``namespaces`` (as ``ip netns pids``)."""
    wanted = set()
    for ns in namespaces:
        with contextlib.suppress(OSError):
            st = os.stat(run_netns / ns)
            wanted.add((st.st_dev, st.st_ino))
    if not wanted:
        return []
    pids = []
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            st = os.stat(f"/proc/{entry.name}/ns/net")
        except OSError:  # gone, a zombie or a kernel thread we may not inspect
            continue
        if (st.st_dev, st.st_ino) in wanted:
            pids.append(int(entry.name))
    return pids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in {"Z", "X"}


def _terminate_pids(pids: Sequence[int], grace: float) -> None:
    """SIGTERM ``pids``, SIGKILL whatever still runs after ``grace`` seconds."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    remaining = list(pids)
    while remaining and time.monotonic() < deadline:
        time.sleep(0.02)
        remaining = [pid for pid in remaining if _alive(pid)]
    for pid in remaining:
        log.warning("pid %d ignored SIGTERM for %.1f s; sending SIGKILL", pid, grace)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _remove_namespaces(
    namespaces: Sequence[str],
    *,
    runner: Runner,
    etc_netns: Path,
    run_netns: Path,
    grace: float,
) -> None:
    """Kill what runs in ``namespaces``, delete them and their /etc/netns directories."""
    _terminate_pids(pids_in_namespaces(namespaces, run_netns), grace)
    existing = set(list_namespaces(runner))
    doomed = [ns for ns in namespaces if ns in existing]
    errors: list[str] = []
    if doomed:
        script = "".join(f"netns delete {ns}\n" for ns in doomed)
        try:
            runner(["ip", "-force", "-batch", "-"], stdin=script)
        except TopologyError as exc:
            errors.append(str(exc))
    for ns in namespaces:
        path = etc_netns / ns
        if path.exists():
            try:
                shutil.rmtree(path)
            except OSError as exc:
                errors.append(f"cannot remove {path}: {exc}")
    if errors:
        raise TopologyError("cleanup incomplete:\n" + "\n".join(errors))


def destroy_prefix(
    prefix: str,
    *,
    runner: Runner = run_command,
    etc_netns: Path = ETC_NETNS,
    run_netns: Path = RUN_NETNS,
    grace: float = 2.0,
) -> list[str]:
    """Remove every namespace named ``<prefix>-*`` (and what runs in it); return their names.

    For the leftovers of a crashed run; processes inside are found by their network namespace
    (as ``ip netns pids`` does) and ended by PID.  Refuses a prefix that is live in this process.
    """
    check_prefix(prefix)
    if prefix in _LIVE:
        raise TopologyError(f"prefix {prefix!r} belongs to a live Topology: call its destroy()")
    start = prefix + "-"
    names = [ns for ns in list_namespaces(runner) if ns.startswith(start)]
    with contextlib.suppress(OSError):
        names += [
            p.name for p in etc_netns.iterdir() if p.name.startswith(start) and p.name not in names
        ]
    _remove_namespaces(names, runner=runner, etc_netns=etc_netns, run_netns=run_netns, grace=grace)
    if names:
        log.info("removed %s", " ".join(names))
    return names


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 5.0,
    interval: float = 0.05,
    *,
    what: str | None = None,
) -> T:
    """Call ``predicate`` until it returns something truthy and return that; else raise.

    Exceptions from ``predicate`` propagate.  Raises :class:`WaitTimeout` after ``timeout`` s.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            label = what or getattr(predicate, "__name__", repr(predicate))
            raise WaitTimeout(f"timed out after {timeout:g} s waiting for {label}")
        time.sleep(interval)


# --------------------------------------------------------------------------------------------
# The builder

_LIVE: dict[str, Topology] = {}


@atexit.register
def _destroy_live() -> None:  # a test run that ends without destroy() leaves nothing behind
    for topo in list(_LIVE.values()):
        with contextlib.suppress(Exception):
            topo.destroy()


@dataclass(slots=True)
class _Proc:
    popen: subprocess.Popen[Any]
    own_group: bool


class Topology:
    """Namespaces, bridges, veths, routers and the processes started in them; see module doc."""

    def __init__(
        self,
        prefix: str,
        *,
        replace_stale: bool = False,
        grace: float = 2.0,
        runner: Runner = run_command,
        etc_netns: Path = ETC_NETNS,
        run_netns: Path = RUN_NETNS,
    ) -> None:
        self.prefix = check_prefix(prefix)
        self.grace = grace
        self._runner = runner
        self._etc_netns = etc_netns
        self._run_netns = run_netns
        self._segments: dict[str, Segment] = {}
        self._hosts: dict[str, Host] = {}
        self._namespaces: list[str] = []  # in creation order, including half-made ones
        self._procs: list[_Proc] = []
        if prefix in _LIVE:
            raise TopologyError(f"prefix {prefix!r} is used by another live Topology")
        stale = [ns for ns in list_namespaces(runner) if ns.startswith(prefix + "-")]
        if stale and not replace_stale:
            raise TopologyError(
                f"namespaces with prefix {prefix!r} already exist ({' '.join(stale)}): a crashed "
                f"run or a test bed still in use; remove them with "
                f"`python -m cyphonic.testbed down --prefix {prefix}` or pass replace_stale=True"
            )
        if stale:
            destroy_prefix(prefix, runner=runner, etc_netns=etc_netns, run_netns=run_netns)
        _LIVE[prefix] = self

    # -- context manager ---------------------------------------------------------------------

    def __enter__(self) -> Topology:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()

    # -- lookups -----------------------------------------------------------------------------

    @property
    def segments(self) -> Mapping[str, Segment]:
        return self._segments

    @property
    def hosts(self) -> Mapping[str, Host]:
        return self._hosts

    def host(self, name: str) -> Host:
        try:
            return self._hosts[name]
        except KeyError:
            raise TopologyError(
                f"no host {name!r} (hosts: {', '.join(self._hosts) or 'none'})"
            ) from None

    def segment(self, name: str) -> Segment:
        try:
            return self._segments[name]
        except KeyError:
            raise TopologyError(
                f"no segment {name!r} (segments: {', '.join(self._segments) or 'none'})"
            ) from None

    def ns(self, name: str) -> str:
        """Namespace of host, router or segment ``name``."""
        if name in self._hosts:
            return self._hosts[name].ns
        if name in self._segments:
            return self._segments[name].ns
        raise TopologyError(f"no host or segment {name!r} in topology {self.prefix}")

    # -- building ----------------------------------------------------------------------------

    def _new_namespace(self, name: str, settings: Mapping[str, str]) -> str:
        if name in self._hosts or name in self._segments:
            raise TopologyError(f"name {name!r} is already used in topology {self.prefix}")
        ns = ns_name(self.prefix, name)
        self._runner(["ip", "netns", "add", ns])
        self._namespaces.append(ns)
        self._runner(["ip", "netns", "exec", ns, "sh", "-c", sysctl_script(settings)])
        return ns

    def _batch(self, ns: str, lines: Sequence[str]) -> None:
        if lines:
            self._runner(["ip", "-n", ns, "-batch", "-"], stdin="".join(f"{x}\n" for x in lines))

    def add_segment(self, name: str, v4: str | None = None, v6: str | None = None) -> Segment:
        """A bridge in its own namespace ``<prefix>-<name>``, with optional v4/v6 subnets."""
        net4 = parse_subnet4(v4, name)
        net6 = parse_subnet6(v6, name)
        br_netfilter = Path("/proc/sys/net/bridge").is_dir()
        ns = self._new_namespace(name, segment_sysctls(br_netfilter=br_netfilter))
        seg = Segment(name, ns, ns, net4, net6)
        self._batch(
            ns,
            [
                "link set lo up",
                f"link add {seg.bridge} type bridge stp_state 0 forward_delay 0 mcast_snooping 0"
                " nf_call_iptables 0 nf_call_ip6tables 0 nf_call_arptables 0",
                f"link set {seg.bridge} up",
            ],
        )
        self._segments[name] = seg
        return seg

    def add_host(
        self,
        name: str,
        segment: Segment | str,
        v4: str | None = None,
        v6: str | None = None,
        *,
        mac: str | None = None,
        autoconf: bool = False,
        sysctls: Mapping[str, str] | None = None,
    ) -> Host:
        """A host namespace ``<prefix>-<name>`` with one interface on ``segment``.

        Static addresses are optional (v4-only, v6-only and address-less hosts are fine); a host
        with an address gets a default route via the segment's router, if it has one.
        ``autoconf`` leaves the kernel's RA/SLAAC handling on (a general node that learns its
        addresses from RAs and DHCP).  ``sysctls`` override the defaults (``HOST_SYSCTLS``).
        """
        seg = self._seg(segment)
        v4cidr, v6cidr = self._plan(seg, name, v4, v6)
        ns = self._new_namespace(name, host_sysctls(autoconf=autoconf, extra=sysctls))
        host = Host(name, ns, autoconf=autoconf)
        self._hosts[name] = host
        self._attach(host, seg, v4cidr, v6cidr, mac=mac, default_route=True, first=True)
        return host

    def add_router(
        self,
        name: str,
        *,
        wan: Segment | str,
        lan: Segment | str,
        wan_v4: str | None = None,
        wan_v6: str | None = None,
        lan_v4: str | None = None,
        lan_v6: str | None = None,
        nat: bool = True,
        symmetric_nat: bool = False,
    ) -> Host:
        """A router between ``wan`` and ``lan``: forwarding on, the LAN's default gateway.

        ``nat`` masquerades IPv4 and IPv6 leaving the WAN interface and drops unsolicited
        inbound traffic (a home NAPT router); ``symmetric_nat`` makes the mapping random per
        connection.  Hosts on ``lan`` (already there or added later) route through it.  Without
        ``nat``, hosts on ``wan`` need routes to the LAN (``run(host, ["ip", "route", ...])``).
        """
        wseg, lseg = self._seg(wan), self._seg(lan)
        if wseg is lseg:
            raise TopologyError(f"router {name}: wan and lan are the same segment {wseg.name}")
        if lseg.gateway_v4 or lseg.gateway_v6:
            raise TopologyError(f"router {name}: segment {lseg.name} already has a router")
        if symmetric_nat and not nat:
            raise TopologyError(f"router {name}: symmetric_nat needs nat=True")
        wan4, wan6 = self._plan(wseg, name, wan_v4, wan_v6)
        lan4, lan6 = self._plan(lseg, name, lan_v4, lan_v6)
        ns = self._new_namespace(name, host_sysctls(router=True))
        router = Host(name, ns, router=True)
        self._hosts[name] = router
        self._attach(router, wseg, wan4, wan6, mac=None, default_route=True, first=True)
        self._attach(router, lseg, lan4, lan6, mac=None, default_route=False, first=False)
        if nat:
            ruleset = nat_ruleset(router.interface(wseg).ifname, symmetric=symmetric_nat)
            self._runner(["ip", "netns", "exec", ns, "nft", "-f", "-"], stdin=ruleset)
        lseg.gateway_v4 = router.interface(lseg).v4
        lseg.gateway_v6 = router.interface(lseg).v6
        for host in self._hosts.values():
            if host is router or host.autoconf:
                continue
            for iface in host.interfaces:
                if iface.segment == lseg.name:
                    self._batch(host.ns, _default_routes(lseg, iface))
        return router

    def connect(
        self,
        name: str,
        segment: Segment | str,
        v4: str | None = None,
        v6: str | None = None,
        *,
        mac: str | None = None,
    ) -> Interface:
        """Give host ``name`` another interface on ``segment`` (an adapter's second interface,
        or the new network of a host that moves: connect, then :meth:`disconnect` the old one).

        The segment's router, if any, becomes the host's default gateway.
        """
        host = self.host(name)
        if host.router:
            raise TopologyError(f"{name} is a router; routers keep their two interfaces")
        seg = self._seg(segment)
        if any(iface.segment == seg.name for iface in host.interfaces):
            raise TopologyError(f"host {name} is already on segment {seg.name}")
        v4cidr, v6cidr = self._plan(seg, name, v4, v6)
        return self._attach(
            host, seg, v4cidr, v6cidr, mac=mac, default_route=True, first=not host.interfaces
        )

    def disconnect(self, name: str, segment: Segment | str) -> None:
        """Remove host ``name``'s interface on ``segment`` (its addresses and routes go too)."""
        host = self.host(name)
        seg = self._seg(segment)
        iface = host.interface(seg)
        if host.router:
            raise TopologyError(f"{name} is a router; routers keep their two interfaces")
        self._batch(host.ns, [f"link delete {iface.ifname}"])
        host.interfaces.remove(iface)
        for addr in (iface.v4, iface.v6):
            if addr is not None:
                seg.used.pop(addr, None)

    def _seg(self, segment: Segment | str) -> Segment:
        seg = self.segment(segment if isinstance(segment, str) else segment.name)
        if not isinstance(segment, str) and segment is not seg:
            raise TopologyError(f"segment {segment.name} belongs to another topology")
        return seg

    def _plan(
        self, seg: Segment, who: str, v4: str | None, v6: str | None
    ) -> tuple[str | None, str | None]:
        v4cidr = plan_address(seg.v4, v4, 4, segment=seg.name, who=who)
        v6cidr = plan_address(seg.v6, v6, 6, segment=seg.name, who=who)
        for cidr in (v4cidr, v6cidr):
            if cidr is not None:
                addr = cidr.split("/")[0]
                if addr in seg.used:
                    raise TopologyError(
                        f"{who}: {addr} on segment {seg.name} is already used by {seg.used[addr]}"
                    )
        ns_name(self.prefix, who)  # validates the name before anything is created
        return v4cidr, v6cidr

    def _attach(
        self,
        host: Host,
        seg: Segment,
        v4cidr: str | None,
        v6cidr: str | None,
        *,
        mac: str | None,
        default_route: bool,
        first: bool,
    ) -> Interface:
        ifname = ns_name(self.prefix, seg.name)
        port = ns_name(self.prefix, host.name)
        mac = mac or interface_mac(self.prefix, host.name, seg.name)
        iface = Interface(
            seg.name,
            ifname,
            port,
            mac,
            v4cidr.split("/")[0] if v4cidr else None,
            v6cidr.split("/")[0] if v6cidr else None,
        )
        self._batch(
            seg.ns,
            [
                f"link add {port} type veth peer name {ifname} address {mac} netns {host.ns}",
                f"link set {port} master {seg.bridge} up",
            ],
        )
        lines = ["link set lo up"] if first else []
        lines.append(f"link set {ifname} up")
        if v4cidr:
            lines.append(f"address add {v4cidr} dev {ifname}")
        if v6cidr:
            lines.append(f"address add {v6cidr} dev {ifname} nodad")
        if default_route and not host.autoconf:
            lines += _default_routes(seg, iface)
        self._batch(host.ns, lines)
        host.interfaces.append(iface)
        for addr in (iface.v4, iface.v6):
            if addr is not None:
                seg.used[addr] = host.name
        return iface

    # -- using -------------------------------------------------------------------------------

    def exec_argv(self, name: str, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run in ``name``'s namespace (for callers with their own spawning)."""
        return ["ip", "netns", "exec", self.ns(name), *argv]

    def run(
        self,
        name: str,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 30.0,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in ``name``'s namespace and wait (text, captured output).

        With ``check`` (the default) a non-zero exit raises :class:`CommandError` carrying the
        command, stdout and stderr; ``subprocess.TimeoutExpired`` after ``timeout`` seconds.
        """
        full = self.exec_argv(name, argv)
        log.debug("+ %s", shlex.join(full))
        proc = subprocess.run(
            full,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )
        if check and proc.returncode != 0:
            raise CommandError(full, proc.returncode, proc.stdout, proc.stderr)
        return proc

    def popen(self, name: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in ``name``'s namespace; ``kwargs`` go to ``subprocess.Popen``.

        The process gets its own session (unless ``start_new_session=False`` is passed), so that
        :meth:`destroy` ends it and its children: SIGTERM to its process group, SIGKILL after
        ``grace`` seconds, then closes its pipes (read what you need before that).  Anything else
        still running in the namespaces is ended by PID too.
        """
        kwargs.setdefault("start_new_session", True)
        full = self.exec_argv(name, argv)
        log.debug("+ %s &", shlex.join(full))
        proc = subprocess.Popen(full, **kwargs)
        self._procs.append(_Proc(proc, bool(kwargs["start_new_session"])))
        return proc

    def set_resolver(
        self,
        name: str,
        nameservers: str | Sequence[str],
        *,
        search: Sequence[str] = (),
        options: Sequence[str] = (),
    ) -> Path:
        """Write ``/etc/netns/<ns>/resolv.conf``: processes started in ``name`` by
        ``ip netns exec`` (getent, dig, ping, :meth:`run`, :meth:`popen`) see it as
        ``/etc/resolv.conf``.  Returns the path written."""
        ns = self.ns(name)
        servers = [nameservers] if isinstance(nameservers, str) else list(nameservers)
        for server in servers:
            try:
                ipaddress.ip_address(server)
            except ValueError as exc:
                raise TopologyError(f"set_resolver({name}): bad nameserver {server!r}") from exc
        text = "".join(f"nameserver {s}\n" for s in servers)
        if search:
            text += "search " + " ".join(search) + "\n"
        if options:
            text += "options " + " ".join(options) + "\n"
        directory = self._etc_netns / ns
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "resolv.conf"
        path.write_text(text, encoding="ascii")
        return path

    # -- tearing down ------------------------------------------------------------------------

    def _stop_tracked(self) -> None:
        running = [p for p in self._procs if p.popen.poll() is None]
        for p in running:
            self._signal(p, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        for p in running:
            try:
                p.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("pid %d ignored SIGTERM; sending SIGKILL", p.popen.pid)
                self._signal(p, signal.SIGKILL)
                p.popen.wait()
        for p in self._procs:  # reaped: close the pipes we handed out
            for stream in (p.popen.stdin, p.popen.stdout, p.popen.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        self._procs.clear()

    @staticmethod
    def _signal(p: _Proc, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            if p.own_group:  # the group leader is ours and not yet reaped: the pgid is ours
                os.killpg(p.popen.pid, sig)
            else:
                p.popen.send_signal(sig)

    def destroy(self) -> None:
        """Stop processes, delete namespaces (and so their veths) and /etc/netns dirs.

        Idempotent; the topology is empty afterwards and its prefix free again.
        """
        try:
            self._stop_tracked()
            if self._namespaces:
                _remove_namespaces(
                    list(reversed(self._namespaces)),
                    runner=self._runner,
                    etc_netns=self._etc_netns,
                    run_netns=self._run_netns,
                    grace=self.grace,
                )
        finally:
            self._namespaces.clear()
            self._hosts.clear()
            self._segments.clear()
            if _LIVE.get(self.prefix) is self:
                del _LIVE[self.prefix]

    def detach(self) -> None:
        """Leave everything running after this process exits (``make lab``).

        The namespaces and processes then belong to whoever calls
        :func:`destroy_prefix` with this prefix later.
        """
        self._procs.clear()
        if _LIVE.get(self.prefix) is self:
            del _LIVE[self.prefix]

    def __repr__(self) -> str:
        return (
            f"Topology(prefix={self.prefix!r}, segments={list(self._segments)}, "
            f"hosts={list(self._hosts)})"
        )


def _default_routes(seg: Segment, iface: Interface) -> list[str]:
    lines = []
    if seg.gateway_v4 and iface.v4 and iface.v4 != seg.gateway_v4:
        lines.append(f"route replace default via {seg.gateway_v4} dev {iface.ifname}")
    if seg.gateway_v6 and iface.v6 and iface.v6 != seg.gateway_v6:
        lines.append(f"route replace default via {seg.gateway_v6} dev {iface.ifname}")
    return lines
