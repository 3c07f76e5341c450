"""Routing (longest prefix wins) and the ``Location`` rewrite that maps upstream URLs back onto the proxy."""

from __future__ import annotations

from proxy.exchange import Exchange
from proxy.filters.base import Filter, HeaderRewrite
from proxy.http.heads import Reply, json_reply
from proxy.router import Router, proxy_location


class RouteFilter(Filter):
    name = "route"

    def __init__(self, router: Router) -> None:
        self.router = router

    def request(self, ex: Exchange) -> Reply | None:
        if ex.admin:
            return None  # only POST /-/reload gets here: AdminFilter answers it in its prepare, unrouted
        match = self.router.match(ex.head.target)
        if match is None:
            prefixes = self.router.prefixes
            return json_reply(
                404,
                {
                    "error": "no_route",
                    "detail": "no route matches this path; configured prefixes: " + ", ".join(prefixes),
                    "prefixes": prefixes,
                },
            )
        ex.route, ex.origin, ex.upstream_target = match
        return None


class LocationFilter(Filter):
    """``Location`` / ``Content-Location`` pointing at the upstream point at the proxy instead: a client that
    follows a redirect (or an OData create's new entity) stays on the proxy and keeps its token."""

    name = "location"

    def header_rewrites(self) -> dict[bytes, HeaderRewrite]:
        def rewrite(ex: Exchange, value: bytes) -> bytes:
            if ex.route is None:
                return value
            text = value.decode("latin-1")
            return proxy_location(text, ex.route, ex.proxy_base()).encode("latin-1")

        return {b"location": rewrite, b"content-location": rewrite}
