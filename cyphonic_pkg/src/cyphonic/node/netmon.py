"""Netlink monitor: notices real-address changes (mobility) as they happen.

A thread blocks on a pyroute2 netlink socket bound to the IPv4/IPv6 address
groups and, on any RTM_NEWADDR/RTM_DELADDR, schedules ``on_change`` in the
event loop, debounced (a move produces a burst of events).  The daemon then
compares the address set and acts only when it really changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

DEBOUNCE = 0.05


class AddressMonitor:
    def __init__(self, loop: asyncio.AbstractEventLoop, on_change: Callable[[], None]) -> None:
        self.loop = loop
        self.on_change = on_change
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pending: asyncio.TimerHandle | None = None
        self.events = 0

    def start(self) -> None:
        """Start the thread; ``OSError`` if netlink cannot be opened."""
        ready = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(
            target=self._run, args=(ready, failure), name="cyphonic-netmon", daemon=True
        )
        self._thread.start()
        ready.wait(5.0)
        if failure:
            raise OSError(f"netlink monitor: {failure[0]}")

    def _run(self, ready: threading.Event, failure: list[BaseException]) -> None:
        # pyroute2's synchronous IPRoute runs an event loop of its own: it must be
        # created in this thread, not in the daemon's (running) loop
        from pyroute2 import IPRoute
        from pyroute2.netlink.rtnl import RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR

        try:
            ipr = IPRoute()
            ipr.bind(groups=RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR)
        except Exception as exc:  # reported to start()
            failure.append(exc)
            ready.set()
            return
        ready.set()
        try:
            while not self._stop.is_set():
                readable, _, _ = select.select([ipr.fileno()], [], [], 0.5)
                if not readable:
                    continue
                try:
                    msgs = ipr.get()
                except OSError as exc:
                    log.warning("netlink monitor: %s", exc)
                    continue
                if any(m.get("event") in ("RTM_NEWADDR", "RTM_DELADDR") for m in msgs):
                    self.events += 1
                    self.loop.call_soon_threadsafe(self._schedule)
        finally:
            with contextlib.suppress(Exception):
                ipr.close()

    def _schedule(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
        self._pending = self.loop.call_later(DEBOUNCE, self.on_change)

    def stop(self) -> None:
        self._stop.set()
        if self._pending is not None:
            self._pending.cancel()
        if self._thread is not None:
            self._thread.join(2.0)
