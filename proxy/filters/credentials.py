"""Token injection (Envoy's credential injector): the bearer token of the route's manager on every upstream
request; an upstream 401 with the current token purges it and sends the request once more with a fresh one.

Where tokens come from is the token manager's business (``proxy.tokens``); this filter only asks for one.
"""

from __future__ import annotations

from collections.abc import Mapping

from proxy.exchange import Exchange
from proxy.filters.base import PENDING, Filter, Pending
from proxy.http.heads import Reply, ResponseHead, json_reply
from proxy.tokens import Token, TokenError, TokenManager


class CredentialsFilter(Filter):
    name = "credentials"
    answer_statuses = frozenset({401})

    def __init__(self, managers: Mapping[str, TokenManager]) -> None:
        self.managers = managers
        self._header: tuple[Token | None, bytes] = (None, b"")

    def request(self, ex: Exchange) -> Pending | None:
        if ex.route is None:
            return None  # POST /-/reload: answered by AdminFilter, never forwarded
        token = self.managers[ex.route.name].usable()
        if token is None:
            return PENDING  # no valid token at hand: wait for one (single flight) in prepare
        ex.token = token
        return None

    async def prepare(self, ex: Exchange) -> Reply | None:
        assert ex.route is not None
        try:
            ex.token = await self.managers[ex.route.name].get()
        except TokenError as exc:
            ex.error = exc.error
            return json_reply(exc.status, exc.as_json())
        return None

    def upstream_headers(self, ex: Exchange, out: list[bytes]) -> None:
        token = ex.token
        if token is None:
            return
        cached, line = self._header
        if cached is not token:  # one encoding per token, not per request
            line = b"Authorization: Bearer " + token.value.reveal().encode("latin-1") + b"\r\n"
            self._header = (token, line)
        out.append(line)

    async def on_answer(self, ex: Exchange, head: ResponseHead) -> bool | Reply:
        if head.status != 401 or ex.token is None or ex.route is None or not ex.replayable:
            return False
        manager = self.managers[ex.route.name]
        if not manager.invalidate(ex.token):
            return False
        ex.replayed = "401"
        try:
            ex.token = await manager.get_after_invalidation()
        except TokenError as exc:
            ex.error = exc.error
            return json_reply(exc.status, exc.as_json())
        return True
