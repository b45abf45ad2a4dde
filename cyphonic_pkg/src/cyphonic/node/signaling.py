"""Node side of NMS signaling: requests with retransmission, server pushes.

``request()`` sends a message and waits for the answer with the same txid,
retransmitting the *same* plaintext (re-sealed with a fresh counter) with
backoff until ``timeout``; NMS treats retransmissions idempotently.  Datagrams
NMS starts itself (a Route Direction to the CN) go to ``on_push``, whose
answer is sent back with the same txid.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable

from cyphonic.crypto.channel import SignalingChannel
from cyphonic.errors import CryptoError, DecodeError, RequestTimeout, SignalingError
from cyphonic.wire import signaling as sig
from cyphonic.wire.signaling import Endpoint, ErrorCode

log = logging.getLogger(__name__)

BACKOFF = (0.25, 0.5, 1.0, 2.0, 2.0)

SendFn = Callable[[bytes, Endpoint], None]
PushFn = Callable[[sig.Message, Endpoint], sig.Message | None]


class SignalingClient:
    def __init__(self, channel: SignalingChannel, send: SendFn, on_push: PushFn) -> None:
        self.channel = channel
        self.send = send
        self.on_push = on_push
        self.waiting: dict[int, asyncio.Future[sig.Message]] = {}
        self._txid = int.from_bytes(os.urandom(4), "big")
        self.counters = {"rx": 0, "tx": 0, "dropped": 0, "retransmits": 0}

    def next_txid(self) -> int:
        self._txid = (self._txid + 1) & 0xFFFFFFFF
        return self._txid

    async def request(self, msg: sig.Message, dst: Endpoint, timeout: float) -> sig.Message:
        """Send ``msg`` to NMS at ``dst``; the answer, or ``SignalingError``/``RequestTimeout``."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[sig.Message] = loop.create_future()
        self.waiting[msg.txid] = fut
        plain = msg.pack()
        deadline = loop.time() + timeout
        try:
            attempt = 0
            while True:
                self.send(self.channel.seal(plain), dst)
                self.counters["tx"] += 1
                wait = min(BACKOFF[min(attempt, len(BACKOFF) - 1)], deadline - loop.time())
                if wait <= 0:
                    break
                done, _ = await asyncio.wait({fut}, timeout=wait)
                if done:
                    answer = fut.result()
                    if isinstance(answer, sig.Error):
                        raise SignalingError(answer.code, answer.text)
                    return answer
                attempt += 1
                self.counters["retransmits"] += 1
        finally:
            self.waiting.pop(msg.txid, None)
            if not fut.done():
                fut.cancel()
        raise RequestTimeout(f"NMS at {sig.format_endpoint(dst)} did not answer in {timeout:g} s")

    def datagram_received(self, data: bytes, src: Endpoint) -> None:
        try:
            header = sig.Header.parse(data)
            msg = sig.parse_message(self.channel.open(data, header))
        except (DecodeError, CryptoError) as exc:
            self.counters["dropped"] += 1
            log.debug("dropped signaling datagram from %s: %s", sig.format_endpoint(src), exc)
            return
        self.counters["rx"] += 1
        fut = self.waiting.get(msg.txid)
        is_push = isinstance(msg, sig.RouteDirection) and msg.role == sig.Role.RESPONDER
        if fut is not None and not is_push:
            if not fut.done():
                fut.set_result(msg)
            return
        answer = self.on_push(msg, src)
        if answer is not None:
            self.send(self.channel.seal(answer.pack()), src)


def is_fatal(exc: SignalingError) -> bool:
    """Errors after which the node must log in to AS again."""
    return exc.code == ErrorCode.UNKNOWN_KEY


async def cancel(task: asyncio.Task[None] | None) -> None:
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
