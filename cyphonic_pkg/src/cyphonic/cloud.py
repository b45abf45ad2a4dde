"""The cloud process: AS (TLS/TCP) and NMS (UDP) on one shared store."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from cyphonic.auth.server import ServerStats, server_ssl_context, start_as_server
from cyphonic.auth.service import AuthService
from cyphonic.config import CloudConfig
from cyphonic.errors import ConfigError
from cyphonic.nms.core import NmsCore
from cyphonic.nms.server import NmsServer
from cyphonic.nms.trs_registry import TrsRegistry
from cyphonic.pki.ca import load_ca
from cyphonic.status import StatusServer
from cyphonic.store.sqlite import SQLiteStore
from cyphonic.trs.config import load_trs_key

log = logging.getLogger(__name__)


class Cloud:
    def __init__(self, cfg: CloudConfig) -> None:
        self.cfg = cfg
        if not (cfg.ca_dir / "ca.crt").exists():
            raise ConfigError(
                f"{cfg.path}: [cloud] state_dir: no CA in {cfg.ca_dir}; "
                "run `cyphonic ca init` first"
            )
        self.store = SQLiteStore(cfg.db_path)
        self.ca = load_ca(cfg.ca_dir)
        self.as_servers: list[asyncio.AbstractServer] = []
        self.nms: NmsServer | None = None
        self.status_server = StatusServer(cfg.status_socket, self.status)
        self.started = time.time()
        self.as_stats = ServerStats()

    async def start(self) -> None:
        cfg = self.cfg
        if cfg.as_enabled:
            service = AuthService(
                self.store,
                self.ca,
                cfg.domain,
                cfg.pool4,
                cfg.pool6,
                cfg.nms_public,
                cfg.common_key_lifetime,
                cfg.as_cert_lifetime_days,
            )
            ctx = server_ssl_context(self.ca, cfg.state_dir, time.time())
            for host, port in cfg.as_listen:
                self.as_servers.append(
                    await start_as_server(service, host, port, ctx, stats=self.as_stats)
                )
                log.info("AS listening on tcp %s:%d (TLS 1.3)", host, port)
        if cfg.nms_enabled:
            registry = TrsRegistry(load_trs_key(cfg.trs_key_file)) if cfg.trs_key_file else None
            core = NmsCore(
                self.store,
                cfg.domain,
                keepalive_interval=cfg.keepalive_interval,
                direction_timeout=cfg.direction_timeout,
                registry=registry,
                relay_lifetime=cfg.relay_lifetime,
            )
            self.nms = NmsServer(core)
            await self.nms.start(cfg.nms_listen)
        await self.status_server.start()
        log.info("cloud for %s up", cfg.domain)

    async def stop(self) -> None:
        await self.status_server.stop()
        if self.nms:
            await self.nms.stop()
        for s in self.as_servers:
            s.close()
            await s.wait_closed()
        self.store.close()

    def status(self) -> dict[str, Any]:
        nms: dict[str, Any] = {}
        if self.nms:
            c = self.nms.core.counters
            nms = dict(vars(c))
            nms["pending_directions"] = len(self.nms.core.pending)
            if self.nms.core.registry is not None:
                nms["trs"] = self.nms.core.registry.status(time.time())
        return {
            "role": "cloud",
            "domain": self.cfg.domain,
            "nodes": len(self.store.list_nodes()),
            "registrations": len(self.store.list_registrations()),
            "nms": nms,
            "as": {k: v for k, v in vars(self.as_stats).items() if isinstance(v, int)},
            "uptime": round(time.time() - self.started, 1),
        }
