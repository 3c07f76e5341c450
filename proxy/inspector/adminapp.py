"""The inspector on ``--admin-listen`` (the aiohttp admin app): the same answers as on the main port.

Unlike ``/-/metrics`` there, the inspector is guarded exactly like the main port (``InspectorApi.admin_guard``:
Host allow-list with the admin address added, no cross-site ``Origin``, the inbound API key where one is set),
because it shows who called what. The current runtime is looked up per request, so a reload that turns
``ui`` off (or on) applies at once; with ``ui: false`` the paths answer the admin endpoints' 404.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from aiohttp import web

from proxy.filters.admin import not_found
from proxy.guard import GuardedRequest, cors_headers
from proxy.http.heads import Reply, RequestHead
from proxy.inspector.api import (
    API_PREFIX,
    EVENTS_PATH,
    PAGE_FILES,
    REQUESTS_PATH,
    ROUTES_PATH,
    SECURITY_HEADERS,
    STATS_PATH,
    InspectorApi,
    too_many_streams,
)
from proxy.inspector.events import STREAM_HEADERS, resume_point, stream_events
from proxy.inspector.recorder import MAX_STREAMS

if TYPE_CHECKING:
    from proxy.app import ProxyState

BACKLOG_LIMIT = 16 * 1024  # bytes waiting in the transport beyond which events are dropped for this client
WRITE_TIMEOUT = 5.0

StateOf = Callable[[web.Request], "ProxyState"]


def _response(reply: Reply, cors_origin: str | None = None) -> web.Response:
    response = web.Response(status=reply.status, body=reply.body)
    for name, value in reply.headers:
        response.headers[name] = value
    if cors_origin is not None:
        for name, value in cors_headers(cors_origin):
            response.headers[name] = value
    return response


def _guarded(request: web.Request, state: ProxyState) -> tuple[InspectorApi | None, Reply | None, str | None]:
    """(the inspector, or None when ``ui`` is off; the guard's refusal or None; the CORS origin or None)."""
    api = state.runtime.inspector
    if api is None:
        return None, not_found(), None
    guard = api.admin_guard
    if guard is None:
        return api, None, None
    head = RequestHead()
    head.method = request.method
    head.target = request.raw_path
    head.version = f"{request.version.major}.{request.version.minor}"
    head.headers = [(name.lower(), name, value) for name, value in request.raw_headers]
    refusal, cors_origin = guard.check(GuardedRequest(head, request.remote or "-"))
    return api, refusal, cors_origin


class _WebSink:
    """The event stream's way out on the admin port; never lets the transport's buffer grow."""

    def __init__(self, request: web.Request, response: web.StreamResponse) -> None:
        self.request = request
        self.response = response

    @property
    def closed(self) -> bool:
        transport = self.request.transport
        return transport is None or transport.is_closing()

    @property
    def backlogged(self) -> bool:
        transport = self.request.transport
        return transport is not None and transport.get_write_buffer_size() > BACKLOG_LIMIT

    async def write(self, data: bytes) -> None:
        await asyncio.wait_for(self.response.write(data), WRITE_TIMEOUT)


def add_inspector_routes(app: web.Application, state_of: StateOf) -> None:
    """Register the page, the JSON API and the event stream on the admin app."""

    async def answer(request: web.Request) -> web.Response:
        state = state_of(request)
        api, refusal, cors_origin = _guarded(request, state)
        if refusal is not None or api is None:
            return _response(refusal or not_found(), cors_origin)
        reply = api.reply(request.method, request.path, request.query_string) or not_found()
        return _response(reply, cors_origin)

    async def events(request: web.Request) -> web.StreamResponse:
        state = state_of(request)
        api, refusal, cors_origin = _guarded(request, state)
        if refusal is not None or api is None:
            return _response(refusal or not_found(), cors_origin)
        recorder = api.recorder
        if recorder.streams >= MAX_STREAMS:
            return _response(too_many_streams(), cors_origin)
        response = web.StreamResponse(status=200)
        for name, value in (*STREAM_HEADERS, *SECURITY_HEADERS):
            response.headers[name] = value
        if cors_origin is not None:
            for name, value in cors_headers(cors_origin):
                response.headers[name] = value
        if request.method == "HEAD":
            return response
        await response.prepare(request)
        after = resume_point(request.headers.get("Last-Event-ID"), request.query.get("since"), recorder.seq)

        def ended() -> bool:
            return state.draining or state.runtime.inspector is not api

        recorder.streams += 1
        try:
            await stream_events(
                api,
                _WebSink(request, response),
                ended,
                after=after,
                stall_limit=api.config.timeouts.client_write,
            )
        except (ConnectionError, TimeoutError):
            pass  # the client went away or stopped reading: nothing to tell it
        finally:
            recorder.streams -= 1
        with contextlib.suppress(ConnectionError, RuntimeError):
            await response.write_eof()
        return response

    for path in (*PAGE_FILES, REQUESTS_PATH, f"{REQUESTS_PATH}/{{seq}}", ROUTES_PATH, STATS_PATH):
        app.router.add_get(path, answer)
    app.router.add_get(EVENTS_PATH, events)
    app.router.add_get(API_PREFIX + "{tail:.*}", answer)  # unknown API paths: the inspector's own 404
