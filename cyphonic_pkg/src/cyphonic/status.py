"""Local status interface: a unix socket that answers one JSON document.

The daemon listens on ``status_socket`` (mode 0660); ``cyphonic status``
connects, sends ``status\\n`` and reads JSON until EOF.  The JSON is a stable
interface (DESIGN.md §4): scripts and tests read it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cyphonic.errors import CyphonicError

log = logging.getLogger(__name__)


class StatusServer:
    def __init__(self, path: Path, provider: Callable[[], dict[str, Any]]) -> None:
        self.path = path
        self.provider = provider
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self.server = await asyncio.start_unix_server(self._serve, path=str(self.path))
            os.chmod(self.path, 0o660)
        except OSError as exc:
            raise CyphonicError(f"cannot open status socket {self.path}: {exc.strerror}") from exc

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(reader.readline(), 5.0)
            writer.write(json.dumps(self.provider(), default=str).encode())
            await writer.drain()
        except (OSError, TimeoutError) as exc:
            log.debug("status client: %s", exc)
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server:
            self.server.close()
            await self.server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def query_status(path: Path, timeout: float = 5.0) -> dict[str, Any]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
        s.sendall(b"status\n")
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    except OSError as exc:
        raise CyphonicError(
            f"cannot reach the daemon at {path}: {exc.strerror or exc} (is it running?)"
        ) from exc
    finally:
        s.close()
    try:
        data: dict[str, Any] = json.loads(b"".join(chunks))
    except ValueError as exc:
        raise CyphonicError(f"daemon at {path} sent invalid status") from exc
    return data
