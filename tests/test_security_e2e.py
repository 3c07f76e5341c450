"""The whole proxy as users run it (real app, real backend, raw sockets): hostile or misdirected requests are
answered by the proxy itself and never reach the upstream or any other host; it binds to loopback unless told
otherwise; a network-facing listener needs a guard; request size limits hold.

A "trap" listener on 127.0.0.2 stands in for a foreign host: an open relay would connect to it, and it must
never see a connection. All traffic in this file goes to 127.0.0.1 (the proxy and the backend) only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from multidict import CIMultiDict

from proxy.config import DEFAULT_LISTEN, Config, Overrides, load_config
from tests.conftest import (
    Backend,
    RunningProxy,
    child_env,
    free_port,
    make_config,
    run_cli,
    running_proxy,
    secret_route,
    write_yaml,
)

API_KEY = "e2e-inbound-key-5f1c7a9b3d2e4f60"
ALLOWED_ORIGIN = "http://localhost:3000"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------------
# helpers


@dataclass
class Trap:
    port: int
    connections: int = 0
    received: bytes = b""


@pytest.fixture
async def trap() -> AsyncIterator[Trap]:
    """A listener on 127.0.0.2 (another loopback address): anything that connects here escaped the proxy."""
    state = Trap(port=0)

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.connections += 1
        with contextlib.suppress(Exception):
            state.received += await asyncio.wait_for(reader.read(4096), 0.5)
        writer.close()

    try:
        server = await asyncio.start_server(on_connect, "127.0.0.2", 0)
    except OSError as exc:  # pragma: no cover - platforms without the whole 127/8 on lo (macOS)
        pytest.skip(f"cannot bind 127.0.0.2: {exc}")
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        server.close()
        await server.wait_closed()
    assert state.connections == 0, f"something connected to the trap host: {state.received[:200]!r}"


@dataclass
class RawResponse:
    status: int
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def raw(port: int, request: bytes, *, read_timeout: float = 5.0) -> RawResponse:
    """Send ``request`` verbatim on a fresh connection to 127.0.0.1:port and read one response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), read_timeout)
        lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
        headers: CIMultiDict[str] = CIMultiDict()
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.add(name.strip(), value.strip())
        if "Content-Length" in headers:
            body = await asyncio.wait_for(reader.readexactly(int(headers["Content-Length"])), read_timeout)
        else:
            body = await asyncio.wait_for(reader.read(), read_timeout)
            if headers.get("Transfer-Encoding", "").lower() == "chunked":
                body = dechunk(body)
    finally:
        writer.close()
    return RawResponse(int(lines[0].split()[1]), headers, body)


def dechunk(data: bytes) -> bytes:
    out = b""
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return out
        out, data = out + data[:size], data[size + 2 :]


def req(
    target: str,
    *,
    host: str | None = "127.0.0.1",
    method: str = "GET",
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1"]
    if host is not None:
        lines.append(f"Host: {host}")
    for name, value in headers or []:
        lines.append(f"{name}: {value}")
    if body:
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def assert_refused(resp: RawResponse, status: int, code: str) -> dict[str, Any]:
    assert resp.status == status, (resp.status, resp.body[:300])
    assert resp.headers["Content-Type"].startswith("application/json"), resp.headers
    body = resp.json()
    assert body["error"] == code, body
    assert isinstance(body["detail"], str) and len(body["detail"]) > 20
    return body  # type: ignore[no-any-return]


def forwarded_json(resp: RawResponse) -> dict[str, Any]:
    """The upstream echo body of a request the proxy forwarded."""
    assert resp.status == 200, (resp.status, resp.body[:300])
    data = resp.json()
    assert isinstance(data, dict) and "raw_path" in data, data
    return data


async def wait_ready(proxy: RunningProxy) -> None:
    """Wait until the first token is there, so that counting requests at the backend is stable."""
    for _ in range(100):
        resp = await raw(proxy.server.port, req("/-/readyz"))
        if resp.status == 200:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("proxy never became ready")


def listening_addresses(port: int) -> list[str] | None:
    """Local addresses of TCP listeners on ``port`` according to ``ss -ltn``; None when ss is missing."""
    ss = shutil.which("ss")
    if ss is None:
        return None
    out = subprocess.run([ss, "-ltnH"], capture_output=True, text=True, timeout=10, check=False).stdout
    found: list[str] = []
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[3].rsplit(":", 1)[-1] == str(port):
            found.append(fields[3].rsplit(":", 1)[0])
    return found


def proxy_config_file(tmp_path: Path, backend: Backend, name: str = "proxy-cli.yaml", **top: Any) -> Path:
    data: dict[str, Any] = {
        "tls": {"ca_bundle": str(backend.tls.ca_path)},
        "routes": [secret_route(backend)],
        "shutdown_timeout": 0,
    }
    data.update(top)
    return write_yaml(tmp_path / name, data)


# --------------------------------------------------------------------------------------------------
# 1. no open relay, no traversal


async def test_forward_proxy_requests_are_refused_and_never_leave(tmp_path: Path, backend: Backend, trap: Trap) -> None:
    async with running_proxy(make_config(tmp_path, backend)) as proxy:
        await wait_ready(proxy)
        port = proxy.server.port
        before = len(backend.upstream.requests)
        token_requests = backend.tokens.requests

        for target, host in [
            (f"http://127.0.0.2:{trap.port}/", f"127.0.0.2:{trap.port}"),
            (f"http://127.0.0.2:{trap.port}/api/v1/echo", f"127.0.0.1:{port}"),
            (f"https://127.0.0.2:{trap.port}/api/v1/echo", f"127.0.0.1:{port}"),
        ]:
            for method in ("GET", "POST", "DELETE"):
                resp = await raw(port, req(target, host=host, method=method))
                body = assert_refused(resp, 400, "absolute_form_refused")
                assert "forward" in body["detail"]

        resp = await raw(port, req(f"127.0.0.2:{trap.port}", host=f"127.0.0.2:{trap.port}", method="CONNECT"))
        body = assert_refused(resp, 405, "connect_refused")
        assert "CONNECT" in body["detail"]
        assert_refused(await raw(port, req("/api/v1/echo", method="TRACE")), 405, "trace_refused")
        assert_refused(await raw(port, req("*", method="OPTIONS")), 400, "invalid_request_target")

        assert len(backend.upstream.requests) == before, backend.upstream.requests[before:]
        assert backend.tokens.requests == token_requests
        # and the proxy still serves ordinary requests on the same listener
        resp = await raw(port, req("/api/v1/echo/still-alive", host=f"127.0.0.1:{port}"))
        assert forwarded_json(resp)["raw_path"] == "/api/v1/echo/still-alive"
    await asyncio.sleep(0.05)
    assert trap.connections == 0


async def test_path_traversal_is_refused(tmp_path: Path, backend: Backend, trap: Trap) -> None:
    async with running_proxy(make_config(tmp_path, backend)) as proxy:
        port = proxy.server.port
        before = len(backend.upstream.requests)
        for target in [
            "/../../etc/passwd",
            "/%2e%2e/x",
            "/api/v1/..%2f..%2fx",
            f"//127.0.0.2:{trap.port}/x",
            "/api/v1/%252e%252e/x",
            "/api/v1/..;x/y",
            "/api/v1\\..\\x",
            "/api/v1/%5c..%5cx",
            "/api/./v1",
        ]:
            resp = await raw(port, req(target))
            assert_refused(resp, 400, "path_traversal_refused")
        assert len(backend.upstream.requests) == before, backend.upstream.requests[before:]
        # an encoded slash inside a key value that forms no dot segment is fine
        resp = await raw(port, req("/api/v1/echo/Items('a%2Fb')"))
        assert forwarded_json(resp)["raw_path"] == "/api/v1/echo/Items('a%2Fb')"
    assert trap.connections == 0


# --------------------------------------------------------------------------------------------------
# 2. Host allow-list (DNS rebinding)


async def test_host_header_allow_list(tmp_path: Path, backend: Backend, trap: Trap) -> None:
    config = make_config(tmp_path, backend, allowed_hosts=["sidecar.internal"])
    async with running_proxy(config) as proxy:
        port = proxy.server.port
        before = len(backend.upstream.requests)
        for host in ["evil.example", f"evil.example:{port}", "localhost.evil.example", f"127.0.0.1.nip.io:{port}"]:
            resp = await raw(port, req("/api/v1/echo", host=host))
            body = assert_refused(resp, 421, "host_not_allowed")
            assert "allowed_hosts" in body["detail"] and "--allowed-host" in body["detail"], body
        assert len(backend.upstream.requests) == before

        for host in [f"localhost:{port}", f"127.0.0.1:{port}", "localhost", f"[::1]:{port}", "sidecar.internal:80"]:
            resp = await raw(port, req("/api/v1/echo/host", host=host))
            assert forwarded_json(resp)["raw_path"] == "/api/v1/echo/host", host
        assert len(backend.upstream.requests) == before + 5
    assert trap.connections == 0


# --------------------------------------------------------------------------------------------------
# 3. cross-site requests and CORS


async def test_cross_site_requests_are_refused(tmp_path: Path, backend: Backend, trap: Trap) -> None:
    async with running_proxy(make_config(tmp_path, backend)) as proxy:
        port = proxy.server.port
        before = len(backend.upstream.requests)
        cases = [
            ([("Origin", "https://evil.example")], "origin_not_allowed"),
            ([("Origin", "null")], "origin_not_allowed"),
            ([("Sec-Fetch-Site", "cross-site")], "cross_site_refused"),
            ([("Origin", "https://evil.example"), ("Sec-Fetch-Site", "cross-site")], "cross_site_refused"),
        ]
        for headers, code in cases:
            for method in ("GET", "POST"):
                resp = await raw(port, req("/api/v1/echo", method=method, headers=headers, body=b"{}"))
                body = assert_refused(resp, 403, code)
                assert "allowed_origins" in body["detail"]
        # a preflight from a foreign origin is refused too
        resp = await raw(
            port,
            req(
                "/api/v1/echo",
                method="OPTIONS",
                headers=[("Origin", "https://evil.example"), ("Access-Control-Request-Method", "DELETE")],
            ),
        )
        assert_refused(resp, 403, "origin_not_allowed")
        assert "Access-Control-Allow-Origin" not in resp.headers
        assert len(backend.upstream.requests) == before

        for headers in (
            [("Origin", f"http://127.0.0.1:{port}")],
            [("Origin", f"http://localhost:{port}"), ("Sec-Fetch-Site", "same-origin")],
            [("Sec-Fetch-Site", "none")],
        ):
            resp = await raw(port, req("/api/v1/echo/same", host=f"127.0.0.1:{port}", headers=headers))
            assert forwarded_json(resp)["raw_path"] == "/api/v1/echo/same"
        assert len(backend.upstream.requests) == before + 3
    assert trap.connections == 0


async def test_cors_for_allowed_origins(tmp_path: Path, backend: Backend, trap: Trap) -> None:
    config = make_config(tmp_path, backend, allowed_origins=[ALLOWED_ORIGIN])
    async with running_proxy(config) as proxy:
        port = proxy.server.port
        before = len(backend.upstream.requests)
        resp = await raw(
            port,
            req(
                "/api/v1/echo",
                method="OPTIONS",
                headers=[
                    ("Origin", ALLOWED_ORIGIN),
                    ("Access-Control-Request-Method", "POST"),
                    ("Access-Control-Request-Headers", "content-type, x-csrf-token"),
                    ("Sec-Fetch-Site", "cross-site"),
                ],
            ),
        )
        assert resp.status == 204, resp
        assert resp.headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN
        assert "POST" in resp.headers["Access-Control-Allow-Methods"]
        assert resp.headers["Access-Control-Allow-Headers"] == "content-type, x-csrf-token"
        assert "Origin" in resp.headers["Vary"]
        assert len(backend.upstream.requests) == before, "the preflight must be answered by the proxy"

        resp = await raw(
            port,
            req(
                "/api/v1/echo/cors",
                method="POST",
                headers=[("Origin", ALLOWED_ORIGIN), ("Sec-Fetch-Site", "cross-site")],
                body=b'{"a": 1}',
            ),
        )
        assert forwarded_json(resp)["raw_path"] == "/api/v1/echo/cors"
        assert resp.headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN
        assert "Origin" in resp.headers["Vary"]
        assert len(backend.upstream.requests) == before + 1

        # other origins still get nothing
        resp = await raw(port, req("/api/v1/echo", headers=[("Origin", "https://app.example")]))
        assert_refused(resp, 403, "origin_not_allowed")
        assert "Access-Control-Allow-Origin" not in resp.headers
        assert len(backend.upstream.requests) == before + 1
    assert trap.connections == 0


async def test_loopback_origin_on_another_port_is_cross_origin(tmp_path: Path, backend: Backend) -> None:
    config = make_config(tmp_path, backend, allowed_origins=[ALLOWED_ORIGIN])
    async with running_proxy(config) as proxy:
        port = proxy.server.port
        before = len(backend.upstream.requests)
        # what a browser sends for a form POST from a page on http://localhost:3001 (same site, other origin)
        for origin in ("http://localhost:3001", f"http://127.0.0.2:{port}", f"http://localhost:{port + 1}"):
            resp = await raw(
                port,
                req(
                    "/api/v1/echo",
                    method="POST",
                    host=f"localhost:{port}",
                    headers=[("Origin", origin), ("Sec-Fetch-Site", "same-site"), ("Content-Type", "text/plain")],
                    body=b"x",
                ),
            )
            assert_refused(resp, 403, "origin_not_allowed")
        assert len(backend.upstream.requests) == before


# --------------------------------------------------------------------------------------------------
# 4. inbound API key


async def test_inbound_api_key(tmp_path: Path, backend: Backend, trap: Trap) -> None:
    config = make_config(tmp_path, backend, inbound_api_key=API_KEY)
    async with running_proxy(config) as proxy:
        port = proxy.server.port
        before = len(backend.upstream.requests)
        refusals = []
        for headers in (
            [],
            [("X-Proxy-Api-Key", "wrong-" + API_KEY)],
            [("X-Proxy-Api-Key", "")],
            [("X-Proxy-Api-Key", API_KEY[:-1])],
            [("Proxy-Authorization", "Bearer wrong")],
            [("Proxy-Authorization", "Basic " + API_KEY)],
            [("Authorization", "Bearer " + API_KEY)],  # the upstream's header, not the proxy's
        ):
            resp = await raw(port, req("/api/v1/echo", headers=headers))
            assert_refused(resp, 401, "proxy_auth_required")
            assert resp.headers["Proxy-Authenticate"].startswith("Bearer")
            assert API_KEY not in resp.body.decode()
            refusals.append(resp.body)
        assert len(set(refusals)) == 1, "missing and wrong keys must get identical answers"
        assert len(backend.upstream.requests) == before

        for headers in (
            [("X-Proxy-Api-Key", API_KEY)],
            [("x-proxy-api-key", API_KEY)],
            [("Proxy-Authorization", "Bearer " + API_KEY)],
            [("Proxy-Authorization", "bearer " + API_KEY), ("X-Proxy-Api-Key", "wrong")],
        ):
            resp = await raw(port, req("/api/v1/echo/keyed", headers=headers))
            echoed = forwarded_json(resp)
            assert echoed["raw_path"] == "/api/v1/echo/keyed"
            names = {name.lower() for name, _ in echoed["headers"]}
            assert "x-proxy-api-key" not in names and "proxy-authorization" not in names, names
            assert API_KEY not in json.dumps(echoed)
        assert len(backend.upstream.requests) == before + 4
        for seen in backend.upstream.requests[before:]:
            assert all(name.lower() not in ("x-proxy-api-key", "proxy-authorization") for name, _ in seen["headers"])
            assert all(API_KEY not in value for _, value in seen["headers"])

        # health checks need no key; metrics do
        assert (await raw(port, req("/-/healthz"))).status == 200
        assert_refused(await raw(port, req("/-/metrics")), 401, "proxy_auth_required")
        assert (await raw(port, req("/-/metrics", headers=[("X-Proxy-Api-Key", API_KEY)]))).status == 200
    assert trap.connections == 0


async def test_custom_api_key_header_is_not_forwarded(tmp_path: Path, backend: Backend) -> None:
    config = make_config(tmp_path, backend, inbound_api_key=API_KEY, inbound_api_key_header="X-Team-Key")
    async with running_proxy(config) as proxy:
        port = proxy.server.port
        assert_refused(
            await raw(port, req("/api/v1/echo", headers=[("X-Proxy-Api-Key", API_KEY)])), 401, "proxy_auth_required"
        )
        resp = await raw(port, req("/api/v1/echo/team", headers=[("X-Team-Key", API_KEY)]))
        echoed = forwarded_json(resp)
        assert all(name.lower() != "x-team-key" for name, _ in echoed["headers"])
        assert API_KEY not in json.dumps(echoed)


# --------------------------------------------------------------------------------------------------
# 5. where it listens


def test_default_listen_is_loopback(tmp_path: Path) -> None:
    assert Config(routes=()).listen_host == "127.0.0.1"
    assert DEFAULT_LISTEN.startswith("127.0.0.1:")
    key = PROJECT_ROOT / "tests" / "fixtures" / "service-keys" / "api-plan-secret.json"
    config = load_config(Overrides(service_key=str(key)), env={})
    assert (config.listen_host, config.listen_port) == ("127.0.0.1", 8080)
    for value in ("9", 9, ":9"):
        path = write_yaml(tmp_path / "port-only.yaml", {"listen": value, "routes": []})
        config = load_config(Overrides(config=str(path), service_key=str(key)), env={})
        assert (config.listen_host, config.listen_port) == ("127.0.0.1", 9), value
    config = load_config(Overrides(service_key=str(key), listen="9"), env={})
    assert config.listen_host == "127.0.0.1"
    config = load_config(Overrides(service_key=str(key)), env={"ODATA_AUTH_PROXY_LISTEN": ":9"})
    assert config.listen_host == "127.0.0.1"


async def test_port_only_listen_binds_loopback_only(tmp_path: Path, backend: Backend) -> None:
    config = make_config(tmp_path, backend, listen="0")
    assert config.listen_host == "127.0.0.1"
    async with running_proxy(config) as proxy:
        assert proxy.server.addresses, "no listening socket"
        assert all(host == "127.0.0.1" for host, _ in proxy.server.addresses), proxy.server.addresses
        assert proxy.server.listener is not None
        for server in proxy.server.listener.servers:
            for sock in server.sockets:
                assert sock.getsockname()[0] == "127.0.0.1"
        seen = listening_addresses(proxy.server.port)
        if seen is not None:
            assert seen == ["127.0.0.1"], seen
        # reachable on loopback
        resp = await raw(proxy.server.port, req("/-/healthz"))
        assert resp.status == 200


async def test_cli_refuses_network_listen_without_guard(tmp_path: Path, backend: Backend) -> None:
    config = proxy_config_file(tmp_path, backend)
    port = free_port()
    remote_config = proxy_config_file(tmp_path, backend, "remote.yaml", listen=f"0.0.0.0:{port}")
    attempts = [
        (["run", "--config", str(config), "--listen", f"0.0.0.0:{port}"], {}, "0.0.0.0 (all network interfaces)"),
        (["run", "--config", str(config), "--listen", f"[::]:{port}"], {}, "all network interfaces"),
        (["run", "--config", str(config)], {"ODATA_AUTH_PROXY_LISTEN": f"0.0.0.0:{port}"}, "0.0.0.0"),
        (["run", "--config", str(remote_config)], {}, "0.0.0.0"),
    ]
    results = await asyncio.gather(*(run_cli(*args, env=child_env(**extra), timeout=15) for args, extra, _ in attempts))
    for (args, _, shown), result in zip(attempts, results, strict=True):
        code, output = result.returncode, result.stdout + result.stderr
        assert code == 2, (args, code, output)
        assert "Refusing to listen on" in output and shown in output, output
        for fix in ("127.0.0.1", "inbound_api_key", "ODATA_AUTH_PROXY_INBOUND_API_KEY", "--allow-remote"):
            assert fix in output, (fix, output)
        assert "Traceback" not in output
    assert backend.tokens.requests == 0, "a refused start must not fetch a token"


async def test_cli_network_listen_with_api_key_starts(tmp_path: Path, backend: Backend) -> None:
    config = proxy_config_file(tmp_path, backend)
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "run",
        "--config",
        str(config),
        "--listen",
        f"0.0.0.0:{port}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=child_env(ODATA_AUTH_PROXY_INBOUND_API_KEY=API_KEY),
        cwd=str(PROJECT_ROOT),
    )
    assert process.stdout is not None
    output: list[str] = []

    async def pump() -> None:
        assert process.stdout is not None
        async for line in process.stdout:
            output.append(line.decode(errors="replace"))

    reader = asyncio.create_task(pump())
    try:
        for _ in range(200):
            if any("listening on" in line for line in output) or process.returncode is not None:
                break
            await asyncio.sleep(0.05)
        assert any("listening on" in line for line in output), "".join(output)
        seen = listening_addresses(port)
        if seen is not None:
            assert seen == ["0.0.0.0"], seen
        assert_refused(await raw(port, req("/api/v1/echo", host=f"127.0.0.1:{port}")), 401, "proxy_auth_required")
        resp = await raw(
            port, req("/api/v1/echo/remote", host=f"127.0.0.1:{port}", headers=[("X-Proxy-Api-Key", API_KEY)])
        )
        assert forwarded_json(resp)["raw_path"] == "/api/v1/echo/remote"
        process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), 15)
        await asyncio.wait_for(reader, 5)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        reader.cancel()
    assert code == 0, "".join(output)
    text = "".join(output)
    assert API_KEY not in text
    assert "Refusing" not in text


# --------------------------------------------------------------------------------------------------
# 6. request limits


async def test_request_limits(tmp_path: Path, backend: Backend, trap: Trap) -> None:
    limits = {"max_header_size": 1024, "max_headers": 20, "max_body_size": 1000, "replay_buffer": 100}
    async with running_proxy(make_config(tmp_path, backend, limits=limits)) as proxy:
        port = proxy.server.port
        await wait_ready(proxy)
        before = len(backend.upstream.requests)

        resp = await raw(port, req("/api/v1/echo", headers=[("X-Long", "a" * 2000)]))
        assert resp.status in (400, 431), resp
        resp = await raw(port, req("/api/v1/echo", headers=[(f"X-H{i}", "1") for i in range(30)]))
        assert resp.status in (400, 431), resp
        resp = await raw(port, req("/api/v1/" + "a" * 2000))
        assert resp.status in (400, 414, 431), resp

        resp = await raw(port, req("/api/v1/echo", method="POST", body=b"x" * 1001))
        assert_refused(resp, 413, "request_body_too_large")
        chunked = b"".join(b"%x\r\n%s\r\n" % (200, b"y" * 200) for _ in range(10)) + b"0\r\n\r\n"
        resp = await raw(
            port,
            req("/api/v1/echo", method="POST", headers=[("Transfer-Encoding", "chunked")]) + chunked,
        )
        assert_refused(resp, 413, "request_body_too_large")
        assert len(backend.upstream.requests) == before, backend.upstream.requests[before:]

        # exactly at the limit is fine, and within limits headers pass
        resp = await raw(
            port,
            req("/api/v1/echo/ok", method="POST", headers=[(f"X-H{i}", "1") for i in range(10)], body=b"z" * 1000),
        )
        assert forwarded_json(resp)["body_length"] == 1000
    assert trap.connections == 0


async def test_streamed_body_over_limit_is_cut(tmp_path: Path, backend: Backend) -> None:
    """A chunked body that outgrows the replay buffer streams upstream; crossing max_body_size still ends it."""
    limits = {"max_body_size": 1000, "replay_buffer": 100}
    async with running_proxy(make_config(tmp_path, backend, limits=limits)) as proxy:
        await wait_ready(proxy)
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
        try:
            writer.write(
                b"POST /api/v1/echo HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
                b"Connection: close\r\n\r\n"
            )
            for _ in range(12):
                writer.write(b"c8\r\n" + b"s" * 200 + b"\r\n")
                await writer.drain()
                await asyncio.sleep(0.02)
            with contextlib.suppress(ConnectionError):
                writer.write(b"0\r\n\r\n")
                await writer.drain()
            answer = await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()
        status_line = answer.split(b"\r\n", 1)[0]
        assert b" 413 " in status_line, answer[:300]
        assert b"request_body_too_large" in answer
        # the start of the body did go upstream (it streams), but the upstream never got the whole body
        for seen in backend.upstream.requests:
            assert seen["raw_path"] == "/api/v1/echo"
