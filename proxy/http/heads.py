"""Message heads as the wire has them (bytes), and the proxy's own small answers.

Header names and values stay bytes from the parser to the upstream and back: the forwarding core copies
them, it does not build dictionaries. Lookups (a handful per request, by the filters) scan the short list.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Iterator
from http import HTTPStatus
from typing import Any, Final

Header = tuple[bytes, bytes, bytes]  # (lower-case name, name as sent, value)

#: RFC 9110 §7.6.1 and the Proxy-* family: never forwarded in either direction.
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)


def _status_lines() -> dict[int, bytes]:
    lines = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}
    lines[499] = b"HTTP/1.1 499 Client Closed Request\r\n"
    return lines


STATUS_LINES: Final = _status_lines()


#: the standard reason phrase of each status, to tell whether an upstream's own is the standard one
_PHRASES: Final = {s.value: s.phrase.encode() for s in HTTPStatus}


def status_line(status: int, reason: bytes | None = None) -> bytes:
    """``HTTP/1.1 <status> <reason>\\r\\n`` from a precomputed table; the upstream's own reason when given (and
    not the standard one: most are, and a table lookup is cheaper than formatting the line)."""
    if reason and _PHRASES.get(status) != reason:
        return b"HTTP/1.1 %d %s\r\n" % (status, reason)
    line = STATUS_LINES.get(status)
    return line if line is not None else b"HTTP/1.1 %d Unknown\r\n" % status


PLAIN_CONNECTION: Final = frozenset({b"keep-alive", b"close"})  # hop-by-hop already: nothing more to drop


def connection_listed(headers: Iterable[Header]) -> frozenset[bytes]:
    """Header names a ``Connection`` header lists (they are hop-by-hop for this message only)."""
    listed: set[bytes] = set()
    for lname, _, value in headers:
        if lname == b"connection":
            if value.lower() in PLAIN_CONNECTION:
                continue
            listed.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(listed)


class HeaderNames:
    """Lower-case header names, remembered. Compiled (mypyc), ``bytes.lower`` is a generic method call and a new
    object per header; a dictionary lookup is neither, and the remembered name's hash stays cached for the set and
    dictionary lookups that follow. Bounded: the names come from the peer."""

    LIMIT: Final = 512

    def __init__(self) -> None:
        self._known: dict[bytes, bytes] = {}

    def lower(self, name: bytes) -> bytes:
        known = self._known.get(name)
        if known is None:
            known = name.lower()
            if len(self._known) < HeaderNames.LIMIT:
                self._known[name] = known
        return known


@functools.lru_cache(maxsize=256)
def _key(name: str) -> bytes:
    return name.lower().encode("latin-1")


class HeaderView:
    """Case-insensitive, read-only access to a header list, for the few lookups the filters make."""

    __slots__ = ("_headers",)

    def __init__(self, headers: list[Header]) -> None:
        self._headers = headers

    def get(self, name: str, default: str | None = None) -> str | None:
        key = _key(name)
        for lname, _, value in self._headers:
            if lname == key:
                return value.decode("latin-1")
        return default

    def getall(self, name: str, default: list[str] | None = None) -> list[str]:
        key = _key(name)
        found = [value.decode("latin-1") for lname, _, value in self._headers if lname == key]
        return found if found or default is None else default

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        key = _key(name)
        return any(lname == key for lname, _, _ in self._headers)

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def items(self) -> Iterator[tuple[str, str]]:
        for _, name, value in self._headers:
            yield name.decode("latin-1"), value.decode("latin-1")


class RequestHead:
    """One client request's head: method, target byte-exact (latin-1 text), version, headers."""

    __slots__ = (
        "chunked",
        "connection",
        "content_length",
        "expect_continue",
        "headers",
        "keep_alive",
        "method",
        "target",
        "version",
    )

    def __init__(self) -> None:
        self.method = ""
        self.target = ""
        self.version = "1.1"
        self.headers: list[Header] = []
        self.keep_alive = True
        self.content_length: int | None = None
        self.chunked = False
        self.expect_continue = False
        self.connection = False  # a Connection header came (it may name more hop-by-hop headers)

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def view(self) -> HeaderView:
        return HeaderView(self.headers)

    def header(self, lname: bytes) -> bytes | None:
        """The first value of a header, by its lower-case name."""
        for name, _, value in self.headers:
            if name == lname:
                return value
        return None


class ResponseHead:
    """An upstream answer's head as parsed: status, reason and headers (bytes)."""

    __slots__ = ("content_length", "headers", "keep_alive", "lists_headers", "reason", "status")

    def __init__(
        self, status: int, reason: bytes, headers: list[Header], keep_alive: bool, content_length: int | None = None
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.keep_alive = keep_alive
        self.content_length = content_length  # the parser saw it go by: no second pass over the headers
        #: a ``Connection`` header names more than keep-alive/close (the parser saw it): ``connection_listed``
        self.lists_headers = True

    def header(self, lname: bytes) -> bytes | None:
        for name, _, value in self.headers:
            if name == lname:
                return value
        return None

    @property
    def view(self) -> HeaderView:
        return HeaderView(self.headers)


class Reply:
    """An answer the proxy gives itself (refusals, errors, admin endpoints): small, sized, sent in one write."""

    __slots__ = ("body", "close", "headers", "status")

    def __init__(
        self, status: int, body: bytes = b"", headers: list[tuple[str, str]] | None = None, *, close: bool = False
    ) -> None:
        self.status = status
        self.body = body
        self.headers = headers or []
        self.close = close

    def header(self, name: str) -> str | None:
        lowered = name.lower()
        for key, value in self.headers:
            if key.lower() == lowered:
                return value
        return None


def json_reply(
    status: int, body: dict[str, Any], headers: dict[str, str] | None = None, *, close: bool = False
) -> Reply:
    """A JSON answer (``{"error": code, "detail": how to fix}`` for every refusal and failure)."""
    data = json.dumps(body).encode()
    listed = [("Content-Type", "application/json; charset=utf-8")]
    if headers:
        listed.extend(headers.items())
    return Reply(status, data, listed, close=close)
