"""OData-specific help for the forwarder: link rewriting in streamed bodies and the SAP CSRF token dance.

Why this exists: OData services put absolute upstream URLs into their bodies (V2 ``__metadata.uri``,
``__next``, ``__deferred.uri``, Atom ``<link href>`` and ``xml:base``, V4 ``@odata.context``,
``@odata.nextLink``, ``@odata.id``, ``@odata.editLink``). A client that follows them would leave the proxy
and arrive at the upstream without a token, so the links are rewritten to point at the proxy, chunk by chunk,
without ever holding a whole body (:class:`StreamRewriter`, :class:`MultiRewriter`); small request bodies get
the reverse treatment (:func:`reverse_rewrite`). And SAP services refuse writes without an ``X-CSRF-Token``
fetched beforehand together with a session cookie: :class:`CsrfSession` and :class:`CsrfStore` keep that
token and cookie per route and credential, bound to the bearer token they were fetched with, and
:func:`fetch_csrf` gets a fresh pair.

Everything here is pure state or a pure function except :func:`fetch_csrf`; the forwarder owns one
:class:`CsrfStore` per runtime, so there is no module-level mutable state.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Final, Protocol
from urllib.parse import urlsplit

import aiohttp

__all__ = [
    "CSRF_HEADER",
    "REWRITABLE_TYPES",
    "WRITE_METHODS",
    "CsrfSession",
    "CsrfStore",
    "MultiRewriter",
    "RewritePlan",
    "StreamRewriter",
    "client_manages_csrf",
    "csrf_fetch_url",
    "csrf_required",
    "fetch_csrf",
    "is_write",
    "link_rewrite_pairs",
    "merge_cookie_header",
    "parse_set_cookie",
    "reverse_rewrite",
    "should_rewrite",
]

# --------------------------------------------------------------------------- link rewriting

REWRITABLE_TYPES: Final = frozenset(
    {
        "application/json",
        "application/xml",
        "application/atom+xml",
        "application/atomsvc+xml",
        "text/xml",
    }
)
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


class StreamRewriter:
    """Replace every occurrence of `old` with `new` in a byte stream, chunk by chunk, holding back at most
    len(old)-1 bytes so a match split across chunk boundaries is still found.

    The concatenated output of all :meth:`feed` calls and the final :meth:`flush` is exactly
    ``stream.replace(old, new)``: matches are found left to right and never overlap, and replaced bytes are
    never scanned again (so a replacement that happens to form ``old`` with its neighbours stays as it is).

    Why it is exact: a match can only be missed if it does not fit into the bytes seen so far, so the only
    bytes held back are the longest tail that is a proper prefix of ``old`` (never a byte before the end of
    the last replacement); they are scanned again together with the next chunk. Bytes that cannot start a
    match go out at once.
    """

    def __init__(self, old: bytes, new: bytes) -> None:
        if not old:
            raise ValueError("StreamRewriter needs a non-empty pattern")
        self._old = old
        self._new = new
        self._held = b""

    def feed(self, chunk: bytes) -> bytes:
        """Take the next chunk; return the bytes that are final now (possibly empty)."""
        buf = self._held + chunk if self._held else chunk
        old, new = self._old, self._new
        out: list[bytes] = []
        pos = 0
        while (idx := buf.find(old, pos)) >= 0:
            out.append(buf[pos:idx])
            out.append(new)
            pos = idx + len(old)
        keep = len(buf)
        for size in range(min(len(old) - 1, len(buf) - pos), 0, -1):
            if buf.endswith(old[:size]):
                keep = len(buf) - size
                break
        out.append(buf[pos:keep])
        self._held = buf[keep:]
        return b"".join(out)

    def flush(self) -> bytes:
        """End of stream: return the held-back tail (shorter than `old`, so it holds no match)."""
        held, self._held = self._held, b""
        return held


@dataclass(frozen=True)
class RewritePlan:
    """The compiled, stateless part of a :class:`MultiRewriter`: build once per route, share across responses."""

    mapping: Mapping[bytes, bytes]
    longest: int
    prefixes: frozenset[bytes]
    regex: re.Pattern[bytes] | None
    #: a substring of every pattern (the upstream's host, in practice): a body without it has no match, and
    #: ``body.find(needle)`` is a fast memory search where the regex would try every position
    needle: bytes = b""

    @classmethod
    def build(cls, pairs: Sequence[tuple[bytes, bytes]]) -> RewritePlan:
        mapping: dict[bytes, bytes] = {}
        for old, new in pairs:
            if not old:
                raise ValueError("MultiRewriter needs non-empty patterns")
            mapping.setdefault(old, new)  # the first pair for a pattern wins
        return cls(
            mapping=mapping,
            longest=max((len(old) for old in mapping), default=0),
            prefixes=frozenset(old[:size] for old in mapping for size in range(1, len(old))),
            regex=_alternation(mapping),
            needle=_common_substring(list(mapping)),
        )


def _common_substring(patterns: Sequence[bytes]) -> bytes:
    """The longest byte string found in every pattern (built once per plan; patterns are short URLs)."""
    if not patterns:
        return b""
    shortest = min(patterns, key=len)
    for size in range(len(shortest), 0, -1):
        for start in range(len(shortest) - size + 1):
            candidate = shortest[start : start + size]
            if all(candidate in other for other in patterns):
                return candidate
    return b""


class MultiRewriter:
    """Several ``(old, new)`` replacements over one byte stream, with the :class:`StreamRewriter` API.

    All patterns are searched in one left-to-right pass (at one position the longest pattern wins) and
    replaced bytes are never scanned again. That equals applying the pairs one after the other whenever no
    replacement contains another pair's pattern — true for :func:`link_rewrite_pairs` — and stays correct
    when one does (for example a proxy URL that extends the upstream URL), where sequential replacement would
    rewrite its own output. Holds back only a tail that could still start a match, at most
    ``max(len(old)) - 1`` bytes.
    """

    def __init__(self, pairs: Sequence[tuple[bytes, bytes]] | RewritePlan) -> None:
        plan = pairs if isinstance(pairs, RewritePlan) else RewritePlan.build(pairs)
        self._map = plan.mapping
        self._longest = plan.longest
        self._prefixes = plan.prefixes
        self._regex = plan.regex
        self._needle = plan.needle
        self._held = b""

    def feed(self, chunk: bytes) -> bytes:
        """Take the next chunk; return the bytes that are final now (possibly empty)."""
        if self._regex is None:
            return chunk
        return self._process(self._held + chunk if self._held else chunk, final=False)

    def flush(self) -> bytes:
        """End of stream: the held-back tail, with any replacement that still fits into it."""
        if not self._held:
            return b""
        held, self._held = self._held, b""
        return self._process(held, final=True)

    def whole(self, body: bytes) -> bytes:
        """A whole body at once (same result as ``feed(body) + flush()``, without the tail bookkeeping)."""
        regex = self._regex
        data = self._held + body if self._held else body
        self._held = b""
        # (``find``, not ``in``: ``bytes.__contains__`` first tries its argument as an integer and raises and
        # clears a TypeError for a bytes one, each time)
        if regex is None or data.find(self._needle) < 0 or regex.search(data) is None:
            return data  # the common case: nothing to replace, nothing copied
        return self._process(data, final=True)

    def _process(self, buf: bytes, *, final: bool) -> bytes:
        regex = self._regex
        assert regex is not None
        # From `undecided` on, the bytes are a proper prefix of some pattern: a match starting there (or a longer
        # one than what matches there now) depends on the next chunk. Every earlier position is decided.
        undecided = len(buf)
        if not final:
            for size in range(min(self._longest - 1, len(buf)), 0, -1):
                if buf[-size:] in self._prefixes:
                    undecided = len(buf) - size
                    break
        out: list[bytes] = []
        pos = 0
        while (m := regex.search(buf, pos)) is not None and m.start() < undecided:
            out.append(buf[pos : m.start()])
            out.append(self._map[m.group()])
            pos = m.end()
        keep = max(pos, undecided)
        out.append(buf[pos:keep])
        self._held = buf[keep:]
        return b"".join(out)


def _alternation(mapping: Mapping[bytes, bytes]) -> re.Pattern[bytes] | None:
    if not mapping:
        return None
    ordered = sorted(mapping, key=len, reverse=True)  # leftmost, then longest
    return re.compile(b"|".join(re.escape(old) for old in ordered))


def _ensure_slash(url: str) -> str:
    return url if url.endswith("/") else url + "/"


def _normalise_proxy_base(proxy_base: str) -> str:
    """``http://host:port/`` + ``"/a/"`` gives ``http://host:port//a/``: collapse the doubled slash."""
    parts = urlsplit(proxy_base)
    if parts.scheme and parts.netloc and parts.path.startswith("//"):
        path = "/" + parts.path.lstrip("/")
        return f"{parts.scheme}://{parts.netloc}{path}"
    return proxy_base


def _port_variant(url: str) -> str | None:
    """The same URL with the scheme's default port spelled out, or dropped when it is spelled out."""
    parts = urlsplit(url)
    default = _DEFAULT_PORTS.get(parts.scheme.lower())
    if default is None or not parts.netloc or "@" in parts.netloc:
        return None
    try:
        port = parts.port
    except ValueError:
        return None
    prefix = f"{parts.scheme}://"
    rest = url[len(prefix) + len(parts.netloc) :]
    if port is None:
        return f"{prefix}{parts.netloc}:{default}{rest}"
    suffix = f":{default}"
    if port == default and parts.netloc.endswith(suffix):
        return f"{prefix}{parts.netloc[: -len(suffix)]}{rest}"
    return None


def _json_escaped(url: str) -> str:
    return url.replace("/", "\\/")


def link_rewrite_pairs(upstream_base: str, proxy_base: str) -> list[tuple[bytes, bytes]]:
    """The ``(upstream, proxy)`` byte pairs that turn absolute upstream URLs in a body into proxy URLs.

    ``upstream_base`` is the route's upstream (``https://tenant/``, ``https://host/api/v1/``), ``proxy_base``
    the proxy URL that maps onto it (``http://127.0.0.1:8080/`` + route prefix). Both should end in ``/``
    (added when missing), which keeps ``https://tenant/`` from matching inside ``https://tenant.other/``.
    Returned, first the canonical pair: the plain form, the JSON form with escaped slashes
    (``https:\\/\\/tenant\\/``), and the same two with the default port spelled out (``https://tenant:443/``)
    — or left out, when the configured upstream spells it out. Pairs whose two sides are equal are dropped.
    """
    upstream = _ensure_slash(upstream_base)
    proxy = _ensure_slash(_normalise_proxy_base(proxy_base))
    forms = [upstream]
    if (variant := _port_variant(upstream)) is not None:
        forms.append(variant)
    pairs: list[tuple[bytes, bytes]] = []
    for form in forms:
        for old, new in ((form, proxy), (_json_escaped(form), _json_escaped(proxy))):
            pair = (old.encode(), new.encode())
            if pair[0] != pair[1] and pair not in pairs:
                pairs.append(pair)
    return pairs


def should_rewrite(content_type: str | None, content_encoding: str | None) -> bool:
    """Is this a JSON or XML body (parameters such as ``charset`` ignored) sent without content coding?

    Compressed bodies (gzip, br, deflate, ...) are never touched: the proxy does not decompress.
    """
    if content_encoding is not None and content_encoding.strip().lower() not in ("", "identity"):
        return False
    if not content_type:
        return False
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type in REWRITABLE_TYPES


def reverse_rewrite(body: bytes, pairs: Sequence[tuple[bytes, bytes]]) -> bytes:
    """Swap proxy URLs in a (small, buffered) request body back to upstream URLs.

    ``pairs`` are the ``(upstream, proxy)`` pairs from :func:`link_rewrite_pairs`; where several share one
    proxy form, the first (canonical) upstream form is used. One pass, so nothing is rewritten twice.
    """
    mapping: dict[bytes, bytes] = {}
    for old, new in pairs:
        if new:
            mapping.setdefault(new, old)
    regex = _alternation(mapping)
    if regex is None:
        return body
    return regex.sub(lambda m: mapping[m.group()], body)


# --------------------------------------------------------------------------- CSRF

WRITE_METHODS: Final = frozenset({"POST", "PUT", "PATCH", "MERGE", "DELETE"})
CSRF_HEADER: Final = "X-CSRF-Token"


def is_write(method: str) -> bool:
    """A method that SAP guards with a CSRF token."""
    return method.upper() in WRITE_METHODS


class HeaderLookup(Protocol):
    """Anything with case-(in)sensitive ``get`` and ``items``: a dict, a multidict, the proxy's header view."""

    def get(self, name: str, /) -> str | None: ...
    def items(self) -> Iterable[tuple[str, str]]: ...


def _header(headers: HeaderLookup, name: str) -> str | None:
    """Case-insensitive lookup that works for plain dicts as well as multidicts."""
    value = headers.get(name)
    if value is not None:
        return value
    lowered = name.lower()
    for key, val in headers.items():
        if key.lower() == lowered:
            return val
    return None


def client_manages_csrf(headers: HeaderLookup) -> bool:
    """The client sent its own ``X-CSRF-Token`` (anything but ``Fetch`` or empty): leave CSRF to it."""
    value = _header(headers, CSRF_HEADER)
    if value is None:
        return False
    value = value.strip()
    return bool(value) and value.lower() != "fetch"


def csrf_required(status: int, headers: HeaderLookup) -> bool:
    """The upstream refused a write for want of a CSRF token: 403 with ``X-CSRF-Token: Required``."""
    if status != 403:
        return False
    value = _header(headers, CSRF_HEADER)
    return value is not None and value.strip().lower() == "required"


def _cookie_expired(attributes: str) -> bool:
    """RFC 6265 §5.2.2/§5.3: ``Max-Age`` <= 0 (wins over ``Expires``) or an ``Expires`` in the past."""
    max_age: str | None = None
    expires: str | None = None
    for attribute in attributes.split(";"):
        name, _, value = attribute.partition("=")
        name = name.strip().lower()
        if name == "max-age":
            max_age = value.strip()
        elif name == "expires":
            expires = value.strip()
    if max_age is not None and re.fullmatch(r"-?[0-9]+", max_age):
        return int(max_age) <= 0
    if expires:
        try:
            when = parsedate_to_datetime(expires)
        except (TypeError, ValueError, IndexError):
            return False
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return when <= datetime.now(UTC)
    return False


def parse_set_cookie(set_cookie_headers: Iterable[str]) -> tuple[dict[str, str], set[str]]:
    """``name=value`` of each ``Set-Cookie`` header (RFC 6265 §5.2), attributes dropped.

    Returns (live cookies, names of cookies the server expired). Deliberately not ``SimpleCookie``: that
    silently drops a header at the first character it dislikes, while SAP cookie values must be sent back
    byte for byte. One header value per cookie (as ``headers.getall("Set-Cookie")`` gives them); commas are
    not split on, since ``Expires`` contains one.
    """
    live: dict[str, str] = {}
    expired: set[str] = set()
    for header in set_cookie_headers:
        pair, _, attributes = header.partition(";")
        name, sep, value = pair.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name:
            continue
        if _cookie_expired(attributes):
            live.pop(name, None)
            expired.add(name)
        else:
            live[name] = value
            expired.discard(name)
    return live, expired


def _cookie_string(cookies: Mapping[str, str]) -> str:
    return "; ".join(f"{name}={value}" for name, value in cookies.items())


@dataclass
class CsrfSession:
    """The cached CSRF token + cookies for one route+credential, bound to the bearer token fingerprint it was
    fetched with.

    SAP ties the CSRF token to the user session behind the session cookies, and the session to the user the
    bearer token stands for: a new bearer token means a new session, so the cache is dropped then.
    """

    token: str | None = None
    cookies: dict[str, str] = field(default_factory=dict)
    bearer_fp: str | None = None

    def headers_for(self, bearer_fp: str) -> dict[str, str] | None:
        """``{"X-CSRF-Token": ..., "Cookie": "a=b; c=d"}`` when a token is cached for this bearer, else None.

        ``Cookie`` is left out when the session has no cookies; merge it with the client's own cookies
        through :func:`merge_cookie_header`. A cache made with another bearer token is cleared.
        """
        if self.bearer_fp is not None and self.bearer_fp != bearer_fp:
            self.clear()
            return None
        if self.token is None:
            return None
        headers = {CSRF_HEADER: self.token}
        if self.cookies:
            headers["Cookie"] = _cookie_string(self.cookies)
        return headers

    def store(self, bearer_fp: str, csrf_token: str | None, set_cookie_headers: Iterable[str]) -> None:
        """Keep the result of a fetch, replacing what was cached (a fetch without cookies opens a new session).

        ``csrf_token`` values that are not tokens (empty, ``Required``, ``Fetch``) are stored as None.
        """
        token = csrf_token.strip() if csrf_token is not None else None
        if not token or token.lower() in ("required", "fetch"):
            token = None
        self.token = token
        self.cookies, _ = parse_set_cookie(set_cookie_headers)
        self.bearer_fp = bearer_fp

    def update_cookies(self, set_cookie_headers: Iterable[str]) -> None:
        """Apply ``Set-Cookie`` headers of a later response (a renewed or ended session) to the cached ones."""
        live, expired = parse_set_cookie(set_cookie_headers)
        for name in expired:
            self.cookies.pop(name, None)
        self.cookies.update(live)

    def clear(self) -> None:
        self.token = None
        self.cookies = {}
        self.bearer_fp = None


def merge_cookie_header(client_cookie: str | None, session_cookies: Mapping[str, str]) -> str:
    """The client's ``Cookie`` header plus the session cookies; on a name clash the session cookie wins.

    The client's cookies keep their order and spelling; the session's follow. Empty string when both are empty.
    """
    parts: list[str] = []
    if client_cookie:
        for item in client_cookie.split(";"):
            item = item.strip()
            if not item:
                continue
            name = item.partition("=")[0].strip()
            if name in session_cookies:
                continue
            parts.append(item)
    parts.extend(f"{name}={value}" for name, value in session_cookies.items())
    return "; ".join(parts)


class CsrfStore:
    """One CsrfSession per (route name, credential key), plus an asyncio.Lock per key so only one fetch runs at
    a time (single flight).

    Usage: take ``lock(key)``, check ``session(key).headers_for(fp)`` again inside it (another task may have
    fetched meanwhile), and only then fetch, ``record_fetch()`` and ``store``.
    """

    def __init__(self) -> None:
        self._sessions: dict[Hashable, CsrfSession] = {}
        self._locks: dict[Hashable, asyncio.Lock] = {}
        self.fetch_count = 0

    def session(self, key: Hashable) -> CsrfSession:
        session = self._sessions.get(key)
        if session is None:
            session = self._sessions[key] = CsrfSession()
        return session

    def lock(self, key: Hashable) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    def record_fetch(self) -> None:
        self.fetch_count += 1


def csrf_fetch_url(upstream_base: str) -> str:
    """Where to send ``X-CSRF-Token: Fetch``: the route's service root.

    The route upstream itself when it has a path (``https://host/api/v1/``); for a bare host
    (``https://tenant/``) the Cloud Integration service root ``https://tenant/api/v1/``.
    """
    base = _ensure_slash(upstream_base)
    if urlsplit(base).path in ("", "/"):
        return base + "api/v1/"
    return base


_FETCH_BODY_LIMIT: Final = 1024 * 1024


async def fetch_csrf(
    session: aiohttp.ClientSession,
    url: str,
    bearer: str,
    timeout: float = 30,
    *,
    proxy: str | None = None,
) -> tuple[str | None, list[str]]:
    """GET ``url`` with the bearer token and ``X-CSRF-Token: Fetch``; return (token, Set-Cookie values).

    The token is the response's ``X-CSRF-Token`` value whatever the status (SAP also hands it out with a 404),
    None when absent. No cookies are sent, so the upstream opens a new session. Redirects are not followed
    (the token must not travel elsewhere), nothing is logged, and the bearer token never appears in an error
    raised from here (network errors propagate as ``aiohttp.ClientError`` / ``TimeoutError``).
    """
    headers = {"Authorization": f"Bearer {bearer}", CSRF_HEADER: "Fetch"}
    async with session.get(
        url,
        headers=headers,
        allow_redirects=False,
        timeout=aiohttp.ClientTimeout(total=timeout),
        proxy=proxy,
    ) as resp:
        token = resp.headers.get(CSRF_HEADER)
        cookies = list(resp.headers.getall("Set-Cookie", ()))
        # drain a small body so the connection goes back to the pool; give up on a big one
        read = 0
        while read <= _FETCH_BODY_LIMIT:
            chunk = await resp.content.readany()
            if not chunk:
                break
            read += len(chunk)
    if token is not None and token.strip().lower() in ("", "required", "fetch"):
        token = None
    return token, cookies
