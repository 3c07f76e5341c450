"""SAP's CSRF token dance done for the client: writes carry a cached ``X-CSRF-Token`` and its session cookies;
a ``403`` with ``X-CSRF-Token: Required`` fetches a fresh pair once (for all writes waiting together) and
sends the write again. A client that manages its own CSRF token is left alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final

import aiohttp

from proxy.exchange import Exchange
from proxy.filters.base import Filter
from proxy.http.heads import Reply, ResponseHead, json_reply
from proxy.odata import (
    CSRF_HEADER,
    CsrfStore,
    client_manages_csrf,
    csrf_fetch_url,
    csrf_required,
    fetch_csrf,
    is_write,
    merge_cookie_header,
)
from proxy.tokens import Token

log = logging.getLogger("odata_auth_proxy.forward")


_READS: Final = frozenset({"GET", "HEAD", "OPTIONS"})  # most requests: known not to be writes without a call


class CsrfFilter(Filter):
    name = "csrf"
    answer_statuses = frozenset({403})

    def __init__(
        self, session: aiohttp.ClientSession, proxy_for: Callable[[str], str | None], timeout: float = 30.0
    ) -> None:
        self.store = CsrfStore()
        self._session = session
        self._proxy_for = proxy_for
        self._timeout = timeout

    def request(self, ex: Exchange) -> None:
        route = ex.route
        method = ex.head.method
        if route is None or route.csrf != "auto" or method in _READS or not is_write(method):
            return None
        if client_manages_csrf(ex.head.view):
            return None  # the client does its own CSRF dance: leave it alone
        ex.csrf_key = route.name
        return None

    def upstream_headers(self, ex: Exchange, out: list[bytes]) -> None:
        if ex.csrf_key is None or ex.token is None:
            return
        session = self.store.session(ex.csrf_key)
        cached = session.headers_for(ex.token.fingerprint)
        if cached is None:
            return
        out.append(f"{CSRF_HEADER}: {cached[CSRF_HEADER]}\r\n".encode("latin-1"))
        ex.dont_forward(b"x-csrf-token")
        client_cookie = ex.head.view.get("Cookie")
        cookie = merge_cookie_header(client_cookie, session.cookies)
        if cookie:
            ex.dont_forward(b"cookie")
            out.append(f"Cookie: {cookie}\r\n".encode("latin-1"))

    async def on_answer(self, ex: Exchange, head: ResponseHead) -> bool | Reply:
        if ex.csrf_key is None or ex.token is None or not ex.replayable:
            return False
        if not csrf_required(head.status, head.view):
            return False
        try:
            await self._refresh(ex, ex.csrf_key, ex.token)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            ex.error = "csrf_fetch_failed"
            return json_reply(
                502,
                {
                    "error": "csrf_fetch_failed",
                    "detail": f"fetching a CSRF token from the upstream failed: {exc.__class__.__name__}",
                    "route": ex.csrf_key,
                },
            )
        ex.replayed = "csrf"
        return True

    async def _refresh(self, ex: Exchange, key: str, token: Token) -> None:
        """Fetch a CSRF token + session cookies once for all writes that hit ``Required`` together."""
        assert ex.route is not None
        session = self.store.session(key)
        stale = session.token
        async with self.store.lock(key):
            if session.token is not None and session.token != stale and session.bearer_fp == token.fingerprint:
                return  # another request fetched a fresh one while we waited
            self.store.record_fetch()
            url = csrf_fetch_url(ex.route.upstream)
            csrf_token, cookies = await fetch_csrf(
                self._session, url, token.value.reveal(), self._timeout, proxy=self._proxy_for(url)
            )
            session.store(token.fingerprint, csrf_token, cookies)
            log.info(
                "route %s: fetched a CSRF token (%s) for writes",
                ex.route.name,
                "ok" if session.token else "none returned",
            )
