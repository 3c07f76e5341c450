"""The forwarding core (Envoy's connection manager + router): run the filter chain, send the request upstream
as bytes, stream the answer back.

For each request: the chain's request hooks (guard, admin, route, credentials …) may answer it; otherwise the
body is buffered up to ``limits.replay_buffer`` (so that it can be sent again after a 401 or a CSRF
``Required``) or streamed on, the upstream request head is built directly from the client's header list (raw
target byte-exact, hop-by-hop and ``Connection``-listed headers dropped, the filters' headers added), and the
answer goes back either whole in one write (small sized bodies: an upstream that breaks off is then an honest
502) or streamed from the upstream connection's read callback with flow control both ways.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Coroutine
from dataclasses import dataclass
from functools import partial
from typing import Any, Final

from proxy.exchange import CLIENT_DISCONNECTED, Exchange
from proxy.filters.base import PENDING, BodyTransform, Chain, Filter, Pending
from proxy.http.heads import HOP_BY_HOP, Reply, RequestHead, ResponseHead, connection_listed, json_reply, status_line
from proxy.http.listener import BodyTimeout, ClientConnection, ClientGone, RequestBody
from proxy.http.upstream import UpstreamClosed, UpstreamConnection, UpstreamError, UpstreamPool
from proxy.throttle import LogThrottle

log = logging.getLogger("odata_auth_proxy.forward")

# Never copied from the client: set by us (Host, Authorization, Content-Length) or answered here (Expect).
_REQUEST_DROP: Final = HOP_BY_HOP | {b"host", b"authorization", b"content-length", b"expect"}
_ANSWER_DROP: Final = HOP_BY_HOP | {b"content-length"}  # framing is ours: set per client, never copied
SMALL_BODY: Final = 64 * 1024  # sized answers up to this are read whole and sent in one write
_MAX_ATTEMPTS: Final = 4  # first send, a 401 replay, a CSRF replay, one retry on a stale pooled connection


class BodyTooLarge(Exception):
    pass


class Later:
    """What :meth:`Pipeline._answer_whole` returns when the answer's body is still on its way."""

    __slots__ = ()


_LATER: Final = Later()


@dataclass(frozen=True)
class PipelineSettings:
    replay_limit: int
    max_body: int | None
    read_timeout: float


class Pipeline:
    """Runs one request through the chain and the upstream pool; called by the listener per request."""

    def __init__(self, chain: Chain, pool: UpstreamPool, settings: PipelineSettings) -> None:
        self.use_chain(chain)
        self.pool = pool
        self.settings = settings
        self.log = LogThrottle(log)  # an unreachable upstream under load: one line, then a count
        # bound once: a bound method made per request is a generic attribute lookup and an allocation
        self._watch = self._watchdog  # set on every forwarded request's connection
        self._ready = self._answer_ready  # called back when the answer's head is in

    def use_chain(self, chain: Chain) -> None:
        """Run requests through ``chain`` (and precompute what depends on it)."""
        self.chain = chain
        self._never_forwarded = _REQUEST_DROP | chain.replaces  # client headers no request carries upstream

    def __call__(self, conn: ClientConnection, head: RequestHead, body: RequestBody) -> None:
        """Start a request. The common case needs no task: the request hooks run here, the request goes out on
        a pooled connection, and the answer is sent back from that connection's read callback
        (:meth:`_answer_ready`). Anything that must wait (a token fetch, a request body, a new connection, a
        replay, a streamed answer) continues in a task of its own (:meth:`_continue`)."""
        ex = Exchange(conn, head, body)
        conn.exchange = ex
        try:
            reply: Reply | Pending | None = None
            pending: list[Filter] | None = None
            for flt in self.chain.on_request:
                reply = flt.request(ex)
                if reply is not None:
                    if reply is not PENDING:
                        break
                    reply = None
                    pending = [flt] if pending is None else [*pending, flt]
            if isinstance(reply, Reply):
                self.answer(ex, reply)
            elif pending is None and not (head.chunked or head.content_length) and ex.origin is not None:
                up = self.pool.take_idle(ex.origin)
                if up is None:
                    self._continue(ex, self._forward(ex))
                    return
                if head.content_length == 0:
                    ex.body_data = b""
                self._send_request(ex, up)
                up.ready = partial(self._ready, ex)
                return
            else:
                self._continue(ex, self._forward(ex, pending))
                return
        except BaseException as exc:
            self._end(ex, self._trouble(ex, exc))
            if not isinstance(exc, Exception):
                raise
            return
        self._end(ex, False)

    def _answer_ready(self, ex: Exchange, up: UpstreamConnection) -> None:
        """From the upstream connection's read callback: the answer's head arrived (or the attempt failed).
        A complete answer nobody needs to look at twice goes back to the client right here."""
        up.ready = None
        answer = up.head
        try:
            if answer is None and ex.conn.closed:  # the client went (or was cut): nothing left to wait for
                self._end(ex, self._trouble(ex, ClientGone()))
                return
            if answer is None or answer.status in self.chain.answer_statuses:
                self._continue(ex, self._forward(ex, sent=up))  # a failure to judge, or a replay to decide
                return
            result = self._answer_whole(ex, up, answer)
            if result is _LATER:
                self._continue(ex, self._forward(ex, sent=up))  # the body is still on its way
                return
            if isinstance(result, Reply):
                self.answer(ex, result)
        except BaseException as exc:
            up.abort()
            self._end(ex, self._trouble(ex, exc))
            if not isinstance(exc, Exception):
                raise
            return
        self._end(ex, False)

    def _continue(self, ex: Exchange, work: Coroutine[Any, Any, Reply | None]) -> None:
        """Run the rest of the request in a task (the connection keeps a reference to it)."""
        ex.conn.task = ex.conn.loop.create_task(self._run(ex, work))

    async def _run(self, ex: Exchange, work: Coroutine[Any, Any, Reply | None]) -> None:
        close = False
        try:
            reply = await work
            if isinstance(reply, Reply):
                self.answer(ex, reply)
        except BaseException as exc:
            close = self._trouble(ex, exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._end(ex, close)

    def _trouble(self, ex: Exchange, exc: BaseException) -> bool:
        """What went wrong while answering, for the access log; returns True: the connection must close."""
        if isinstance(exc, ClientGone):
            if ex.error is None:
                ex.error = CLIENT_DISCONNECTED
                ex.status = 499
        elif isinstance(exc, Exception) and not isinstance(exc, ConnectionError):
            ex.conn.handler_failed(ex.head, exc)  # a bug: a 500 when nothing was sent yet
            ex.status = 500
        return True

    def _end(self, ex: Exchange, close: bool) -> None:
        """The exchange is over: the filters observe it, the connection goes on to the next request."""
        try:
            if ex.status == 0:
                ex.status = 500 if ex.error is None else 502
            ended = ex.ended = time.perf_counter()  # one clock reading for every filter that observes the end
            ex.duration = ended - ex.started
            for flt in self.chain.on_finished:
                flt.finished(ex)
        finally:
            ex.conn.request_done(ex.head, close=close)

    # ---------------------------------------------------------------- the proxy's own answers

    def answer(self, ex: Exchange, reply: Reply) -> None:
        """Send a Reply with the chain's answer headers (request id, CORS)."""
        conn = ex.conn
        ex.status = reply.status
        if conn.closed or conn.response_started:
            return
        lines = [status_line(reply.status)]
        for name, value in reply.headers:
            lines.append(f"{name}: {value}\r\n".encode("latin-1", "replace"))
        for flt in self.chain.on_response_headers:
            flt.response_headers(ex, lines)
        if reply.status in (204, 304):  # RFC 9110 §8.6: no Content-Length on a 204, no body on either
            conn.start_response(ex.head, b"".join(lines), None, keep_alive=not reply.close, has_body=False)
            return
        conn.start_response(
            ex.head,
            b"".join(lines),
            len(reply.body),
            keep_alive=not reply.close,
            body=b"" if ex.head.method == "HEAD" else reply.body,
            has_body=ex.head.method != "HEAD",
        )

    # ---------------------------------------------------------------- forwarding

    async def _forward(
        self, ex: Exchange, pending: list[Filter] | None = None, *, sent: UpstreamConnection | None = None
    ) -> Reply | None:
        """The request from where :meth:`__call__` left it: ``pending`` filters to await first, or an attempt
        already ``sent`` whose answer (or failure) has arrived."""
        head, body, settings = ex.head, ex.body, self.settings
        if pending is not None:
            for flt in pending:
                reply = await flt.prepare(ex)
                if reply is not None:
                    return reply
        if sent is None and head.has_body:
            if settings.max_body is not None and (head.content_length or 0) > settings.max_body:
                return self._too_large()
            if head.expect_continue and not body.size and not body.complete:
                ex.conn.send_continue()
            try:
                complete = await body.read_until(settings.replay_limit)
            except BodyTimeout:
                return self._body_timeout(ex)
            if settings.max_body is not None and body.size > settings.max_body:
                return self._too_large()
            if complete:
                data = body.take()
                for flt in self.chain.on_request_body:
                    data = flt.request_body(ex, data)
                ex.body_data = data
                ex.bytes_in = body.size
            else:
                ex.streaming = True
        elif head.content_length == 0:
            ex.body_data = b""
        attempts = 0 if sent is None else 1
        replayed: set[int] = set()
        up = sent
        while True:
            if up is None:
                attempts += 1
                assert ex.origin is not None
                up = self.pool.take_idle(ex.origin)
                if up is None:
                    try:
                        up = await self.pool.connect(ex.origin)
                    except UpstreamError as exc:
                        return self._upstream_error(ex, exc)
                self._send_request(ex, up)
            try:
                answer = await up.response_head()
            except UpstreamError as exc:
                if ex.conn.closed:
                    raise ClientGone from None  # the client went (or was cut): not the upstream's failure
                failed = self._upload_failure(ex)
                if failed is not None:
                    return failed
                if isinstance(exc, UpstreamClosed) and up.reused and ex.replayable and attempts < _MAX_ATTEMPTS:
                    up = None
                    continue  # the pooled connection had been closed by the upstream: try a fresh one
                return self._upstream_error(ex, exc)
            except BaseException:
                up.abort()  # cancelled or a bug: the connection is in an unknown state
                raise
            replay: bool | Reply = False
            for index, flt in enumerate(self.chain.on_answer if answer.status in self.chain.answer_statuses else ()):
                if index in replayed:
                    continue
                replay = await flt.on_answer(ex, answer)
                if replay is not False:
                    if replay is True:
                        replayed.add(index)
                    break
            if isinstance(replay, Reply):
                self._discard(up)
                return replay
            if replay and ex.replayable and attempts < _MAX_ATTEMPTS:
                self._discard(up)
                up = None
                continue
            try:
                return await self._send_back(ex, up, answer)
            except BaseException:
                up.abort()  # cut short (client gone, cancelled): never back into the pool half-read
                raise

    def _upload_failure(self, ex: Exchange) -> Reply | None:
        """The request body failed while streaming upstream: that, not the upstream, is the story."""
        error = ex.body.error
        if error is None:
            return None
        if isinstance(error, BodyTimeout):
            return self._body_timeout(ex)
        if isinstance(error, BodyTooLarge):
            return self._too_large()
        raise ClientGone

    def _send_request(self, ex: Exchange, up: UpstreamConnection) -> None:
        """Send the request head (and the buffered body, or start streaming it) on ``up``."""
        head = ex.head
        lines = [
            f"{head.method} {ex.upstream_target} HTTP/1.1\r\nHost: ".encode("latin-1"),
            ex.origin.host_header if ex.origin is not None else b"",
            b"\r\n",
        ]
        added: list[bytes] = []
        for flt in self.chain.on_upstream_headers:
            flt.upstream_headers(ex, added)  # first: a filter may also drop the client's own version
        drop, never = ex.drop, self._never_forwarded
        listed = connection_listed(head.headers) if head.connection else ()
        for lname, name, value in head.headers:
            if lname in never or lname in drop or lname in listed or lname.startswith(b"proxy-"):
                continue
            lines.extend((name, b": ", value, b"\r\n"))  # pieces of the one join below: cheaper than formatting a line
        lines.extend(ex.extra)
        lines.extend(added)
        data = ex.body_data
        client_chunked = False
        if data is not None:
            if data or head.has_body or head.method in ("POST", "PUT", "PATCH", "MERGE"):
                lines.append(b"Content-Length: %d\r\n\r\n" % len(data))
                lines.append(data)
            else:
                lines.append(b"\r\n")
        elif ex.streaming:
            if head.content_length is not None:
                lines.append(b"Content-Length: %d\r\n\r\n" % head.content_length)
            else:
                client_chunked = True
                lines.append(b"Transfer-Encoding: chunked\r\n\r\n")
        else:
            lines.append(b"\r\n")
        up.begin(b"".join(lines), head_request=head.method == "HEAD")
        conn = ex.conn
        conn.abort_on_loss = up  # a client that goes away releases the upstream at once
        ex.upstream = up
        conn.watchdog = self._watch
        if ex.streaming:
            self._stream_upload(ex, up, client_chunked)

    def _watchdog(self, conn: ClientConnection, now: float) -> None:
        """From the listener's sweep: an upstream silent for ``timeouts.read`` is given up (504 or a cut)."""
        ex = conn.exchange
        up = ex.upstream if ex is not None else None
        if up is None or up.complete or up.closed or conn.write_paused:
            return
        if now - up.last_read > self.settings.read_timeout:
            up.timed_out()

    def _stream_upload(self, ex: Exchange, up: UpstreamConnection, chunked: bool) -> None:
        body, max_body = ex.body, self.settings.max_body
        up.flow_peer = ex.conn

        def sink(chunk: bytes) -> None:
            if max_body is not None and body.size > max_body:
                body.fail(BodyTooLarge())
                return
            up.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)

        def end() -> None:
            ex.bytes_in = body.size
            if chunked:
                up.write(b"0\r\n\r\n")

        def failed(error: BaseException) -> None:
            ex.bytes_in = body.size
            up.abort()  # the upstream must never see a complete request made of a partial body

        body.stream_to(sink, end, failed)

    def _discard(self, up: UpstreamConnection) -> None:
        """An answer the client will not see (replaced by a replay): keep the connection only if it is done."""
        if up.reusable():
            up.take_body()
            self.pool.release(up)
        else:
            up.abort()

    # ---------------------------------------------------------------- the answer, back to the client

    def _client_head(self, ex: Exchange, answer: ResponseHead) -> list[bytes]:
        """Status line and headers for the client: hop-by-hop and framing dropped, rewrites applied."""
        lines = [status_line(answer.status, answer.reason)]
        listed = connection_listed(answer.headers) if answer.lists_headers else ()
        rewrites = self.chain.header_rewrites
        for lname, name, value in answer.headers:
            if lname in _ANSWER_DROP or (listed and lname in listed):
                continue
            if lname in rewrites:
                value = rewrites[lname](ex, value)
            lines.extend((name, b": ", value, b"\r\n"))  # pieces of the caller's one join
        for flt in self.chain.on_response_headers:
            flt.response_headers(ex, lines, answer)
        return lines

    def _transform(self, ex: Exchange, answer: ResponseHead, *, whole: bool) -> BodyTransform | None:
        """The first filter's transform of this answer's body (link rewriting), or None to pass it through."""
        for flt in self.chain.on_body:
            transform = flt.body_transform(ex, answer, whole=whole)
            if transform is not None:
                return transform
        return None

    def _answer_whole(self, ex: Exchange, up: UpstreamConnection, answer: ResponseHead) -> Reply | Later | None:
        """Send an answer that has no body or whose body is all here, in one write; ``_LATER`` otherwise."""
        head, conn = ex.head, ex.conn
        ex.upstream_status = answer.status
        ex.status = answer.status
        if head.method == "HEAD" or answer.status in (204, 304):
            lines = self._client_head(ex, answer)
            length = answer.content_length if head.method == "HEAD" else None
            conn.start_response(head, b"".join(lines), length, has_body=False)
            self._done_with(ex, up)
            return None
        if not up.complete:
            return _LATER
        transform = self._transform(ex, answer, whole=True)
        data = up.take_body()
        if transform is not None:
            try:
                data = transform.whole(data)
            except zlib.error as exc:
                return self._body_incomplete(ex, up, answer, exc)
        lines = self._client_head(ex, answer)
        conn.start_response(head, b"".join(lines), len(data), body=data)
        self._done_with(ex, up)
        return None

    async def _send_back(self, ex: Exchange, up: UpstreamConnection, answer: ResponseHead) -> Reply | None:
        result = self._answer_whole(ex, up, answer)
        if result is not _LATER:
            return result  # type: ignore[return-value]
        length = answer.content_length
        if length is not None and length <= SMALL_BODY:
            try:
                await up.wait_complete()
            except UpstreamError as exc:
                return self._body_incomplete(ex, up, answer, exc)
            return self._answer_whole(ex, up, answer)  # type: ignore[return-value]
        transform = self._transform(ex, answer, whole=False)
        lines = self._client_head(ex, answer)
        ex.conn.start_response(ex.head, b"".join(lines), None if transform is not None else length)
        await self._stream_download(ex, up, transform)
        return None

    def _body_incomplete(self, ex: Exchange, up: UpstreamConnection, answer: ResponseHead, exc: BaseException) -> Reply:
        """A small answer's body broke off (or would not decompress): an honest 502, nothing sent yet."""
        up.abort()
        length = answer.content_length
        detail = "the upstream broke off its " + (f"{length}-byte answer" if length is not None else "answer")
        received = getattr(exc, "received", 0)
        if received:
            detail += f" after {received} bytes"
        ex.error = "upstream_body_incomplete"
        route_name = ex.route.name if ex.route else "-"
        self.log.log(
            logging.WARNING,
            (route_name, "upstream_body_incomplete"),
            "route %s: %s (%s)",
            route_name,
            detail,
            exc.__class__.__name__,
        )
        return json_reply(
            502,
            {
                "error": "upstream_body_incomplete",
                "detail": detail,
                "route": ex.route.name if ex.route else None,
                "upstream_status": answer.status,
            },
        )

    async def _stream_download(self, ex: Exchange, up: UpstreamConnection, transform: BodyTransform | None) -> None:
        conn = ex.conn
        broken: list[BaseException] = []

        if transform is None:
            sink = conn.send_body
        else:

            def sink(chunk: bytes) -> None:
                if broken:
                    return
                try:
                    conn.send_body(transform.feed(chunk))
                except zlib.error as exc:
                    broken.append(exc)
                    up.abort()

        conn.flow_peer = up
        if conn.write_paused:
            up.pause_reading()
        conn.abort_on_loss = up
        up.stream_to(sink)
        try:
            await up.wait_complete()
            if transform is not None and not broken:
                conn.send_body(transform.flush())
        except UpstreamError as exc:
            if conn.closed:
                if ex.error is None:
                    ex.error = CLIENT_DISCONNECTED
                    ex.status = 499
                    log.info(
                        "route %s: client disconnected during the download after %d bytes",
                        ex.route.name if ex.route else "-",
                        conn.bytes_out,
                    )
                raise ClientGone from None
            cause = broken[0] if broken else exc
            route_name = ex.route.name if ex.route else "-"
            self.log.log(
                logging.WARNING,
                (route_name, "upstream_body_broken"),
                "route %s: upstream body broke off after %d bytes (%s); closing the client connection",
                route_name,
                conn.bytes_out,
                cause.__class__.__name__,
            )
            ex.error = "upstream_body_incomplete"
            conn.abort_response()
            return
        conn.end_response()
        self._done_with(ex, up)

    def _done_with(self, ex: Exchange, up: UpstreamConnection) -> None:
        if ex.streaming and not ex.body.complete:
            ex.body.detach()  # the upstream answered before the whole upload: that connection is spent
            up.abort()
            return
        self.pool.release(up)

    # ---------------------------------------------------------------- failures

    def _too_large(self) -> Reply:
        limit = self.settings.max_body
        return json_reply(
            413,
            {
                "error": "request_body_too_large",
                "detail": f"the request body exceeds limits.max_body_size ({limit} bytes)",
            },
            close=True,
        )

    def _body_timeout(self, ex: Exchange) -> Reply:
        ex.error = "client_body_timeout"
        return json_reply(
            408,
            {
                "error": "request_timeout",
                "detail": "the request body stopped arriving (timeouts.client_body); nothing was completed upstream",
            },
            close=True,
        )

    def _upstream_error(self, ex: Exchange, exc: UpstreamError) -> Reply:
        ex.error = exc.code
        route = ex.route.name if ex.route is not None else "-"
        self.log.log(logging.WARNING, (route, exc.code), "route %s: %s (%s)", route, exc.code, exc.detail)
        upstream = _origin_text(ex.route.upstream) if ex.route is not None else None
        return json_reply(exc.status, {"error": exc.code, "detail": exc.detail, "upstream": upstream, "route": route})


def _origin_text(upstream: str) -> str:
    scheme, _, rest = upstream.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"
