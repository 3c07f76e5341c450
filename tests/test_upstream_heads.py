"""Upstream answer heads as they really arrive: split over many reads, after interim ``1xx`` heads, with
``Connection``-listed and ``Keep-Alive`` lines, tight or padded header syntax, odd reason phrases, no headers at
all, or too long to be sane.

These tests drive a scripted plain-HTTP upstream on 127.0.0.1 that writes each answer in the pieces a test
chooses (a pause between pieces, so that each arrives in a read of its own), and read what the client gets
through the proxy, byte for byte where framing matters. (They were written for an attempt to take the header
lines as one block instead of one parser callback per header: measured, it saved nothing, see the notes.)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from proxy.http.heads import HeaderNames
from tests.conftest import Backend, make_config, running_proxy, secret_route


@dataclass
class ScriptedUpstream:
    """Answers every request with ``answer``, written in ``pieces`` (byte offsets to split at)."""

    answer: bytes
    pieces: Sequence[int] = ()
    close_after: bool = False  # end the connection after the answer (a body delimited by the close)
    requests: list[bytes] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                self.requests.append(head)
                start = 0
                for cut in (*self.pieces, len(self.answer)):
                    writer.write(self.answer[start:cut])
                    await writer.drain()
                    start = cut
                    await asyncio.sleep(0.02)  # its own read on the proxy's side
                if self.close_after:
                    return
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


@contextlib.asynccontextmanager
async def proxied(tmp_path: Path, backend: Backend, upstream: ScriptedUpstream) -> AsyncIterator[str]:
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        config = make_config(tmp_path, backend, [secret_route(backend, upstream=url, rewrite_links=False)])
        async with running_proxy(config) as proxy:
            yield proxy.url
    finally:
        server.close()
        await server.wait_closed()


async def raw_get(base: str, path: str) -> bytes:
    """One GET with ``Connection: close``; everything the proxy sent back, as bytes."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
        return await asyncio.wait_for(reader.read(-1), 10)
    finally:
        writer.close()


def head_lines(raw: bytes) -> list[bytes]:
    return raw.partition(b"\r\n\r\n")[0].split(b"\r\n")


ANSWER = (
    b"HTTP/1.1 200 OK\r\nServer: scripted\r\nContent-Type: application/json\r\nX-Custom: kept as sent\r\n"
    b'Content-Length: 11\r\nConnection: keep-alive\r\nETag: "e1"\r\n\r\n{"ok":true}'
)


@pytest.mark.parametrize(
    "pieces",
    [(), (1, 2, 3, 10, 20, 40, 60), tuple(range(1, 90)), (len(ANSWER) - 13, len(ANSWER) - 12)],
    ids=["one-read", "split-often", "byte-by-byte", "split-in-the-final-crlf"],
)
async def test_a_head_split_over_reads_arrives_whole(tmp_path: Path, backend: Backend, pieces: tuple[int, ...]) -> None:
    upstream = ScriptedUpstream(ANSWER, pieces)
    async with proxied(tmp_path, backend, upstream) as base:
        async with aiohttp.ClientSession() as client:
            for _ in range(2):  # the second on the pooled connection: the head's state starts afresh
                async with client.get(base + "/api/v1/x") as resp:
                    assert resp.status == 200 and resp.reason == "OK"
                    assert await resp.read() == b'{"ok":true}'
                    assert resp.headers["X-Custom"] == "kept as sent"
                    assert resp.headers["ETag"] == '"e1"'
                    assert resp.headers["Content-Length"] == "11"
                    assert resp.headers.getall("Content-Length") == ["11"]
        lines = head_lines(await raw_get(base, "/api/v1/y"))
        assert b"Connection: keep-alive" not in lines  # the upstream's own: the proxy frames per client
        assert lines.count(b"Content-Length: 11") == 1
        assert b"Server: scripted" in lines and b"Connection: close" in lines
    assert len(upstream.requests) == 3


@pytest.mark.parametrize("pieces", [(), (10,), (25, 26, 27, 30)], ids=["one-read", "split", "split-at-the-seam"])
async def test_interim_heads_are_skipped(tmp_path: Path, backend: Backend, pieces: tuple[int, ...]) -> None:
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
    upstream = ScriptedUpstream(interim + ANSWER, pieces)
    async with proxied(tmp_path, backend, upstream) as base:
        raw = await raw_get(base, "/api/v1/x")
    lines = head_lines(raw)
    assert lines[0] == b"HTTP/1.1 200 OK"
    assert b"X-Custom: kept as sent" in lines and not any(line.startswith(b"Link") for line in lines)
    assert raw.endswith(b'\r\n\r\n{"ok":true}')


CHUNKED_HEAD = (
    b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nKeep-Alive: timeout=5, max=100\r\n"
    b"X-Hop: for the proxy only\r\nX-Keep: for the client\r\nTransfer-Encoding: chunked\r\n\r\n"
)


@pytest.mark.parametrize(
    ("pieces", "framing"),
    [((), b"Content-Length: 3"), ((len(CHUNKED_HEAD) + 8,), b"Transfer-Encoding: chunked")],
    ids=["whole", "streamed"],
)
async def test_connection_listed_and_keep_alive_lines_stay_behind(
    tmp_path: Path, backend: Backend, pieces: tuple[int, ...], framing: bytes
) -> None:
    """Whole (one write, sized by the proxy) or streamed (chunked again, for this client)."""
    upstream = ScriptedUpstream(CHUNKED_HEAD + b"3\r\nabc\r\n0\r\n\r\n", pieces)
    async with proxied(tmp_path, backend, upstream) as base:
        raw = await raw_get(base, "/api/v1/x")
        async with aiohttp.ClientSession() as client, client.get(base + "/api/v1/x") as resp:
            assert await resp.read() == b"abc"
    lines = head_lines(raw)
    names = {line.partition(b":")[0].lower() for line in lines[1:]}
    assert b"x-keep" in names
    assert not names & {b"x-hop", b"keep-alive"}
    assert lines.count(framing) == 1  # ours, for this client
    assert sum(line.lower().startswith((b"content-length", b"transfer-encoding")) for line in lines) == 1


async def test_two_connection_headers_are_both_honoured(tmp_path: Path, backend: Backend) -> None:
    answer = (
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nX-Hop: no\r\nConnection: X-Hop\r\nContent-Length: 2\r\n\r\nok"
    )
    async with proxied(tmp_path, backend, ScriptedUpstream(answer)) as base:
        lines = head_lines(await raw_get(base, "/api/v1/x"))
    assert not any(line.lower().startswith(b"x-hop") for line in lines)


async def test_header_syntax_and_reason_phrase_come_through(tmp_path: Path, backend: Backend) -> None:
    answer = (
        b"HTTP/1.1 299 Fine Indeed, Thanks\r\nX-Tight:value\r\nX-Padded:   padded  \r\nX-Empty:\r\n"
        b"content-length: 4\r\n\r\nbody"
    )
    async with proxied(tmp_path, backend, ScriptedUpstream(answer)) as base:
        async with aiohttp.ClientSession() as client, client.get(base + "/api/v1/x") as resp:
            assert resp.status == 299 and resp.reason == "Fine Indeed, Thanks"
            assert resp.headers["X-Tight"] == "value"
            assert resp.headers["X-Padded"].strip() == "padded"
            assert resp.headers["X-Empty"] == ""
            assert resp.headers.getall("Content-Length") == ["4"]
            assert await resp.read() == b"body"


async def test_an_answer_without_headers_ends_with_the_connection(tmp_path: Path, backend: Backend) -> None:
    async with proxied(
        tmp_path, backend, ScriptedUpstream(b"HTTP/1.1 200 OK\r\n\r\nuntil the end", close_after=True)
    ) as base:
        raw = await raw_get(base, "/api/v1/x")
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n")
    assert raw.endswith(b"\r\n\r\nd\r\nuntil the end\r\n0\r\n\r\n")  # chunked again for this client


async def test_a_vary_header_is_kept_and_merged_for_cors(tmp_path: Path, backend: Backend) -> None:
    """A header a filter rewrites (Vary, for CORS) takes the line-by-line way; without CORS it stays as sent."""
    answer = b"HTTP/1.1 200 OK\r\nVary: Accept-Encoding\r\nContent-Length: 2\r\n\r\nok"
    async with proxied(tmp_path, backend, ScriptedUpstream(answer)) as base:
        async with aiohttp.ClientSession() as client, client.get(base + "/api/v1/x") as resp:
            assert resp.headers.getall("Vary") == ["Accept-Encoding"]
            assert await resp.read() == b"ok"


async def test_an_endless_head_is_refused(tmp_path: Path, backend: Backend) -> None:
    filler = b"".join(b"X-Filler-%05d: %s\r\n" % (i, b"f" * 100) for i in range(800))  # ~90 KiB
    answer = b"HTTP/1.1 200 OK\r\n" + filler + b"Content-Length: 2\r\n\r\nok"
    pieces = tuple(range(16 * 1024, len(answer), 16 * 1024))
    async with proxied(tmp_path, backend, ScriptedUpstream(answer, pieces)) as base:
        async with aiohttp.ClientSession() as client, client.get(base + "/api/v1/x") as resp:
            assert resp.status == 502
            body = await resp.json()
    assert body["error"] == "upstream_protocol_error"
    assert "longer than 65536 bytes" in body["detail"]


def test_header_names_are_lowered_and_remembered_up_to_a_limit() -> None:
    """Both parsers lower-case header names through one remembering table each (a dictionary lookup instead of a
    ``bytes.lower`` call per header); the names come from the peer, so the table stops growing at its limit."""
    names = HeaderNames()
    first = names.lower(b"Content-Type")
    assert first == b"content-type"
    assert names.lower(b"Content-Type") is first  # remembered, not lowered again
    for number in range(HeaderNames.LIMIT + 100):
        assert names.lower(b"X-Name-%d" % number) == b"x-name-%d" % number
    assert len(names._known) == HeaderNames.LIMIT
    assert names.lower(b"X-After-The-Limit") == b"x-after-the-limit"  # still right, only not remembered
    assert len(names._known) == HeaderNames.LIMIT
