"""The inspector on the request path: record every exchange, and serve ``/-/`` and ``/-/api/…`` on the main port.

``InspectFilter`` takes ``AdminFilter``'s place in the chain when ``ui`` is on, so the inspector adds no hook of
its own on the way in: the admin filter's ``/-/`` check is the only test an ordinary request meets there. On the
way out, ``finished`` hands the exchange to the recorder (one tuple; the inspector's own requests under ``/-/``
are not recorded). That is all an ordinary request pays: ``bench/micro.py`` and ``bench/run --only inspector``
measure it.

Where the admin endpoints are served on the main port (no ``--admin-listen``), it answers the page, the JSON
and the event stream; everything else under ``/-/`` (``healthz``, ``readyz``, ``metrics``, ``reload``) goes to
``AdminFilter`` as before. It stands where ``AdminFilter`` stood: after the guard (Host allow-list, cross-site
refusals, the inbound API key). The event stream is written from ``prepare`` straight to the client connection;
``Pipeline.answer`` leaves a started answer alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from proxy.exchange import Exchange
from proxy.filters.admin import AdminFilter
from proxy.filters.base import PENDING, Pending
from proxy.http.heads import Reply, status_line
from proxy.http.listener import ClientConnection
from proxy.inspector.api import EVENTS_PATH, SECURITY_HEADERS, InspectorApi, method_not_allowed, too_many_streams
from proxy.inspector.events import STREAM_HEADERS, resume_point, stream_events
from proxy.inspector.recorder import MAX_STREAMS

if TYPE_CHECKING:
    from proxy.app import ProxyState


class _ConnectionSink:
    """The event stream's way out on the main port: chunks on the client connection, never past its buffer."""

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn

    @property
    def closed(self) -> bool:
        return self.conn.closed

    @property
    def backlogged(self) -> bool:
        return self.conn.write_paused

    async def write(self, data: bytes) -> None:
        self.conn.send_body(data)


class InspectFilter(AdminFilter):
    """The admin endpoints plus the inspector: records each finished exchange; with ``serve`` also answers the
    inspector's page, JSON and event stream."""

    name = "admin"  # it is the admin filter, with the inspector added

    def __init__(self, api: InspectorApi, state: Callable[[], ProxyState], *, serve: bool, stall_limit: float) -> None:
        super().__init__(state, serve=serve)
        self.api = api
        self.recorder = api.recorder  # per request: a compiled attribute, not a lookup on the (Python) api object
        self._serving = serve
        self._stall_limit = stall_limit
        self._state_of = state

    def request(self, ex: Exchange) -> Reply | Pending | None:
        if not ex.admin:
            return None
        head = ex.head
        target = head.target
        if self._serving:
            path, _, query = target.partition("?")
            if path == EVENTS_PATH:
                return PENDING if head.method in ("GET", "HEAD") else method_not_allowed(path)
            reply = self.api.reply(head.method, path, query)
            if reply is not None:
                return reply
        return super().request(ex)

    async def prepare(self, ex: Exchange) -> Reply | None:
        if self._serving and ex.head.target.partition("?")[0] == EVENTS_PATH:
            return await self._events(ex)
        return await super().prepare(ex)

    def finished(self, ex: Exchange) -> None:
        self.recorder.record(ex)

    async def _events(self, ex: Exchange) -> Reply:
        """The event stream, until the client goes, the proxy drains or reloads; then an (ignored) Reply."""
        api = self.api
        recorder = api.recorder
        if recorder.streams >= MAX_STREAMS:
            return too_many_streams()
        headers = [*STREAM_HEADERS, *SECURITY_HEADERS]
        if ex.head.method == "HEAD":
            return Reply(200, b"", headers)
        conn = ex.conn
        lines = [status_line(200)]
        lines.extend(f"{name}: {value}\r\n".encode("latin-1") for name, value in headers)
        lines.append(ex.request_id_line)
        conn.start_response(ex.head, b"".join(lines), None)
        ex.status = 200
        last_event_id = ex.head.header(b"last-event-id")
        after = resume_point(
            last_event_id.decode("latin-1") if last_event_id is not None else None,
            _query_value(ex.head.target.partition("?")[2], "since"),
            recorder.seq,
        )
        state = self._state_of

        def ended() -> bool:
            current = state()
            return conn.draining or current.draining or current.runtime.inspector is not api

        recorder.streams += 1
        try:
            await stream_events(api, _ConnectionSink(conn), ended, after=after, stall_limit=self._stall_limit)
        finally:
            recorder.streams -= 1
            conn.end_response()
        return Reply(200)


def _query_value(query: str, name: str) -> str | None:
    for part in query.split("&"):
        key, _, value = part.partition("=")
        if key == name:
            return value
    return None
