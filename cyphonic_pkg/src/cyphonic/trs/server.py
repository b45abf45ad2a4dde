"""asyncio glue for the TRS: UDP sockets in, ``RelayCore`` decides, UDP out.

One socket per listen address; an IPv6 socket is IPv6-only, so a dual-stack TRS has an IPv4
and an IPv6 socket.  Datagrams leave on the socket of the destination's family, which is how
a packet that arrived over IPv4 from one side reaches the other side over IPv6.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from cyphonic.errors import CyphonicError
from cyphonic.status import StatusServer
from cyphonic.trs.config import TrsConfig, load_trs_key
from cyphonic.trs.core import Outgoing, RelayCore
from cyphonic.udp import bind_udp, family_of
from cyphonic.wire.signaling import Endpoint, format_endpoint

log = logging.getLogger(__name__)
TICK = 0.1


class _Proto(asyncio.DatagramProtocol):
    def __init__(self, server: TrsServer) -> None:
        self.server = server

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.server.send(self.server.core.handle(data, (addr[0], addr[1]), time.time()))

    def error_received(self, exc: Exception) -> None:
        log.debug("TRS socket error: %s", exc)


class TrsServer:
    def __init__(self, core: RelayCore, listen: list[Endpoint]) -> None:
        self.core = core
        self.listen = list(listen)
        self.transports: dict[int, asyncio.DatagramTransport] = {}
        self.bound: list[Endpoint] = []
        self.started = 0.0
        self._ticker: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()

    @classmethod
    def from_config(cls, cfg: TrsConfig) -> TrsServer:
        core = RelayCore(
            cfg.trs_id,
            load_trs_key(cfg.key_file),
            cfg.public,
            nms=cfg.nms,
            idle_timeout=cfg.idle_timeout,
            max_sessions=cfg.max_sessions,
        )
        return cls(core, cfg.listen)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            for host, port in self.listen:
                fam = family_of(host)
                if fam in self.transports:
                    raise CyphonicError(f"TRS listens twice on IPv{fam}: one address per family")
                sock = bind_udp(host, port, "TRS")
                bound = sock.getsockname()
                transport, _ = await loop.create_datagram_endpoint(lambda: _Proto(self), sock=sock)
                self.transports[fam] = transport
                self.bound.append((host, bound[1]))
                log.info("TRS listening on udp %s", format_endpoint((host, bound[1])))
        except BaseException:
            await self.stop()
            raise
        if not self.core.public_endpoints:  # tests: listen on port 0, announce what we got
            self.core.public_endpoints = tuple(self.bound)
        self.started = time.time()
        self._ticker = asyncio.create_task(self._tick())

    def send(self, out: list[Outgoing]) -> None:
        for o in out:
            t = self.transports.get(6 if ":" in o.addr[0] else 4)
            if t is not None:
                t.sendto(o.data, o.addr)

    async def _tick(self) -> None:
        while True:
            self.send(self.core.tick(time.time()))
            await asyncio.sleep(TICK)

    async def stop(self) -> None:
        if self._ticker:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        for t in self.transports.values():
            t.close()
        self.transports.clear()
        self._stopped.set()

    async def run(self, status_socket: Path | None = None) -> None:
        """Start, serve (and answer ``cyphonic status`` on ``status_socket``) until stopped."""
        status = StatusServer(status_socket, self.status) if status_socket else None
        await self.start()
        try:
            if status:
                await status.start()
            await self._stopped.wait()
        finally:
            if status:
                await status.stop()
            await self.stop()

    def status(self) -> dict[str, Any]:
        now = time.time()
        return {
            "role": "trs",
            "listen": [format_endpoint(ep) for ep in self.bound],
            "uptime": round(now - self.started, 1) if self.started else 0.0,
            **self.core.status(now),
        }
