"""The admin endpoints (``/-/healthz``, ``/-/readyz``, ``/-/metrics``) on the main port, as a filter.

The same answers serve ``--admin-listen`` (an aiohttp app in ``proxy.server``), so both ports tell the same.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from proxy.exchange import Exchange
from proxy.filters.base import Filter
from proxy.guard import ADMIN_PREFIX
from proxy.http.heads import Reply, json_reply
from proxy.tokens import TokenError

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


_OAUTH_CODE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
# our own error categories (``TokenError.error`` when the token server gave no OAuth error)
_OWN_ERRORS = {
    "unreachable": "token server unreachable",
    "timeout": "token server did not answer in time",
    "tls_error": "TLS handshake with the token server failed",
    "proxy_error": "the outbound proxy refused the tunnel to the token server",
    "bad_response": "token server answered without a token",
    "internal_error": "token fetch failed (internal error)",
    "broker_unreachable": "token broker (supervisor process) unreachable",
    "broker_error": "token broker (supervisor process) answered with an error",
    "unknown_route": "token broker does not know this route",
}


def not_ready_reason(error: TokenError | None) -> str:
    """Why a route has no token, for ``/-/readyz``, which answers without an API key: the error code and
    our own words only, never the token server's ``error_description`` or a remote reason string (those
    are in the log and in the 502/503/504 body of a request, redacted)."""
    if error is None:
        return "no token yet (first fetch in progress)"
    code = error.error if _OAUTH_CODE.fullmatch(error.error) else "(unrecognised error code)"
    if error.http_status is not None and code != "bad_response":
        return f"token server refused: {code}"  # the token server's OAuth error code
    reason = _OWN_ERRORS.get(code, f"token unavailable: {code}")
    if code == "bad_response" and error.http_status is not None:
        reason += f" (HTTP {error.http_status})"
    return reason


def readiness(state: ProxyState) -> Reply:
    if state.draining:
        return json_reply(503, {"status": "draining", "detail": "shutting down"})
    not_ready: dict[str, str] = {}
    for name, manager in state.runtime.managers.items():
        if manager.current is None:
            not_ready[name] = not_ready_reason(manager.last_error)
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
