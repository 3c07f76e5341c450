"""Map a local request path to a route and an upstream URL (longest prefix wins), and back again.

Like nginx ``proxy_pass`` with a URI: the prefix is stripped and the rest appended to the route's
upstream base path, byte for byte — OData keys such as ``('a%20b')`` and ``$filter`` expressions are
never decoded or re-encoded on the way.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from proxy.config import Route
from proxy.http.upstream import Origin

#: (route, origin: where the request goes, target: path and query on the upstream, encoded exactly as the client
#: sent them); a plain tuple: one is made per request, and a dataclass's ``__init__`` costs five times as much
Match = tuple[Route, Origin, str]


@dataclass(frozen=True)
class _Entry:
    route: Route
    prefix: str
    base_path: str  # the upstream's base path, ending in "/"
    origin: Origin


class Router:
    def __init__(self, routes: tuple[Route, ...]) -> None:
        ordered = sorted(routes, key=lambda r: len(r.prefix), reverse=True)
        self._entries = [_Entry(r, r.prefix, _base_path(r.upstream), Origin.from_url(r.upstream)) for r in ordered]

    @property
    def prefixes(self) -> list[str]:
        return sorted(e.prefix for e in self._entries)

    def match(self, raw_target: str) -> Match | None:
        """``raw_target`` is the request target as received (path + optional query)."""
        path, sep, query = raw_target.partition("?")
        for entry in self._entries:
            prefix = entry.prefix
            if path.startswith(prefix):
                rest = path[len(prefix) :]
            elif path == prefix[:-1] and prefix != "/":
                rest = ""
            else:
                continue
            target = entry.base_path + rest
            return entry.route, entry.origin, target + "?" + query if sep else target
        return None


def _base_path(upstream: str) -> str:
    path = urlsplit(upstream).path or "/"
    return path if path.endswith("/") else path + "/"


def proxy_location(value: str, route: Route, proxy_base: str) -> str:
    """Rewrite a ``Location``/``Content-Location`` that points into the route's upstream to the proxy.

    ``proxy_base`` is ``scheme://host[:port]`` as the client addressed the proxy. Anything else (another
    host, a relative reference outside the upstream base path) is returned unchanged.
    """
    upstream = route.upstream  # ends with "/"
    upstream_root = upstream[:-1]
    if value.startswith(upstream) or value == upstream_root:
        return proxy_base + route.prefix + value[len(upstream) :]
    base_path = _base_path(upstream)
    if value.startswith("/") and not value.startswith("//") and base_path != "/" and value.startswith(base_path):
        return route.prefix + value[len(base_path) :]
    if value.startswith("/") and not value.startswith("//") and base_path == "/" and route.prefix != "/":
        return route.prefix + value[1:]
    return value
