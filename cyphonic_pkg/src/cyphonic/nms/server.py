"""asyncio glue for NMS: UDP sockets in, ``NmsCore`` decides, UDP out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from cyphonic.errors import CyphonicError
from cyphonic.nms.core import NmsCore, Outgoing
from cyphonic.udp import bind_udp, family_of
from cyphonic.wire.signaling import Endpoint, format_endpoint
from cyphonic.wire.tunnel import PacketType

log = logging.getLogger(__name__)
TRS_CONTROL_BYTE = bytes([PacketType.TRS_CONTROL])
TICK = 0.05


class _Proto(asyncio.DatagramProtocol):
    def __init__(self, server: NmsServer) -> None:
        self.server = server

    def datagram_received(self, data: bytes, addr: Any) -> None:
        src = (addr[0], addr[1])
        core = self.server.core
        if data[:1] == TRS_CONTROL_BYTE and core.registry is not None:
            outs, results = core.registry.handle(data, src, time.time())
            self.server.send([Outgoing(o.data, o.addr) for o in outs])
            self.server.send(core.relay_results(results, time.time()))
            return
        self.server.send(core.handle(data, src, time.time()))

    def error_received(self, exc: Exception) -> None:
        log.debug("NMS socket error: %s", exc)


class NmsServer:
    def __init__(self, core: NmsCore) -> None:
        self.core = core
        self.transports: dict[int, asyncio.DatagramTransport] = {}
        self._ticker: asyncio.Task[None] | None = None

    async def start(self, listen: list[Endpoint]) -> None:
        loop = asyncio.get_running_loop()
        for host, port in listen:
            fam = family_of(host)
            if fam in self.transports:
                raise CyphonicError(f"NMS listens twice on IPv{fam}: one address per family")
            sock = bind_udp(host, port, "NMS")
            transport, _ = await loop.create_datagram_endpoint(lambda: _Proto(self), sock=sock)
            self.transports[fam] = transport
            log.info("NMS listening on udp %s", format_endpoint((host, port)))
        self._ticker = asyncio.create_task(self._tick())

    def send(self, out: list[Outgoing]) -> None:
        for o in out:
            t = self.transports.get(6 if ":" in o.addr[0] else 4)
            if t is not None:
                t.sendto(o.data, o.addr)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            now = time.time()
            if self.core.registry is not None:
                outs, results = self.core.registry.tick(now)
                self.send([Outgoing(o.data, o.addr) for o in outs])
                self.send(self.core.relay_results(results, now))
            self.send(self.core.tick(now))

    async def stop(self) -> None:
        if self._ticker:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        self.core.flush_marks(time.time())
        for t in self.transports.values():
            t.close()
