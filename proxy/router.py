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
    prefix: str  # starts and ends with "/", holds no "?" (``config.normalize_prefix``)
    base_path: str  # the upstream's base path, ending in "/"
    origin: Origin

    @property
    def root(self) -> str:
        """The prefix without its final slash ("/api/v1" for "/api/v1/"): that path is the route's root too."""
        return self.prefix[:-1] if self.prefix != "/" else ""

    @property
    def verbatim(self) -> bool:
        """The upstream's base path is the prefix itself: the target goes up exactly as it came."""
        return self.base_path == self.prefix


class Router:
    def __init__(self, routes: tuple[Route, ...]) -> None:
        ordered = sorted(routes, key=lambda r: len(r.prefix), reverse=True)
        entries = [_Entry(r, r.prefix, _base_path(r.upstream), Origin.from_url(r.upstream)) for r in ordered]
        self._entries = entries
        # per entry, in the order tried: what ``match`` needs, unpacked once
        self._table = [(e.prefix, e.root, e.verbatim, e.base_path, e.route, e.origin) for e in entries]

    @property
    def prefixes(self) -> list[str]:
        return sorted(e.prefix for e in self._entries)

    def match(self, raw_target: str) -> Match | None:
        """``raw_target`` is the request target as received (path + optional query). Longest prefix first; a
        prefix holds no "?", so a target that starts with it has a path that does."""
        for prefix, root, verbatim, base_path, route, origin in self._table:
            if raw_target.startswith(prefix):
                if verbatim:
                    return route, origin, raw_target  # the common case: nothing to cut or join
                return route, origin, base_path + raw_target[len(prefix) :]
            if root and raw_target.startswith(root):
                rest = raw_target[len(root) :]
                if not rest or rest[0] == "?":  # "/api/v1" or "/api/v1?x": the base path, with the query
                    return route, origin, base_path + rest
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
