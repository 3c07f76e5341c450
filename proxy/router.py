"""Map a local request path to a route and an upstream URL (longest prefix wins), and back again.

Like nginx ``proxy_pass`` with a URI: the prefix is stripped and the rest appended to the route's
upstream base path, byte for byte — OData keys such as ``('a%20b')`` and ``$filter`` expressions are
never decoded or re-encoded on the way.
"""

from __future__ import annotations

from dataclasses import dataclass

from yarl import URL

from proxy.config import Route


@dataclass(frozen=True)
class Match:
    route: Route
    url: URL  # the upstream URL, encoded exactly as the client sent path and query


class Router:
    def __init__(self, routes: tuple[Route, ...]) -> None:
        self._routes = sorted(routes, key=lambda r: len(r.prefix), reverse=True)
        self._bases = {r.name: URL(r.upstream) for r in routes}

    @property
    def prefixes(self) -> list[str]:
        return sorted(r.prefix for r in self._routes)

    def match(self, raw_target: str) -> Match | None:
        """``raw_target`` is the request target as received (path + optional query)."""
        path, sep, query = raw_target.partition("?")
        for route in self._routes:
            prefix = route.prefix
            if path.startswith(prefix):
                rest = path[len(prefix) :]
            elif path == prefix[:-1] and prefix != "/":
                rest = ""
            else:
                continue
            return Match(route, self._upstream_url(route, rest, query if sep else ""))
        return None

    def _upstream_url(self, route: Route, rest: str, query: str) -> URL:
        base = self._bases[route.name]
        path = base.raw_path
        if not path.endswith("/"):
            path += "/"
        return URL.build(
            scheme=base.scheme,
            host=base.raw_host or "",
            port=base.explicit_port,
            path=path + rest,
            query_string=query,
            encoded=True,
        )


def proxy_location(value: str, route: Route, proxy_base: str) -> str:
    """Rewrite a ``Location``/``Content-Location`` that points into the route's upstream to the proxy.

    ``proxy_base`` is ``scheme://host[:port]`` as the client addressed the proxy. Anything else (another
    host, a relative reference outside the upstream base path) is returned unchanged.
    """
    upstream = route.upstream  # ends with "/"
    upstream_root = upstream[:-1]
    if value.startswith(upstream) or value == upstream_root:
        return proxy_base + route.prefix + value[len(upstream) :]
    base_path = URL(upstream).raw_path
    if value.startswith("/") and not value.startswith("//") and base_path != "/" and value.startswith(base_path):
        return route.prefix + value[len(base_path) :]
    if value.startswith("/") and not value.startswith("//") and base_path == "/" and route.prefix != "/":
        return route.prefix + value[1:]
    return value
