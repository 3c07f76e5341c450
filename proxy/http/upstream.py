"""The upstream side: a pool of keep-alive (TLS) connections per origin, each an ``asyncio.BufferedProtocol``.

Why a BufferedProtocol: with a plain Protocol on a TLS connection, uvloop allocates a fresh 256 KiB buffer
for every read (mmap, page faults, munmap) — about 22 µs a request, most of the proxy's budget
(``shared/dataplane.md``). Reading into one reused buffer removes that cost; the pool's connections share
it, since every read is parsed before the next one happens.

Answers are parsed by httptools (llhttp). A body is buffered while the caller decides what to do with the
head (a 401 replay, a CSRF retry), then either taken whole (small answers go out in one write) or streamed
straight from ``buffer_updated`` into a sink, with flow control: the sink's owner pauses this connection's
reading while the client cannot take more.

An outbound HTTP proxy is reached with ``CONNECT`` and ``loop.start_tls``, for both schemes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, cast
from urllib.parse import unquote, urlsplit

import httptools

from proxy.http.flow import FlowPeer
from proxy.http.heads import PLAIN_CONNECTION, Header, HeaderNames, ResponseHead
from proxy.outbound import OutboundProxies

READ_BUFFER: Final = 256 * 1024
WRITE_HIGH_WATER: Final = 512 * 1024
IDLE_TIMEOUT: Final = 30.0  # a pooled connection unused this long is closed (upstreams drop theirs after 60 s+)
_NO_BODY_STATUS: Final = frozenset({204, 304})
MAX_HEAD: Final = 64 * 1024  # an upstream answer whose head goes on longer than this is refused (502)


@dataclass(frozen=True)
class Origin:
    """Where a route's requests go: scheme, host, port; ``host_header`` is what the upstream expects."""

    scheme: str
    host: str
    port: int
    host_header: bytes

    #: the pool's dictionary key, a string (its hash is cached): the pool looks its idle connections up by origin
    #: on every request, and the dataclass's own hash would build and hash a tuple each time
    key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", f"{self.scheme}://{self.host}:{self.port} {self.host_header!r}")

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @classmethod
    def from_url(cls, url: str) -> Origin:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        host = parts.hostname or ""
        port = parts.port or (443 if scheme == "https" else 80)
        default = (scheme == "https" and port == 443) or (scheme == "http" and port == 80)
        shown = f"[{host}]" if ":" in host else host
        host_header = shown if default else f"{shown}:{port}"
        return cls(scheme, host, port, host_header.encode("idna") if host_header.isascii() else host_header.encode())


class UpstreamError(Exception):
    """No (complete) answer from the upstream; ``code``/``detail`` go into the client's 502/504 JSON."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


class UpstreamClosed(UpstreamError):
    """The connection closed before any byte of the answer: safe to send again on a fresh connection."""

    def __init__(self) -> None:
        super().__init__(502, "upstream_error", "the upstream closed the connection without answering")


class UpstreamBodyBroken(UpstreamError):
    def __init__(self, received: int) -> None:
        super().__init__(502, "upstream_body_incomplete", f"the upstream broke off its answer after {received} bytes")
        self.received = received


class UpstreamTimeout(UpstreamError):
    def __init__(self) -> None:
        super().__init__(504, "upstream_timeout", "the upstream did not answer in time")


class UpstreamConnection(asyncio.BufferedProtocol):
    """One connection to an upstream; one request at a time."""

    # slots: more than 30 attributes would leave CPython 3.11 no shared-key (inline) layout, and every
    # attribute access on the request path a dictionary lookup
    __slots__ = (
        "_done_waiter",
        "_framed",
        "_head_size",
        "_head_waiter",
        "_headers",
        "_interim",
        "_length",
        "_lists_headers",
        "_names",
        "_reading_paused",
        "_reason",
        "_reset_parser",
        "_tunnel",
        "_tunnel_data",
        "_until_close",
        "_view",
        "body_size",
        "chunks",
        "closed",
        "complete",
        "error",
        "flow_peer",
        "got_bytes",
        "head",
        "head_request",
        "idle_since",
        "last_read",
        "loop",
        "origin",
        "parser",
        "pool",
        "ready",
        "reused",
        "sink",
        "transport",
    )

    def __init__(self, pool: UpstreamPool, origin: Origin) -> None:
        self.pool = pool
        self.origin = origin
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self._view = pool.read_buffer
        self._names = pool.header_names
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self.last_read = 0.0
        self.flow_peer: FlowPeer | None = None  # the client connection whose body we are sending
        self._tunnel: asyncio.Future[bytes] | None = None
        self._tunnel_data = b""
        self._reading_paused = False
        self._reset()

    def _reset(self) -> None:
        self._new_answer_head()
        self.head: ResponseHead | None = None
        self.head_request = False
        self.got_bytes = False
        self.complete = False
        self.body_size = 0
        self.chunks: list[bytes] = []
        self.sink: Callable[[bytes], None] | None = None
        self.error: UpstreamError | None = None
        self._interim = False
        self._until_close = False
        self._reset_parser = False
        self._head_size = 0  # bytes read while the answer's head was not complete
        self._head_waiter: asyncio.Future[ResponseHead] | None = None
        self._done_waiter: asyncio.Future[None] | None = None
        #: called once, from the read callback, when the answer's head is here or the attempt failed: the
        #: forwarding core's way to answer without a task (``response_head`` is the awaitable way)
        self.ready: Callable[[UpstreamConnection], None] | None = None

    def _new_answer_head(self) -> None:
        """What the parser callbacks collect of one answer head (again after an interim 1xx head)."""
        self._headers: list[Header] = []
        self._reason = b""
        self._length: bytes | None = None
        self._framed = False  # a Content-Length or Transfer-Encoding: the body does not end with the connection
        self._lists_headers = False

    # ---------------------------------------------------------------- asyncio.BufferedProtocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are no subclasses of it
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        if self._tunnel is not None:
            self._tunnel_bytes(bytes(self._view[:nbytes]))
            return
        self.last_read = time.monotonic()
        self.got_bytes = True
        try:
            self.parser.feed_data(self._view[:nbytes])
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(502, "upstream_protocol_error", f"the upstream's answer is not valid HTTP: {exc}"))
            self.abort()
        else:
            if self.head is None:  # counted per read, not per header: a head without end must not fill memory
                self._head_size += nbytes
                if self._head_size > MAX_HEAD:
                    self._fail(
                        UpstreamError(
                            502,
                            "upstream_protocol_error",
                            f"the upstream's answer head is longer than {MAX_HEAD} bytes",
                        )
                    )
                    self.abort()
        if self._reset_parser:
            self._reset_parser = False
            self.parser = httptools.HttpResponseParser(self)
        ready = self.ready
        if ready is not None and self.head is not None:
            self.ready = None
            ready(self)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if self._tunnel is not None and not self._tunnel.done():
            self._tunnel.set_exception(ConnectionResetError("the outbound proxy closed the connection"))
        if self.head is None:
            self._fail(
                UpstreamClosed()
                if not self.got_bytes
                else UpstreamError(
                    502, "upstream_error", "the upstream closed the connection in the middle of its answer's head"
                )
            )
        elif not self.complete:
            if self._until_close:  # a body delimited by the end of the connection
                self._finish()
            else:
                self._fail(UpstreamBodyBroken(self.body_size))
        if self.flow_peer is not None:
            self.flow_peer.resume_reading()
            self.flow_peer = None

    def pause_writing(self) -> None:
        if self.flow_peer is not None:
            self.flow_peer.pause_reading()

    def resume_writing(self) -> None:
        if self.flow_peer is not None:
            self.flow_peer.resume_reading()

    # ---------------------------------------------------------------- httptools callbacks

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        lname = self._names.lower(name)
        self._headers.append((lname, name, value))
        if lname == b"content-length":
            self._length = value
            self._framed = True
        elif lname == b"transfer-encoding":
            self._framed = True
        elif lname == b"connection" and value.lower() not in PLAIN_CONNECTION:
            self._lists_headers = True  # the answer names hop-by-hop headers of its own

    def on_headers_complete(self) -> None:
        parser = self.parser
        status = parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self._interim = True  # 100 Continue & co: not the answer; the answer's own head starts afresh
            self._new_answer_head()
            return
        raw = self._length
        length = int(raw) if raw is not None and raw.strip().isdigit() else None  # llhttp vetted it already
        head = ResponseHead(status, self._reason, self._headers, bool(parser.should_keep_alive()), length)
        head.lists_headers = self._lists_headers
        self.head = head
        if self.head_request or status in _NO_BODY_STATUS:
            self._reset_parser = self.head_request  # llhttp would wait for a HEAD answer's announced body
            self._finish()
        elif not self._framed:
            self._until_close = True
            head.keep_alive = False
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(head)

    def on_body(self, body: bytes) -> None:
        self.body_size += len(body)
        if self.sink is not None:
            self.sink(body)
        else:
            self.chunks.append(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if not self.complete:
            self._finish()

    # ---------------------------------------------------------------- state changes

    def _finish(self) -> None:
        self.complete = True
        waiter = self._done_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if self.error is not None or self.complete:
            return
        self.error = error
        for waiter in (self._head_waiter, self._done_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_exception(error)
                waiter.exception()  # retrieved here: nobody may be waiting any more
        ready = self.ready
        if ready is not None:
            self.ready = None
            ready(self)

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def timed_out(self) -> None:
        self._fail(UpstreamTimeout())
        self.abort()

    # ---------------------------------------------------------------- the caller's side

    def begin(self, data: bytes, *, head_request: bool) -> None:
        """Send a request head (and a buffered body, when ``data`` holds it) and expect its answer."""
        self._reset()
        self.head_request = head_request
        self.last_read = time.monotonic()
        assert self.transport is not None
        self.transport.write(data)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    async def response_head(self) -> ResponseHead:
        if self.head is not None:
            return self.head
        if self.error is not None:
            raise self.error
        self._head_waiter = self.loop.create_future()
        return await self._head_waiter

    async def wait_complete(self) -> None:
        if self.complete:
            return
        if self.error is not None:
            raise self.error
        self._done_waiter = self.loop.create_future()
        await self._done_waiter

    def take_body(self) -> bytes:
        chunks, self.chunks = self.chunks, []
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def stream_to(self, sink: Callable[[bytes], None]) -> None:
        """Hand what is buffered and every later piece of the body to ``sink``."""
        for chunk in self.chunks:
            sink(chunk)
        self.chunks = []
        self.sink = sink

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = False
            self.transport.resume_reading()
            self.last_read = time.monotonic()  # not late while we were not reading

    def reusable(self) -> bool:
        """Complete, kept alive by the upstream, open, and its body taken: it can carry another request."""
        return self.complete and self.head is not None and self.head.keep_alive and not self.closed and not self.chunks

    # ---------------------------------------------------------------- outbound proxy tunnel

    def _tunnel_bytes(self, data: bytes) -> None:
        assert self._tunnel is not None
        self._tunnel_data += data
        if b"\r\n\r\n" in self._tunnel_data:
            head = self._tunnel_data.partition(b"\r\n\r\n")[0]
            waiter, self._tunnel = self._tunnel, None
            if not waiter.done():
                waiter.set_result(head)
        elif len(self._tunnel_data) > 65536:
            waiter, self._tunnel = self._tunnel, None
            waiter.set_exception(ValueError("the outbound proxy's answer to CONNECT has no end"))

    async def open_tunnel(self, authorization: str | None) -> tuple[int, str]:
        """``CONNECT host:port``; returns the proxy's status and reason."""
        self._tunnel = self.loop.create_future()
        host = self.origin.host
        target = f"[{host}]:{self.origin.port}" if ":" in host else f"{host}:{self.origin.port}"
        lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
        if authorization:
            lines.append(f"Proxy-Authorization: {authorization}")
        self.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        head = await self._tunnel
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1", "replace")
        parts = status_line.split(" ", 2)
        try:
            status = int(parts[1])
        except (IndexError, ValueError):
            return 502, f"not an HTTP answer: {status_line[:80]}"
        return status, parts[2] if len(parts) > 2 else ""


class UpstreamPool:
    """Keep-alive connections per origin, opened on demand (directly or through an outbound proxy)."""

    def __init__(
        self,
        ssl_context: ssl.SSLContext,
        proxies: OutboundProxies,
        connect_timeout: float,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.ssl_context = ssl_context
        self.proxies = proxies
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        # One read buffer for every connection of the pool: each read is parsed (and its body bytes copied out)
        # in ``buffer_updated`` before the loop reads anything else, so the memory does not grow with the pool.
        self.read_buffer = memoryview(bytearray(READ_BUFFER))
        self.header_names = HeaderNames()  # lower-case answer header names, shared like the buffer
        self._idle: dict[str, list[UpstreamConnection]] = {}  # by Origin.key
        self._all: set[UpstreamConnection] = set()
        self.closed = False

    def take_idle(self, origin: Origin) -> UpstreamConnection | None:
        """A pooled connection to ``origin`` that is still open and not too old, or None."""
        idle = self._idle.get(origin.key)
        if idle:
            now = time.monotonic()
            while idle:
                conn = idle.pop()
                if conn.closed or conn.transport is None or conn.transport.is_closing():
                    continue
                if now - conn.idle_since > self.idle_timeout:
                    conn.abort()
                    continue
                conn.reused = True
                return conn
        return None

    def expire_idle(self) -> int:
        """Close pooled connections unused for ``idle_timeout``; returns how many (called every few seconds)."""
        deadline = time.monotonic() - self.idle_timeout
        expired = 0
        for idle in self._idle.values():
            while idle and idle[0].idle_since < deadline:  # oldest first: released ones are appended
                idle.pop(0).abort()
                expired += 1
        return expired

    async def acquire(self, origin: Origin) -> UpstreamConnection:
        return self.take_idle(origin) or await self.connect(origin)

    def release(self, conn: UpstreamConnection) -> None:
        """Back to the pool when it can carry another request; closed otherwise."""
        conn.flow_peer = None
        conn.sink = None
        if self.closed or not conn.reusable():
            conn.abort()
            return
        if conn._reading_paused:  # paused for a slow client: a pooled connection must see a close
            conn.resume_reading()
        conn.idle_since = conn.last_read  # its answer's last bytes came in this very moment
        self._idle.setdefault(conn.origin.key, []).append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        self._all.discard(conn)
        idle = self._idle.get(conn.origin.key)
        if idle and conn in idle:
            idle.remove(conn)

    async def connect(self, origin: Origin) -> UpstreamConnection:
        conn = UpstreamConnection(self, origin)
        proxy = self.proxies.for_url(origin.url)
        try:
            async with asyncio.timeout(self.connect_timeout):
                if proxy is None:
                    await self.loop.create_connection(
                        lambda: conn,
                        origin.host,
                        origin.port,
                        ssl=self.ssl_context if origin.tls else None,
                        server_hostname=origin.host if origin.tls else None,
                    )
                else:
                    await self._through_proxy(conn, origin, proxy)
        except UpstreamError:
            conn.abort()
            raise
        except TimeoutError:
            conn.abort()
            raise UpstreamError(
                504,
                "upstream_timeout",
                f"connecting to {origin.url} took longer than timeouts.connect ({self.connect_timeout:g} s)",
            ) from None
        except ssl.SSLCertVerificationError as exc:
            conn.abort()
            raise UpstreamError(
                502,
                "upstream_tls_error",
                f"the upstream's TLS certificate is not trusted ({exc.verify_message}); "
                "add a private or corporate CA with --ca-bundle FILE",
            ) from None
        except ssl.SSLError as exc:
            conn.abort()
            raise UpstreamError(
                502, "upstream_tls_error", f"TLS with the upstream failed: {exc.reason or exc}"[:300]
            ) from None
        except OSError as exc:
            conn.abort()
            reason = exc.strerror or str(exc) or exc.__class__.__name__
            if exc.errno == errno.ECONNREFUSED:
                reason = "connection refused"
            raise UpstreamError(
                502,
                "upstream_unreachable",
                f"cannot connect to the upstream {origin.host}:{origin.port}: {reason}"[:300],
            ) from None
        if self.closed:
            conn.abort()
            raise UpstreamError(503, "shutting_down", "the proxy is shutting down")
        self._all.add(conn)
        return conn

    async def _through_proxy(self, conn: UpstreamConnection, origin: Origin, proxy: str) -> None:
        parts = urlsplit(proxy)
        authorization = None
        if parts.username is not None:
            credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            authorization = "Basic " + base64.b64encode(credentials.encode()).decode()
        try:
            await self.loop.create_connection(lambda: conn, parts.hostname or "", parts.port or 80)
        except OSError as exc:
            reason = exc.strerror or exc.__class__.__name__
            raise UpstreamError(
                502,
                "outbound_proxy_error",
                f"cannot connect to the outbound HTTP proxy {parts.hostname}:{parts.port}: {reason}",
            ) from None
        try:
            status, reason = await conn.open_tunnel(authorization)
        except (OSError, ValueError) as exc:
            raise UpstreamError(502, "outbound_proxy_error", f"the outbound HTTP proxy failed: {exc}"[:300]) from None
        if status != 200:
            detail = f"the outbound HTTP proxy refused the tunnel to the upstream: HTTP {status} {reason}".rstrip()
            if status == 407:
                detail += (
                    "; it wants credentials: put them into the proxy URL (http://user:password@proxy:port) in "
                    "outbound_proxy or HTTPS_PROXY"
                )
            raise UpstreamError(502, "outbound_proxy_error", detail)
        if origin.tls:
            assert conn.transport is not None
            transport = await self.loop.start_tls(conn.transport, conn, self.ssl_context, server_hostname=origin.host)
            conn.transport = cast(asyncio.Transport, transport)
            conn.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    async def close(self) -> None:
        self.closed = True
        for conns in self._idle.values():
            for conn in conns:
                conn.abort()
        self._idle.clear()
        for conn in list(self._all):
            conn.abort()
        with contextlib.suppress(Exception):
            await asyncio.sleep(0)
