"""Tests of cyphonic.auth.server and cyphonic.auth.client: real TLS over loopback,
plus property-based fuzzing of the frame and request parsers."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import socket
import ssl
import stat
import struct
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cyphonic import admin
from cyphonic.auth import client
from cyphonic.auth.server import (
    MAX_FRAME,
    AuthServer,
    EnrollRequest,
    GeneralNodeInfo,
    GnEnrollRequest,
    GnListRequest,
    LoginRequest,
    ServerStats,
    decode_frame,
    encode_frame,
    ensure_server_certificate,
    frame_length,
    general_node_to_json,
    gn_list_answer_from_json,
    login_result_from_json,
    login_result_to_json,
    parse_json_object,
    parse_request,
    server_ssl_context,
    start_as_server,
)
from cyphonic.auth.service import AuthService
from cyphonic.errors import AuthError, CyphonicError, DecodeError, EnrollmentError
from cyphonic.pki.ca import (
    CertificateAuthority,
    init_ca,
    issue_node_certificate,
    load_ca,
)
from cyphonic.pki.node_keys import generate_node_keys, make_csr
from cyphonic.pki.tokens import create_token
from cyphonic.store.base import GeneralNodeRecord
from cyphonic.store.sqlite import SQLiteStore

DOMAIN = "cy.example"
AS_NAME = "as.cy.example"
POOL4 = IPv4Network("10.77.0.0/24")
POOL6 = IPv6Network("fd00:77::/64")
T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


@dataclass
class Cloud:
    """A running AS on 127.0.0.1 with its CA, store and counters."""

    dir: Path
    ca: CertificateAuthority
    store: SQLiteStore
    service: AuthService
    stats: ServerStats
    port: int

    @property
    def ca_path(self) -> Path:
        return self.dir / "ca" / "ca.crt"

    def token(self, fqdn: str, ttl: float = 600, now: float | None = None) -> str:
        return create_token(self.store, fqdn, ttl, time.time() if now is None else now)

    async def enroll(self, fqdn: str, key_dir: Path, token: str | None = None) -> Path:
        return await client.enroll(
            "127.0.0.1",
            self.port,
            self.ca_path,
            token if token is not None else self.token(fqdn),
            fqdn,
            key_dir,
            DOMAIN,
        )

    async def login(self, fqdn: str, key_dir: Path) -> Any:
        return await client.login("127.0.0.1", self.port, self.ca_path, key_dir, fqdn, DOMAIN)

    def add_gn(self, mac: str, fqdn: str, adapter: str) -> GeneralNodeRecord:
        return admin.add_general_node(
            self.store,
            DOMAIN,
            POOL4,
            POOL6,
            mac=mac,
            fqdn=fqdn,
            adapter_fqdn=adapter,
            now=time.time(),
        )

    async def gn_list(self, adapter_dir: Path) -> tuple[int, list[GeneralNodeInfo]]:
        return await client.gn_list("127.0.0.1", self.port, self.ca_path, adapter_dir, DOMAIN)

    async def gn_enroll(self, adapter_dir: Path, gn_dir: Path, fqdn: str) -> Path:
        return await client.gn_enroll(
            "127.0.0.1", self.port, self.ca_path, adapter_dir, gn_dir, fqdn, DOMAIN
        )


@asynccontextmanager
async def cloud(
    base: Path, *, db: str | Path = ":memory:", timeout: float = 10.0
) -> AsyncIterator[Cloud]:
    ca_dir = base / "ca"
    ca = load_ca(ca_dir) if (ca_dir / "ca.key").exists() else init_ca(ca_dir, DOMAIN, time.time())
    store = SQLiteStore(db)
    service = AuthService(store, ca, DOMAIN, POOL4, POOL6, ["192.0.2.1:4502"], 3600, 30)
    ctx = server_ssl_context(ca, base / "state", time.time())
    stats = ServerStats()
    server = await start_as_server(service, "127.0.0.1", 0, ctx, stats=stats, timeout=timeout)
    port = server.sockets[0].getsockname()[1]
    try:
        yield Cloud(base, ca, store, service, stats, port)
    finally:
        server.close()
        await server.wait_closed()
        store.close()


async def raw_request(
    c: Cloud,
    data: bytes,
    *,
    cert: Path | None = None,
    key: Path | None = None,
    half_close: bool = False,
) -> dict[str, Any] | None:
    """Send ``data`` over TLS and return the decoded answer, or None if the AS hung up."""
    ctx = client.client_ssl_context(c.ca_path, cert, key)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", c.port, ssl=ctx, server_hostname=AS_NAME
    )
    try:
        writer.write(data)
        await writer.drain()
        if half_close:
            writer.close()
            return None
        header = await asyncio.wait_for(reader.readexactly(4), 5)
        return parse_json_object(await reader.readexactly(frame_length(header)))
    except (asyncio.IncompleteReadError, ConnectionResetError):
        return None
    finally:
        writer.close()


def frame(obj: Any) -> bytes:
    payload = json.dumps(obj).encode()
    return struct.pack(">I", len(payload)) + payload


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ============================================================== enrollment and login


def test_enroll_then_login(tmp_path: Path) -> None:
    async def main() -> None:
        async with cloud(tmp_path) as c:
            key_dir = tmp_path / "n1"
            cert_path = await c.enroll("n1.cy.example", key_dir)
            assert cert_path == key_dir / "node.crt"
            assert mode(key_dir / "node.key") == 0o600
            assert mode(key_dir / "x25519.key") == 0o600
            assert (key_dir / "ca.crt").read_bytes() == c.ca_path.read_bytes()
            result = await c.login("n1.cy.example", key_dir)
            node = c.store.get_node_by_fqdn("n1.cy.example")
            assert node is not None
            assert result.node_id == node.node_id
            assert (str(result.vip4), str(result.vip6)) == ("10.77.0.2", "fd00:77::2")
            assert result.nms_endpoints == ("192.0.2.1:4502",)
            stored = c.store.get_common_key(result.key_id)
            assert stored is not None and stored.key == result.common_key
            assert c.stats.enrolled == 1 and c.stats.logged_in == 1
            assert c.stats.internal_errors == 0

    run(main())


def test_reused_expired_and_forged_tokens(tmp_path: Path) -> None:
    async def main() -> None:
        async with cloud(tmp_path) as c:
            token = c.token("n1.cy.example")
            await c.enroll("n1.cy.example", tmp_path / "n1", token)
            with pytest.raises(EnrollmentError, match=r"already used.*\(token_used\)"):
                await c.enroll("n1.cy.example", tmp_path / "n1b", token)
            old = c.token("n2.cy.example", ttl=10, now=time.time() - 1000)
            with pytest.raises(EnrollmentError, match=r"expired at .*\(token_expired\)"):
                await c.enroll("n2.cy.example", tmp_path / "n2", old)
            with pytest.raises(EnrollmentError, match=r"not known to this AS"):
                await c.enroll("n3.cy.example", tmp_path / "n3", "Zm9yZ2VkIHRva2Vu")
            other = c.token("n4.cy.example")
            with pytest.raises(EnrollmentError, match=r"created for n4\.cy\.example, not n5"):
                await c.enroll("n5.cy.example", tmp_path / "n5", other)
            assert not (tmp_path / "n2" / "node.crt").exists()
            assert c.stats.refused == 4

    run(main())


def test_enroll_refuses_bad_fqdn_locally(tmp_path: Path) -> None:
    async def main() -> None:
        async with cloud(tmp_path) as c:
            with pytest.raises(EnrollmentError, match="not under the CYPHONIC domain"):
                await c.enroll("n1.elsewhere.example", tmp_path / "n1", "t")
            assert c.stats.connections == 0

    run(main())


def test_login_with_certificate_from_another_ca(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    async def main() -> None:
        async with cloud(tmp_path) as c:
            await c.enroll("n1.cy.example", tmp_path / "n1")
            other = init_ca(tmp_path / "other-ca", DOMAIN, time.time())
            evil = tmp_path / "evil"
            keys = generate_node_keys(evil)
            forged = issue_node_certificate(
                other, make_csr(keys, "n1.cy.example"), "n1.cy.example", 30, time.time()
            )
            (evil / "node.crt").write_bytes(forged.public_bytes(serialization.Encoding.PEM))
            # The client itself notices before connecting ...
            connections = c.stats.connections
            with pytest.raises(AuthError, match="not issued by this CYPHONIC CA"):
                await c.login("n1.cy.example", evil)
            assert c.stats.connections == connections
            # ... and the AS refuses it in the TLS handshake when it is sent anyway.
            ctx = client.client_ssl_context(c.ca_path, evil / "node.crt", evil / "node.key")
            with pytest.raises(CyphonicError, match=r"(closed the connection|reset).*certificate"):
                await client._exchange(
                    "127.0.0.1",
                    c.port,
                    ctx,
                    AS_NAME,
                    {"op": "login", "fqdn": "n1.cy.example"},
                    c.ca_path,
                    5.0,
                    eof_hint=" (certificate refused?)",
                )
            assert c.stats.tls_failures == 1
            assert c.stats.logged_in == 0
            assert c.store.get_common_key(1) is None
            # the AS is unharmed
            await c.login("n1.cy.example", tmp_path / "n1")

    run(main())
    assert any("client certificate rejected" in r.getMessage() for r in caplog.records)


def test_as_certificate_from_another_ca(tmp_path: Path) -> None:
    async def main() -> None:
        async with cloud(tmp_path) as c:
            init_ca(tmp_path / "other-ca", DOMAIN, time.time())
            with pytest.raises(
                EnrollmentError, match=r"TLS verification of the AS at 127\.0\.0\.1:"
            ):
                await client.enroll(
                    "127.0.0.1",
                    c.port,
                    tmp_path / "other-ca" / "ca.crt",
                    c.token("n1.cy.example"),
                    "n1.cy.example",
                    tmp_path / "n1",
                    DOMAIN,
                )
            assert c.stats.enrolled == 0

    run(main())


def test_login_claiming_another_fqdn(tmp_path: Path) -> None:
    async def main() -> None:
        async with cloud(tmp_path) as c:
            await c.enroll("n1.cy.example", tmp_path / "n1")
            await c.enroll("n2.cy.example", tmp_path / "n2")
            with pytest.raises(
                AuthError, match=r"certificate is for n1\.cy\.example, not n2\.cy\.example"
            ):
                await c.login("n2.cy.example", tmp_path / "n1")
            assert c.stats.logged_in == 0

    run(main())


def test_superseded_certificate_refused(tmp_path: Path) -> None:
    async def main() -> None:
        async with cloud(tmp_path) as c:
            await c.enroll("n1.cy.example", tmp_path / "first")
            await c.enroll("n1.cy.example", tmp_path / "second")
            with pytest.raises(AuthError, match="superseded by a later enrollment"):
                await c.login("n1.cy.example", tmp_path / "first")
            await c.login("n1.cy.example", tmp_path / "second")

    run(main())


def test_login_without_enrollment(tmp_path: Path) -> None:
    async def main() -> None:
        async with cloud(tmp_path) as c:
            with pytest.raises(AuthError, match=r"node\.crt not found: enroll this node first"):
                await c.login("n1.cy.example", tmp_path / "nothing")

    run(main())


def test_vips_stable_across_restart(tmp_path: Path) -> None:
    db = tmp_path / "cloud.sqlite"

    async def first() -> tuple[int, str, str]:
        async with cloud(tmp_path, db=db) as c:
            await c.enroll("n0.cy.example", tmp_path / "n0")
            await c.enroll("n1.cy.example", tmp_path / "n1")
            r = await c.login("n1.cy.example", tmp_path / "n1")
            return r.node_id, str(r.vip4), str(r.vip6)

    async def second() -> tuple[tuple[int, str, str], tuple[int, str, str]]:
        async with cloud(tmp_path, db=db) as c:  # same CA, same database file
            same = await c.login("n1.cy.example", tmp_path / "n1")
            await c.enroll("n1.cy.example", tmp_path / "n1-new")  # re-enrollment
            again = await c.login("n1.cy.example", tmp_path / "n1-new")
            return (same.node_id, str(same.vip4), str(same.vip6)), (
                again.node_id,
                str(again.vip4),
                str(again.vip6),
            )

    before = run(first())
    same, again = run(second())
    assert before == same == again
    assert before[1:] == ("10.77.0.3", "fd00:77::3")


# ============================================================== hostile input


def test_garbage_and_oversized_frames_do_not_kill_the_server(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    async def main() -> None:
        async with cloud(tmp_path, timeout=0.5) as c:
            # not TLS at all
            r, w = await asyncio.open_connection("127.0.0.1", c.port)
            w.write(b"GET / HTTP/1.0\r\n\r\n" + bytes(range(256)))
            await w.drain()
            assert await r.read() == b""
            w.close()
            # connect and hang up at once
            r, w = await asyncio.open_connection("127.0.0.1", c.port)
            w.close()
            # oversized and empty frames
            answer = await raw_request(c, struct.pack(">I", MAX_FRAME + 1) + b"{}")
            assert answer is not None and answer["code"] == "bad_frame"
            assert "exceeds" in answer["error"]
            answer = await raw_request(c, b"\xff\xff\xff\xff")
            assert answer is not None and answer["code"] == "bad_frame"
            answer = await raw_request(c, b"\x00\x00\x00\x00")
            assert answer is not None and answer["code"] == "bad_frame"
            # malformed requests
            for bad in (
                b"\x00\x00\x00\x05{oops",
                b"\x00\x00\x00\x04\xff\xfe\xfd\xfc",
                frame([1, 2, 3]),
                frame({"op": "shutdown"}),
                frame({"op": "enroll", "token": 5, "fqdn": "x", "csr": "y"}),
                frame({"op": "login"}),
                frame({"no": "op"}),
                struct.pack(">I", 40000) + b"[" * 40000,
            ):
                answer = await raw_request(c, bad)
                assert answer is not None, bad[:20]
                assert answer["ok"] is False and answer["code"] == "bad_request"
            # a truncated frame, then end of stream
            assert await raw_request(c, b"\x00\x00\x01\x00{", half_close=True) is None
            # silence until the server's timeout
            ctx = client.client_ssl_context(c.ca_path)
            r, w = await asyncio.open_connection(
                "127.0.0.1", c.port, ssl=ctx, server_hostname=AS_NAME
            )
            assert await asyncio.wait_for(r.read(), 5) == b""
            w.close()
            # TLS 1.2 is refused
            ctx12 = client.client_ssl_context(c.ca_path)
            ctx12.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx12.maximum_version = ssl.TLSVersion.TLSv1_2
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await asyncio.open_connection(
                    "127.0.0.1", c.port, ssl=ctx12, server_hostname=AS_NAME
                )
            await asyncio.sleep(0.1)
            # still serving
            await c.enroll("n1.cy.example", tmp_path / "n1")
            await c.login("n1.cy.example", tmp_path / "n1")
            s = c.stats
            assert s.tls_failures >= 3
            assert s.bad_frames >= 12
            assert s.timeouts == 1
            assert s.internal_errors == 0
            assert s.enrolled == 1 and s.logged_in == 1

    run(main())
    assert not [r for r in caplog.records if r.exc_info], "no tracebacks for bad input"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_login_without_client_certificate(tmp_path: Path) -> None:
    async def main() -> None:
        async with cloud(tmp_path) as c:
            await c.enroll("n1.cy.example", tmp_path / "n1")
            answer = await raw_request(c, frame({"op": "login", "fqdn": "n1.cy.example"}))
            assert answer == {
                "ok": False,
                "code": "login_refused",
                "error": "login needs the node's client certificate (node.crt)",
            }

    run(main())


def test_secrets_are_never_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secrets: list[str] = []

    async def main() -> None:
        async with cloud(tmp_path) as c:
            token = c.token("n1.cy.example")
            secrets.append(token)
            with pytest.raises(EnrollmentError):
                await c.enroll("n2.cy.example", tmp_path / "n2", token)
            await c.enroll("n1.cy.example", tmp_path / "n1", token)
            with pytest.raises(EnrollmentError):
                await c.enroll("n1.cy.example", tmp_path / "n1", token)
            result = await c.login("n1.cy.example", tmp_path / "n1")
            secrets.append(base64.b64encode(result.common_key).decode())
            secrets.append(result.common_key.hex())

    run(main())
    text = "\n".join(r.getMessage() for r in caplog.records) + caplog.text
    assert "enrolled n1.cy.example" in text
    for secret in secrets:
        assert secret not in text


# ============================================================== client failures


def test_as_unreachable(tmp_path: Path) -> None:
    port = free_port()
    init_ca(tmp_path / "ca", DOMAIN, time.time())
    ca_path = tmp_path / "ca" / "ca.crt"

    async def main() -> None:
        with pytest.raises(
            EnrollmentError, match=rf"^cannot reach AS at 127\.0\.0\.1:{port}: Connection refused$"
        ):
            await client.enroll(
                "127.0.0.1", port, ca_path, "t", "n1.cy.example", tmp_path / "n1", DOMAIN
            )

    run(main())


def test_login_unreachable_is_an_auth_error(tmp_path: Path) -> None:
    async def main() -> Path:
        async with cloud(tmp_path) as c:
            await c.enroll("n1.cy.example", tmp_path / "n1")
            return c.ca_path

    ca_path = run(main())
    port = free_port()

    async def login() -> None:
        with pytest.raises(AuthError, match=r"cannot reach AS at .*Connection refused"):
            await client.login("127.0.0.1", port, ca_path, tmp_path / "n1", "n1.cy.example", DOMAIN)

    run(login())


def test_as_timeout(tmp_path: Path) -> None:
    init_ca(tmp_path / "ca", DOMAIN, time.time())
    ca_path = tmp_path / "ca" / "ca.crt"

    async def main() -> None:
        hold: list[asyncio.StreamWriter] = []

        async def silent(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            hold.append(w)

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            with pytest.raises(EnrollmentError, match=r"did not answer within 0\.3 s"):
                await client.enroll(
                    "127.0.0.1",
                    port,
                    ca_path,
                    "t",
                    "n1.cy.example",
                    tmp_path / "n1",
                    DOMAIN,
                    timeout=0.3,
                )
        finally:
            for w in hold:
                w.close()
            server.close()
            await server.wait_closed()

    run(main())


def test_missing_ca_certificate(tmp_path: Path) -> None:
    async def main() -> None:
        with pytest.raises(EnrollmentError, match=r"CA certificate .*ca\.crt not found"):
            await client.enroll(
                "127.0.0.1", 1, tmp_path / "ca.crt", "t", "n1.cy.example", tmp_path / "n", DOMAIN
            )

    run(main())


# ============================================================== AS certificate


def test_ensure_server_certificate(tmp_path: Path) -> None:
    now = time.time()
    ca = init_ca(tmp_path / "ca", DOMAIN, now)
    state = tmp_path / "state"
    cert_path, key_path = ensure_server_certificate(ca, state, now, ip_addresses=["127.0.0.1"])
    assert mode(key_path) == 0o600
    pem = cert_path.read_bytes()
    # reused while it fits
    assert ensure_server_certificate(ca, state, now + 86400, ip_addresses=["127.0.0.1"])
    assert cert_path.read_bytes() == pem
    # renewed when it would expire soon, when names are added, or for a new CA
    ensure_server_certificate(ca, state, now + 380 * 86400)
    assert cert_path.read_bytes() != pem
    pem = cert_path.read_bytes()
    ensure_server_certificate(ca, state, now, dns_names=["cloud.cy.example"])
    assert cert_path.read_bytes() != pem
    pem = cert_path.read_bytes()
    other = init_ca(tmp_path / "other", DOMAIN, now)
    ensure_server_certificate(other, state, now, dns_names=["cloud.cy.example"])
    assert cert_path.read_bytes() != pem
    key_path.write_bytes(b"garbage")
    ensure_server_certificate(other, state, now)
    assert mode(key_path) == 0o600
    ctx = server_ssl_context(other, state, now)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    assert ctx.verify_mode == ssl.CERT_OPTIONAL


# ============================================================== codec and fuzzing


def test_frame_round_trip() -> None:
    obj = {"op": "login", "fqdn": "n1.cy.example"}
    data = encode_frame(obj)
    assert data[:4] == struct.pack(">I", len(data) - 4)
    assert parse_json_object(decode_frame(data)) == obj
    assert parse_request(decode_frame(data)) == LoginRequest("n1.cy.example")
    with pytest.raises(DecodeError, match="carries"):
        decode_frame(data + b"x")
    with pytest.raises(ValueError):
        encode_frame({"x": "y" * MAX_FRAME})


def test_parse_enroll_request() -> None:
    req = parse_request(
        json.dumps({"op": "enroll", "token": "t", "fqdn": "f", "csr": "c"}).encode()
    )
    assert req == EnrollRequest(token="t", fqdn="f", csr_pem=b"c")
    assert "'t'" not in repr(req)
    with pytest.raises(DecodeError, match="ASCII"):
        parse_request(json.dumps({"op": "enroll", "token": "t", "fqdn": "f", "csr": "é"}).encode())
    with pytest.raises(DecodeError, match=r"1\.\.256"):
        parse_request(
            json.dumps({"op": "enroll", "token": "t" * 300, "fqdn": "f", "csr": "c"}).encode()
        )


def test_login_result_round_trip(tmp_path: Path) -> None:
    async def main() -> Any:
        async with cloud(tmp_path) as c:
            await c.enroll("n1.cy.example", tmp_path / "n1")
            return await c.login("n1.cy.example", tmp_path / "n1")

    result = run(main())
    wire = json.loads(json.dumps(login_result_to_json(result)))
    assert login_result_from_json(wire) == result
    for field, bad in (
        ("common_key", "!!!"),
        ("common_key", base64.b64encode(b"short").decode()),
        ("vip4", "fd00::1"),
        ("vip4", "10.99.0.1"),
        ("node_id", 0),
        ("node_id", True),
        ("key_expires_at", "soon"),
        ("nms_endpoints", [1]),
    ):
        with pytest.raises(DecodeError):
            login_result_from_json({**wire, field: bad})


def _check_parser(data: bytes) -> None:
    try:
        req = parse_request(data)
    except DecodeError:
        return
    assert isinstance(req, EnrollRequest | LoginRequest | GnListRequest | GnEnrollRequest)


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_fuzz_request_parser_bytes(data: bytes) -> None:
    _check_parser(data)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=6,
)
request_like = st.fixed_dictionaries(
    {"op": st.sampled_from(["enroll", "login", "gn_list", "gn_enroll", "other", ""]) | json_values},
    optional={
        "token": st.text(max_size=300) | json_values,
        "fqdn": st.text(max_size=300) | json_values,
        "csr": st.text(max_size=100) | json_values,
    },
)


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request_like)
def test_fuzz_request_parser_structured(obj: dict[str, Any]) -> None:
    data = json.dumps(obj).encode()
    try:
        req = parse_request(data)
    except DecodeError:
        return
    if isinstance(req, LoginRequest):
        assert obj["op"] == "login" and req.fqdn == obj["fqdn"]
    elif isinstance(req, GnListRequest):
        assert obj["op"] == "gn_list"
    elif isinstance(req, GnEnrollRequest):
        assert obj["op"] == "gn_enroll" and req.fqdn == obj["fqdn"]
        assert req.csr_pem == obj["csr"].encode("ascii") and 0 < len(req.fqdn) <= 255
    else:
        assert obj["op"] == "enroll" and req.token == obj["token"]


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.binary(max_size=64) | st.builds(lambda o: encode_frame(o), request_like),
    st.binary(max_size=8),
)
def test_fuzz_frame_decoder(data: bytes, tail: bytes) -> None:
    for candidate in (data, data + tail, data[: len(data) // 2]):
        try:
            payload = decode_frame(candidate)
        except DecodeError:
            continue
        assert 0 < len(payload) <= MAX_FRAME
        _check_parser(payload)


VALID_ANSWER: dict[str, Any] = {
    "node_id": 7,
    "fqdn": "n1.cy.example",
    "vip4": "10.77.0.2",
    "vip6": "fd00:77::2",
    "vip4_pool": "10.77.0.0/24",
    "vip6_pool": "fd00:77::/64",
    "key_id": 9,
    "common_key": base64.b64encode(bytes(32)).decode(),
    "key_expires_at": 1.5,
    "nms_endpoints": ["192.0.2.1:4502"],
    "domain": "cy.example",
}
answer_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=60)
    | st.lists(st.text(max_size=10), max_size=3)
)


@settings(max_examples=1000, deadline=None)
@given(
    st.dictionaries(st.sampled_from(sorted(VALID_ANSWER)), answer_scalars, max_size=6),
    st.sets(st.sampled_from(sorted(VALID_ANSWER)), max_size=3),
)
def test_fuzz_login_answer_decoder(changes: dict[str, Any], removed: set[str]) -> None:
    """A valid answer with some fields replaced by random values or removed."""
    obj = {k: v for k, v in {**VALID_ANSWER, **changes}.items() if k not in removed}
    try:
        result = login_result_from_json(obj)
    except DecodeError:
        return
    assert len(result.common_key) == 32


def test_internal_error_is_answered_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        async with cloud(tmp_path) as c:

            def broken(*_args: Any) -> Any:
                raise RuntimeError("disk on fire")

            monkeypatch.setattr(c.service, "enroll", broken)
            with pytest.raises(EnrollmentError, match=r"internal error in the AS.*\(internal\)"):
                await c.enroll("n1.cy.example", tmp_path / "n1")
            assert c.stats.internal_errors == 1

    run(main())
    assert any(r.exc_info for r in caplog.records if r.levelno == logging.ERROR)


# ============================================================== general nodes

MAC1 = "02:00:5e:00:53:01"
MAC2 = "02:00:5e:00:53:02"


def test_general_node_end_to_end(tmp_path: Path) -> None:
    """The adapter lists its general nodes, enrolls one, and the general node logs in."""

    async def main() -> None:
        async with cloud(tmp_path) as c:
            ad_dir = tmp_path / "adapter"
            await c.enroll("ad.cy.example", ad_dir)
            await c.enroll("ad2.cy.example", tmp_path / "adapter2")
            gn1 = c.add_gn(MAC1, "gn1.cy.example", "ad.cy.example")
            gn2 = c.add_gn(MAC2, "gn2.cy.example", "ad2.cy.example")
            generation, nodes = await c.gn_list(ad_dir)
            assert generation == admin.generation(c.store) == 2
            assert nodes == [GeneralNodeInfo(MAC1, "gn1.cy.example", gn1.vip4, gn1.vip6)]
            assert await c.gn_list(tmp_path / "adapter2") == (
                2,
                [GeneralNodeInfo(MAC2, "gn2.cy.example", gn2.vip4, gn2.vip6)],
            )
            gn_dir = ad_dir / "general-nodes" / MAC1.replace(":", "")
            cert_path = await c.gn_enroll(ad_dir, gn_dir, "gn1.cy.example")
            assert cert_path == gn_dir / "node.crt"
            assert mode(gn_dir / "node.key") == 0o600 and mode(gn_dir / "x25519.key") == 0o600
            assert (gn_dir / "ca.crt").read_bytes() == c.ca_path.read_bytes()
            assert (ad_dir / "node.crt").read_bytes() != cert_path.read_bytes()
            result = await c.login("gn1.cy.example", gn_dir)
            assert (result.fqdn, result.vip4, result.vip6) == ("gn1.cy.example", gn1.vip4, gn1.vip6)
            node = c.store.get_node_by_fqdn("gn1.cy.example")
            assert node is not None and node.node_id == result.node_id
            # the adapter still logs in as itself, and sees a later change
            await c.login("ad.cy.example", ad_dir)
            admin.remove_general_node(c.store, MAC1)
            assert await c.gn_list(ad_dir) == (3, [])
            with pytest.raises(AuthError, match=r"gn1\.cy\.example is not enrolled"):
                await c.login("gn1.cy.example", gn_dir)
            s = c.stats
            assert (s.gn_listed, s.gn_enrolled, s.logged_in) == (3, 1, 2)
            assert s.internal_errors == 0

    run(main())


def test_gn_requests_need_a_client_certificate(tmp_path: Path) -> None:
    async def main() -> None:
        async with cloud(tmp_path) as c:
            answer = await raw_request(c, frame({"op": "gn_list"}))
            assert answer == {
                "ok": False,
                "code": "login_refused",
                "error": "gn_list needs the adapter's client certificate (node.crt)",
            }
            answer = await raw_request(
                c, frame({"op": "gn_enroll", "fqdn": "gn1.cy.example", "csr": "x"})
            )
            assert answer is not None and answer["code"] == "login_refused"
            assert "gn_enroll needs the adapter's client certificate" in answer["error"]
            assert c.stats.refused == 2

    run(main())


def test_gn_enroll_refusals_over_tls(tmp_path: Path) -> None:
    async def main() -> None:
        async with cloud(tmp_path) as c:
            await c.enroll("ad.cy.example", tmp_path / "ad")
            await c.enroll("ad2.cy.example", tmp_path / "ad2")
            c.add_gn(MAC1, "gn1.cy.example", "ad.cy.example")
            with pytest.raises(
                EnrollmentError,
                match=r"refused to enroll general node gn1\.cy\.example: general node "
                r"gn1\.cy\.example is behind the adapter ad\.cy\.example, not ad2\.cy\.example "
                r"\(enroll_refused\)$",
            ):
                await c.gn_enroll(tmp_path / "ad2", tmp_path / "gn1-by-ad2", "gn1.cy.example")
            with pytest.raises(EnrollmentError, match=r"gn9\.cy\.example is not a general node"):
                await c.gn_enroll(tmp_path / "ad", tmp_path / "gn9", "gn9.cy.example")
            assert not (tmp_path / "gn1-by-ad2" / "node.crt").exists()
            # a node cannot enroll under a general node's name
            with pytest.raises(
                EnrollmentError, match=r"gn1\.cy\.example is a general node .*\(enroll_refused\)"
            ):
                await c.enroll("gn1.cy.example", tmp_path / "impostor")
            assert c.store.get_node_by_fqdn("gn1.cy.example") is None
            assert c.stats.gn_enrolled == 0 and c.stats.refused == 3

    run(main())


def test_gn_client_local_refusals(tmp_path: Path) -> None:
    async def main() -> None:
        async with cloud(tmp_path) as c:
            ad = tmp_path / "ad"
            with pytest.raises(AuthError, match=r"node\.crt not found: enroll this node first"):
                await c.gn_list(ad)
            with pytest.raises(EnrollmentError, match=r"node\.crt not found: enroll this node"):
                await c.gn_enroll(ad, tmp_path / "gn1", "gn1.cy.example")
            await c.enroll("ad.cy.example", ad)
            with pytest.raises(EnrollmentError, match="is the adapter's own"):
                await c.gn_enroll(ad, ad, "gn1.cy.example")
            with pytest.raises(EnrollmentError, match="not under the CYPHONIC domain"):
                await c.gn_enroll(ad, tmp_path / "gn1", "gn1.other.example")
            assert c.stats.connections == 1  # only the adapter's enrollment
            assert not (tmp_path / "gn1").exists()

    run(main())


def test_gn_list_by_a_general_node_is_refused(tmp_path: Path) -> None:
    async def main() -> None:
        async with cloud(tmp_path) as c:
            await c.enroll("ad.cy.example", tmp_path / "ad")
            c.add_gn(MAC1, "gn1.cy.example", "ad.cy.example")
            await c.gn_enroll(tmp_path / "ad", tmp_path / "gn1", "gn1.cy.example")
            with pytest.raises(AuthError, match=r"general node, not an adapter \(login_refused\)$"):
                await c.gn_list(tmp_path / "gn1")

    run(main())


def test_gn_list_too_long_for_one_frame(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        async with cloud(tmp_path) as c:
            records = [
                GeneralNodeRecord(
                    mac=f"02:00:00:00:{i >> 8:02x}:{i & 0xFF:02x}",
                    fqdn=f"general-node-{i:05d}.cy.example",
                    vip4=IPv4Address("10.0.0.0") + i,
                    vip6=IPv6Address("fd00::") + i,
                    adapter_fqdn="ad.cy.example",
                    created_at=0.0,
                )
                for i in range(1000)
            ]
            monkeypatch.setattr(c.service, "gn_list", lambda _der, _now: (7, records))
            handler = AuthServer(c.service, ssl.create_default_context())
            answer = handler.handle_request(GnListRequest(), b"")
            assert answer["ok"] is False and answer["code"] == "refused"
            assert "1000 general nodes does not fit" in answer["error"]
            monkeypatch.setattr(c.service, "gn_list", lambda _der, _now: (7, records[:300]))
            answer = handler.handle_request(GnListRequest(), b"")
            assert answer["ok"] is True and len(answer["general_nodes"]) == 300

    run(main())


def test_parse_gn_requests() -> None:
    assert parse_request(b'{"op": "gn_list", "extra": 1}') == GnListRequest()
    req = parse_request(
        json.dumps({"op": "gn_enroll", "fqdn": "gn1.cy.example", "csr": "PEM"}).encode()
    )
    assert req == GnEnrollRequest(fqdn="gn1.cy.example", csr_pem=b"PEM")
    for bad in (
        {"op": "gn_enroll", "fqdn": "gn1.cy.example"},
        {"op": "gn_enroll", "csr": "PEM"},
        {"op": "gn_enroll", "fqdn": "", "csr": "PEM"},
        {"op": "gn_enroll", "fqdn": "f" * 256, "csr": "PEM"},
        {"op": "gn_enroll", "fqdn": "f", "csr": "é"},
        {"op": "gn_enroll", "fqdn": 1, "csr": "PEM"},
        {"op": "GN_LIST"},
    ):
        with pytest.raises(DecodeError):
            parse_request(json.dumps(bad).encode())


VALID_GN_ANSWER: dict[str, Any] = {
    "ok": True,
    "generation": 5,
    "general_nodes": [
        {"mac": MAC1, "fqdn": "gn1.cy.example", "vip4": "10.77.0.2", "vip6": "fd00:77::2"},
        {"mac": MAC2, "fqdn": "gn2.cy.example", "vip4": "10.77.0.3", "vip6": "fd00:77::3"},
    ],
}


def test_gn_list_answer_round_trip() -> None:
    generation, nodes = gn_list_answer_from_json(VALID_GN_ANSWER, DOMAIN)
    assert generation == 5
    assert nodes[0] == GeneralNodeInfo(
        MAC1, "gn1.cy.example", IPv4Address("10.77.0.2"), IPv6Address("fd00:77::2")
    )
    assert [general_node_to_json(n) for n in nodes] == VALID_GN_ANSWER["general_nodes"]
    assert gn_list_answer_from_json({"generation": 0, "general_nodes": []}) == (0, [])
    entry = VALID_GN_ANSWER["general_nodes"][0]
    bad: dict[str, Any]
    for bad in (
        {"generation": -1},
        {"generation": True},
        {"generation": 2**63},
        {"general_nodes": {}},
        {"general_nodes": [1]},
        {"general_nodes": [{**entry, "mac": "02:00:5E:00:53:01"}]},
        {"general_nodes": [{**entry, "mac": "nonsense"}]},
        {"general_nodes": [{**entry, "fqdn": "gn1.other.example"}]},
        {"general_nodes": [{**entry, "fqdn": "GN1.cy.example"}]},
        {"general_nodes": [{**entry, "vip4": "fd00::1"}]},
        {"general_nodes": [{**entry, "vip6": "10.0.0.1"}]},
        {"general_nodes": [{**entry, "vip6": 7}]},
        {"general_nodes": [entry, {**entry, "fqdn": "other.cy.example"}]},  # MAC twice
        {"general_nodes": [entry, {**entry, "mac": MAC2}]},  # FQDN twice
    ):
        with pytest.raises(DecodeError):
            gn_list_answer_from_json({**VALID_GN_ANSWER, **bad}, DOMAIN)


gn_entry_values = (
    st.none()
    | st.integers()
    | st.text(max_size=30)
    | st.sampled_from([MAC1, "gn1.cy.example", "10.77.0.2", "fd00:77::2", "02:00:5E:00:53:01"])
)


@settings(max_examples=1000, deadline=None)
@given(
    st.integers(-5, 2**64) | st.none() | st.text(max_size=5),
    st.lists(
        st.dictionaries(st.sampled_from(["mac", "fqdn", "vip4", "vip6"]), gn_entry_values)
        | st.just(VALID_GN_ANSWER["general_nodes"][0])
        | json_values,
        max_size=4,
    ),
)
def test_fuzz_gn_list_answer_decoder(generation: Any, entries: list[Any]) -> None:
    try:
        gen, nodes = gn_list_answer_from_json(
            {"generation": generation, "general_nodes": entries}, DOMAIN
        )
    except DecodeError:
        return
    assert isinstance(gen, int) and 0 <= gen < 2**63
    assert len({n.mac for n in nodes}) == len(nodes) == len(entries)
    for n in nodes:
        assert isinstance(n.vip4, IPv4Address) and isinstance(n.vip6, IPv6Address)
        assert n.fqdn.endswith("." + DOMAIN)
