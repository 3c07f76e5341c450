"""OData link rewriting as a filter: absolute upstream URLs in JSON/XML answers point at the proxy instead
(streamed, gzip/deflate inflated and deflated again), proxy URLs in small request bodies point back upstream,
and ``Accept-Encoding`` is narrowed to what the rewriter can open. The rewriting itself is ``proxy.odata``."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Final

from proxy.config import Route
from proxy.exchange import Exchange
from proxy.filters.base import BodyTransform, Filter
from proxy.http.heads import ResponseHead
from proxy.odata import MultiRewriter, RewritePlan, link_rewrite_pairs, reverse_rewrite, should_rewrite

_REWRITABLE_ENCODINGS: Final = frozenset({"gzip", "x-gzip", "deflate", "identity"})
_PLAN_CACHE_LIMIT: Final = 256  # bounded: proxy bases come from the (allow-listed) Host header
# replacement pairs, their compiled plan, and a rewriter for whole bodies (``rewrite`` keeps no state between
# calls, so one per plan serves every whole body)
_Plan = tuple[list[tuple[bytes, bytes]], RewritePlan, MultiRewriter]


@dataclass
class LinkTransform:
    """Link rewriting, inside an inflate → rewrite → deflate sandwich for gzip/deflate bodies, so that the
    client still receives the encoding it was promised."""

    rewriter: MultiRewriter
    decompress: zlib._Decompress | None = None
    compress: zlib._Compress | None = None

    def feed(self, chunk: bytes) -> bytes:
        if self.decompress is None or self.compress is None:
            return self.rewriter.feed(chunk)
        data = self.rewriter.feed(self.decompress.decompress(chunk))
        # sync-flush per chunk: the client gets each piece without waiting for the compressor's window
        return self.compress.compress(data) + self.compress.flush(zlib.Z_SYNC_FLUSH) if data else b""

    def whole(self, body: bytes) -> bytes:
        """A whole (small) body at once."""
        if self.decompress is None or self.compress is None:
            return self.rewriter.whole(body)
        return self.feed(body) + self.flush()

    def flush(self) -> bytes:
        if self.decompress is None or self.compress is None:
            return self.rewriter.flush()
        data = self.rewriter.feed(self.decompress.flush()) + self.rewriter.flush()
        return self.compress.compress(data) + self.compress.flush(zlib.Z_FINISH)


def narrowed_accept_encoding(value: str) -> str | None:
    """``Accept-Encoding`` with only what the link rewriter can open (Postman sends ``br``); None: drop it."""
    kept = [item.strip() for item in value.split(",") if item.split(";")[0].strip().lower() in _REWRITABLE_ENCODINGS]
    return ", ".join(kept) if kept else None


class LinksFilter(Filter):
    name = "links"

    def __init__(self) -> None:
        self._plans: dict[tuple[str, str], _Plan] = {}
        self._by_host: dict[tuple[str, bytes], _Plan] = {}
        self._types: dict[bytes, bool] = {}

    def request(self, ex: Exchange) -> None:
        route = ex.route
        if route is None or not route.rewrite_links:
            return None
        value = ex.head.header(b"accept-encoding")
        if value is not None:
            narrowed = narrowed_accept_encoding(value.decode("latin-1"))
            ex.dont_forward(b"accept-encoding")
            if narrowed:
                ex.extra += (f"Accept-Encoding: {narrowed}\r\n".encode("latin-1"),)
        return None

    def request_body(self, ex: Exchange, data: bytes) -> bytes:
        route = ex.route
        if route is None or not route.rewrite_links or not data:
            return data
        content_type = ex.head.header(b"content-type")
        if not should_rewrite(content_type.decode("latin-1") if content_type else None, None):
            return data
        return reverse_rewrite(data, self._plan(route, ex.proxy_base())[0])

    def body_transform(self, ex: Exchange, head: ResponseHead, *, whole: bool = False) -> BodyTransform | None:
        route = ex.route
        if route is None or not route.rewrite_links:
            return None
        content_type = encoding = None
        for lname, _, value in head.headers:
            if lname == b"content-type":
                content_type = value
            elif lname == b"content-encoding":
                encoding = value.strip().lower()
        if content_type is None or not self._rewritable(content_type):
            return None
        plan = self._plan_for(ex, route)
        if not encoding or encoding == b"identity":
            return plan[2] if whole else MultiRewriter(plan[1])  # a whole body: the shared, stateless use
        if encoding in (b"gzip", b"x-gzip"):
            return LinkTransform(MultiRewriter(plan[1]), zlib.decompressobj(wbits=31), zlib.compressobj(wbits=31))
        if encoding == b"deflate":  # HTTP "deflate" is the zlib format (RFC 9110 §8.4.1.2)
            return LinkTransform(MultiRewriter(plan[1]), zlib.decompressobj(wbits=15), zlib.compressobj(wbits=15))
        return None  # br, zstd …: passed through untouched, links stay as they are

    def _plan_for(self, ex: Exchange, route: Route) -> _Plan:
        """The route's plan for the Host the client used (looked up by the raw Host value: no string built)."""
        host = ex.head.header(b"host")
        cached = self._by_host.get((route.name, host)) if host is not None else None
        if cached is None:
            cached = self._plan(route, ex.proxy_base())
            if host is not None and len(self._by_host) < _PLAN_CACHE_LIMIT:
                self._by_host[(route.name, host)] = cached
        return cached

    def _rewritable(self, content_type: bytes) -> bool:
        """``should_rewrite`` for a Content-Type value, remembered (upstreams use a handful of values)."""
        verdict = self._types.get(content_type)
        if verdict is None:
            verdict = should_rewrite(content_type.decode("latin-1"), None)
            if len(self._types) < _PLAN_CACHE_LIMIT:
                self._types[content_type] = verdict
        return verdict

    def _plan(self, route: Route, proxy_base: str) -> _Plan:
        """Replacement pairs, their compiled plan and a shared whole-body rewriter for this route as the client
        addresses the proxy."""
        key = (route.name, proxy_base)
        cached = self._plans.get(key)
        if cached is None:
            pairs = link_rewrite_pairs(route.upstream, proxy_base + route.prefix)
            plan = RewritePlan.build(pairs)
            cached = (pairs, plan, MultiRewriter(plan))
            if len(self._plans) < _PLAN_CACHE_LIMIT:
                self._plans[key] = cached
        return cached
