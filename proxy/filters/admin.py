"""The admin endpoints (``/-/healthz``, ``/-/readyz``, ``/-/metrics``, ``POST /-/reload``) on the main port, as
a filter.

The same answers serve ``--admin-listen`` (an aiohttp app in ``proxy.app``), so both ports tell the same.

``POST /-/reload`` is the reload where there is no SIGHUP (Windows) or no shell next to the process: the same
reload as SIGHUP, answered with its outcome. It has passed the guard like every request (Host allow-list, no
cross-site ``Origin``/``Sec-Fetch-Site``, the inbound API key when one is configured); on top of that a caller
from another machine is refused unless an API key is configured (it changes what the proxy does, so "anyone
who can reach the port" is not enough even with ``--allow-remote``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from proxy.exchange import Exchange
from proxy.filters.base import PENDING, Filter, Pending
from proxy.guard import is_loopback
from proxy.http.heads import Reply, json_reply
from proxy.tokens import TokenError

if TYPE_CHECKING:
    from proxy.app import ProxyState

ADMIN_PATHS: Final = ("/-/healthz", "/-/readyz", "/-/metrics")
RELOAD_PATH: Final = "/-/reload"
_RELOAD_ERRORS: Final = {409: "reload_refused", 500: "reload_error", 501: "reload_unsupported"}


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


_OAUTH_CODE: Final = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
# our own error categories (``TokenError.error`` when the token server gave no OAuth error)
_OWN_ERRORS: Final = {
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
    listed = ", ".join(ADMIN_PATHS)
    return json_reply(404, {"error": "not_found", "detail": f"admin endpoints: {listed}, POST {RELOAD_PATH}"})


def reload_method_not_allowed() -> Reply:
    return json_reply(
        405,
        {"error": "method_not_allowed", "detail": f"{RELOAD_PATH} takes POST (odata-auth-proxy reload sends it)"},
        {"Allow": "POST"},
    )


def reload_refusal(peer: str, state: ProxyState) -> Reply | None:
    """None when ``peer`` may reload: this machine, or anyone who passed the configured inbound API key."""
    if is_loopback(peer) or state.runtime.config.inbound_api_key is not None:
        return None
    return json_reply(
        403,
        {
            "error": "reload_not_allowed",
            "detail": f"{RELOAD_PATH} is accepted from this machine only (loopback) unless an inbound API key is "
            "configured; run 'odata-auth-proxy reload' on the machine the proxy runs on, or configure "
            "inbound_api_key and send it",
        },
    )


async def reload_reply(state: ProxyState) -> Reply:
    """Run the reload (the same as SIGHUP's) and answer with its outcome in words."""
    if state.reloader is None:
        result_status, detail = 501, "this process cannot reload (it was not started from a configuration)"
    else:
        result = await state.reloader()
        result_status, detail = result.status, result.detail
    if result_status == 200:
        return json_reply(200, {"status": "reloaded", "detail": detail})
    error = _RELOAD_ERRORS.get(result_status, "reload_error")
    return json_reply(result_status, {"status": "not_reloaded", "error": error, "detail": detail})


class AdminFilter(Filter):
    """Answers ``/-/…`` itself; with ``serve=False`` (``--admin-listen`` set) only says where they are not."""

    name = "admin"

    def __init__(self, state: Callable[[], ProxyState], *, serve: bool) -> None:
        self._state = state
        self._serve = serve

    def request(self, ex: Exchange) -> Reply | Pending | None:
        if not ex.admin:
            return None
        target = ex.head.target
        path = target.partition("?")[0]
        if self._serve and path == RELOAD_PATH:
            if ex.head.method != "POST":
                return reload_method_not_allowed()
            return reload_refusal(ex.conn.peer, self._state()) or PENDING  # the reload itself: in prepare
        if self._serve and ex.head.method in ("GET", "HEAD"):
            reply = admin_reply(path, self._state())
            if reply is not None:
                return reply
        return not_found()

    async def prepare(self, ex: Exchange) -> Reply | None:
        return await reload_reply(self._state())
