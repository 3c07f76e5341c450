"""The inbound guard as a filter: refusals before anything else runs, CORS headers on every answer."""

from __future__ import annotations

from proxy.exchange import Exchange
from proxy.filters.base import Filter, HeaderRewrite
from proxy.guard import Guard, GuardedRequest, cors_headers, merge_vary
from proxy.http.heads import Reply, ResponseHead


class GuardFilter(Filter):
    name = "guard"

    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self._dropped = guard.dropped_headers

    def request(self, ex: Exchange) -> Reply | None:
        if self.guard.plainly_fine(ex.head):
            return None  # no key configured, so there are no key headers to drop either
        refusal, cors_origin = self.guard.check(GuardedRequest(ex.head, ex.conn.peer))
        if refusal is not None:
            return refusal
        ex.cors_origin = cors_origin
        ex.dont_forward(*self._dropped)
        return None

    def response_headers(self, ex: Exchange, out: list[bytes], answer: ResponseHead | None = None) -> None:
        origin = ex.cors_origin
        if origin is None:
            return
        has_vary = answer is not None and answer.header(b"vary") is not None
        for name, value in cors_headers(origin):
            if name == "Vary" and has_vary:
                continue  # merged into the upstream's own Vary (header_rewrites)
            out.append(f"{name}: {value}\r\n".encode("latin-1"))

    def header_rewrites(self) -> dict[bytes, HeaderRewrite]:
        def vary(ex: Exchange, value: bytes) -> bytes:
            if ex.cors_origin is None:
                return value
            return merge_vary(value.decode("latin-1")).encode("latin-1")

        return {b"vary": vary}
