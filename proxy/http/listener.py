"""The client side: one ``asyncio.Protocol`` per connection, request heads parsed by httptools (llhttp).

Why not aiohttp's server: measured side by side it costs about ten times this per request
(``shared/dataplane.md``). What aiohttp did for free is done here, each in one place:

* keep-alive, pipelined requests answered in order (later ones wait, reading paused), HTTP/1.0 clients;
* a client that half-closes after its request still gets the answer (``eof_received`` keeps the transport);
* header size and count limits, malformed framing answered with 400 and a close;
* flow control both ways: the client's write buffer above its high-water mark pauses the peer feeding it
  (the upstream connection), and a peer that cannot take more pauses reading from the client;
* slow and stalled clients: one coarse periodic sweep (far cheaper than a timer per request) enforces the
  ``timeouts.client_*`` settings;
* graceful drain: stop accepting, ``Connection: close`` on every answer, a total time budget, then cut.

What a request *means* is somebody else's job: each complete request head is handed to the ``Handler``
(``proxy.pipeline``), which answers through :meth:`ClientConnection.respond` or the streaming calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, cast

import httptools

from proxy.http.flow import Abortable, FlowPeer

if TYPE_CHECKING:
    from proxy.exchange import Exchange
from proxy.http.heads import HeaderNames, Reply, RequestHead, json_reply, status_line

log = logging.getLogger("odata_auth_proxy.http")

WRITE_HIGH_WATER: Final = 512 * 1024
LINGER_SECONDS: Final = 2.0  # how long an early answer's connection keeps reading what the client still sends
_PAUSE_PIPELINE: Final = 1  # a later request is queued behind the one in progress
_PAUSE_PEER: Final = 2  # the peer we feed (the upstream) cannot take more


@dataclass(frozen=True)
class ListenerSettings:
    max_header_size: int = 16384
    max_headers: int = 100
    client_header: float = 30.0
    client_body: float = 60.0
    client_write: float = 60.0
    client_idle: float = 75.0


class ClientGone(Exception):
    """The client closed its connection (or was cut) while the request was being handled."""


#: the usual methods' names as (interned) text, without decoding them per request
_METHOD_NAMES: Final = {
    name.encode(): name
    for name in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "MERGE", "CONNECT", "TRACE")
}


class BodyTimeout(Exception):
    """The client stopped sending its request body for ``timeouts.client_body``."""


class RequestBody:
    """One request's body as it arrives: buffered until the handler streams it on, then passed through.

    ``read_until(limit)`` waits for the whole body or for more than ``limit`` bytes (the replay buffer);
    ``stream_to(sink, end)`` hands what is buffered and everything after it to ``sink``, so large uploads
    flow without a coroutine hop per chunk.
    """

    __slots__ = ("_end", "_on_error", "_sink", "_waiter", "chunks", "complete", "conn", "error", "size", "wanted")

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        self.chunks: list[bytes] = []
        self.size = 0
        self.complete = False
        self.wanted = False  # the handler asked for it: the client_body timeout runs from now
        self.error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._sink: Callable[[bytes], None] | None = None
        self._end: Callable[[], None] | None = None
        self._on_error: Callable[[BaseException], None] | None = None

    def feed(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self._sink is not None:
            self._sink(chunk)
            return
        self.chunks.append(chunk)
        self._wake()

    def finish(self) -> None:
        self.complete = True
        if self._end is not None:
            end, self._end = self._end, None
            end()
        self._wake()

    def fail(self, error: BaseException) -> None:
        if self.complete or self.error is not None:
            return
        self.error = error
        self._wake()
        if self._on_error is not None:
            on_error, self._on_error = self._on_error, None
            on_error(error)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def read_until(self, limit: int) -> bool:
        """Wait until the body is complete (True) or more than ``limit`` bytes are buffered (False)."""
        self.want()
        while not self.complete and self.size <= limit:
            if self.error is not None:
                raise self.error
            self._waiter = self.conn.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self.error is not None and not self.complete:
            raise self.error
        return self.complete

    def want(self) -> None:
        if not self.wanted:
            self.wanted = True
            self.conn.body_wanted(self)

    def take(self) -> bytes:
        data = b"".join(self.chunks) if len(self.chunks) != 1 else self.chunks[0]
        self.chunks = []
        return data

    def stream_to(
        self, sink: Callable[[bytes], None], end: Callable[[], None], on_error: Callable[[BaseException], None]
    ) -> None:
        """Send what is buffered now and every later chunk to ``sink``; call ``end`` once it is complete, or
        ``on_error`` if it never will be (client gone, stalled, too large)."""
        self.want()
        for chunk in self.chunks:
            sink(chunk)
        self.chunks = []
        if self.complete:
            end()
            return
        if self.error is not None:
            on_error(self.error)
            return
        self._sink = sink
        self._end = end
        self._on_error = on_error

    def detach(self) -> None:
        """Stop streaming (the upstream went away): later chunks are dropped."""
        self._sink = _discard
        self._end = None
        self._on_error = None


def _discard(chunk: bytes) -> None:
    return None


#: Starts one request; calls ``conn.request_done(head)`` exactly once when it is over (synchronously when the
#: answer is ready at once, later from a callback or a task of its own).
Handler = Callable[["ClientConnection", RequestHead, RequestBody], None]


class ClientConnection(asyncio.Protocol):
    """One client connection: parses requests, runs the handler for each in turn, frames its answers."""

    # slots: more than 30 attributes would leave CPython 3.11 no shared-key (inline) layout, and every
    # attribute access on the request path a dictionary lookup
    __slots__ = (
        "_active",
        "_body",
        "_chunked_out",
        "_close_after",
        "_closing",
        "_head",
        "_head_started",
        "_header_size",
        "_in_head",
        "_lingering",
        "_max_head",
        "_max_header",
        "_max_headers",
        "_names",
        "_paused",
        "_queue",
        "_starting",
        "_too_big",
        "_upgraded",
        "_url",
        "_write_paused_since",
        "_write_waiter",
        "abort_on_loss",
        "active_body",
        "bytes_out",
        "closed",
        "draining",
        "eof",
        "exchange",
        "flow_peer",
        "last_read",
        "listener",
        "loop",
        "parser",
        "peer",
        "response_started",
        "settings",
        "sockname",
        "task",
        "transport",
        "watchdog",
        "write_paused",
    )

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.loop = listener.loop
        self.settings = listener.settings
        # the header limits, looked up per header
        self._max_header = self.settings.max_header_size
        self._max_head = self.settings.max_header_size * 4
        self._max_headers = self.settings.max_headers
        self._names = listener.header_names
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.peer = "-"
        self.sockname: tuple[Any, ...] = ("127.0.0.1", 0)
        self.closed = False
        self.eof = False
        self.draining = listener.draining
        self._upgraded = False
        self._lingering = False
        # parsing
        self._head: RequestHead | None = None
        self._body: RequestBody | None = None
        self._url = b""  # the request target as it arrives (llhttp may hand it over in pieces)
        self._header_size = 0
        self._too_big: Reply | None = None
        # handling
        self._queue: deque[tuple[RequestHead, RequestBody] | Reply] = deque()
        self._active: RequestHead | None = None  # the request being answered
        self._starting = False  # inside _next's loop: a request that ends at once must not recurse
        self._closing = False
        self.task: asyncio.Task[None] | None = None  # the handler's task, while it needs one (kept referenced)
        self.active_body: RequestBody | None = None
        #: aborted when this connection is lost (the upstream connection carrying its request); an object, not
        #: a bound method: making one per request cost more than the rest of the assignment
        self.abort_on_loss: Abortable | None = None
        self.exchange: Exchange | None = None  # the handler's record of the request in progress
        self.watchdog: Callable[[ClientConnection, float], None] | None = None  # from the sweep, while one runs
        # response state
        self.response_started = False
        self._chunked_out = False
        self._close_after = False
        self.bytes_out = 0
        # flow control
        self._paused = 0
        self.write_paused = False
        self._write_paused_since = 0.0
        self._write_waiter: asyncio.Future[None] | None = None
        self.flow_peer: FlowPeer | None = None
        # timing (monotonic seconds)
        self.last_read = time.monotonic()
        self._head_started = self.last_read
        self._in_head = True  # a fresh connection owes its first request head within client_header

    # ---------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are no subclasses of it
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        peer = self.transport.get_extra_info("peername")
        if peer:
            self.peer = str(peer[0])
        sockname = self.transport.get_extra_info("sockname")
        if sockname:
            self.sockname = sockname
        self.listener.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self._upgraded:
            if self._lingering:
                self.last_read = time.monotonic()
            return
        self.last_read = time.monotonic()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # CONNECT (refused by the guard) or an Upgrade header: answer this request, then close; nothing
            # after it on this connection is HTTP we would understand
            self._upgraded = True
            if self._queue and not isinstance(self._queue[-1], Reply):
                self._queue[-1][0].keep_alive = False
            elif self._active is not None and self.active_body is not None:
                self._close_after = True
            self._next()
        except httptools.HttpParserError as exc:
            self._malformed(str(exc) or exc.__class__.__name__)
        if self._too_big is not None:
            reply, self._too_big = self._too_big, None
            self._enqueue_reply(reply)

    def eof_received(self) -> bool | None:
        self.eof = True
        if self._lingering:
            return None
        if self._body is not None and not self._body.complete:
            # the end of the stream in the middle of a body: that upload was cut short, never half-closed after it
            self._body.fail(ClientGone())
            self._body = None
        if self._active is not None or self._queue:
            return True  # half-closed after its request: the answer still goes out, then we close
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.listener.connections.discard(self)
        self.listener.changed()
        gone = ClientGone()
        if self._body is not None:
            self._body.fail(gone)
        if self.active_body is not None:
            self.active_body.fail(gone)
        for item in self._queue:
            if not isinstance(item, Reply):
                item[1].fail(gone)
        self._queue.clear()
        if self.abort_on_loss is not None:
            peer, self.abort_on_loss = self.abort_on_loss, None
            peer.abort()
        self._wake_writer()

    def pause_writing(self) -> None:
        self.write_paused = True
        self._write_paused_since = time.monotonic()
        if self.flow_peer is not None:
            self.flow_peer.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.flow_peer is not None:
            self.flow_peer.resume_reading()
        self._wake_writer()

    def _wake_writer(self) -> None:
        waiter = self._write_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ---------------------------------------------------------------- httptools callbacks

    def on_message_begin(self) -> None:
        self._head = RequestHead()
        self._url = b""
        self._header_size = 0
        if not self._in_head:
            self._in_head = True
            self._head_started = self.last_read

    def _over_limit(self, status: int, error: str, detail: str) -> None:
        """A request beyond ``limits.*``: answer ``status`` and close; parsing stops here."""
        if self._too_big is None:
            self._too_big = json_reply(status, {"error": error, "detail": detail}, close=True)
        raise httptools.HttpParserError(error)

    def on_url(self, url: bytes) -> None:
        self._url += url  # one piece as a rule: joining to b"" copies nothing
        limit = self._max_header
        if len(self._url) > limit:
            self._over_limit(
                414,
                "request_target_too_long",
                f"the request target is longer than limits.max_header_size ({limit} bytes); shorten the URL or "
                "raise the limit",
            )

    def on_header(self, name: bytes, value: bytes) -> None:
        head = self._head
        assert head is not None
        size = len(name) + len(value)
        self._header_size += size + 4
        if size > self._max_header or self._header_size > self._max_head or len(head.headers) >= self._max_headers:
            self._header_over_limit(len(head.headers))  # raises
        head.headers.append((self._names.lower(name), name, value))

    def _header_over_limit(self, count: int) -> None:
        """Answer 431 for the header that went over a limit (``_over_limit`` raises)."""
        limit, most = self._max_header, self._max_headers
        if count >= most or self._header_size > self._max_head:
            what = "headers" if count >= most else "header bytes"
            self._over_limit(
                431,
                "request_headers_too_large",
                f"the request has too many {what} (limits.max_headers {most}, limits.max_header_size {limit} "
                "bytes per header)",
            )
        self._over_limit(
            431,
            "request_header_too_large",
            f"a request header is longer than limits.max_header_size ({limit} bytes)",
        )

    def on_headers_complete(self) -> None:
        head = self._head
        assert head is not None
        parser = self.parser
        method = parser.get_method()
        head.method = _METHOD_NAMES.get(method) or method.decode("latin-1")
        head.target = self._url.decode("latin-1")
        head.keep_alive = keep_alive = bool(parser.should_keep_alive())
        for lname, _, value in head.headers:
            if lname == b"content-length":
                head.content_length = int(value)
            elif lname == b"transfer-encoding":
                head.chunked = value.strip().lower().endswith(b"chunked")
            elif lname == b"expect":
                head.expect_continue = value.strip().lower() == b"100-continue"
            elif lname == b"connection":
                head.connection = True
        # Kept alive without a Connection header can only be HTTP/1.1 (1.0 needs "Connection: keep-alive"):
        # httptools' get_http_version formats a new string with str.format each time (~2,500 instructions)
        head.version = "1.1" if keep_alive and not head.connection else parser.get_http_version()
        self._in_head = False
        body = RequestBody(self)
        if not (head.chunked or head.content_length):  # has_body, without the property call
            body.complete = True
        self._body = body
        self._queue.append((head, body))
        if self._active is None:
            self._next()
        else:
            self._pause(_PAUSE_PIPELINE)

    def on_body(self, body: bytes) -> None:
        if self._body is not None:
            self._body.feed(body)

    def on_message_complete(self) -> None:
        body, self._body = self._body, None
        if body is not None and not body.complete:  # a bodyless request's was complete from the start
            body.finish()

    # ---------------------------------------------------------------- requests in turn

    def _malformed(self, reason: str) -> None:
        if self._too_big is not None:
            return  # a limit was hit: that answer is more precise
        shown = reason.encode("ascii", "backslashreplace").decode()[:120]
        log.info("malformed request from %s: %s", self.peer, shown)
        self._upgraded = True  # stop parsing: framing is lost
        if self._body is not None:
            self._body.fail(ClientGone())
        self._enqueue_reply(
            json_reply(
                400,
                {"error": "bad_request", "detail": f"malformed HTTP request: {shown}"},
                close=True,
            )
        )

    def _enqueue_reply(self, reply: Reply) -> None:
        self._upgraded = True
        self._queue.append(reply)
        if self._active is None:
            self._next()

    def _next(self) -> None:
        """Start the next queued request (or refusal), or go idle.

        Most requests are answered from callbacks without a task of their own, often before the handler returns
        (a refusal, an admin answer): the loop takes the next pipelined request then, instead of recursing.
        """
        if self._starting:
            return
        self._starting = True
        try:
            while self._active is None and not self.closed and not self._closing:
                if not self._queue:
                    if self.eof or (self.draining and not self._in_head_with_bytes()):
                        self._close()
                    else:
                        self.last_read = time.monotonic()  # the idle clock starts now
                        if self._paused & _PAUSE_PIPELINE:
                            self._resume(_PAUSE_PIPELINE)
                    return
                item = self._queue.popleft()
                self.response_started = False
                self._chunked_out = False
                self._close_after = False
                self.bytes_out = 0
                if isinstance(item, Reply):
                    self._write_reply(item, "1.1", keep_alive=False, head_only=False)
                    self._close()
                    return
                head, body = item
                self.active_body = body
                self._active = head
                handler = self.listener.handler  # an instance attribute: called through a local (3.11 lookups)
                try:
                    handler(self, head, body)
                except Exception as exc:  # a bug must cost one request, not the connection's silence
                    self.handler_failed(head, exc)
        finally:
            self._starting = False

    def _in_head_with_bytes(self) -> bool:
        return self._head is not None and self._body is None and self._in_head

    def handler_failed(self, head: RequestHead, exc: BaseException) -> None:
        """The last resort for a bug in the handler: a 500 when nothing was sent yet, then close."""
        log.error("internal error while answering %s: %s", head.method, exc.__class__.__name__)
        if not self.response_started and not self.closed:
            self.respond(
                head,
                json_reply(500, {"error": "internal_error", "detail": exc.__class__.__name__}, close=True),
            )
        self.request_done(head, close=True)

    def request_done(self, head: RequestHead, *, close: bool = False) -> None:
        """The handler is done with ``head``: keep the connection for the next request, or close it."""
        if self._active is not head:
            return  # already done (a bug path reported it twice)
        body = self.active_body
        self._active = None
        self.task = None
        self.active_body = None
        self.abort_on_loss = None
        self.exchange = None
        self.watchdog = None
        self.flow_peer = None
        if close:
            self._close_after = True
        if self.listener.idle_waiter is not None:  # a drain waits for the last request (checked here: per request)
            self.listener.changed()
        if self.closed:
            return
        complete = body is None or body.complete
        if not complete and not self.eof and self.response_started:
            self._close_lingering()
            return
        if self._close_after or not head.keep_alive or not complete or (self._upgraded and not self._queue):
            self._close()
            return
        self._next()

    def _close(self) -> None:
        self._closing = True
        if self.transport is not None and not self.closed:
            self.transport.close()

    def _close_lingering(self) -> None:
        """Close after an answer that did not wait for the whole request body (413, 401, 408 …): like nginx's
        lingering close, stop writing but read (and drop) what the client still sends for a moment, so that
        the client reads the answer instead of a reset caused by closing on unread data."""
        transport = self.transport
        if transport is None or self.closed:
            return
        self._upgraded = True  # nothing more is parsed
        self._lingering = True
        self._closing = True
        self._resume(_PAUSE_PIPELINE | _PAUSE_PEER)
        if transport.can_write_eof():
            transport.write_eof()
        self.loop.call_later(LINGER_SECONDS, self._close)

    def cut(self, why: str) -> None:
        """End the connection now (drain budget spent, stalled client): the handler is told why first."""
        if self.exchange is not None:
            self.exchange.cut(why)
        if self.transport is not None:
            self.transport.abort()

    @property
    def busy(self) -> bool:
        return self._active is not None or bool(self._queue)

    # ---------------------------------------------------------------- flow control

    def _pause(self, reason: int) -> None:
        if not self._paused and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self._paused |= reason

    def _resume(self, reason: int) -> None:
        if not self._paused & reason:
            return
        self._paused &= ~reason
        if not self._paused and self.transport is not None and not self.closed:
            self.transport.resume_reading()
            self.last_read = time.monotonic()  # the client was not late while we were not listening

    def pause_reading(self) -> None:
        """The peer we feed (the upstream) cannot take more: stop reading the client's body."""
        self._pause(_PAUSE_PEER)

    def resume_reading(self) -> None:
        self._resume(_PAUSE_PEER)

    def body_wanted(self, body: RequestBody) -> None:
        """The handler wants the body: send ``100 Continue`` if the client waits for it; start its clock."""
        self.last_read = time.monotonic()
        if self._paused & _PAUSE_PIPELINE and body is self.active_body:
            self._resume(_PAUSE_PIPELINE)

    async def wait_writable(self) -> None:
        """Wait while the client's write buffer is above its high-water mark."""
        while self.write_paused and not self.closed:
            self._write_waiter = self.loop.create_future()
            try:
                await self._write_waiter
            finally:
                self._write_waiter = None
        if self.closed:
            raise ClientGone

    # ---------------------------------------------------------------- answering

    def send_continue(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _connection_header(self, head_version: str, keep_alive: bool) -> bytes:
        if not keep_alive or self.draining or self.eof:
            self._close_after = True
            return b"Connection: close\r\n"
        if head_version == "1.0":
            return b"Connection: keep-alive\r\n"
        return b""

    def respond(self, head: RequestHead, reply: Reply) -> None:
        """The proxy's own answer (refusal, error, admin), sized and in one write."""
        keep_alive = head.keep_alive and not reply.close and (self.active_body is None or self.active_body.complete)
        self._write_reply(reply, head.version, keep_alive, head_only=head.method == "HEAD")

    def _write_reply(self, reply: Reply, version: str, keep_alive: bool, head_only: bool) -> None:
        if self.transport is None or self.closed:
            return
        self.response_started = True
        lines = [status_line(reply.status)]
        for name, value in reply.headers:
            lines.append(f"{name}: {value}\r\n".encode("latin-1", "replace"))
        lines.append(b"Content-Length: %d\r\n" % len(reply.body))
        lines.append(self._connection_header(version, keep_alive))
        lines.append(b"\r\n")
        if not head_only:
            lines.append(reply.body)
            self.bytes_out += len(reply.body)
        self.transport.write(b"".join(lines))

    def start_response(
        self,
        head: RequestHead,
        status_and_headers: bytes,
        length: int | None,
        *,
        keep_alive: bool = True,
        body: bytes = b"",
        has_body: bool = True,
    ) -> None:
        """Send an answer's head: ``status_and_headers`` is the status line and header lines, without framing.

        ``length`` is the body size when known (sent as ``Content-Length``); else the body is chunked for an
        HTTP/1.1 client and delimited by closing the connection for an HTTP/1.0 one. ``body`` (whole, when
        ``length`` is given) goes out in the same write.
        """
        if self.transport is None or self.closed:
            raise ClientGone
        self.response_started = True
        keep_alive = keep_alive and head.keep_alive and (self.active_body is None or self.active_body.complete)
        if not has_body:
            framing = b"" if length is None else b"Content-Length: %d\r\n" % length
        elif length is not None:
            framing = b"Content-Length: %d\r\n" % length
        elif head.version == "1.1":
            self._chunked_out = True
            framing = b"Transfer-Encoding: chunked\r\n"
        else:
            keep_alive = False
            framing = b""
        connection = self._connection_header(head.version, keep_alive)
        self.transport.write(b"".join((status_and_headers, framing, connection, b"\r\n", body)))
        self.bytes_out += len(body)

    def send_body(self, chunk: bytes) -> None:
        """A piece of a streamed answer (framed when chunked); the caller honours ``write_paused``."""
        if not chunk or self.closed or self.transport is None:
            return
        self.bytes_out += len(chunk)
        if self._chunked_out:
            self.transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        else:
            self.transport.write(chunk)

    def end_response(self) -> None:
        if self._chunked_out and not self.closed and self.transport is not None:
            self.transport.write(b"0\r\n\r\n")

    def abort_response(self) -> None:
        """The answer cannot be completed (the upstream broke off): cutting the connection is the only signal."""
        self._close_after = True
        if self.transport is not None:
            self.transport.abort()

    # ---------------------------------------------------------------- the sweep

    def check(self, now: float) -> None:
        """Enforce the client timeouts; called about once a second (more often with short timeouts)."""
        settings = self.settings
        if self.watchdog is not None:
            self.watchdog(self, now)
        if self.closed:
            return
        if self.write_paused and now - self._write_paused_since > settings.client_write:
            log.info("client %s read nothing for %.0f s: cutting the connection", self.peer, settings.client_write)
            self.cut("client_write_timeout")
            return
        body = self.active_body
        if (
            body is not None
            and body.wanted
            and not body.complete
            and body.error is None
            and not self._paused
            and now - self.last_read > settings.client_body
        ):
            log.info("client %s stopped sending its request body for %.0f s", self.peer, settings.client_body)
            body.fail(BodyTimeout())
            return
        if self._active is not None or self._queue:
            return
        if self._in_head:
            if now - self._head_started > settings.client_header:
                if self._head is not None:
                    log.info(
                        "client %s did not complete its request head within %.0f s", self.peer, settings.client_header
                    )
                    self._write_reply(
                        json_reply(
                            408, {"error": "request_timeout", "detail": "the request head did not arrive in time"}
                        ),
                        "1.1",
                        keep_alive=False,
                        head_only=False,
                    )
                self._close()
        elif now - self.last_read > settings.client_idle:
            self._close()


class Listener:
    """The client connections of one proxy process, across its listening sockets: sweep and drain."""

    def __init__(self, handler: Handler, settings: ListenerSettings) -> None:
        self.handler = handler
        self.settings = settings
        self.loop = asyncio.get_running_loop()
        self.connections: set[ClientConnection] = set()
        self.header_names = HeaderNames()  # shared by the connections: one parse at a time
        self.servers: list[asyncio.Server] = []
        self.draining = False
        self.idle_waiter: asyncio.Future[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        shortest = min(settings.client_header, settings.client_body, settings.client_write, settings.client_idle)
        self.sweep_interval = max(0.05, min(1.0, shortest / 4))

    def protocol(self) -> ClientConnection:
        return ClientConnection(self)

    async def serve(self, *, sock: Any = None, host: str | None = None, port: int | None = None) -> asyncio.Server:
        server = await self.loop.create_server(
            self.protocol, host=host, port=port, sock=sock, reuse_address=True if sock is None else None, backlog=1024
        )
        self.servers.append(server)
        if self._sweeper is None:
            self._sweeper = self.loop.create_task(self._sweep())
        return server

    def tighten_sweep(self, seconds: float) -> None:
        """Another timeout checked from the sweep (the upstream read timeout) wants at least this precision."""
        self.sweep_interval = max(0.05, min(self.sweep_interval, seconds / 4))

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval)
            now = time.monotonic()
            for conn in list(self.connections):
                conn.check(now)

    def routes_in_flight(self) -> Iterator[str]:
        """The route of each request being answered now: ``requests_in_flight``, counted when scraped."""
        for conn in self.connections:
            ex = conn.exchange
            if ex is not None and ex.route is not None:
                yield ex.route.name

    def changed(self) -> None:
        """A request finished or a connection closed: the drain may be over."""
        waiter = self.idle_waiter
        if waiter is not None and not waiter.done() and not any(c.busy for c in self.connections):
            waiter.set_result(None)

    def start_drain(self) -> None:
        """Stop accepting; every answer from now on says ``Connection: close``."""
        self.draining = True
        for server in self.servers:
            server.close()
        for conn in self.connections:
            conn.draining = True

    async def drain(self, deadline: float) -> int:
        """Wait until no request is in flight or the (monotonic) ``deadline``; cut what is left. Returns how
        many requests were cut."""
        self.start_drain()
        if any(c.busy for c in self.connections):
            self.idle_waiter = self.loop.create_future()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.idle_waiter, max(0.0, deadline - time.monotonic()))
        cut = 0
        for conn in list(self.connections):
            if conn.busy:
                cut += 1
                conn.cut("drain_timeout")
            else:
                conn._close()
        if cut:  # let the cut requests see it and write their access log lines (they end at once)
            self.idle_waiter = self.loop.create_future()
            self.changed()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.idle_waiter, 1.0)
        await self.close()
        return cut

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        for server in self.servers:
            server.close()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        await asyncio.sleep(0)  # let connection_lost run
