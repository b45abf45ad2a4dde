"""TRS over real UDP on loopback (127.0.0.1 and ::1), and the TRS configuration."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from cyphonic.errors import ConfigError, CyphonicError
from cyphonic.nms.trs_registry import RelayResult, TrsRegistry
from cyphonic.trs.config import derive_trs_id, load_trs_config, load_trs_key
from cyphonic.trs.core import RelayCore
from cyphonic.trs.server import TrsServer
from cyphonic.wire import relay
from cyphonic.wire.relay import Side
from cyphonic.wire.signaling import Endpoint

KEY = bytes(range(32))
SID = b"\x5a" * 8
RELAY_KEY = b"\x3c" * 32


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_v6 = pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")


class Peer:
    """A UDP socket on loopback driven with the event loop's sock_* calls."""

    def __init__(self, host: str) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.setblocking(False)
        name = self.sock.getsockname()
        self.addr: Endpoint = (name[0], name[1])

    def send(self, data: bytes, addr: Endpoint) -> None:
        self.sock.sendto(data, addr)

    async def recv(self, timeout: float = 2.0) -> tuple[bytes, Endpoint]:
        loop = asyncio.get_running_loop()
        data, addr = await asyncio.wait_for(loop.sock_recvfrom(self.sock, 65535), timeout)
        return data, (addr[0], addr[1])

    async def silent(self, timeout: float = 0.2) -> bool:
        try:
            await self.recv(timeout)
        except TimeoutError:
            return True
        return False

    def close(self) -> None:
        self.sock.close()


async def relay_through_server(host_a: str, host_b: str) -> dict[str, int]:
    nms = Peer("127.0.0.1")
    registry = TrsRegistry(KEY)
    core = RelayCore(9, KEY, [], nms=[nms.addr])
    listen: list[Endpoint] = [("127.0.0.1", 0)]
    if _has_ipv6_loopback():
        listen.append(("::1", 0))
    server = TrsServer(core, listen)
    a, b = Peer(host_a), Peer(host_b)
    try:
        await server.start()
        trs_v4 = next(ep for ep in server.bound if ":" not in ep[0])
        trs_for = {4: trs_v4}
        if len(server.bound) > 1:
            trs_for[6] = next(ep for ep in server.bound if ":" in ep[0])

        # NMS learns the TRS from its hello and asks for a relayed session
        hello, src = await nms.recv()
        loop_now = asyncio.get_running_loop().time  # any clock: the registry only compares
        answers, _ = registry.handle(hello, src, loop_now())
        inst = registry.pick(loop_now())
        assert inst is not None and inst.trs_id == 9
        assert inst.endpoints == tuple(server.bound)
        for o in answers + registry.request_relay(inst, SID, RELAY_KEY, 600, loop_now()):
            nms.send(o.data, o.addr)
        results: list[RelayResult] = []
        while not results:
            data, src = await nms.recv()
            _, results = registry.handle(data, src, loop_now())
        (result,) = results
        assert result.ok and result.endpoints == tuple(server.bound)

        # both nodes bind from their own family and get an ack from where they sent to
        for peer, side, host in ((a, Side.MN, host_a), (b, Side.CN, host_b)):
            dst = trs_for[6 if ":" in host else 4]
            peer.send(relay.RelayBind.create(RELAY_KEY, side, SID, 1000).pack(), dst)
            data, src = await peer.recv()
            assert src == dst
            ack = relay.RelayBindAck.parse(data)
            assert ack.verify(RELAY_KEY) and ack.side is side
        assert core.sessions[SID].endpoints == [a.addr, b.addr]

        # data both ways, unchanged
        dst_a = trs_for[6 if ":" in host_a else 4]
        dst_b = trs_for[6 if ":" in host_b else 4]
        for i in range(5):
            pkt = relay.RelayData.wrap(SID, b"\x04\x00\x00\x00" + bytes([i]) * 200)
            a.send(pkt, dst_a)
            got, src = await b.recv()
            assert got == pkt and src == dst_b
        back = relay.RelayData.wrap(SID, b"\x02reply")
        b.send(back, dst_b)
        got, src = await a.recv()
        assert got == back and src == dst_a

        # a stranger using the session id gets nothing through
        stranger = Peer(host_a)
        try:
            stranger.send(relay.RelayData.wrap(SID, b"spoof"), dst_a)
            assert await b.silent()
        finally:
            stranger.close()

        status = server.status()
        assert status["role"] == "trs" and status["trs_id"] == 9
        assert status["sessions"][0]["session_id"] == SID.hex()
        return dict(core.counters)
    finally:
        await server.stop()
        for p in (a, b, nms):
            p.close()


def test_relay_v4_to_v4() -> None:
    counters = asyncio.run(relay_through_server("127.0.0.1", "127.0.0.1"))
    assert counters["relayed_packets"] == 6 and counters["wrong_source"] == 1


@needs_v6
def test_relay_v4_side_to_v6_side() -> None:
    counters = asyncio.run(relay_through_server("127.0.0.1", "::1"))
    assert counters["relayed_packets"] == 6 and counters["wrong_source"] == 1


@needs_v6
def test_relay_v6_side_to_v4_side() -> None:
    counters = asyncio.run(relay_through_server("::1", "127.0.0.1"))
    assert counters["relayed_packets"] == 6


def test_run_stops_cleanly_and_serves_status(tmp_path: Path) -> None:
    from cyphonic.status import query_status

    async def main() -> dict[str, object]:
        core = RelayCore(3, KEY, [("192.0.2.1", 4503)], nms=[("127.0.0.1", 9)])
        server = TrsServer(core, [("127.0.0.1", 0)])
        sock = tmp_path / "trs.sock"
        task = asyncio.create_task(server.run(sock))
        for _ in range(100):
            if sock.exists():
                break
            await asyncio.sleep(0.01)
        status = await asyncio.to_thread(query_status, sock)
        await server.stop()
        await asyncio.wait_for(task, 2)
        assert not sock.exists()
        return status

    status = asyncio.run(main())
    assert status["trs_id"] == 3 and status["public"] == ["192.0.2.1:4503"]
    assert "counters" in status


def test_listen_failure_is_a_clear_error() -> None:
    async def main() -> None:
        blocker = Peer("127.0.0.1")
        try:
            server = TrsServer(RelayCore(3, KEY, []), [blocker.addr])
            await server.start()
        finally:
            blocker.close()

    with pytest.raises(CyphonicError, match=r"TRS cannot listen on 127\.0\.0\.1"):
        asyncio.run(main())


# -- configuration --------------------------------------------------------------------------

TRS = """
[trs]
public = ["198.51.100.10:4503", "[2001:db8::10]:4503"]
nms = ["198.51.100.1:4502"]
key_file = "/etc/cyphonic/trs.key"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "trs.toml"
    p.write_text(text)
    return p


def test_config_defaults(tmp_path: Path) -> None:
    cfg = load_trs_config(write(tmp_path, TRS))
    assert cfg.listen == [("0.0.0.0", 4503), ("::", 4503)]
    assert cfg.public == [("198.51.100.10", 4503), ("2001:db8::10", 4503)]
    assert cfg.nms == [("198.51.100.1", 4502)]
    assert cfg.key_file == Path("/etc/cyphonic/trs.key")
    assert cfg.trs_id == derive_trs_id(cfg.public) and 0 < cfg.trs_id < 2**31
    assert cfg.idle_timeout == 120.0 and cfg.max_sessions == 10000
    assert cfg.status_socket == Path("/run/cyphonic/trs.sock") and cfg.log_level == "info"


def test_config_explicit(tmp_path: Path) -> None:
    text = """
[trs]
listen = ["192.0.2.5:4600"]
nms = ["192.0.2.1:4502", "[2001:db8::1]:4502"]
key_file = "k"
trs_id = 42
idle_timeout = 30
log_level = "DEBUG"
"""
    cfg = load_trs_config(write(tmp_path, text))
    assert cfg.public == [("192.0.2.5", 4600)]  # specific listen addresses are public
    assert cfg.trs_id == 42 and cfg.idle_timeout == 30.0 and cfg.log_level == "debug"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (TRS.replace("public = [", "# public = ["), "[trs] public: required"),
        (TRS.replace('nms = ["198.51.100.1:4502"]\n', ""), "[trs] nms: missing required key"),
        (TRS.replace('["198.51.100.1:4502"]', "[]"), "[trs] nms: at least one"),
        (TRS.replace('key_file = "/etc/cyphonic/trs.key"\n', ""), "key_file: missing"),
        (TRS + "trs_id = 0\n", "[trs] trs_id: must be between"),
        (TRS + "idle_timeout = -1\n", "[trs] idle_timeout: must be positive"),
        (TRS + "idle_timout = 5\n", "[trs] idle_timout: unknown key"),
        (TRS + "[nms]\n", "unknown table [nms]"),
        (TRS.replace("198.51.100.10:4503", "198.51.100.10"), "[trs] public: bad endpoint"),
        (TRS.replace("198.51.100.10:4503", "0.0.0.0:4503"), "not an address nodes can reach"),
        ("", "missing required table [trs]"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_trs_config(write(tmp_path, text))
    assert needle in str(err.value)


def test_key_file(tmp_path: Path) -> None:
    p = tmp_path / "trs.key"
    p.write_text(KEY.hex() + "\n")
    p.chmod(0o600)
    assert load_trs_key(p) == KEY
    for bad in ("abc", KEY.hex()[:-2], "zz" * 32, ""):
        p.write_text(bad)
        with pytest.raises(ConfigError, match="64 hexadecimal digits"):
            load_trs_key(p)
    with pytest.raises(ConfigError, match="not found"):
        load_trs_key(tmp_path / "missing.key")


def test_server_from_config(tmp_path: Path) -> None:
    key = tmp_path / "trs.key"
    key.write_text(KEY.hex())
    cfg = load_trs_config(write(tmp_path, TRS.replace("/etc/cyphonic/trs.key", str(key))))
    server = TrsServer.from_config(cfg)
    assert server.core.trs_id == cfg.trs_id and server.listen == cfg.listen
    assert server.core.public_endpoints == tuple(cfg.public)
