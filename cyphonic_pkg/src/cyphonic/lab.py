"""``make lab``: bring up the system in namespaces and show it working.

Cloud (AS, NMS, TRS), node a on the Internet, node b behind a NAPT router, and an
adapter whose general node ``gn`` (an unmodified host running ISC dhclient) gets
its VIP by DHCP.  ``python -m cyphonic.lab up`` builds it, prints each daemon's
status, pings ``b.cyphonic.test`` from a and ``a.cyphonic.test`` from the general
node by name, then leaves everything running
(``ip netns exec cylab-a bash`` to explore).  ``python -m cyphonic.lab down``
removes it all, by name.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from cyphonic.cli import format_status
from cyphonic.testbed.overlay import (
    AdapterSpec,
    GeneralNodeSpec,
    NodeSpec,
    OverlayLab,
    RouterSpec,
)
from cyphonic.testbed.topology import destroy_prefix, wait_for

PREFIX = "cylab"
WORKDIR = Path("/run/cyphonic-lab")
STATE = WORKDIR / "lab.json"


def say(msg: str) -> None:
    print(f">> {msg}", flush=True)


def up() -> int:
    if STATE.exists():
        say("a lab is already up; replacing it")
        down()
    lab = OverlayLab(
        prefix=PREFIX,
        workdir=WORKDIR,
        nodes=[
            NodeSpec("a", "198.51.100.20", "2001:db8:100::20"),
            NodeSpec("b", "10.10.1.10", None, lan="ra"),
        ],
        routers=[RouterSpec("ra", "198.51.100.2", None, lan_v4="10.10.1.0/24")],
        adapters=[
            AdapterSpec(
                "ad",
                "198.51.100.40",
                "2001:db8:100::40",
                general_nodes=[GeneralNodeSpec("gn", "02:00:00:00:00:99")],
            )
        ],
        trs=True,
        log=say,
        replace_stale=True,
    )
    say(
        "building namespaces (cloud, node a, NAPT router ra with node b, adapter ad with "
        "general node gn), CA, AS/NMS/TRS, enrolling"
    )
    try:
        lab.build()
    except BaseException:
        for name in ("cloud", "a", "b"):
            print(f"--- {name} log ---\n{lab.tail(name)}", file=sys.stderr)
        lab.destroy()
        raise
    say("ping b.cyphonic.test from a (DNS query -> route selection -> tunnel -> ICMP)")
    r = lab.topo.run("a", ["ping", "-c", "3", "-i", "0.3", "b.cyphonic.test"], check=False)
    print(r.stdout, r.stderr, sep="", end="")
    say("general node gn: ISC dhclient -4 on its link (DHCPv4 from the adapter)")
    ifname = lab.topo.host("gn").ifname
    lab.topo.set_resolver("gn", "192.0.2.53")
    lab.topo.popen(
        "gn",
        [
            "dhclient",
            "-4",
            "-d",
            "-lf",
            str(WORKDIR / "gn.leases"),
            "-pf",
            str(WORKDIR / "gn.pid"),
            ifname,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(
        lambda: (
            "10.64." in lab.topo.run("gn", ["ip", "-4", "-o", "addr"]).stdout
            and "10.64.0.1" in lab.topo.run("gn", ["cat", "/etc/resolv.conf"]).stdout
        ),
        30,
    )
    print(lab.topo.run("gn", ["ip", "-4", "-o", "addr", "show", "dev", ifname]).stdout, end="")
    say("ping a.cyphonic.test from the general node (through the adapter and the overlay)")
    r6 = lab.topo.run("gn", ["ping", "-4", "-c", "3", "-i", "0.3", "a.cyphonic.test"], check=False)
    print(r6.stdout, r6.stderr, sep="", end="")
    for name in ("cloud", "a", "b", "ad"):
        say(f"cyphonic status ({name})")
        print(format_status(lab.status(name)))
    pids = {name: p.pid for name, p in lab.procs.items()}
    STATE.write_text(json.dumps({"prefix": PREFIX, "pids": pids}))
    lab.topo.detach()
    say(
        "lab is up. Try: ip netns exec cylab-a ping b.cyphonic.test | "
        f"ip netns exec cylab-a {sys.executable} -m cyphonic.cli status --socket "
        f"{lab.status_socket('a')} | make lab-down"
    )
    return 0 if r.returncode == 0 and r6.returncode == 0 else 1


def _is_ours(pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"cyphonic" in cmd


def down() -> int:
    if STATE.exists():
        state = json.loads(STATE.read_text())
        for name, pid in state.get("pids", {}).items():
            if _is_ours(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                    say(f"stopped {name} (pid {pid})")
        time.sleep(0.5)
    destroy_prefix(PREFIX)
    shutil.rmtree(WORKDIR, ignore_errors=True)
    say("lab removed")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m cyphonic.lab")
    p.add_argument("action", choices=["up", "down"])
    args = p.parse_args()
    if os.geteuid() != 0:
        print("the lab needs root (network namespaces)", file=sys.stderr)
        return 1
    return up() if args.action == "up" else down()


if __name__ == "__main__":
    sys.exit(main())
