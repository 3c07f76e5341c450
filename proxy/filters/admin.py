"""The admin endpoints (``/-/healthz``, ``/-/readyz``, ``/-/metrics``) on the main port, as a filter.

The same answers serve ``--admin-listen`` (an aiohttp app in ``proxy.server``), so both ports tell the same.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from proxy.exchange import Exchange
from proxy.filters.base import Filter
from proxy.guard import ADMIN_PREFIX
from proxy.http.heads import Reply, json_reply

if TYPE_CHECKING:
    from proxy.app import ProxyState

ADMIN_PATHS = ("/-/healthz", "/-/readyz", "/-/metrics")


def admin_reply(path: str, state: ProxyState) -> Reply | None:
    """The answer for an admin path, or None when ``path`` is none of them."""
    if path == "/-/healthz":
        return json_reply(200, {"status": "ok"})
    if path == "/-/readyz":
        return readiness(state)
    if path == "/-/metrics":
        body, content_type = state.metrics.render()
        return Reply(200, body, [("Content-Type", content_type)])
    return None


def readiness(state: ProxyState) -> Reply:
    if state.draining:
        return json_reply(503, {"status": "draining", "detail": "shutting down"})
    not_ready: dict[str, str] = {}
    for name, manager in state.runtime.managers.items():
        if manager.current is None:
            error = manager.last_error
            not_ready[name] = error.detail if error else "no token yet (first fetch in progress)"
    if not_ready:
        return json_reply(503, {"status": "not_ready", "routes": not_ready})
    return json_reply(200, {"status": "ready", "routes": sorted(state.runtime.managers)})


def not_found() -> Reply:
    return json_reply(404, {"error": "not_found", "detail": "admin endpoints: " + ", ".join(ADMIN_PATHS)})


class AdminFilter(Filter):
    """Answers ``/-/…`` itself; with ``serve=False`` (``--admin-listen`` set) only says where they are not."""

    name = "admin"

    def __init__(self, state: Callable[[], ProxyState], *, serve: bool) -> None:
        self._state = state
        self._serve = serve

    def request(self, ex: Exchange) -> Reply | None:
        target = ex.head.target
        if not target.startswith(ADMIN_PREFIX):
            return None
        if self._serve and ex.head.method in ("GET", "HEAD"):
            reply = admin_reply(target.partition("?")[0], self._state())
            if reply is not None:
                return reply
        return not_found()
