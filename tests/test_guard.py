"""Inbound guard: hostile requests are answered by the guard and never reach the forwarding handler.

Every server here listens on 127.0.0.1; a "trap" listener on 127.0.0.2 stands in for a foreign host
that an open relay would connect to, and must never see a connection.

The proxy under test is the real request path (``Listener`` -> ``Pipeline`` -> ``Chain``) with the
``GuardFilter`` first and a recording filter after it in place of the routing and forwarding filters.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from proxy.exchange import Exchange
from proxy.filters.base import PENDING, Chain, Filter, Pending
from proxy.filters.guard import GuardFilter
from proxy.guard import (
    ADMIN_PREFIX,
    DEFAULT_API_KEY_HEADER,
    Guard,
    GuardedRequest,
    GuardSettings,
    is_loopback,
    listen_address_problem,
)
from proxy.http.heads import HeaderView, Reply, RequestHead, json_reply
from proxy.http.listener import Listener, ListenerSettings
from proxy.http.upstream import Origin, UpstreamPool
from proxy.outbound import OutboundProxies
from proxy.pipeline import Pipeline, PipelineSettings
from proxy.redact import Secret

KEY = "s3cr3t-inbound-key-0123456789abcdef"
ALLOWED_ORIGIN = "http://localhost:3000"
PIPELINE_SETTINGS = PipelineSettings(replay_limit=1024 * 1024, max_body=None, read_timeout=5.0)


# --------------------------------------------------------------------------------------------------
# fixtures


@dataclass
class Seen:
    method: str
    raw_path: str
    headers: HeaderView  # the request's headers minus those the filters dropped (never forwarded)
    body: bytes


@dataclass
class Served:
    port: int
    seen: list[Seen] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Trap:
    port: int
    connections: int = 0


@pytest.fixture
async def trap() -> AsyncIterator[Trap]:
    """A listener on 127.0.0.2 (another loopback address): an open relay would connect here."""
    state = Trap(port=0)

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.connections += 1
        writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.2", 0)
    state.port = server.sockets[0].getsockname()[1]
    yield state
    server.close()
    await server.wait_closed()
    assert state.connections == 0, "something connected to the trap host"


def forwarded_headers(ex: Exchange) -> HeaderView:
    """The client's headers as the forwarding core would pass them on: without those in ``ex.drop``."""
    return HeaderView([h for h in ex.head.headers if h[0] not in ex.drop])


class RecordingFilter(Filter):
    """Stands in for routing and forwarding: records what got through the guard, then answers.

    ``{"forwarded": target}`` as JSON (the proxy's own answer), except for paths starting with /stream:
    those go to a real upstream (``stream_origin``) whose answer the pipeline streams back.
    """

    name = "record"

    def __init__(self, served: Served, stream_origin: Origin) -> None:
        self.served = served
        self.stream_origin = stream_origin

    def request(self, ex: Exchange) -> Pending:
        return PENDING  # the recording needs the body: done in prepare

    async def prepare(self, ex: Exchange) -> Reply | None:
        await ex.body.read_until(10**7)
        body = ex.body.take()
        self.served.seen.append(Seen(ex.head.method, ex.head.target, forwarded_headers(ex), body))
        if ex.head.target.startswith("/stream"):
            ex.origin = self.stream_origin
            ex.upstream_target = ex.head.target
            return None
        return json_reply(200, {"forwarded": ex.head.target})


@dataclass
class StreamUpstream:
    """A plain-HTTP upstream on 127.0.0.1 that answers every request with a chunked body in two writes."""

    server: asyncio.Server
    origin: Origin


async def start_stream_upstream() -> StreamUpstream:
    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nVary: Accept-Encoding\r\n"
                b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n6\r\nstream\r\n"
            )
            await writer.drain()
            await asyncio.sleep(0.05)  # the answer is still arriving when the pipeline starts sending it on
            writer.write(b"2\r\ned\r\n0\r\n\r\n")
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return StreamUpstream(server, Origin.from_url(f"http://127.0.0.1:{port}"))


async def start_proxy(chain: Chain) -> tuple[Listener, UpstreamPool, int]:
    """The real listener and forwarding core around ``chain``, on 127.0.0.1 and a free port."""
    pool = UpstreamPool(ssl.create_default_context(), OutboundProxies(None, {}), 5.0)
    listener = Listener(Pipeline(chain, pool, PIPELINE_SETTINGS), ListenerSettings())
    server = await listener.serve(host="127.0.0.1", port=0)
    return listener, pool, server.sockets[0].getsockname()[1]


Serve = Callable[..., Awaitable[Served]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    upstream = await start_stream_upstream()
    started: list[tuple[Listener, UpstreamPool]] = []

    async def start(**overrides: Any) -> Served:
        settings = GuardSettings(**{"listen_host": "127.0.0.1", "listen_port": 0, **overrides})
        served = Served(port=0)
        chain = Chain([GuardFilter(Guard(settings)), RecordingFilter(served, upstream.origin)])
        listener, pool, served.port = await start_proxy(chain)
        started.append((listener, pool))
        return served

    yield start
    for listener, pool in started:
        await listener.close()
        await pool.close()
    upstream.server.close()
    await upstream.server.wait_closed()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@dataclass
class RawResponse:
    status: int
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def raw(port: int, request: bytes) -> RawResponse:
    """Send ``request`` verbatim over a fresh connection and read one response.

    Reads by Content-Length, not until EOF: with the pure-Python parser (AIOHTTP_NO_EXTENSIONS=1)
    aiohttp keeps a refused CONNECT connection open until the client half-closes.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
        headers: CIMultiDict[str] = CIMultiDict()
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.add(name.strip(), value.strip())
        if "Content-Length" in headers:
            body = await asyncio.wait_for(reader.readexactly(int(headers["Content-Length"])), 5)
        else:
            body = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    return RawResponse(int(lines[0].split()[1]), headers, body)


def req(target: str, host: str | None = "127.0.0.1", method: str = "GET", version: str = "1.1") -> bytes:
    lines = [f"{method} {target} HTTP/{version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def assert_refused(resp: RawResponse, status: int, code: str) -> dict[str, str]:
    assert resp.status == status, resp
    assert resp.headers["Content-Type"].startswith("application/json")
    body = resp.json()
    assert body["error"] == code
    assert isinstance(body["detail"], str) and len(body["detail"]) > 20
    return body  # type: ignore[no-any-return]


# --------------------------------------------------------------------------------------------------
# 1. no open relay, no traversal (raw sockets: clients would normalise these away)


async def test_absolute_form_is_refused(serve: Serve, trap: Trap) -> None:
    served = await serve()
    targets = [
        (f"http://127.0.0.2:{trap.port}/", f"127.0.0.2:{trap.port}"),
        (f"http://127.0.0.2:{trap.port}/odata/x?$top=1", f"127.0.0.1:{served.port}"),
        (f"HTTPS://127.0.0.2:{trap.port}/x", "127.0.0.1"),
        (f"http://127.0.0.2:{trap.port}", "localhost"),
    ]
    for target, host in targets:
        for method in ("GET", "POST"):
            resp = await raw(served.port, req(target, host=host, method=method))
            body = assert_refused(resp, 400, "absolute_form_refused")
            assert "forward" in body["detail"]
    assert served.seen == []


async def test_connect_is_refused(serve: Serve, trap: Trap) -> None:
    served = await serve()
    for host in (f"127.0.0.2:{trap.port}", "127.0.0.1"):
        resp = await raw(served.port, req(f"127.0.0.2:{trap.port}", host=host, method="CONNECT"))
        assert_refused(resp, 405, "connect_refused")
        assert "CONNECT" not in resp.headers["Allow"]
    assert served.seen == []


@pytest.mark.parametrize(
    "target",
    [
        "/a/../b",
        "/a/./b",
        "/..",
        "/../etc/passwd",
        "/a/..",
        "/a/%2e%2e/b",
        "/a/%2E%2E/b",
        "/a/%2E./b",
        "/a/.%2e/b",
        "/a/%2e/b",
        "/%2e%2e",
        "/a/..%2fb",
        "/a%2f..%2fb",
        "/a%2F..%2Fb",
        "/a/%252e%252e/b",
        "/a/..;x=1/b",
        "/a\\..\\b",
        "/a\\b",
        "/a%5c..%5cb",
        "/a#/../b",
        "//127.0.0.2/x",
        "///x",
        "/%2f%2f127.0.0.2/x",
        "/%2F/x",
    ],
)
async def test_traversal_is_refused(serve: Serve, trap: Trap, target: str) -> None:
    served = await serve()
    resp = await raw(served.port, req(target.replace("127.0.0.2", f"127.0.0.2:{trap.port}")))
    assert_refused(resp, 400, "path_traversal_refused")
    assert served.seen == []


@pytest.mark.parametrize(
    "target",
    [
        "/odata/Items('a%2Fb')",
        "/odata/Items?$filter=Name%20eq%20'../x'",
        "/odata/a..b/c.d",
        "/.well-known/x",
        "/odata/...",
        "/",
    ],
)
async def test_harmless_dots_and_encoded_slashes_pass(serve: Serve, target: str) -> None:
    served = await serve()
    resp = await raw(served.port, req(target))
    assert resp.status == 200, resp
    assert [s.raw_path for s in served.seen] == [target]


async def test_other_request_targets_and_trace(serve: Serve) -> None:
    served = await serve()
    assert_refused(await raw(served.port, req("*", method="OPTIONS")), 400, "invalid_request_target")
    assert_refused(await raw(served.port, req("/x", method="TRACE")), 405, "trace_refused")
    assert served.seen == []


# --------------------------------------------------------------------------------------------------
# 2. Host allow-list


async def test_foreign_host_is_refused(serve: Serve, trap: Trap, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="odata_auth_proxy.guard")
    served = await serve(allowed_hosts=("sidecar",))
    for host in ("evil.example", f"attacker.example:{served.port}", "", "0.0.0.0", "127.0.0.1.evil.example"):
        body = assert_refused(await raw(served.port, req("/odata/x", host=host)), 421, "host_not_allowed")
        assert "allowed_hosts:" in body["detail"]
        assert "--allowed-host NAME" in body["detail"]
    long_host = "x" * 300 + "<script>"
    body = assert_refused(await raw(served.port, req("/x", host=long_host)), 421, "host_not_allowed")
    assert "x" * 101 not in body["detail"]
    assert "<script>" not in body["detail"]
    assert served.seen == []
    record = caplog.records[0]
    assert record.name == "odata_auth_proxy.guard"
    assert record.levelno == logging.WARNING
    assert "host_not_allowed" in record.getMessage()
    assert "/odata/x" in record.getMessage()
    assert "127.0.0.1" in record.getMessage()  # client address


async def test_missing_host(serve: Serve) -> None:
    served = await serve()
    resp = await raw(served.port, req("/x", host=None))  # the guard answers 400 host_not_allowed
    assert resp.status == 400
    assert served.seen == []
    resp = await raw(served.port, req("/x", host=None, version="1.0"))
    assert resp.status == 200
    assert len(served.seen) == 1


def request_head(method: str, target: str, version: str = "1.1", headers: dict[str, str] | None = None) -> RequestHead:
    head = RequestHead()
    head.method = method
    head.target = target
    head.version = version
    for name, value in (headers or {}).items():
        raw_name = name.encode("latin-1")
        head.headers.append((raw_name.lower(), raw_name, value.encode("latin-1")))
    return head


async def test_missing_host_in_the_guard_itself() -> None:
    """The guard refuses HTTP/1.1 without Host itself: it does not rely on the parser for that."""
    guard = Guard(GuardSettings("127.0.0.1", 8080))
    reply, cors_origin = guard.check(GuardedRequest(request_head("GET", "/x"), "127.0.0.1"))
    assert reply is not None
    assert reply.status == 400
    assert json.loads(reply.body)["error"] == "host_not_allowed"
    assert cors_origin is None
    # HTTP/1.0 may omit Host: nothing to refuse, and nothing for a CORS answer
    assert guard.check(GuardedRequest(request_head("GET", "/x", version="1.0"), "127.0.0.1")) == (None, None)


@pytest.mark.parametrize(
    "host",
    [
        "localhost:{port}",
        "LOCALHOST",
        "127.0.0.1:{port}",
        "127.0.0.1",
        "127.1.2.3:{port}",
        "[::1]:{port}",
        "[::1]",
        "sidecar",
        "SideCar:{port}",
        "fixed:8443",
    ],
)
async def test_allowed_hosts(serve: Serve, client: aiohttp.ClientSession, trap: Trap, host: str) -> None:
    served = await serve(allowed_hosts=("sidecar", "fixed:8443"))
    async with client.get(f"{served.url}/odata/x", headers={"Host": host.format(port=served.port)}) as resp:
        assert resp.status == 200
    assert len(served.seen) == 1


async def test_host_port_and_listen_host_rules(serve: Serve, client: aiohttp.ClientSession) -> None:
    served = await serve(listen_host="proxy.internal", allowed_hosts=("fixed:8443",))
    for host, status in [
        ("fixed:9", 421),
        ("fixed", 421),
        ("proxy.internal:1234", 200),
        ("PROXY.internal", 200),
    ]:
        async with client.get(f"{served.url}/x", headers={"Host": host}) as resp:
            assert resp.status == status, host
    served = await serve(listen_host="0.0.0.0")
    async with client.get(f"{served.url}/x", headers={"Host": f"0.0.0.0:{served.port}"}) as resp:
        assert resp.status == 421


# --------------------------------------------------------------------------------------------------
# 3. cross-site requests and CORS


async def test_cross_site_is_refused(serve: Serve, client: aiohttp.ClientSession) -> None:
    served = await serve(allowed_origins=(ALLOWED_ORIGIN, "null"))  # "null" is never honoured
    cases: list[tuple[dict[str, str], str]] = [
        ({"Origin": "https://evil.example"}, "origin_not_allowed"),
        ({"Origin": "null"}, "origin_not_allowed"),
        ({"Origin": "http://evil.example"}, "origin_not_allowed"),
        ({"Origin": "http://localhost.evil.example"}, "origin_not_allowed"),
        ({"Origin": "chrome-extension://localhost"}, "origin_not_allowed"),
        ({"Sec-Fetch-Site": "cross-site"}, "cross_site_refused"),
        ({"Sec-Fetch-Site": "cross-site", "Origin": "http://127.0.0.1:4000"}, "cross_site_refused"),
    ]
    for headers, code in cases:
        async with client.post(f"{served.url}/odata/x", headers=headers, data=b"{}") as resp:
            assert resp.status == 403, headers
            assert (await resp.json())["error"] == code
            assert "Access-Control-Allow-Origin" not in resp.headers
    assert served.seen == []


async def test_same_origin_and_non_browser_requests_pass(serve: Serve, client: aiohttp.ClientSession) -> None:
    served = await serve()
    for headers in [
        {},
        {"Origin": f"http://localhost:{served.port}"},
        {"Origin": f"http://127.0.0.1:{served.port}"},
        {"Origin": f"http://[::1]:{served.port}", "Host": f"[::1]:{served.port}"},
        {"Sec-Fetch-Site": "same-origin", "Origin": f"http://localhost:{served.port}"},
        {"Sec-Fetch-Site": "none"},
        {"Sec-Fetch-Site": "same-site"},
    ]:
        async with client.get(f"{served.url}/odata/x", headers=headers) as resp:
            assert resp.status == 200, headers
            assert "Access-Control-Allow-Origin" not in resp.headers
    assert len(served.seen) == 7


async def test_allowed_origin_gets_cors_headers(serve: Serve, client: aiohttp.ClientSession) -> None:
    served = await serve(allowed_origins=(ALLOWED_ORIGIN + "/",))
    for path in ("/odata/x", "/stream"):  # the proxy's own answer, and an upstream's streamed one
        headers = {"Origin": ALLOWED_ORIGIN, "Sec-Fetch-Site": "cross-site"}
        async with client.get(f"{served.url}{path}", headers=headers) as resp:
            assert resp.status == 200
            assert resp.headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN
            assert resp.headers["Access-Control-Expose-Headers"] == "*"
            assert "Origin" in resp.headers["Vary"]
            assert len(resp.headers.getall("Vary")) == 1  # merged into the upstream's own Vary, not added
            if path == "/stream":
                assert resp.headers["Vary"] == "Accept-Encoding, Origin"
                assert resp.headers["Transfer-Encoding"] == "chunked"
                assert await resp.read() == b"streamed"
    assert len(served.seen) == 2


async def test_preflight(serve: Serve, client: aiohttp.ClientSession) -> None:
    served = await serve(allowed_origins=(ALLOWED_ORIGIN,), api_key=Secret(KEY))
    preflight = {
        "Origin": ALLOWED_ORIGIN,
        "Access-Control-Request-Method": "PATCH",
        "Access-Control-Request-Headers": "x-proxy-api-key, content-type",
        "Sec-Fetch-Site": "cross-site",
    }
    async with client.options(f"{served.url}/odata/x", headers=preflight) as resp:
        assert resp.status == 204
        assert resp.headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN
        methods = {m.strip() for m in resp.headers["Access-Control-Allow-Methods"].split(",")}
        assert methods == {"GET", "HEAD", "POST", "PUT", "PATCH", "MERGE", "DELETE", "OPTIONS"}
        assert resp.headers["Access-Control-Allow-Headers"] == "x-proxy-api-key, content-type"
        assert resp.headers["Access-Control-Max-Age"] == "600"
    for origin in ("https://evil.example", "http://127.0.0.1:4000"):
        async with client.options(f"{served.url}/odata/x", headers={**preflight, "Origin": origin}) as resp:
            assert resp.status == 403
            assert "Access-Control-Allow-Origin" not in resp.headers
    assert served.seen == []
    # a plain OPTIONS is not a preflight: it is forwarded (with the key)
    async with client.options(f"{served.url}/odata/x", headers={DEFAULT_API_KEY_HEADER: KEY}) as resp:
        assert resp.status == 200
    assert [s.method for s in served.seen] == ["OPTIONS"]


# --------------------------------------------------------------------------------------------------
# 4. inbound API key


async def test_api_key_missing_or_wrong(
    serve: Serve, client: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="odata_auth_proxy.guard")
    served = await serve(api_key=Secret(KEY), allowed_origins=(ALLOWED_ORIGIN,))
    bodies: list[bytes] = []
    for headers in [
        {},
        {DEFAULT_API_KEY_HEADER: "wrong"},
        {DEFAULT_API_KEY_HEADER: KEY + "x"},
        {DEFAULT_API_KEY_HEADER: ""},
        {"Proxy-Authorization": "Bearer wrong"},
        {"Proxy-Authorization": f"Basic {KEY}"},
        {"Authorization": f"Bearer {KEY}"},
    ]:
        async with client.get(f"{served.url}/odata/x?q={KEY}", headers=headers) as resp:
            assert resp.status == 401, headers
            assert resp.headers["Proxy-Authenticate"] == 'Bearer realm="odata-auth-proxy"'
            body = await resp.read()
            assert json.loads(body)["error"] == "proxy_auth_required"
            assert KEY not in body.decode()
            assert all(KEY not in v for v in resp.headers.values())
            bodies.append(body)
    assert len(set(bodies)) == 1, "missing and wrong key must be indistinguishable"
    # a refusal for an allowed CORS origin is readable by that web app
    async with client.get(f"{served.url}/odata/x", headers={"Origin": ALLOWED_ORIGIN}) as resp:
        assert resp.status == 401
        assert resp.headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN
    # a key in the URL, placed where truncation to 100 characters would cut it in half
    long_path = "/odata/" + "a" * 80 + f"?q={KEY}"
    async with client.get(f"{served.url}{long_path}", headers={"Origin": "https://evil.example"}) as resp:
        assert resp.status == 403
    resp2 = await raw(served.port, req(long_path.replace("/odata/", "/odata/../")))
    assert_refused(resp2, 400, "path_traversal_refused")
    assert KEY[:8] not in resp2.body.decode()
    assert served.seen == []
    assert "proxy_auth_required" in caplog.text
    assert KEY[:8] not in caplog.text
    assert all(r.levelno == logging.WARNING for r in caplog.records)


async def test_api_key_accepted_and_stripped(serve: Serve, client: aiohttp.ClientSession) -> None:
    served = await serve(api_key=Secret(KEY))
    for headers in [
        {DEFAULT_API_KEY_HEADER: KEY, "X-Other": "kept"},
        {"Proxy-Authorization": f"Bearer {KEY}", "X-Other": "kept"},
        {"Proxy-Authorization": f"bearer  {KEY} ", "X-Other": "kept"},
        {DEFAULT_API_KEY_HEADER: "wrong", "Proxy-Authorization": f"Bearer {KEY}", "X-Other": "kept"},
    ]:
        async with client.post(f"{served.url}/odata/x", headers=headers, data=b'{"a": 1}') as resp:
            assert resp.status == 200, headers
    assert len(served.seen) == 4
    for seen in served.seen:
        assert DEFAULT_API_KEY_HEADER not in seen.headers
        assert "Proxy-Authorization" not in seen.headers
        assert seen.headers["X-Other"] == "kept"
        assert seen.body == b'{"a": 1}'
        assert all(KEY not in v for _, v in seen.headers.items())


async def test_filters_around_the_guard_share_the_exchange(client: aiohttp.ClientSession) -> None:
    """A filter after the guard sees the request with the key's headers marked as not forwarded; what it
    stores on the exchange is visible to an earlier (observing) filter's ``finished`` hook, for refusals too."""
    observed: list[tuple[str, str, int, int]] = []
    later_saw: list[tuple[set[bytes], HeaderView]] = []

    class Observe(Filter):
        def request(self, ex: Exchange) -> Reply | None:
            ex.request_id = "r-1"
            return None

        def finished(self, ex: Exchange) -> None:
            observed.append((ex.request_id, ex.upstream_target, ex.status, ex.bytes_out))

    class Later(Filter):
        def request(self, ex: Exchange) -> Reply | None:
            assert ex.request_id == "r-1"
            later_saw.append((set(ex.drop), forwarded_headers(ex)))
            ex.upstream_target = "/demo"
            return Reply(200, b"abc")

    guard = Guard(GuardSettings("127.0.0.1", 0, api_key=Secret(KEY)))
    listener, pool, port = await start_proxy(Chain([Observe(), GuardFilter(guard), Later()]))
    try:
        for headers in (
            {DEFAULT_API_KEY_HEADER: KEY, "X-Other": "kept"},
            {"Proxy-Authorization": f"Bearer {KEY}", "X-Other": "kept"},
        ):
            async with client.get(f"http://127.0.0.1:{port}/x", headers=headers) as resp:
                assert resp.status == 200
                assert await resp.read() == b"abc"
        async with client.get(f"http://127.0.0.1:{port}/x") as resp:
            assert resp.status == 401
            refusal = await resp.read()
    finally:
        await listener.close()
        await pool.close()
    assert observed == [("r-1", "/demo", 200, 3), ("r-1", "/demo", 200, 3), ("r-1", "", 401, len(refusal))]
    assert len(later_saw) == 2
    for drop, seen_headers in later_saw:
        assert {DEFAULT_API_KEY_HEADER.lower().encode(), b"proxy-authorization"} <= drop
        assert DEFAULT_API_KEY_HEADER not in seen_headers
        assert "Proxy-Authorization" not in seen_headers
        assert seen_headers["X-Other"] == "kept"
        assert all(KEY not in v for _, v in seen_headers.items())


async def test_custom_api_key_header(serve: Serve, client: aiohttp.ClientSession) -> None:
    served = await serve(api_key=Secret(KEY), api_key_header="X-Inbound-Key")
    async with client.get(f"{served.url}/x", headers={DEFAULT_API_KEY_HEADER: KEY}) as resp:
        assert resp.status == 401
        assert "X-Inbound-Key" in (await resp.json())["detail"]
    async with client.get(f"{served.url}/x", headers={"x-inbound-key": KEY}) as resp:
        assert resp.status == 200
    assert "X-Inbound-Key" not in served.seen[0].headers


async def test_empty_api_key_fails_closed(serve: Serve, client: aiohttp.ClientSession) -> None:
    served = await serve(api_key=Secret(""))
    for headers in [{}, {DEFAULT_API_KEY_HEADER: ""}, {"Proxy-Authorization": "Bearer "}]:
        async with client.get(f"{served.url}/x", headers=headers) as resp:
            assert resp.status == 401
    assert served.seen == []


async def test_health_checks_need_no_key_but_the_rest_of_the_guard(serve: Serve, client: aiohttp.ClientSession) -> None:
    served = await serve(api_key=Secret(KEY))
    for path in ("healthz", "readyz", "healthz?verbose=1"):
        async with client.get(f"{served.url}{ADMIN_PREFIX}{path}") as resp:
            assert resp.status == 200, path
    for path in ("metrics", "healthz/", "healthz/../metrics"):
        resp2 = await raw(served.port, req(f"{ADMIN_PREFIX}{path}"))
        assert resp2.status in (400, 401), path
    async with client.get(f"{served.url}{ADMIN_PREFIX}healthz", headers={"Host": "evil.example"}) as resp:
        assert resp.status == 421
    async with client.get(f"{served.url}{ADMIN_PREFIX}healthz", headers={"Origin": "https://evil.example"}) as resp:
        assert resp.status == 403
    assert [s.raw_path for s in served.seen] == ["/-/healthz", "/-/readyz", "/-/healthz?verbose=1"]


# --------------------------------------------------------------------------------------------------
# listen address


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", True),
        ("127.0.0.53", True),
        ("127.255.255.254", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LocalHost", True),
        ("::ffff:127.0.0.1", True),
        ("0.0.0.0", False),
        ("::", False),
        ("[::]", False),
        ("", False),
        ("192.0.2.10", False),
        ("10.0.0.5", False),
        ("2001:db8::1", False),
        ("my-laptop", False),
        ("localhost.example", False),
        ("127.0.0.1.example", False),
        ("128.0.0.1", False),
    ],
)
def test_is_loopback(host: str, expected: bool) -> None:
    assert is_loopback(host) is expected


@pytest.mark.parametrize(
    ("host", "allow_remote", "has_api_key", "problem"),
    [
        ("127.0.0.1", False, False, False),
        ("::1", False, False, False),
        ("localhost", False, False, False),
        ("0.0.0.0", False, False, True),
        ("::", False, False, True),
        ("", False, False, True),
        ("192.0.2.10", False, False, True),
        ("0.0.0.0", True, False, False),
        ("0.0.0.0", False, True, False),
        ("192.0.2.10", True, True, False),
    ],
)
def test_listen_address_problem(host: str, allow_remote: bool, has_api_key: bool, problem: bool) -> None:
    message = listen_address_problem(host, allow_remote=allow_remote, has_api_key=has_api_key)
    if not problem:
        assert message is None
        return
    assert message is not None
    assert "\n" not in message
    assert message.count(". ") >= 1
    for hint in (
        "127.0.0.1",
        "inbound_api_key",
        "ODATA_AUTH_PROXY_INBOUND_API_KEY",
        "--allow-remote",
        "allow_remote: true",
        "sidecar",
        "service key",
    ):
        assert hint in message
    if host:
        assert f"binding {host}" in message
