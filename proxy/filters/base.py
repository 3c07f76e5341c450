"""The filter chain: what the proxy does to a request and its answer, one small stage per job.

Envoy's HTTP filter chain is the model: each filter sees the request on the way up and the answer on the way
down, and may answer itself (a refusal), add headers, ask for the request to be sent again (a 401 with a
stale token, a CSRF ``Required``), or transform the answer's body. The forwarding core
(``proxy.pipeline``) runs the hooks in order and knows nothing of guards, tokens or OData.

A filter overrides only the hooks it needs; :class:`Chain` keeps, per hook, the filters that override it, so
a hook nobody implements costs nothing on the request path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar, Final, Protocol

from mypy_extensions import mypyc_attr

from proxy.exchange import Exchange
from proxy.http.heads import Reply, ResponseHead


class BodyTransform(Protocol):
    """Streamed edits of an answer's body (link rewriting)."""

    def feed(self, chunk: bytes) -> bytes: ...
    def flush(self) -> bytes: ...
    def whole(self, body: bytes) -> bytes: ...


HeaderRewrite = Callable[[Exchange, bytes], bytes]


class Pending:
    """What ``Filter.request`` returns when it needs its ``prepare`` awaited (the rare, asynchronous case)."""

    __slots__ = ()


PENDING: Final = Pending()


@mypyc_attr(allow_interpreted_subclasses=True)  # compiled (proxy/compiled.py), yet open to filters of your own
class Filter:
    """Base class: every hook does nothing. Override the ones the filter needs."""

    name: ClassVar[str] = "filter"
    #: client request headers this filter always replaces with its own: never forwarded as the client sent them
    #: (per request, ``Exchange.dont_forward``)
    replaces: ClassVar[frozenset[bytes]] = frozenset()
    #: the answer statuses ``on_answer`` acts on; the core calls it for no other
    answer_statuses: ClassVar[frozenset[int]] = frozenset()

    def request(self, ex: Exchange) -> Reply | Pending | None:
        """The request head arrived: answer it here (a Reply), let it go on (None), or ask for ``prepare``
        to be awaited before the request goes upstream (``PENDING``: a token must be fetched first)."""
        return None

    async def prepare(self, ex: Exchange) -> Reply | None:
        """Asynchronous work this filter asked for with ``PENDING``; may answer instead."""
        return None

    def request_body(self, ex: Exchange, data: bytes) -> bytes:
        """Edit a buffered (small, whole) request body before it goes upstream."""
        return data

    def upstream_headers(self, ex: Exchange, out: list[bytes]) -> None:
        """Add header lines (``b"Name: value\\r\\n"``) to each upstream attempt (a replay asks again)."""

    async def on_answer(self, ex: Exchange, head: ResponseHead) -> bool | Reply:
        """The upstream's answer head: True sends the request again (once per filter), a Reply replaces it."""
        return False

    def response_headers(self, ex: Exchange, out: list[bytes], answer: ResponseHead | None = None) -> None:
        """Add header lines to the client's answer: the upstream's (``answer``) or the proxy's own (None)."""

    def header_rewrites(self) -> dict[bytes, HeaderRewrite]:
        """Answer headers (lower-case name) whose value this filter rewrites on the way to the client."""
        return {}

    def body_transform(self, ex: Exchange, head: ResponseHead, *, whole: bool = False) -> BodyTransform | None:
        """A transform for this answer's body, or None to pass it through untouched. ``whole``: only its
        ``whole`` method will be called (the body is all here), so a stateless, shared one will do."""
        return None

    def finished(self, ex: Exchange) -> None:
        """The exchange is over (answered, failed or cut): observe it."""


def _overrides(flt: Filter, hook: str) -> bool:
    return getattr(type(flt), hook) is not getattr(Filter, hook)


class Chain:
    """The filters in order, and per hook the ones that implement it."""

    def __init__(self, filters: Sequence[Filter]) -> None:
        self.filters = tuple(filters)
        self.replaces = frozenset().union(*(f.replaces for f in self.filters))

        def pick(hook: str) -> tuple[Filter, ...]:
            return tuple(f for f in self.filters if _overrides(f, hook))

        self.on_request = pick("request")
        self.on_request_body = pick("request_body")
        self.on_upstream_headers = pick("upstream_headers")
        self.on_answer = pick("on_answer")
        self.answer_statuses = frozenset().union(*(f.answer_statuses for f in self.on_answer))
        self.on_response_headers = pick("response_headers")
        self.on_body = pick("body_transform")
        self.on_finished = tuple(reversed(pick("finished")))  # the innermost filter first, like a stack unwinding
        rewrites: dict[bytes, HeaderRewrite] = {}
        for flt in self.filters:
            rewrites.update(flt.header_rewrites())
        self.header_rewrites = rewrites
