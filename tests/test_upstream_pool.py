"""The upstream pool on its own: keep-alive reuse, idle expiry, stale connections, and failures in words.

Real TLS to the HTTPS upstream of ``conftest`` (a throwaway CA), real sockets, only 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import ssl

import pytest

from proxy.http.upstream import Origin, UpstreamError, UpstreamPool
from proxy.outbound import OutboundProxies
from tests.conftest import Backend, Tls, free_port


def trusting(tls: Tls) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.load_verify_locations(cafile=str(tls.ca_path))
    return ctx


def pool_for(ctx: ssl.SSLContext, idle_timeout: float = 30.0) -> UpstreamPool:
    return UpstreamPool(ctx, OutboundProxies(None, {}), connect_timeout=5.0, idle_timeout=idle_timeout)


async def get(pool: UpstreamPool, origin: Origin, path: str = "/api/v1/echo/pool") -> tuple[int, bytes, bool]:
    """One GET through the pool (without a token the upstream answers 401, which is all this needs)."""
    conn = await pool.acquire(origin)
    reused = conn.reused
    conn.begin(
        b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (path.encode(), origin.host_header),
        head_request=False,
    )
    head = await asyncio.wait_for(conn.response_head(), 5)
    await asyncio.wait_for(conn.wait_complete(), 5)
    body = conn.take_body()
    pool.release(conn)
    return head.status, body, reused


async def test_a_released_connection_is_reused(backend: Backend) -> None:
    pool = pool_for(trusting(backend.tls))
    origin = Origin.from_url(backend.upstream.url)
    try:
        first = await get(pool, origin)
        second = await get(pool, origin)
    finally:
        await pool.close()
    assert first[0] == second[0] == 401
    assert b"unauthorized" in first[1]
    assert (first[2], second[2]) == (False, True)


async def test_idle_connections_expire(backend: Backend) -> None:
    pool = pool_for(trusting(backend.tls), idle_timeout=0.2)
    origin = Origin.from_url(backend.upstream.url)
    try:
        await get(pool, origin)
        assert pool.expire_idle() == 0  # just released: not idle long enough
        await asyncio.sleep(0.3)
        assert pool.expire_idle() == 1
        assert pool.take_idle(origin) is None
        assert (await get(pool, origin))[2] is False  # a fresh connection
    finally:
        await pool.close()


async def test_a_connection_the_upstream_closed_is_not_handed_out() -> None:
    """An upstream that closes idle connections (without saying so) must not cost a request."""

    async def answer_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()

    server = await asyncio.start_server(answer_then_close, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = pool_for(ssl.create_default_context())
    origin = Origin.from_url(f"http://127.0.0.1:{port}")
    try:
        assert (await get(pool, origin))[:2] == (200, b"ok")
        await asyncio.sleep(0.2)
        assert pool.take_idle(origin) is None
        assert (await get(pool, origin))[:2] == (200, b"ok")
    finally:
        await pool.close()
        server.close()
        await server.wait_closed()


async def test_refused_connection_is_named() -> None:
    pool = pool_for(ssl.create_default_context())
    port = free_port()
    try:
        with pytest.raises(UpstreamError) as caught:
            await pool.acquire(Origin.from_url(f"https://127.0.0.1:{port}"))
    finally:
        await pool.close()
    assert caught.value.code == "upstream_unreachable"
    assert f"127.0.0.1:{port}" in caught.value.detail and "refused" in caught.value.detail


async def test_untrusted_certificate_says_how_to_fix_it(backend: Backend) -> None:
    pool = pool_for(ssl.create_default_context())  # the throwaway CA is not trusted here
    try:
        with pytest.raises(UpstreamError) as caught:
            await pool.acquire(Origin.from_url(backend.upstream.url))
    finally:
        await pool.close()
    assert caught.value.code == "upstream_tls_error"
    assert "--ca-bundle" in caught.value.detail


def test_origin_host_header_keeps_non_default_ports_only() -> None:
    assert Origin.from_url("https://tenant.example/api/v1/").host_header == b"tenant.example"
    assert Origin.from_url("https://tenant.example:443/").host_header == b"tenant.example"
    assert Origin.from_url("https://127.0.0.1:8443/").host_header == b"127.0.0.1:8443"
    assert Origin.from_url("http://[::1]:8080/").host_header == b"[::1]:8080"
