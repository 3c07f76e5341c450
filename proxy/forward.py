"""The streaming forwarder: one request in, one request upstream with a bearer token, the answer streamed back.

Bodies are never held whole, except a small request body (``limits.replay_buffer``, 1 MiB) kept so that the
request can be replayed once after an upstream 401 with a fresh token. Hop-by-hop headers are dropped
(RFC 9110 §7.6.1), the client's ``Authorization`` is replaced, redirects are passed to the client and
never followed with the token, and ``Location`` headers pointing upstream are rewritten to the proxy.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.config import Route
from proxy.exchange import exchange_of
from proxy.odata import (
    CSRF_HEADER,
    CsrfStore,
    MultiRewriter,
    RewritePlan,
    client_manages_csrf,
    csrf_fetch_url,
    csrf_required,
    fetch_csrf,
    is_write,
    link_rewrite_pairs,
    merge_cookie_header,
    reverse_rewrite,
    should_rewrite,
)
from proxy.outbound import OutboundProxies
from proxy.router import proxy_location
from proxy.tokens import Token, TokenError, TokenManager, outbound_proxy_detail

log = logging.getLogger("odata_auth_proxy.forward")

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Never copied from the client to the upstream: we set them (Host, Authorization, Content-Length) or
# they must not travel (Expect: the proxy already answered 100-continue itself).
_REQUEST_DROP = HOP_BY_HOP | {"host", "authorization", "content-length", "expect"}
_RESPONSE_DROP = HOP_BY_HOP
_SKIP_AUTO = frozenset({"Accept", "Accept-Encoding", "User-Agent", "Content-Type"})
READ_CHUNK = 256 * 1024
SMALL_BODY = 64 * 1024  # sized bodies up to this are read whole and sent in one write


def json_error(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(body, status=status, headers=headers)


def _connection_listed(headers: CIMultiDictProxy[str]) -> set[str]:
    listed: set[str] = set()
    for value in headers.getall("Connection", ()):
        listed.update(token.strip().lower() for token in value.split(",") if token.strip())
    return listed


def upstream_request_headers(headers: CIMultiDictProxy[str], drop: frozenset[str] = frozenset()) -> CIMultiDict[str]:
    """Client headers minus hop-by-hop (and those named in ``Connection``), Host and Authorization."""
    listed = _connection_listed(headers) if "Connection" in headers else set()
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lowered = name.lower()
        if lowered in _REQUEST_DROP or lowered in listed or lowered in drop or lowered.startswith("proxy-"):
            continue
        out.add(name, value)
    return out


def client_response_headers(headers: CIMultiDictProxy[str], route: Route, proxy_base: str) -> CIMultiDict[str]:
    listed = _connection_listed(headers) if "Connection" in headers else set()
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lowered = name.lower()
        if lowered in _RESPONSE_DROP or lowered in listed:
            continue
        if lowered in ("location", "content-location"):
            value = proxy_location(value, route, proxy_base)
        out.add(name, value)
    return out


_REWRITABLE_ENCODINGS = frozenset({"gzip", "x-gzip", "deflate", "identity"})


def narrow_accept_encoding(headers: CIMultiDict[str]) -> None:
    """Ask only for encodings the link rewriter can open (Postman sends ``br``): links must stay on the proxy."""
    value = headers.get("Accept-Encoding")
    if value is None:
        return
    kept = [item.strip() for item in value.split(",") if item.split(";")[0].strip().lower() in _REWRITABLE_ENCODINGS]
    if kept:
        headers["Accept-Encoding"] = ", ".join(kept)
    else:
        headers.popall("Accept-Encoding")


def proxy_base_url(request: web.Request) -> str:
    """``scheme://host[:port]`` as the client addressed the proxy (the guard has vetted the Host header).

    Not ``request.host``: without a Host header (HTTP/1.0) aiohttp falls back to ``socket.getfqdn()``, a
    blocking DNS lookup on the event loop; the socket's own address is what the client connected to.
    """
    host = request.headers.get("Host")
    if not host:
        sockname = request.transport.get_extra_info("sockname") if request.transport is not None else None
        address, port = (sockname[0], sockname[1]) if sockname else ("127.0.0.1", 80)
        host = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    return f"{request.scheme}://{host}"


class BodyTooLarge(Exception):
    pass


class ClientGone(Exception):
    """Writing to the client failed: it closed the connection (not an upstream failure)."""


CLIENT_DISCONNECTED = "client_disconnected"


async def _write_to_client(out: web.StreamResponse, chunk: bytes) -> None:
    try:
        await out.write(chunk)
    except ConnectionError:  # aiohttp's ClientConnectionResetError is one
        raise ClientGone from None


@dataclass
class BodyTransform:
    """Streamed response body edits: link rewriting, inside an inflate → rewrite → deflate sandwich for
    gzip/deflate bodies, so that the client still receives the encoding it was promised."""

    rewriter: MultiRewriter
    decompress: zlib._Decompress | None = None  # for compressed bodies
    compress: zlib._Compress | None = None  # of the same format

    def feed(self, chunk: bytes) -> bytes:
        if self.decompress is None or self.compress is None:
            return self.rewriter.feed(chunk)
        data = self.rewriter.feed(self.decompress.decompress(chunk))
        # sync-flush per chunk: the client gets each piece without waiting for the compressor's window
        return self.compress.compress(data) + self.compress.flush(zlib.Z_SYNC_FLUSH) if data else b""

    def flush(self) -> bytes:
        if self.decompress is None or self.compress is None:
            return self.rewriter.flush()
        data = self.rewriter.feed(self.decompress.flush()) + self.rewriter.flush()
        return self.compress.compress(data) + self.compress.flush(zlib.Z_FINISH)


@dataclass
class RequestBody:
    """The client's body: buffered (and so replayable) when small, otherwise a one-shot stream."""

    data: bytes | None = None
    stream: AsyncIterator[bytes] | None = None
    length: int | None = None  # Content-Length to send upstream when streaming a sized body
    received: int = 0
    too_large: bool = False
    consumed: bool = False  # a stream can be sent once only
    client_gone: bool = False  # the client vanished mid-upload

    @property
    def replayable(self) -> bool:
        return self.stream is None and not self.consumed

    def payload(self) -> bytes | AsyncIterator[bytes] | None:
        if self.stream is not None:
            stream, self.stream = self.stream, None
            self.consumed = True
            return stream
        return self.data


async def read_request_body(request: web.Request, replay_limit: int, max_body: int | None) -> RequestBody:
    """Buffer up to ``replay_limit`` bytes; a longer or unknown-length body streams on (not replayable)."""
    length = request.content_length
    if max_body is not None and length is not None and length > max_body:
        raise BodyTooLarge
    if not request.body_exists:
        return RequestBody(data=None)
    content = request.content
    body = RequestBody()
    if length is not None and length <= replay_limit:
        body.data = await content.readexactly(length) if length else b""
        body.received = length
        return body
    buffered: list[bytes] = []
    size = 0
    if length is None:
        while size <= replay_limit:
            chunk = await content.readany()
            if not chunk:
                body.data = b"".join(buffered)
                body.received = size
                return body
            buffered.append(chunk)
            size += len(chunk)
            if max_body is not None and size > max_body:
                raise BodyTooLarge
    body.length = length
    body.received = size

    async def stream() -> AsyncIterator[bytes]:
        for chunk in buffered:
            yield chunk
        buffered.clear()
        while True:
            try:
                chunk = await content.readany()
            except ConnectionError:
                body.client_gone = True
                raise
            if not chunk:
                return
            body.received += len(chunk)
            if max_body is not None and body.received > max_body:
                body.too_large = True
                raise BodyTooLarge
            yield chunk

    body.stream = stream()
    return body


@dataclass(frozen=True)
class ForwardSettings:
    replay_limit: int
    max_body: int | None
    proxies: OutboundProxies
    drop_headers: frozenset[str] = frozenset()
    csrf_timeout: float = 30.0


class Forwarder:
    """Sends one client request upstream with a token; replays it once after a 401 (fresh token) or a
    ``X-CSRF-Token: Required`` 403 (fresh CSRF token) when the body allows it."""

    def __init__(self, session: aiohttp.ClientSession, settings: ForwardSettings) -> None:
        self._session = session
        self._settings = settings
        self.csrf = CsrfStore()
        self._plans: dict[tuple[str, str], tuple[list[tuple[bytes, bytes]], RewritePlan]] = {}

    async def forward(self, request: web.Request, route: Route, url: URL, manager: TokenManager) -> web.StreamResponse:
        settings = self._settings
        record = exchange_of(request)
        try:
            body = await read_request_body(request, settings.replay_limit, settings.max_body)
        except BodyTooLarge:
            return self._too_large()
        try:
            token = await manager.get()
        except TokenError as exc:
            record.error = exc.error
            return json_error(exc.status, exc.as_json())
        headers = upstream_request_headers(request.headers, settings.drop_headers)
        if record.request_id != "-":
            headers["X-Request-Id"] = record.request_id
        if body.length is not None and body.stream is not None:
            headers["Content-Length"] = str(body.length)
        proxy_base = proxy_base_url(request)
        if route.rewrite_links:
            narrow_accept_encoding(headers)
        if route.rewrite_links and body.data and should_rewrite(request.content_type, None):
            body.data = reverse_rewrite(body.data, self._link_plan(route, proxy_base)[0])
        csrf_key = route.name if route.csrf == "auto" and is_write(request.method) else None
        if csrf_key is not None and client_manages_csrf(request.headers):
            csrf_key = None  # the client does its own CSRF dance: leave it alone
        client_cookie = headers.get("Cookie")
        try:
            resp = await self._send(request.method, url, headers, token, body, csrf_key, client_cookie)
            if resp.status == 401 and body.replayable and manager.invalidate(token):
                resp.release()
                record.replayed = "401"
                try:
                    token = await manager.get_after_invalidation()
                except TokenError as exc:
                    record.error = exc.error
                    return json_error(exc.status, exc.as_json())
                resp = await self._send(request.method, url, headers, token, body, csrf_key, client_cookie)
            if csrf_key is not None and body.replayable and csrf_required(resp.status, resp.headers):
                resp.release()
                await self._refresh_csrf(route, csrf_key, token)
                record.replayed = "csrf"
                resp = await self._send(request.method, url, headers, token, body, csrf_key, client_cookie)
        except BodyTooLarge:
            return self._too_large()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            if body.too_large:
                return self._too_large()
            if body.client_gone:
                return self._client_gone(request, route, body.received, "upload")
            return self._upstream_error(route, url, exc, request)
        record.token_fp = token.fingerprint
        record.upstream_status = resp.status
        record.bytes_in = body.received
        async with resp:
            return await self._stream_back(request, route, resp, proxy_base)

    async def _send(
        self,
        method: str,
        url: URL,
        headers: CIMultiDict[str],
        token: Token,
        body: RequestBody,
        csrf_key: str | None,
        client_cookie: str | None,
    ) -> aiohttp.ClientResponse:
        headers["Authorization"] = "Bearer " + token.value.reveal()
        if csrf_key is not None:
            session = self.csrf.session(csrf_key)
            cached = session.headers_for(token.fingerprint)
            if cached is not None:
                headers[CSRF_HEADER] = cached[CSRF_HEADER]
                cookie = merge_cookie_header(client_cookie, session.cookies)
                if cookie:
                    headers["Cookie"] = cookie
        return await self._session.request(
            method,
            url,
            headers=headers,
            data=body.payload(),
            allow_redirects=False,
            skip_auto_headers=_SKIP_AUTO,
            proxy=self._settings.proxies.for_url(url),
            compress=None,
        )

    async def _refresh_csrf(self, route: Route, key: str, token: Token) -> None:
        """Fetch a CSRF token + session cookies once for all writes that hit ``Required`` together."""
        session = self.csrf.session(key)
        stale = session.token
        async with self.csrf.lock(key):
            if session.token is not None and session.token != stale and session.bearer_fp == token.fingerprint:
                return  # another request fetched a fresh one while we waited
            self.csrf.record_fetch()
            csrf_url = csrf_fetch_url(route.upstream)
            csrf_token, cookies = await fetch_csrf(
                self._session,
                csrf_url,
                token.value.reveal(),
                self._settings.csrf_timeout,
                proxy=self._settings.proxies.for_url(csrf_url),
            )
            session.store(token.fingerprint, csrf_token, cookies)
            log.info(
                "route %s: fetched a CSRF token (%s) for writes",
                route.name,
                "ok" if session.token else "none returned",
            )

    def _link_plan(self, route: Route, proxy_base: str) -> tuple[list[tuple[bytes, bytes]], RewritePlan]:
        """Replacement pairs and their compiled plan for this route as the client addresses the proxy."""
        key = (route.name, proxy_base)
        cached = self._plans.get(key)
        if cached is None:
            pairs = link_rewrite_pairs(route.upstream, proxy_base + route.prefix)
            cached = (pairs, RewritePlan.build(pairs))
            if len(self._plans) < 256:  # bounded: proxy_base comes from the (allow-listed) Host header
                self._plans[key] = cached
        return cached

    async def _stream_back(
        self, request: web.Request, route: Route, resp: aiohttp.ClientResponse, proxy_base: str
    ) -> web.StreamResponse:
        headers = client_response_headers(resp.headers, route, proxy_base)
        has_body = request.method != "HEAD" and resp.status not in (204, 304)
        transform = self._body_transform(route, resp, proxy_base) if has_body else None
        length = resp.content_length
        if has_body and length is not None and length <= SMALL_BODY:
            return await self._send_small(request, route, resp, headers, length, transform)
        out = web.StreamResponse(status=resp.status, reason=resp.reason)
        out.headers.extend(headers)
        if transform is not None:
            out.headers.popall("Content-Length", None)
        await out.prepare(request)
        sent = 0
        if has_body:
            try:
                async for chunk in resp.content.iter_chunked(READ_CHUNK):
                    if transform is not None:
                        chunk = transform.feed(chunk)
                    if chunk:
                        await _write_to_client(out, chunk)
                        sent += len(chunk)
                if transform is not None:
                    tail = transform.flush()
                    if tail:
                        await _write_to_client(out, tail)
                        sent += len(tail)
            except ClientGone:
                exchange_of(request).bytes_out = sent
                self._client_gone(request, route, sent, "download")
                return out
            except (aiohttp.ClientError, TimeoutError, zlib.error) as exc:
                # headers are gone already: the only honest signal left is to cut the connection
                log.warning(
                    "route %s: upstream body broke off after %d bytes (%s); closing the client connection",
                    route.name,
                    sent,
                    exc.__class__.__name__,
                )
                exchange_of(request).bytes_out = sent
                if request.transport is not None:
                    request.transport.close()
                return out
        exchange_of(request).bytes_out = sent
        await out.write_eof()
        return out

    async def _send_small(
        self,
        request: web.Request,
        route: Route,
        resp: aiohttp.ClientResponse,
        headers: CIMultiDict[str],
        length: int,
        transform: BodyTransform | None,
    ) -> web.StreamResponse:
        """A small sized body (most OData answers) is read whole, rewritten if needed, and sent in one write."""
        try:
            body = await resp.content.readexactly(length)
            if transform is not None:
                body = transform.feed(body) + transform.flush()
                headers.popall("Content-Length", None)  # web.Response sets the new one
        except (aiohttp.ClientError, TimeoutError, asyncio.IncompleteReadError, zlib.error) as exc:
            # nothing was sent to the client yet, so it can get an honest 502 instead of a cut body
            got = len(exc.partial) if isinstance(exc, asyncio.IncompleteReadError) else None
            detail = f"the upstream broke off its {length}-byte answer" + (f" after {got} bytes" if got else "")
            exchange_of(request).error = "upstream_body_incomplete"
            log.warning("route %s: %s (%s)", route.name, detail, exc.__class__.__name__)
            return json_error(
                502,
                {
                    "error": "upstream_body_incomplete",
                    "detail": detail,
                    "route": route.name,
                    "upstream_status": resp.status,
                },
            )
        out = web.Response(status=resp.status, reason=resp.reason, headers=headers, body=body)
        exchange_of(request).bytes_out = len(body)
        return out

    def _body_transform(self, route: Route, resp: aiohttp.ClientResponse, proxy_base: str) -> BodyTransform | None:
        """Link rewriting for OData JSON/XML bodies; gzip/deflate ones are inflated and deflated again."""
        if not route.rewrite_links or not should_rewrite(resp.headers.get("Content-Type"), None):
            return None
        encoding = resp.headers.get("Content-Encoding", "").strip().lower()
        rewriter = MultiRewriter(self._link_plan(route, proxy_base)[1])
        if encoding in ("", "identity"):
            return BodyTransform(rewriter)
        if encoding in ("gzip", "x-gzip"):
            return BodyTransform(rewriter, zlib.decompressobj(wbits=31), zlib.compressobj(wbits=31))
        if encoding == "deflate":  # HTTP "deflate" is the zlib format (RFC 9110 §8.4.1.2)
            return BodyTransform(rewriter, zlib.decompressobj(wbits=15), zlib.compressobj(wbits=15))
        return None  # br, zstd …: passed through untouched, links stay as they are

    def _client_gone(self, request: web.Request, route: Route, size: int, what: str) -> web.Response:
        """The client went away: not the upstream's fault, so no upstream error and an access-log 499."""
        exchange_of(request).error = CLIENT_DISCONNECTED
        log.info("route %s: client disconnected during the %s after %d bytes", route.name, what, size)
        return web.Response(status=499, text="client closed request")

    def _too_large(self) -> web.Response:
        limit = self._settings.max_body
        return json_error(
            413,
            {
                "error": "request_body_too_large",
                "detail": f"the request body exceeds limits.max_body_size ({limit} bytes)",
            },
            headers={"Connection": "close"},
        )

    def _upstream_error(self, route: Route, url: URL, exc: BaseException, request: web.Request) -> web.Response:
        upstream = f"{url.scheme}://{url.raw_authority}"
        if isinstance(exc, aiohttp.ServerTimeoutError | TimeoutError | asyncio.TimeoutError):
            status, code, detail = 504, "upstream_timeout", "the upstream did not answer in time"
        elif isinstance(exc, aiohttp.ClientHttpProxyError):
            status, code, detail = 502, "outbound_proxy_error", outbound_proxy_detail(exc, "the upstream")
        elif isinstance(exc, aiohttp.ClientConnectorCertificateError):
            status, code = 502, "upstream_tls_error"
            detail = (
                f"the upstream's TLS certificate is not trusted ({exc.certificate_error}); "
                "add a private or corporate CA with --ca-bundle FILE"
            )
        elif isinstance(exc, aiohttp.ClientSSLError):
            status, code, detail = 502, "upstream_tls_error", f"TLS with the upstream failed: {str(exc)[:300]}"
        elif isinstance(exc, aiohttp.ClientConnectorError):
            status, code, detail = 502, "upstream_unreachable", f"cannot connect to the upstream: {str(exc)[:300]}"
        else:
            status, code = 502, "upstream_error"
            detail = f"the upstream connection failed: {exc.__class__.__name__}: {str(exc)[:200]}"
        exchange_of(request).error = code
        log.warning("route %s: %s (%s)", route.name, code, detail)
        return json_error(status, {"error": code, "detail": detail, "upstream": upstream, "route": route.name})
