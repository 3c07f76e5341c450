"""The forwarder end to end: a real proxy (in-process, or a subprocess for the memory test) between real
HTTP clients (aiohttp and raw sockets) and the HTTPS test upstream of ``conftest.py``."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from tests.conftest import (
    Backend,
    RssSampler,
    RunningProxy,
    free_port,
    make_config,
    proxy_subprocess,
    raw_request,
    rss_bytes,
    running_proxy,
    secret_route,
    serve,
    write_yaml,
)

TIMEOUT = aiohttp.ClientTimeout(total=30)


# --------------------------------------------------------------------------- helpers


@dataclass
class RawResponse:
    status: int
    headers: CIMultiDict[str]
    body: bytes


async def read_response(reader: asyncio.StreamReader, *, head: bool = False) -> RawResponse:
    status_line = await reader.readline()
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    status = int(status_line.split()[1])
    headers: CIMultiDict[str] = CIMultiDict()
    while True:
        line = await reader.readline()
        assert line, "connection closed inside the response head"
        if line in (b"\r\n", b"\n"):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers.add(name.strip(), value.strip())
    if head or status in (204, 304):
        return RawResponse(status, headers, b"")
    if headers.get("Transfer-Encoding", "").lower() == "chunked":
        body = bytearray()
        while True:
            size = int((await reader.readline()).split(b";")[0].strip(), 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
                break
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        return RawResponse(status, headers, bytes(body))
    if "Content-Length" in headers:
        length = int(headers["Content-Length"])
        data = bytearray()
        while len(data) < length:  # tolerate a short body: the caller decides whether that is an error
            chunk = await reader.read(length - len(data))
            if not chunk:
                break
            data += chunk
        return RawResponse(status, headers, bytes(data))
    return RawResponse(status, headers, await reader.read())


@contextlib.asynccontextmanager
async def raw_connection(port: int) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await writer.wait_closed()


async def raw_exchange(port: int, data: bytes, *, head: bool = False) -> RawResponse:
    async with raw_connection(port) as (reader, writer):
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(read_response(reader, head=head), 15)


def proxy_port(proxy: RunningProxy) -> int:
    return proxy.server.port


def fingerprint(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:8]


def header_values(headers: list[list[str]], name: str) -> list[str]:
    return [value for key, value in headers if key.lower() == name.lower()]


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=TIMEOUT, cookie_jar=aiohttp.DummyCookieJar()) as session:
        yield session


async def wait_ready(client: aiohttp.ClientSession, base: str, deadline: float = 10.0) -> None:
    end = time.monotonic() + deadline
    while True:
        async with client.get(base + "/-/readyz") as resp:
            if resp.status == 200:
                return
        assert time.monotonic() < end, "the proxy never became ready"
        await asyncio.sleep(0.05)


# --------------------------------------------------------------------------- paths and queries, byte for byte

ODATA_TARGET = "/api/v1/echo/IntegrationPackages('a%20b')?$filter=Name%20eq%20'x''&$top=1&x=%2F&y=a+b"
ODD_TARGET = (
    "/api/v1/echo/Items(Id='x%27y',Ver=1);p=q/@h:8/$value,a=b;c/%27%2C%3B(x)"
    "?$select=A,B&$expand=C($top=2)&k=v;w&at=@x:y&q=%27it''s%27&e=&=&a%3Db=c%26d"
)


@pytest.mark.parametrize("target", [ODATA_TARGET, ODD_TARGET], ids=["odata", "odd-characters"])
async def test_raw_target_reaches_upstream_byte_for_byte(proxy: RunningProxy, backend: Backend, target: str) -> None:
    resp = await raw_exchange(
        proxy_port(proxy), raw_request("GET", target, proxy_port(proxy), [("Connection", "close")])
    )
    assert resp.status == 200, resp.body
    assert json.loads(resp.body)["raw_path"] == target
    assert backend.upstream.requests[-1]["raw_path"] == target


@pytest.mark.parametrize("target", [ODATA_TARGET, ODD_TARGET], ids=["odata", "odd-characters"])
async def test_encoded_url_through_aiohttp_byte_for_byte(
    proxy: RunningProxy, backend: Backend, client: aiohttp.ClientSession, target: str
) -> None:
    async with client.get(URL(proxy.url + target, encoded=True)) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["raw_path"] == target


# --------------------------------------------------------------------------- methods


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "MERGE", "DELETE", "OPTIONS"])
async def test_every_method_reaches_upstream_unchanged(
    proxy: RunningProxy, backend: Backend, client: aiohttp.ClientSession, method: str
) -> None:
    payload = b'{"Name": "x"}' if method in ("POST", "PUT", "PATCH", "MERGE") else None
    async with client.request(method, proxy.url + "/api/v1/echo/m?x=1", data=payload) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["method"] == method
    assert backend.upstream.requests[-1]["method"] == method
    if payload is not None:
        assert body["body_length"] == len(payload)
        assert body["body_sha256"] == hashlib.sha256(payload).hexdigest()


async def test_merge_over_a_raw_socket(proxy: RunningProxy, backend: Backend) -> None:
    port = proxy_port(proxy)
    payload = b'{"Description": "merged"}'
    request = raw_request(
        "MERGE",
        "/api/v1/echo/IntegrationPackages('P1')",
        port,
        [("Content-Type", "application/json"), ("Connection", "close")],
        payload,
    )
    resp = await raw_exchange(port, request)
    assert resp.status == 200
    body = json.loads(resp.body)
    assert body["method"] == "MERGE"
    assert body["body_length"] == len(payload)
    assert backend.upstream.requests[-1]["method"] == "MERGE"


async def test_head_has_no_body_and_keeps_content_length(proxy: RunningProxy, backend: Backend) -> None:
    """HEAD answers carry the GET's Content-Length but no body; the connection stays usable afterwards."""
    port = proxy_port(proxy)
    async with raw_connection(port) as (reader, writer):
        # (not /api/v1/stream: the test upstream's StreamResponse would write a body on HEAD itself)
        writer.write(raw_request("HEAD", "/api/v1/hop", port))
        await writer.drain()
        head = await asyncio.wait_for(read_response(reader, head=True), 10)
        assert head.status == 200
        assert head.headers.get("Content-Length") == str(len("hop"))
        assert "Transfer-Encoding" not in head.headers
        # a body sent after the HEAD answer would be parsed as the next status line here
        writer.write(raw_request("GET", "/api/v1/echo/after-head", port, [("Connection", "close")]))
        await writer.drain()
        follow = await asyncio.wait_for(read_response(reader), 10)
    assert follow.status == 200
    assert json.loads(follow.body)["raw_path"] == "/api/v1/echo/after-head"
    assert [r["method"] for r in backend.upstream.requests] == ["HEAD", "GET"]


async def test_head_through_aiohttp(proxy: RunningProxy, backend: Backend, client: aiohttp.ClientSession) -> None:
    async with client.head(proxy.url + "/api/v1/echo/h") as resp:
        assert resp.status == 200
        assert int(resp.headers["Content-Length"]) > 0
        assert await resp.read() == b""
    assert backend.upstream.requests[-1]["method"] == "HEAD"


# --------------------------------------------------------------------------- request headers

HOP_BY_HOP_SENT = ["x-custom", "keep-alive", "te", "proxy-authorization", "proxy-connection", "upgrade", "trailer"]


async def test_request_hop_by_hop_headers_are_removed_end_to_end_kept(proxy: RunningProxy, backend: Backend) -> None:
    port = proxy_port(proxy)
    sent = [
        ("Connection", "keep-alive, X-Custom"),
        ("X-Custom", "1"),
        ("Keep-Alive", "5"),
        ("TE", "trailers"),
        ("Trailer", "X-Checksum"),
        ("Proxy-Authorization", "Basic x"),
        ("Proxy-Connection", "keep-alive"),
        ("Upgrade", "websocket"),
        ("X-Other", "other value"),
        ("Accept", "application/json;odata=verbose"),
        ("Accept-Encoding", "gzip, deflate"),
        ("User-Agent", "odata-test/1.0 (raw)"),
        ("Cookie", "a=1; SAP_SESSIONID=xyz"),
        ("Authorization", "Bearer client-token"),
        ("X-Request-Id", "req-123.abc"),
        ("X-Multi", "first"),
        ("X-Multi", "second"),
    ]
    resp = await raw_exchange(port, raw_request("GET", "/api/v1/echo/headers", port, sent))
    assert resp.status == 200, resp.body
    assert resp.headers["X-Request-Id"] == "req-123.abc"
    seen: list[list[str]] = json.loads(resp.body)["headers"]
    names = {name.lower() for name, _ in seen}
    for name in HOP_BY_HOP_SENT:
        assert name not in names, f"{name} reached the upstream"
    for value in header_values(seen, "Connection"):
        assert "x-custom" not in value.lower()
    assert header_values(seen, "X-Other") == ["other value"]
    assert header_values(seen, "Accept") == ["application/json;odata=verbose"]
    assert header_values(seen, "Accept-Encoding") == ["gzip, deflate"]
    assert header_values(seen, "User-Agent") == ["odata-test/1.0 (raw)"]
    assert header_values(seen, "Cookie") == ["a=1; SAP_SESSIONID=xyz"]
    assert header_values(seen, "X-Request-Id") == ["req-123.abc"]
    assert header_values(seen, "X-Multi") == ["first", "second"]
    (authorization,) = header_values(seen, "Authorization")
    assert authorization != "Bearer client-token"
    assert authorization.startswith("Bearer ")
    assert authorization[7:] in backend.tokens.issued
    assert header_values(seen, "Host") == [URL(backend.upstream.url).raw_authority]


async def test_generated_request_id_is_returned_and_sent_upstream(
    proxy: RunningProxy, backend: Backend, client: aiohttp.ClientSession
) -> None:
    async with client.get(proxy.url + "/api/v1/echo/rid") as resp:
        assert resp.status == 200
        request_id = resp.headers["X-Request-Id"]
        body = await resp.json()
    assert re.fullmatch(r"[0-9a-f]{12}-[0-9a-f]+", request_id)
    assert header_values(body["headers"], "X-Request-Id") == [request_id]
    async with client.get(proxy.url + "/api/v1/echo/rid") as resp:
        assert resp.headers["X-Request-Id"] != request_id  # one per request


async def test_invalid_client_request_id_is_replaced(
    proxy: RunningProxy, backend: Backend, client: aiohttp.ClientSession
) -> None:
    async with client.get(proxy.url + "/api/v1/echo/rid", headers={"X-Request-Id": "bad id <script>"}) as resp:
        request_id = resp.headers["X-Request-Id"]
        body = await resp.json()
    assert request_id != "bad id <script>"
    assert header_values(body["headers"], "X-Request-Id") == [request_id]


# --------------------------------------------------------------------------- response headers


async def test_response_hop_by_hop_headers_are_removed(proxy: RunningProxy, client: aiohttp.ClientSession) -> None:
    async with client.get(proxy.url + "/api/v1/hop") as resp:
        assert resp.status == 200
        assert await resp.text() == "hop"
        assert "X-Private" not in resp.headers
        assert "Keep-Alive" not in resp.headers
        assert resp.headers["X-Kept"] == "1"
        assert "x-private" not in resp.headers.get("Connection", "").lower()


async def test_two_set_cookie_headers_are_preserved(proxy: RunningProxy, client: aiohttp.ClientSession) -> None:
    async with client.get(proxy.url + "/api/v1/cookies") as resp:
        assert resp.status == 200
        assert resp.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/; HttpOnly"]


async def test_redirect_is_passed_through_and_location_rewritten(
    proxy: RunningProxy, backend: Backend, client: aiohttp.ClientSession
) -> None:
    async with client.get(proxy.url + "/api/v1/redirect", allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == f"{proxy.url}/api/v1/target?x=1"
        assert resp.headers["Content-Location"] == f"{proxy.url}/api/v1/here"
    # the proxy did not follow it (with the token) either
    assert [r["raw_path"] for r in backend.upstream.requests] == ["/api/v1/redirect"]


GZIP_JSON = {"hello": "world" * 100}


async def fetch_gzip(base: str) -> tuple[aiohttp.ClientResponse, bytes]:
    async with (
        aiohttp.ClientSession(timeout=TIMEOUT, auto_decompress=False) as raw_client,
        raw_client.get(base + "/api/v1/gzip", headers={"Accept-Encoding": "gzip"}) as resp,
    ):
        assert resp.status == 200
        return resp, await resp.read()


async def test_gzip_body_passes_through_untouched_without_link_rewriting(tmp_path: Path, backend: Backend) -> None:
    config = make_config(tmp_path, backend, [secret_route(backend, rewrite_links=False)])
    async with running_proxy(config) as proxy:
        resp, data = await fetch_gzip(proxy.url)
    assert resp.headers["Content-Encoding"] == "gzip"
    assert data[:2] == b"\x1f\x8b"
    assert json.loads(gzip.decompress(data)) == GZIP_JSON
    assert int(resp.headers["Content-Length"]) == len(data)


async def test_gzip_body_passes_through_untouched(proxy: RunningProxy) -> None:
    resp, data = await fetch_gzip(proxy.url)
    assert resp.headers.get("Content-Encoding") == "gzip"
    assert data[:2] == b"\x1f\x8b"
    assert json.loads(gzip.decompress(data)) == GZIP_JSON


async def test_gzip_json_reaches_the_client_intact(proxy: RunningProxy) -> None:
    """Whether passed through or inflated, the client decodes exactly the upstream's JSON, and the framing
    headers describe the bytes actually sent."""
    resp, raw = await fetch_gzip(proxy.url)
    if "Content-Length" in resp.headers:
        assert int(resp.headers["Content-Length"]) == len(raw)
    if resp.headers.get("Content-Encoding") == "gzip":
        assert json.loads(gzip.decompress(raw)) == GZIP_JSON
    else:
        assert "Content-Encoding" not in resp.headers
        assert json.loads(raw) == GZIP_JSON


# --------------------------------------------------------------------------- several routes


async def test_two_routes_share_one_token_and_map_paths(
    tmp_path: Path, backend: Backend, client: aiohttp.ClientSession
) -> None:
    routes = [
        secret_route(backend, name="a", prefix="/a/", upstream=backend.upstream.url + "/api/v1/"),
        secret_route(backend, name="b", prefix="/b/", upstream=backend.upstream.url + "/"),
    ]
    async with running_proxy(make_config(tmp_path, backend, routes)) as proxy:
        async with client.get(proxy.url + "/a/echo?x=1") as resp:
            assert resp.status == 200
            assert (await resp.json())["raw_path"] == "/api/v1/echo?x=1"
        async with client.get(proxy.url + "/b/api/v1/echo/b?y=2") as resp:
            assert resp.status == 200
            assert (await resp.json())["raw_path"] == "/api/v1/echo/b?y=2"
        async with client.get(proxy.url + "/a/echo/Items('x%2Fy')?$filter=A%20eq%20'b'") as resp:
            assert (await resp.json())["raw_path"] == "/api/v1/echo/Items('x%2Fy')?$filter=A%20eq%20'b'"
        async with client.get(proxy.url + "/a") as resp:  # the bare prefix maps to the upstream base path
            assert resp.status == 200
            assert (await resp.json())["raw_path"] == "/api/v1/"
        async with client.get(proxy.url + "/a/redirect", allow_redirects=False) as resp:
            assert resp.status == 302
            assert resp.headers["Location"] == f"{proxy.url}/a/target?x=1"
            assert resp.headers["Content-Location"] == f"{proxy.url}/a/here"
        for path in ("/unknown", "/ab/echo", "/", "/api/v1/echo"):
            async with client.get(proxy.url + path) as resp:
                assert resp.status == 404, path
                body = await resp.json()
            assert body["error"] == "no_route"
            assert body["prefixes"] == ["/a/", "/b/"]
            assert "/a/" in body["detail"] and "/b/" in body["detail"]
        await wait_ready(client, proxy.url)
    assert backend.tokens.requests == 1
    assert [r["raw_path"] for r in backend.upstream.requests] == [
        "/api/v1/echo?x=1",
        "/api/v1/echo/b?y=2",
        "/api/v1/echo/Items('x%2Fy')?$filter=A%20eq%20'b'",
        "/api/v1/",
        "/api/v1/redirect",
    ]


# --------------------------------------------------------------------------- request bodies


async def test_sized_body_beyond_replay_buffer_keeps_its_content_length(
    proxy: RunningProxy, client: aiohttp.ClientSession
) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 17)  # past the 1 MiB replay buffer: streamed, not buffered
    async with client.put(proxy.url + "/api/v1/echo/sized", data=payload) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["body_length"] == len(payload)
    assert body["body_sha256"] == hashlib.sha256(payload).hexdigest()
    assert body["chunked"] is False
    assert header_values(body["headers"], "Content-Length") == [str(len(payload))]


async def test_expect_100_continue(proxy: RunningProxy, backend: Backend) -> None:
    port = proxy_port(proxy)
    payload = b"0123456789" * 100
    async with raw_connection(port) as (reader, writer):
        head = raw_request(
            "POST",
            "/api/v1/echo/expect",
            port,
            [("Content-Length", str(len(payload))), ("Expect", "100-continue"), ("Connection", "close")],
        )
        writer.write(head)
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert interim.startswith(b"HTTP/1.1 100"), interim
        writer.write(payload)
        await writer.drain()
        resp = await asyncio.wait_for(read_response(reader), 10)
    assert resp.status == 200
    body = json.loads(resp.body)
    assert body["body_length"] == len(payload)
    assert header_values(body["headers"], "Expect") == []


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
async def test_upload_cut_short_by_the_client_never_reaches_upstream_complete(
    tmp_path: Path, backend: Backend, framing: str
) -> None:
    """A client that dies mid-upload must not make the upstream see a shorter body as a complete one."""
    outcomes: list[tuple[str, int]] = []
    started = asyncio.Event()

    async def sink(request: web.Request) -> web.Response:
        started.set()
        size = 0
        try:
            async for chunk in request.content.iter_any():
                size += len(chunk)
        except Exception:
            outcomes.append(("broken", size))
            raise
        outcomes.append(("complete", size))
        return web.Response(text="stored")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", sink)
    runner, sink_url = await serve(app, backend.tls.server_ctx)
    try:
        config = make_config(tmp_path, backend, [secret_route(backend, upstream=sink_url)])
        async with running_proxy(config) as proxy:
            port = proxy_port(proxy)
            async with raw_connection(port) as (_, writer):
                if framing == "chunked":
                    writer.write(raw_request("POST", "/upload", port, [("Transfer-Encoding", "chunked")]))
                    for _ in range(40):  # 2.5 MiB of chunks, past the replay buffer, then no last chunk
                        writer.write(b"10000\r\n" + b"a" * 65536 + b"\r\n")
                else:
                    writer.write(raw_request("POST", "/upload", port, [("Content-Length", str(8 << 20))]))
                    writer.write(b"a" * (3 << 20))
                await writer.drain()
                await asyncio.wait_for(started.wait(), 10)  # the body is streaming upstream now
                await asyncio.sleep(0.2)
                writer.transport.abort()
            end = time.monotonic() + 10
            while not outcomes and time.monotonic() < end:
                await asyncio.sleep(0.05)
    finally:
        await runner.cleanup()
    assert outcomes, "the upload never reached the upstream"
    assert all(state == "broken" for state, _ in outcomes), outcomes


async def abandon_download(port: int) -> None:
    """Start a 256 MiB download, read 2 MiB of it, and drop the connection (a client giving up)."""
    async with raw_connection(port) as (reader, writer):
        writer.write(raw_request("GET", f"/api/v1/stream?bytes={256 << 20}", port))
        await writer.drain()
        received = 0
        while received < 2 << 20:
            received += len(await reader.read(65536))
        writer.transport.abort()


async def test_proxy_survives_a_client_abandoning_a_download(
    proxy: RunningProxy, client: aiohttp.ClientSession
) -> None:
    port = proxy_port(proxy)
    await abandon_download(port)
    for _ in range(3):
        async with client.get(proxy.url + "/api/v1/echo/after-abort") as resp:
            assert resp.status == 200
            await resp.read()
    async with client.get(proxy.url + "/-/metrics") as resp:
        text = await resp.text()
    assert metric_total(text, "odata_auth_proxy_requests_in_flight") == 0


async def test_requests_in_flight_are_counted_while_they_run(
    proxy: RunningProxy, client: aiohttp.ClientSession
) -> None:
    """``requests_in_flight`` is worked out when scraped, from the requests the listener is answering."""
    slow = [asyncio.create_task(client.get(proxy.url + "/api/v1/slow?seconds=1")) for _ in range(2)]
    try:
        in_flight = 0.0
        for _ in range(50):
            await asyncio.sleep(0.02)
            async with client.get(proxy.url + "/-/metrics") as resp:
                text = await resp.text()
            in_flight = metric_total(text, 'odata_auth_proxy_requests_in_flight{route="api"}')
            if in_flight == 2:
                break
        assert in_flight == 2
    finally:
        for resp in await asyncio.gather(*slow):
            assert resp.status == 200
            await resp.read()
            resp.release()
    async with client.get(proxy.url + "/-/metrics") as resp:
        text = await resp.text()
    assert metric_total(text, 'odata_auth_proxy_requests_in_flight{route="api"}') == 0


async def test_client_abandoning_a_download_is_not_blamed_on_the_upstream(
    proxy: RunningProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="odata_auth_proxy")
    port = proxy_port(proxy)
    await abandon_download(port)
    await asyncio.sleep(0.5)
    blamed = [r.getMessage() for r in caplog.records if "upstream" in r.getMessage() and r.levelno >= logging.WARNING]
    assert blamed == []


# --------------------------------------------------------------------------- upstream failures


async def test_unreachable_upstream_is_502(tmp_path: Path, backend: Backend, client: aiohttp.ClientSession) -> None:
    dead = f"https://127.0.0.1:{free_port()}"
    config = make_config(tmp_path, backend, [secret_route(backend, upstream=dead)])
    async with running_proxy(config) as proxy, client.get(proxy.url + "/api/v1/echo") as resp:
        assert resp.status == 502
        assert resp.content_type == "application/json"
        body = await resp.json()
    assert body["error"] == "upstream_unreachable"
    assert body["upstream"] == dead
    assert body["route"] == "api"


async def test_slow_upstream_is_504(tmp_path: Path, backend: Backend, client: aiohttp.ClientSession) -> None:
    config = make_config(tmp_path, backend, timeouts={"read": 0.5})
    async with running_proxy(config) as proxy:
        started = time.monotonic()
        async with client.get(proxy.url + "/api/v1/slow?seconds=2") as resp:
            assert resp.status == 504
            body = await resp.json()
        assert time.monotonic() - started < 1.8
    assert body["error"] == "upstream_timeout"
    assert body["upstream"] == backend.upstream.url


async def test_small_body_cut_short_upstream_is_a_502(proxy: RunningProxy, client: aiohttp.ClientSession) -> None:
    # small answers are read whole before anything is sent, so the client can get an honest error
    async with client.get(proxy.url + "/api/v1/broken") as resp:
        assert resp.status == 502
        body = await resp.json()
    assert body["error"] == "upstream_body_incomplete"
    assert "broke off its 1000-byte answer" in body["detail"]


async def test_large_body_cut_short_upstream_is_never_a_clean_response(
    proxy: RunningProxy, client: aiohttp.ClientSession
) -> None:
    with pytest.raises(aiohttp.ClientPayloadError):
        async with client.get(proxy.url + "/api/v1/broken?size=2000000") as resp:
            assert resp.status == 200
            await resp.read()


async def test_large_body_cut_short_upstream_raw(proxy: RunningProxy) -> None:
    port = proxy_port(proxy)
    resp = await raw_exchange(port, raw_request("GET", "/api/v1/broken?size=2000000", port))
    if "Content-Length" in resp.headers:
        assert len(resp.body) < int(resp.headers["Content-Length"])
    else:  # chunked without the terminating chunk would have failed in read_response
        pytest.fail(f"unexpected framing: {dict(resp.headers)}")


# --------------------------------------------------------------------------- body limits


async def test_body_over_limit_with_content_length_is_413(
    tmp_path: Path, backend: Backend, client: aiohttp.ClientSession
) -> None:
    config = make_config(tmp_path, backend, limits={"max_body_size": 1000})
    async with running_proxy(config) as proxy:
        async with client.post(proxy.url + "/api/v1/echo/big", data=b"x" * 2000) as resp:
            assert resp.status == 413
            body = await resp.json()
        assert body["error"] == "request_body_too_large"
        async with client.post(proxy.url + "/api/v1/echo/small", data=b"x" * 1000) as resp:
            assert resp.status == 200
            assert (await resp.json())["body_length"] == 1000
    assert [r["raw_path"] for r in backend.upstream.requests] == ["/api/v1/echo/small"]


async def test_chunked_body_over_limit_is_413(tmp_path: Path, backend: Backend, client: aiohttp.ClientSession) -> None:
    config = make_config(tmp_path, backend, limits={"max_body_size": 1000})

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(5):
            yield b"y" * 500

    async with running_proxy(config) as proxy, client.post(proxy.url + "/api/v1/echo/chunked", data=chunks()) as resp:
        assert resp.status == 413
        assert (await resp.json())["error"] == "request_body_too_large"
    assert backend.upstream.requests == []


async def test_chunked_body_over_limit_after_streaming_started_is_413(
    tmp_path: Path, backend: Backend, client: aiohttp.ClientSession
) -> None:
    """Past the replay buffer the body already streams upstream when the limit is hit: still a 413."""
    config = make_config(tmp_path, backend, limits={"max_body_size": 3 * 1024 * 1024, "replay_buffer": 65536})

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(64):
            yield b"z" * 65536  # 4 MiB in all

    async with running_proxy(config) as proxy:
        async with client.post(proxy.url + "/api/v1/echo/streamed", data=chunks()) as resp:
            assert resp.status == 413
            assert (await resp.json())["error"] == "request_body_too_large"


# --------------------------------------------------------------------------- admin endpoints


def metric_total(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_admin_endpoints_are_answered_locally(
    proxy: RunningProxy, backend: Backend, client: aiohttp.ClientSession
) -> None:
    async with client.get(proxy.url + "/-/healthz") as resp:
        assert resp.status == 200
    await wait_ready(client, proxy.url)
    async with client.get(proxy.url + "/-/readyz") as resp:
        assert resp.status == 200
        assert (await resp.json())["routes"] == ["api"]
    async with client.get(proxy.url + "/-/metrics") as resp:
        assert resp.status == 200
        before = await resp.text()
    assert "odata_auth_proxy_requests_total" in before
    for _ in range(3):
        async with client.get(proxy.url + "/api/v1/echo/counted") as resp:
            assert resp.status == 200
    async with client.get(proxy.url + "/-/metrics") as resp:
        after = await resp.text()
    assert (
        metric_total(after, "odata_auth_proxy_requests_total")
        == metric_total(before, "odata_auth_proxy_requests_total") + 3
    )
    # ("/-/" itself is the inspector page now: tests/test_inspector_api.py)
    for path in ("/-/anything-else", "/-/nothing/", "/-/healthz/x"):
        async with client.get(proxy.url + path) as resp:
            assert resp.status == 404, path
            assert (await resp.json())["error"] == "not_found"
    assert all(not r["raw_path"].startswith("/-/") for r in backend.upstream.requests)
    assert [r["raw_path"] for r in backend.upstream.requests] == ["/api/v1/echo/counted"] * 3


async def test_readyz_names_route_and_reason_when_token_server_refuses(
    tmp_path: Path, backend: Backend, client: aiohttp.ClientSession
) -> None:
    backend.tokens.fail = "invalid_client"
    async with running_proxy(make_config(tmp_path, backend)) as proxy:
        end = time.monotonic() + 10
        while True:
            async with client.get(proxy.url + "/-/readyz") as resp:
                assert resp.status == 503
                body = await resp.json()
            if "invalid_client" in json.dumps(body):
                break
            assert time.monotonic() < end, body
            await asyncio.sleep(0.05)
        assert body["status"] == "not_ready"
        assert "invalid_client" in body["routes"]["api"]
        async with client.get(proxy.url + "/-/healthz") as resp:
            assert resp.status == 200  # alive, just not ready
    assert backend.upstream.requests == []


# --------------------------------------------------------------------------- access log


async def test_access_log_line(
    proxy: RunningProxy, backend: Backend, client: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="odata_auth_proxy.access")
    async with client.post(
        proxy.url + "/api/v1/echo/logged?$top=1", data=b"abc", headers={"X-Request-Id": "log-req-1"}
    ) as resp:
        assert resp.status == 200
        await resp.read()
    await asyncio.sleep(0.05)
    records = [r for r in caplog.records if r.name == "odata_auth_proxy.access"]
    assert len(records) == 1
    record = records[0]
    message = record.getMessage()
    (token,) = backend.tokens.issued
    fp = fingerprint(token)
    assert re.fullmatch(r"[0-9a-f]{8}", fp)
    for part in ("POST", "/api/v1/echo/logged", " 200 ", "route=api", "upstream=200", f"token={fp}", "id=log-req-1"):
        assert part in message, (part, message)
    assert token not in message
    fields: dict[str, Any] = record.fields  # type: ignore[attr-defined]
    assert fields["method"] == "POST"
    assert fields["status"] == 200
    assert fields["route"] == "api"
    assert fields["upstream_status"] == 200
    assert fields["token_fp"] == fp
    assert fields["request_id"] == "log-req-1"
    assert token not in json.dumps(fields, default=str)


# --------------------------------------------------------------------------- streaming, constant memory (subprocess)


DOWNLOAD = 512 * 1024 * 1024
UPLOAD = 256 * 1024 * 1024
MAX_GROWTH = 64 * 1024 * 1024


@pytest.mark.timeout(120)
async def test_streaming_large_bodies_in_constant_memory(tmp_path: Path, backend: Backend) -> None:
    port = free_port()
    config = write_yaml(
        tmp_path / "proxy.yaml",
        {
            "listen": f"127.0.0.1:{port}",
            "tls": {"ca_bundle": str(backend.tls.ca_path)},
            "routes": [secret_route(backend)],
            "access_log": True,
        },
    )
    base = f"http://127.0.0.1:{port}"
    timings: dict[str, float] = {}
    started = time.monotonic()
    async with (
        proxy_subprocess(config, port, tmp_path / "proxy.log") as process,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120, sock_read=30)) as client,
    ):
        # warm-up: a token, pools, buffers and code paths all in use once
        async with client.get(base + "/api/v1/stream?bytes=4194304") as resp:
            assert resp.status == 200
            async for _ in resp.content.iter_chunked(256 * 1024):
                pass

        async def warm_chunks() -> AsyncIterator[bytes]:
            for _ in range(16):
                yield b"w" * 256 * 1024

        async with client.post(base + "/api/v1/echo/warm", data=warm_chunks()) as resp:
            assert resp.status == 200
        await asyncio.sleep(0.2)
        baseline = rss_bytes(process.pid)

        t0 = time.monotonic()
        received = 0
        with RssSampler(process.pid) as download_rss:
            async with client.get(base + f"/api/v1/stream?bytes={DOWNLOAD}") as resp:
                assert resp.status == 200
                async for chunk in resp.content.iter_chunked(256 * 1024):
                    received += len(chunk)
        timings["download"] = time.monotonic() - t0
        assert received == DOWNLOAD
        assert download_rss.peak - baseline < MAX_GROWTH, (baseline, download_rss.peak)

        digest = hashlib.sha256()

        async def upload_chunks() -> AsyncIterator[bytes]:
            for i in range(UPLOAD // (256 * 1024)):
                chunk = i.to_bytes(4, "big") * (64 * 1024)
                digest.update(chunk)
                yield chunk

        t0 = time.monotonic()
        with RssSampler(process.pid) as upload_rss:
            async with client.post(base + "/api/v1/echo/upload", data=upload_chunks()) as resp:
                assert resp.status == 200
                body = await resp.json()
        timings["upload"] = time.monotonic() - t0
        assert body["body_length"] == UPLOAD
        assert body["body_sha256"] == digest.hexdigest()
        assert body["chunked"] is True
        assert upload_rss.peak - baseline < MAX_GROWTH, (baseline, upload_rss.peak)
    timings["total"] = time.monotonic() - started
    print(
        f"\nstreaming: download {DOWNLOAD >> 20} MiB in {timings['download']:.1f} s, upload {UPLOAD >> 20} MiB in "
        f"{timings['upload']:.1f} s, total {timings['total']:.1f} s; proxy RSS baseline {baseline >> 20} MiB, "
        f"peak growth {(download_rss.peak - baseline) >> 20} / {(upload_rss.peak - baseline) >> 20} MiB"
    )
    assert timings["total"] < 60, timings


async def test_http10_without_host_gets_links_for_the_socket_address(proxy: RunningProxy) -> None:
    port = proxy_port(proxy)
    async with raw_connection(port) as (reader, writer):
        writer.write(b"GET /api/v1/redirect HTTP/1.0\r\n\r\n")
        await writer.drain()
        head = (await asyncio.wait_for(reader.read(65536), 5)).decode("latin-1")
    assert head.startswith("HTTP/1.0 302") or head.startswith("HTTP/1.1 302"), head
    assert f"Location: http://127.0.0.1:{port}/api/v1/target?x=1" in head


async def test_access_log_counts_bytes_of_the_proxys_own_answers(
    tmp_path: Path, backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="odata_auth_proxy.access")
    config = make_config(tmp_path, backend, [secret_route(backend, prefix="/a/")])
    async with running_proxy(config) as proxy, aiohttp.ClientSession() as client:
        async with client.get(proxy.url + "/nowhere") as resp:
            assert resp.status == 404
            size = len(await resp.read())
    lines = [r.getMessage() for r in caplog.records if r.name == "odata_auth_proxy.access"]
    assert any('"GET /nowhere" 404' in line and f" {size}B " in line for line in lines), lines
