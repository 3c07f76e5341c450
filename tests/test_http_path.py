"""The client-facing HTTP path end to end, as the listener rewrite (aiohttp → asyncio Protocols + httptools) must
keep or newly provide it: half-closed clients, the ``timeouts.client_*`` deadlines (head, body, write, idle), an
exact drain, pipelining, ``Expect: 100-continue``, HTTP/1.0, chunked uploads, a pooled upstream connection the
upstream closed, and flow control (bounded memory under a slow reader).

Everything here talks to the proxy through real sockets on 127.0.0.1 (raw asyncio streams, aiohttp, curl), to
the real HTTPS test backend of ``conftest.py``; the deadlines are checked against the proxy's documented
granularity (a sweep about once a second, so a timeout of T fires by about T + 2 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from proxy.app import prepare
from proxy.server import ProxyServer
from tests.conftest import (
    Backend,
    RssSampler,
    child_env,
    free_port,
    make_config,
    proxy_subprocess,
    raw_request,
    rss_bytes,
    running_proxy,
    secret_route,
    write_yaml,
)

CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed")

SWEEP_SLACK = 2.5  # a client_* timeout of T must have fired by T + this (sweep ~1/s, plus scheduling)
MiB = 1024 * 1024


# --------------------------------------------------------------------------- helpers


@dataclass
class RawResponse:
    """One HTTP answer as it came over the wire."""

    version: str
    status: int
    headers: CIMultiDict[str]
    body: bytes
    framing: str  # "content-length", "chunked" or "eof"

    def json(self) -> Any:
        return json.loads(self.body)

    def connection_tokens(self) -> set[str]:
        return {t.strip().lower() for v in self.headers.getall("Connection", []) for t in v.split(",") if t.strip()}


STATUS_LINE = re.compile(rb"^HTTP/(1\.[01]) (\d{3})(?: [^\r\n]*)?\r?\n$")


async def read_response(reader: asyncio.StreamReader) -> RawResponse:
    """Read one answer, framed by Content-Length, chunked encoding, or the end of the connection."""
    status_line = await reader.readline()
    assert status_line, "the connection was closed before an answer arrived"
    match = STATUS_LINE.match(status_line)
    assert match, f"not an HTTP status line: {status_line!r}"
    version, status = "HTTP/" + match.group(1).decode(), int(match.group(2))
    headers: CIMultiDict[str] = CIMultiDict()
    while True:
        line = await reader.readline()
        assert line.endswith(b"\n"), f"connection closed inside the response head: {line!r}"
        if line in (b"\r\n", b"\n"):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers.add(name.strip(), value.strip())
    if status in (204, 304) or 100 <= status < 200:
        return RawResponse(version, status, headers, b"", "content-length")
    if "chunked" in headers.get("Transfer-Encoding", "").lower():
        body = bytearray()
        while True:
            size_line = await reader.readline()
            assert size_line.endswith(b"\n"), f"connection closed inside the chunked body after {len(body)} bytes"
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return RawResponse(version, status, headers, bytes(body), "chunked")
            body += await reader.readexactly(size)
            assert await reader.readexactly(2) == b"\r\n"
    if "Content-Length" in headers:
        return RawResponse(
            version, status, headers, await reader.readexactly(int(headers["Content-Length"])), "content-length"
        )
    return RawResponse(version, status, headers, await reader.read(), "eof")


async def parse_response(data: bytes) -> RawResponse:
    """``read_response`` over bytes already read (up to the end of the connection)."""
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return await read_response(reader)


@dataclass
class ReadOutcome:
    data: bytes  # what arrived (only the first ``keep`` bytes when counting a large body)
    received: int  # how many bytes arrived in all
    end: str  # "eof", "reset", "timeout" (still open at the deadline) or "cap" (more than ``cap`` arrived)
    elapsed: float

    @property
    def closed(self) -> bool:
        return self.end in ("eof", "reset")


async def read_until_closed(
    reader: asyncio.StreamReader, timeout: float, *, cap: int = 1 << 62, keep: int = 1 << 62
) -> ReadOutcome:
    """Read until the peer closes (EOF or reset), at most ``timeout`` seconds and ``cap`` bytes."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + timeout
    data = bytearray()
    received = 0
    end = "timeout"
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        try:
            chunk = await asyncio.wait_for(reader.read(256 * 1024), remaining)
        except TimeoutError:
            break
        except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
            end = "reset"
            break
        if not chunk:
            end = "eof"
            break
        received += len(chunk)
        if len(data) < keep:
            data += chunk[: keep - len(data)]
        if received > cap:
            end = "cap"
            break
    return ReadOutcome(bytes(data), received, end, loop.time() - started)


@contextlib.asynccontextmanager
async def connect(
    port: int, *, rcvbuf: int | None = None, limit: int = 1 << 16
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A raw connection to the proxy; ``rcvbuf`` shrinks the socket's receive buffer before connecting."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port)), 5)
    except BaseException:
        sock.close()
        raise
    reader, writer = await asyncio.open_connection(sock=sock, limit=limit)
    try:
        yield reader, writer
    finally:
        writer.transport.abort()
        with contextlib.suppress(OSError, ConnectionError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 2)


async def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(0.02)


def header_values(headers: list[list[str]], name: str) -> list[str]:
    """Values of ``name`` among the headers the test upstream echoed back."""
    return [value for key, value in headers if key.lower() == name.lower()]


def reached_upstream(backend: Backend, prefix: str) -> Callable[[], bool]:
    return lambda: any(r["raw_path"].startswith(prefix) for r in backend.upstream.requests)


def metric_total(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def in_flight(base: str) -> float:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as client,
        client.get(base + "/-/metrics") as resp,
    ):
        assert resp.status == 200
        return metric_total(await resp.text(), "odata_auth_proxy_requests_in_flight")


@dataclass
class Served:
    """A ProxyServer whose stop() the test calls (and times) itself."""

    server: ProxyServer
    stopped: bool = False

    async def stop(self) -> None:
        self.stopped = True
        await self.server.stop()


@contextlib.asynccontextmanager
async def started_server(server: ProxyServer) -> AsyncIterator[Served]:
    """Start ``server``; stop it on the way out only if the test did not get that far."""
    await server.start()
    served = Served(server)
    try:
        yield served
    finally:
        if not served.stopped:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.stop(), 15)


# --------------------------------------------------------------------------- 1. half-close


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_half_closed_client_still_gets_the_whole_answer(tmp_path: Path, backend: Backend, method: str) -> None:
    """A client that sends its complete request and then shuts down its sending side (SHUT_WR, as ``nc -N`` and
    many scripted clients do) must still receive the complete answer before the proxy closes."""
    payload = b"half-closed upload" if method == "POST" else b""
    async with running_proxy(make_config(tmp_path, backend)) as running:
        port = running.server.port
        async with connect(port) as (reader, writer):
            writer.write(raw_request(method, f"/api/v1/echo/half-{method.lower()}", port, body=payload))
            await writer.drain()
            assert writer.can_write_eof()
            writer.write_eof()  # shutdown(SHUT_WR): a FIN after the request, the receiving side stays open
            try:
                resp = await asyncio.wait_for(read_response(reader), 10)
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                pytest.fail(f"no complete answer after the half-close: {exc!r}")
            after = await read_until_closed(reader, 3)
    assert resp.status == 200, resp.body
    assert after.data == b"" and after.end == "eof", f"not closed after the answer ({after.end}): {after.data!r}"
    body = resp.json()
    assert body["method"] == method
    assert body["raw_path"] == f"/api/v1/echo/half-{method.lower()}"
    assert body["body_length"] == len(payload)
    assert body["body_sha256"] == hashlib.sha256(payload).hexdigest()


# --------------------------------------------------------------------------- 2.-5. the client_* timeouts


async def test_stalled_upload_gets_408_and_never_reaches_the_upstream(tmp_path: Path, backend: Backend) -> None:
    """``timeouts.client_body``: a body that stops arriving mid-request is answered 408 and the connection
    closed; a body small enough to be buffered whole was never sent upstream."""
    async with running_proxy(make_config(tmp_path, backend, timeouts={"client_body": 1})) as running:
        port = running.server.port
        async with connect(port) as (reader, writer):
            head = raw_request("POST", "/api/v1/echo/stalled", port, [("Content-Length", "1000")])
            writer.write(head + b"0123456789")  # 10 of the 1000 promised bytes, then nothing
            await writer.drain()
            outcome = await read_until_closed(reader, 1 + SWEEP_SLACK + 2)
        await asyncio.sleep(0.2)
    assert outcome.data.startswith(b"HTTP/1.1 408"), f"no 408 within {outcome.elapsed:.1f} s: {outcome.data[:200]!r}"
    assert outcome.closed, f"the connection stayed open after the 408 ({outcome.end})"
    assert outcome.elapsed < 1 + SWEEP_SLACK, f"408 + close took {outcome.elapsed:.1f} s"
    assert backend.upstream.requests == [], "the incomplete request reached the upstream"


async def test_slow_request_head_is_cut(tmp_path: Path, backend: Backend) -> None:
    """``timeouts.client_header``: a request head that never completes (slowloris) gets the connection closed
    (a 408 before closing is fine)."""
    async with running_proxy(make_config(tmp_path, backend, timeouts={"client_header": 1})) as running:
        async with connect(running.server.port) as (reader, writer):
            writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # no blank line: the head never ends
            await writer.drain()
            outcome = await read_until_closed(reader, 1 + SWEEP_SLACK + 2)
    assert outcome.data == b"" or re.match(rb"HTTP/1\.[01] 408 ", outcome.data), outcome.data[:200]
    assert outcome.closed, f"the connection was still open after {outcome.elapsed:.1f} s"
    assert outcome.elapsed < 1 + SWEEP_SLACK, f"closed only after {outcome.elapsed:.1f} s"
    assert backend.upstream.requests == []


async def test_idle_keep_alive_connection_is_closed(tmp_path: Path, backend: Backend) -> None:
    """``timeouts.client_idle``: a kept-alive connection with no next request is closed after the idle time."""
    async with running_proxy(make_config(tmp_path, backend, timeouts={"client_idle": 1})) as running:
        port = running.server.port
        async with connect(port) as (reader, writer):
            writer.write(raw_request("GET", "/api/v1/echo/idle", port))
            await writer.drain()
            resp = await asyncio.wait_for(read_response(reader), 10)
            assert resp.status == 200
            assert "close" not in resp.connection_tokens()  # really a keep-alive answer
            outcome = await read_until_closed(reader, 1 + SWEEP_SLACK + 2)
    assert outcome.data == b"", outcome.data[:200]
    assert outcome.closed, f"the idle connection was still open after {outcome.elapsed:.1f} s"
    assert outcome.elapsed < 1 + SWEEP_SLACK, f"closed only after {outcome.elapsed:.1f} s"


async def test_client_that_stops_reading_is_cut_and_the_upstream_released(tmp_path: Path, backend: Backend) -> None:
    """``timeouts.client_write``: a client that reads nothing of a (512 MiB) answer for longer than the write
    timeout is disconnected and the upstream stream released, instead of pinning both forever."""
    total = 512 * MiB
    async with running_proxy(make_config(tmp_path, backend, timeouts={"client_write": 1})) as running:
        port = running.server.port
        async with connect(port, rcvbuf=16384, limit=16384) as (reader, writer):
            writer.write(raw_request("GET", f"/api/v1/stream?bytes={total}", port))
            await writer.drain()
            status_line = await asyncio.wait_for(reader.readline(), 10)
            assert status_line.startswith(b"HTTP/1.1 200 "), status_line
            await asyncio.sleep(4)  # read nothing: only the socket buffers (a few hundred KiB) can fill
            outcome = await read_until_closed(reader, 8, cap=64 * MiB, keep=0)
        assert outcome.end != "cap", (
            f"the proxy kept streaming to a client that read nothing for 4 s: {outcome.received >> 20} MiB arrived"
        )
        assert outcome.closed, f"still open {outcome.elapsed:.1f} s after reading resumed"
        assert outcome.received < 64 * MiB
        end = time.monotonic() + 3
        while (count := await in_flight(running.url)) != 0:
            assert time.monotonic() < end, f"{count} request(s) still in flight: the upstream stream was kept"
            await asyncio.sleep(0.1)


# --------------------------------------------------------------------------- 6. drain


async def test_drain_is_bounded_by_shutdown_timeout(
    tmp_path: Path, backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    """``shutdown_timeout`` is the drain's whole budget: stop() returns after about that long (not twice it),
    the request still in flight is cut, and its access log line blames the drain, not the client (no 499)."""
    caplog.set_level(logging.INFO, logger="odata_auth_proxy.access")
    config = make_config(tmp_path, backend, shutdown_timeout=1)
    async with started_server(ProxyServer(prepare(config))) as served:
        server = served.server
        port = server.port
        async with connect(port) as (reader, writer):
            writer.write(raw_request("GET", "/api/v1/slow?seconds=30", port))
            await writer.drain()
            await wait_until(reached_upstream(backend, "/api/v1/slow"), 10, "the slow request to reach the upstream")
            server.request_stop()
            started = time.monotonic()
            await asyncio.wait_for(served.stop(), 10)
            took = time.monotonic() - started
            outcome = await read_until_closed(reader, 3)
    assert took < 1.5, f"stop() took {took:.2f} s with shutdown_timeout 1"
    assert took > 0.8, f"stop() returned after {took:.2f} s: the in-flight request did not get its drain time"
    assert outcome.closed, f"the client's connection was left open after stop() ({outcome.end})"
    assert b"slow done" not in outcome.data
    await wait_until(
        lambda: any("/api/v1/slow" in r.getMessage() for r in caplog.records if r.name == "odata_auth_proxy.access"),
        2,
        "the access log line of the cut request",
    )
    (record,) = [r for r in caplog.records if r.name == "odata_auth_proxy.access" and "/api/v1/slow" in r.getMessage()]
    message = record.getMessage()
    fields: dict[str, Any] = getattr(record, "fields", {})
    assert fields.get("status") != 499 and " 499 " not in message, message
    assert "drain" in message.lower(), message


async def test_keep_alive_request_during_drain_is_answered_with_connection_close(
    tmp_path: Path, backend: Backend
) -> None:
    """A request arriving on an already-open keep-alive connection while the server drains is still served, but
    its answer says ``Connection: close`` (and the connection then ends), so the client reconnects elsewhere."""
    config = make_config(tmp_path, backend, shutdown_timeout=2)
    async with started_server(ProxyServer(prepare(config))) as served:
        server = served.server
        port = server.port
        async with connect(port) as (reader, writer), connect(port) as (_, slow_writer):
            writer.write(raw_request("GET", "/api/v1/echo/before-drain", port))
            await writer.drain()
            first = await asyncio.wait_for(read_response(reader), 10)
            assert first.status == 200
            assert "close" not in first.connection_tokens()
            # a slow request keeps the server in its drain while the kept-alive connection sends again
            slow_writer.write(raw_request("GET", "/api/v1/slow?seconds=30", port))
            await slow_writer.drain()
            await wait_until(reached_upstream(backend, "/api/v1/slow"), 10, "the slow request to reach the upstream")
            server.request_stop()
            writer.write(raw_request("GET", "/api/v1/echo/during-drain", port))
            await writer.drain()
            second = await asyncio.wait_for(read_response(reader), 5)
            after = await read_until_closed(reader, 3)
            await asyncio.wait_for(served.stop(), 10)
    assert second.status == 200, second.body
    assert second.json()["raw_path"] == "/api/v1/echo/during-drain"
    assert "close" in second.connection_tokens(), f"no Connection: close while draining: {dict(second.headers)}"
    assert after.data == b"" and after.closed, f"the connection stayed open after Connection: close ({after.end})"


# --------------------------------------------------------------------------- 7. pipelining


async def test_pipelined_requests_are_answered_in_order(tmp_path: Path, backend: Backend) -> None:
    """Three GETs written in one send on one connection get three complete answers, in request order."""
    async with running_proxy(make_config(tmp_path, backend)) as running:
        port = running.server.port
        async with connect(port) as (reader, writer):
            writer.write(b"".join(raw_request("GET", f"/api/v1/echo/{n}", port) for n in (1, 2, 3)))
            await writer.drain()
            answers = [await asyncio.wait_for(read_response(reader), 10) for _ in range(3)]
            # the connection is still usable after the pipeline
            writer.write(raw_request("GET", "/api/v1/echo/4", port, [("Connection", "close")]))
            await writer.drain()
            answers.append(await asyncio.wait_for(read_response(reader), 10))
    assert [a.status for a in answers] == [200] * 4
    assert [a.json()["raw_path"] for a in answers] == [f"/api/v1/echo/{n}" for n in (1, 2, 3, 4)]
    assert [r["raw_path"] for r in backend.upstream.requests] == [f"/api/v1/echo/{n}" for n in (1, 2, 3, 4)]


# --------------------------------------------------------------------------- 8. Expect: 100-continue


async def test_expect_100_continue_raw(tmp_path: Path, backend: Backend) -> None:
    """The proxy sends ``100 Continue`` before the client sends its body, and does not pass Expect upstream."""
    async with running_proxy(make_config(tmp_path, backend)) as running:
        port = running.server.port
        async with connect(port) as (reader, writer):
            writer.write(
                raw_request("POST", "/api/v1/echo/expect", port, [("Expect", "100-continue"), ("Content-Length", "5")])
            )
            await writer.drain()
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert interim.startswith(b"HTTP/1.1 100 "), interim
            writer.write(b"hello")
            await writer.drain()
            resp = await asyncio.wait_for(read_response(reader), 10)
    assert resp.status == 200, resp.body
    body = resp.json()
    assert body["body_length"] == 5
    assert body["body_sha256"] == hashlib.sha256(b"hello").hexdigest()
    assert header_values(body["headers"], "Expect") == []
    assert all(name.lower() != "expect" for name, _ in backend.upstream.requests[-1]["headers"])


@needs_curl
async def test_expect_100_continue_with_curl(tmp_path: Path, backend: Backend) -> None:
    """curl with ``Expect: 100-continue`` and a 2 MiB body (streamed, past the replay buffer) gets its 100,
    then a 200 whose echo carries exactly the bytes sent."""
    assert CURL is not None
    payload = os.urandom(2 * MiB)
    upload = tmp_path / "upload.bin"
    upload.write_bytes(payload)
    async with running_proxy(make_config(tmp_path, backend)) as running:
        process = await asyncio.create_subprocess_exec(
            CURL,
            "-sS",
            "-v",
            "--noproxy",
            "*",
            "--max-time",
            "15",
            "--expect100-timeout",
            "10",  # without the 100 curl would wait this long: the check below sees whether it came
            "-H",
            "Expect: 100-continue",
            "--data-binary",
            f"@{upload}",
            "-w",
            "\n%{http_code}",
            running.url + "/api/v1/echo/curl-expect",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=child_env(),
        )
        out, err = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0, err.decode(errors="replace")
    text, _, code = out.decode().rpartition("\n")
    assert code == "200", text
    assert "< HTTP/1.1 100 Continue" in err.decode(errors="replace")
    body = json.loads(text)
    assert body["body_length"] == len(payload)
    assert body["body_sha256"] == hashlib.sha256(payload).hexdigest()
    assert header_values(body["headers"], "Expect") == []


# --------------------------------------------------------------------------- 9. HTTP/1.0


@pytest.mark.parametrize(
    "target", ["/api/v1/echo/x", "/api/v1/stream?bytes=300000"], ids=["sized-answer", "chunked-upstream-answer"]
)
async def test_http10_request_is_answered_and_closed(tmp_path: Path, backend: Backend, target: str) -> None:
    """HTTP/1.0 without Host: a 200 with a body an HTTP/1.0 client can frame (Content-Length or the end of the
    connection, never chunked), then the proxy closes the connection."""
    async with running_proxy(make_config(tmp_path, backend)) as running:
        async with connect(running.server.port) as (reader, writer):
            writer.write(f"GET {target} HTTP/1.0\r\n\r\n".encode())
            await writer.drain()
            outcome = await read_until_closed(reader, 10)
    assert outcome.end == "eof", f"the connection was not closed after the HTTP/1.0 answer ({outcome.end})"
    assert re.match(rb"HTTP/1\.[01] 200 ", outcome.data), outcome.data[:200]
    resp = await parse_response(outcome.data)
    assert resp.framing != "chunked", "chunked encoding sent to an HTTP/1.0 client"
    if target.startswith("/api/v1/echo"):
        assert resp.json()["raw_path"] == target
    else:
        assert resp.body == b"x" * 300000


async def test_http10_keep_alive_request_gets_a_complete_answer(tmp_path: Path, backend: Backend) -> None:
    """HTTP/1.0 with ``Connection: keep-alive``: whether kept alive or not, the answer is complete and framed."""
    async with running_proxy(make_config(tmp_path, backend)) as running:
        port = running.server.port
        async with connect(port) as (reader, writer):
            writer.write(
                raw_request("GET", "/api/v1/echo/ka", port, [("Connection", "keep-alive")], version="HTTP/1.0")
            )
            await writer.drain()
            resp = await asyncio.wait_for(read_response(reader), 10)
    assert resp.status == 200
    assert resp.framing != "chunked", "chunked encoding sent to an HTTP/1.0 client"
    assert resp.json()["raw_path"] == "/api/v1/echo/ka"


@pytest.mark.parametrize(
    ("version", "connection", "chunked"),
    [
        ("HTTP/1.1", None, True),  # kept alive without a Connection header: 1.1, worked out without asking llhttp
        ("HTTP/1.1", "keep-alive", True),
        ("HTTP/1.0", "keep-alive", False),  # kept alive too, but 1.0: never chunked
    ],
)
async def test_streamed_answer_framing_follows_the_client_version(
    tmp_path: Path, backend: Backend, version: str, connection: str | None, chunked: bool
) -> None:
    """A streamed answer of unknown length: chunked to an HTTP/1.1 client, delimited by the close for 1.0 —
    however the request said keep-alive (the version is taken from the keep-alive flag when no Connection
    header came, and asked of the parser otherwise)."""
    headers = [("Connection", connection)] if connection else []
    async with running_proxy(make_config(tmp_path, backend)) as running:
        port = running.server.port
        async with connect(port) as (reader, writer):
            writer.write(raw_request("GET", "/api/v1/stream?bytes=300000", port, headers, version=version))
            await writer.drain()
            outcome = await read_until_closed(reader, 10) if not chunked else None
            resp = (
                await parse_response(outcome.data)
                if outcome is not None
                else await asyncio.wait_for(read_response(reader), 10)
            )
    assert resp.status == 200
    assert (resp.framing == "chunked") == chunked, resp.framing
    assert resp.body == b"x" * 300000


# --------------------------------------------------------------------------- 10. chunked uploads


def chunked(pieces: Sequence[bytes]) -> bytes:
    return b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in pieces) + b"0\r\n\r\n"


def split(data: bytes, sizes: Sequence[int]) -> list[bytes]:
    out, pos = [], 0
    for size in sizes:
        out.append(data[pos : pos + size])
        pos += size
    if pos < len(data):
        out.append(data[pos:])
    return out


@pytest.mark.parametrize(
    ("size", "sizes"),
    [
        (380_000, [1, 15, 4096, 65536, 10_000, 300_000]),  # ≤ replay_buffer: buffered, replayable
        (3 * MiB, [7, 65536, 1_000_000, 333_333, 1]),  # > replay_buffer: streamed upstream
    ],
    ids=["small-replayable", "large-streamed"],
)
async def test_chunked_upload_arrives_whole(tmp_path: Path, backend: Backend, size: int, sizes: list[int]) -> None:
    """A raw ``Transfer-Encoding: chunked`` upload of several chunks reaches the upstream byte for byte."""
    payload = os.urandom(size)
    pieces = split(payload, sizes)
    assert len(pieces) > 3 and b"".join(pieces) == payload
    async with running_proxy(make_config(tmp_path, backend)) as running:
        port = running.server.port
        async with connect(port) as (reader, writer):
            head = raw_request("POST", "/api/v1/echo/chunked", port, [("Transfer-Encoding", "chunked")])
            writer.write(head + chunked(pieces))
            await writer.drain()
            resp = await asyncio.wait_for(read_response(reader), 15)
    assert resp.status == 200, resp.body
    body = resp.json()
    assert body["body_length"] == size
    assert body["body_sha256"] == hashlib.sha256(payload).hexdigest()


# --------------------------------------------------------------------------- 11. pooled connection closed upstream


@dataclass
class ClosingUpstream:
    """A plain-HTTP upstream that answers each request keep-alive style (no ``Connection: close``) and then
    closes the connection 50 ms later: a pooled connection the proxy must not trust blindly."""

    requests: list[str]
    connections: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            request_line, *lines = head.decode("latin-1").split("\r\n")
            length = 0
            for line in lines:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if length:
                await reader.readexactly(length)
            self.requests.append(request_line)
            body = json.dumps({"request": request_line, "connection": self.connections}).encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
            await asyncio.sleep(0.05)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()


async def test_pooled_connection_closed_by_the_upstream_is_not_an_error(tmp_path: Path, backend: Backend) -> None:
    """After the upstream silently closed a kept-alive connection, the next request still gets a 200 (the proxy
    retries on a fresh connection when a pooled one turns out closed before any byte of the answer)."""
    upstream = ClosingUpstream(requests=[])
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0)
    try:
        up_url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        config = make_config(tmp_path, backend, [secret_route(backend, upstream=up_url)])
        async with (
            running_proxy(config) as running,
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client,
        ):
            statuses = []
            for path in ("/first", "/second"):
                async with client.get(running.url + path) as resp:
                    statuses.append(resp.status)
                    answer = await resp.read()
                assert resp.status == 200, answer
                assert json.loads(answer)["request"] == f"GET {path} HTTP/1.1"
                await asyncio.sleep(0.3)  # the upstream has closed the pooled connection by now
    finally:
        server.close()
        await server.wait_closed()
    assert statuses == [200, 200]
    assert upstream.requests == ["GET /first HTTP/1.1", "GET /second HTTP/1.1"]
    assert upstream.connections >= 2


# --------------------------------------------------------------------------- 12. flow control (subprocess)


async def download(
    client: aiohttp.ClientSession, url: str, reader: Callable[[aiohttp.StreamReader], Awaitable[int]]
) -> int:
    async with client.get(url) as resp:
        assert resp.status == 200
        return await reader(resp.content)


@pytest.mark.timeout(60)
async def test_slow_reader_download_in_bounded_memory(tmp_path: Path, backend: Backend) -> None:
    """Flow control: a 512 MiB download to a client that first reads nothing, then reads slowly, does not pile
    up in the proxy (RSS growth ≤ 32 MiB) and arrives complete."""
    total = 512 * MiB
    port = free_port()
    config = write_yaml(
        tmp_path / "proxy.yaml",
        {
            "listen": f"127.0.0.1:{port}",
            "tls": {"ca_bundle": str(backend.tls.ca_path)},
            "routes": [secret_route(backend)],
        },
    )
    base = f"http://127.0.0.1:{port}"
    started = time.monotonic()

    async def fast(content: aiohttp.StreamReader) -> int:
        count = 0
        async for chunk in content.iter_chunked(256 * 1024):
            count += len(chunk)
        return count

    async def slow_then_fast(content: aiohttp.StreamReader) -> int:
        await asyncio.sleep(2)  # read nothing: upstream → proxy → client must all stop
        count = 0
        end = time.monotonic() + 3
        while time.monotonic() < end:
            chunk = await content.read(64 * 1024)
            assert chunk, "the body ended early"
            count += len(chunk)
            await asyncio.sleep(0.01)
        return count + await fast(content)

    async with (
        proxy_subprocess(config, port, tmp_path / "proxy.log") as process,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60, sock_read=20)) as client,
    ):
        # warm-up: token, pools, buffers and code paths all used once
        assert await download(client, base + "/api/v1/stream?bytes=8388608", fast) == 8 * MiB
        await asyncio.sleep(0.2)
        baseline = rss_bytes(process.pid)
        with RssSampler(process.pid) as sampler:
            received = await download(client, base + f"/api/v1/stream?bytes={total}", slow_then_fast)
    took = time.monotonic() - started
    growth = sampler.peak - baseline
    print(f"\nslow reader: {total >> 20} MiB in {took:.1f} s, proxy RSS {baseline >> 20} MiB + {growth >> 20} MiB")
    assert received == total
    assert growth <= 32 * MiB, f"the proxy's RSS grew by {growth / MiB:.1f} MiB (baseline {baseline >> 20} MiB)"


async def test_client_gone_while_its_answer_is_awaited_is_logged_499_and_frees_the_upstream(
    tmp_path: Path, backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    """The common path has no task: the request waits on a pooled upstream connection's read callback. A client
    that goes away meanwhile (a reset) must still end the exchange: the upstream connection aborted (not pooled
    half-read), the access log saying 499 client_disconnected, nothing left in flight, the next request fine."""
    caplog.set_level(logging.INFO, logger="odata_auth_proxy.access")
    config = make_config(tmp_path, backend)
    async with started_server(ProxyServer(prepare(config))) as served:
        port = served.server.port
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as client, client.get(base + "/api/v1/echo/warm") as resp:
            assert resp.status == 200  # a pooled connection now waits: the next request takes the task-free path
        async with connect(port) as (_reader, writer):
            writer.write(raw_request("GET", "/api/v1/slow?seconds=30", port))
            await writer.drain()
            await wait_until(reached_upstream(backend, "/api/v1/slow"), 10, "the slow request to reach the upstream")
            # gone for good (a reset, as a killed client): a plain close would be a half-close, answered later
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

        def slow_lines() -> list[logging.LogRecord]:
            access = [r for r in caplog.records if r.name == "odata_auth_proxy.access"]
            return [r for r in access if "/api/v1/slow" in r.getMessage()]

        await wait_until(lambda: bool(slow_lines()), 5, "the access log line of the abandoned request")
        (record,) = slow_lines()
        assert " 499 " in record.getMessage() and "client_disconnected" in record.getMessage(), record.getMessage()
        assert await in_flight(base) == 0
        async with aiohttp.ClientSession() as client, client.get(base + "/api/v1/echo/after") as resp:
            assert resp.status == 200
