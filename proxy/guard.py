"""Inbound security guard: who may make this proxy act with the service key's rights.

Why this module exists
----------------------
The proxy adds an OAuth bearer token to every request it forwards, so anyone who can get a request
*into* it acts with the full rights of the service key. "It only listens on 127.0.0.1" is not enough
protection on its own:

* a web page in the user's browser can send requests to ``http://127.0.0.1:PORT`` (CSRF), or point a
  DNS name it controls at 127.0.0.1 and read the answers as same-origin (DNS rebinding);
* a client that mistakes the proxy for a forward proxy (``GET http://other-host/ HTTP/1.1``,
  ``CONNECT host:443``) must not turn it into an open relay that carries the token elsewhere;
* ``..`` segments, encoded slashes, backslashes and ``//host`` paths must not let a caller escape the
  upstream path prefix a route was configured for, or change the upstream host when a URL is joined;
* when the proxy is reachable from a network (sidecar, ``--allow-remote``), an inbound API key is
  the only thing between the network and the service key.

:class:`Guard` therefore answers hostile or misdirected requests itself — nothing is forwarded for
them — with a JSON body ``{"error": code, "detail": how-to-fix}``, and logs each refusal at WARNING on
the ``odata_auth_proxy.guard`` logger (code, method, client address, truncated path; never a header value
and never the API key). The checks run in this order:

1. request target: ``CONNECT`` -> 405 ``connect_refused``; ``TRACE``/``TRACK`` -> 405
   ``trace_refused`` (the upstream would echo the injected ``Authorization`` header back);
   absolute form -> 400 ``absolute_form_refused``; asterisk form (``OPTIONS *``) -> 400
   ``invalid_request_target``; ``.``/``..`` segments (also percent-encoded, with encoded slashes,
   double-encoded, or Tomcat-style ``..;x``), backslashes and a leading ``//`` -> 400
   ``path_traversal_refused``.
2. ``Host`` allow-list (DNS rebinding) -> 421 ``host_not_allowed``; HTTP/1.1 without ``Host`` -> 400.
3. cross-site requests: ``Sec-Fetch-Site: cross-site`` -> 403 ``cross_site_refused``; an ``Origin``
   that is not allowed (``null`` included) -> 403 ``origin_not_allowed``; CORS for the configured
   ``allowed_origins`` (preflight answered here with 204).
4. inbound API key (when configured) -> 401 ``proxy_auth_required``; on success both credential
   headers are dropped from what goes upstream.

What the parser (httptools/llhttp) leaves to the guard
------------------------------------------------------
The request target arrives exactly as sent: absolute-form (``GET http://127.0.0.2:9/``), ``*``,
``host:port`` after CONNECT (the parser flags CONNECT as an upgrade; the request is still answered), and
paths that are not normalised at all (``/a/../b``, ``//host/x``, ``\\``, percent-encoded dots and
slashes). So the guard looks at the raw target and every decoding level of it, and at the ``Host`` header,
never at a host taken from the target. Malformed framing (both ``Content-Length`` and
``Transfer-Encoding``, bad chunk sizes, invalid header characters) is refused by the parser with 400.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote

from proxy.http.heads import Reply, RequestHead, json_reply
from proxy.redact import Secret

__all__ = [
    "ADMIN_PREFIX",
    "DEFAULT_API_KEY_HEADER",
    "Guard",
    "GuardSettings",
    "GuardedRequest",
    "is_loopback",
    "listen_address_problem",
]

DEFAULT_API_KEY_HEADER: Final = "X-Proxy-Api-Key"
ADMIN_PREFIX: Final = "/-/"

_LOG: Final = logging.getLogger("odata_auth_proxy.guard")

#: Admin endpoints polled by container health checks: no API key needed (all other checks apply).
_KEYLESS_PATHS: Final = frozenset({f"{ADMIN_PREFIX}healthz", f"{ADMIN_PREFIX}readyz"})
_CORS_METHODS: Final = "GET, HEAD, POST, PUT, PATCH, MERGE, DELETE, OPTIONS"
_CORS_MAX_AGE: Final = "600"
_REALM_CHALLENGE: Final = 'Bearer realm="odata-auth-proxy"'
_MAX_ECHO: Final = 100
_MAX_DECODE_ROUNDS: Final = 4
_REFUSED_METHODS: Final = frozenset({"CONNECT", "TRACE", "TRACK"})
_HOST_CACHE_LIMIT: Final = 256  # distinct Host values remembered (bounded: the header is the client's to choose)

_SCHEME_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_PORT_RE: Final = re.compile(r"[0-9]{1,5}")
_ORIGIN_RE: Final = re.compile(r"([a-z][a-z0-9+.-]*)://([^/?#@\s]+)")
_TOKEN_RE: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


@dataclass(frozen=True)
class GuardSettings:
    """What the guard lets in. Built once from the config; the middleware precomputes from it."""

    listen_host: str
    listen_port: int
    #: extra Host names (e.g. sidecar service names), case-insensitive; ``name`` matches any port,
    #: ``name:port`` only that port
    allowed_hosts: tuple[str, ...] = ()
    #: browser origins allowed to call the proxy cross-origin (CORS), exact ``scheme://host[:port]``;
    #: ``null`` is ignored (any site can produce it from a sandboxed iframe)
    allowed_origins: tuple[str, ...] = ()
    api_key: Secret | None = None
    api_key_header: str = DEFAULT_API_KEY_HEADER


# --------------------------------------------------------------------------------------------------
# listen address


def _strip_brackets(host: str) -> str:
    if host.startswith("[") and host.endswith("]"):
        return host[1:-1]
    return host


def is_loopback(host: str) -> bool:
    """True for ``127.0.0.0/8``, ``::1`` (bracketed or not) and ``localhost``; no DNS look-up.

    False for the unspecified addresses (``0.0.0.0``, ``::``, ``""``), LAN addresses and other names.
    """
    value = _strip_brackets(host.strip())
    if value.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def _is_unspecified(host: str) -> bool:
    value = _strip_brackets(host.strip())
    if not value or value == "*":
        return True
    try:
        return ipaddress.ip_address(value).is_unspecified
    except ValueError:
        return False


def listen_address_problem(host: str, *, allow_remote: bool, has_api_key: bool) -> str | None:
    """Why listening on ``host`` is dangerous, or None when it is fine (loopback, or explicitly allowed)."""
    if is_loopback(host) or allow_remote or has_api_key:
        return None
    shown = _clip(host) if host.strip() else "''"
    if _is_unspecified(host):
        shown += " (all network interfaces)"
    return (
        f"Refusing to listen on {shown}: binding {shown} exposes the proxy to the network, and with it "
        "the full rights of the service key, because every request the proxy forwards gets the "
        "service key's OAuth token. Use 127.0.0.1 (or ::1 / localhost) to keep the proxy local to "
        "this machine, or set an inbound API key (inbound_api_key in the config file or the "
        "ODATA_AUTH_PROXY_INBOUND_API_KEY environment variable) so that every caller must present "
        "it, or pass --allow-remote (allow_remote: true in the config file) if the proxy runs as a "
        "sidecar in an isolated pod network."
    )


# --------------------------------------------------------------------------------------------------
# helpers


def _clip(value: str, limit: int = _MAX_ECHO) -> str:
    """Escape control and non-ASCII characters, then cut to ``limit`` characters: safe to echo/log."""
    escaped = value.encode("unicode_escape", errors="backslashreplace").decode("ascii")
    if len(escaped) > limit:
        return escaped[:limit] + "..."
    return escaped


def _split_host_port(value: str) -> tuple[str, str | None] | None:
    """``Host``-style ``host[:port]`` -> (lower-case host, port or None); None when malformed."""
    value = value.strip()
    if not value:
        return None
    port: str | None = None
    if value.startswith("["):
        end = value.find("]")
        if end == -1:
            return None
        host, rest = value[: end + 1], value[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                return None
            port = rest[1:]
    elif value.count(":") == 1:
        host, port = value.split(":")
    else:  # a name, an IPv4 address, or an (invalid in Host, but harmless) bare IPv6 address
        host = value
    if port is not None and not _PORT_RE.fullmatch(port):
        return None
    if not host:
        return None
    return host.lower(), port


def _canonical_host(host: str) -> str:
    value = _strip_brackets(host.strip()).lower()
    try:
        return ipaddress.ip_address(value).compressed
    except ValueError:
        return value


def _has_dot_segment(path: str) -> bool:
    for segment in path.split("/"):
        name = segment.split(";", 1)[0]  # Tomcat & co treat "..;x" as ".."
        if name in (".", "..") or unicodedata.normalize("NFKC", name) in (".", ".."):
            return True
    return False


def _path_problem(raw_path: str) -> str | None:
    """What is wrong with an origin-form path (query excluded), or None."""
    path = raw_path.split("?", 1)[0]
    if path.isascii() and "%" not in path and "\\" not in path and "/." not in path and not path.startswith("//"):
        return None  # the common case, decided without splitting: no segment can be (or decode to) a dot
    candidate = path
    for _ in range(_MAX_DECODE_ROUNDS):
        if "\\" in candidate:
            return "a backslash (literal or percent-encoded) in the path"
        if candidate.startswith("//"):
            return "a path starting with '//' (a network-path reference that names another host)"
        if _has_dot_segment(candidate):
            return "a '.' or '..' path segment (literal, percent-encoded, or formed by encoded slashes)"
        decoded = unquote(candidate)
        if decoded == candidate:
            return None
        candidate = decoded
    return "a path percent-encoded more than three times over"


def _parse_origin(origin: str) -> tuple[str, str, str | None] | None:
    match = _ORIGIN_RE.fullmatch(origin.strip().lower())
    if match is None:
        return None
    hostport = _split_host_port(match.group(2))
    if hostport is None:
        return None
    return match.group(1), hostport[0], hostport[1]


def _normalise_origin(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


def merge_vary(value: str) -> str:
    """An answer's ``Vary`` with ``Origin`` added (CORS answers differ by origin)."""
    parts = [p.strip().lower() for p in value.split(",")]
    if "origin" in parts or "*" in parts:
        return value
    return f"{value}, Origin" if value.strip() else "Origin"


def _requested_headers(value: str) -> str:
    tokens = [t.strip() for t in value.split(",")]
    return ", ".join(t for t in tokens if _TOKEN_RE.fullmatch(t))[:1000]


def _bearer_token(value: str) -> str | None:
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


# --------------------------------------------------------------------------------------------------
# middleware


class Guard:
    """Precomputed settings plus the four checks; built once per configuration, swapped whole on reload."""

    def __init__(self, settings: GuardSettings) -> None:
        self.settings = settings
        self._host_verdicts: dict[bytes, bool] = {}  # by the raw Host value: no decoding per request
        hosts: set[tuple[str, str | None]] = set()
        for entry in settings.allowed_hosts:
            parsed = _split_host_port(entry)
            if parsed is not None:
                hosts.add((_canonical_host(parsed[0]), parsed[1]))
        if settings.listen_host.strip() and not _is_unspecified(settings.listen_host):
            hosts.add((_canonical_host(settings.listen_host), None))
        self.allowed_hosts = frozenset(hosts)
        # "null" (sandboxed iframes, file: pages, redirects) is never a CORS origin: any site can send it
        self.cors_origins = frozenset(
            _normalise_origin(o) for o in settings.allowed_origins if _normalise_origin(o) not in ("", "null")
        )
        key = settings.api_key.reveal() if settings.api_key is not None else None
        self._key: bytes | None = key.encode("utf-8") if key is not None else None
        self._key_text = key or ""
        self.key_header = settings.api_key_header

    # ---- output -------------------------------------------------------------------------------

    def _redact(self, text: str) -> str:
        if self._key_text and self._key_text in text:
            text = text.replace(self._key_text, "[redacted]")
        return text

    def show(self, value: str) -> str:
        """A request-supplied value made safe to echo or log: key redacted *before* truncation, escaped."""
        return _clip(self._redact(value))

    def refuse(
        self,
        request: GuardedRequest,
        status: int,
        code: str,
        detail: str,
        *,
        headers: Mapping[str, str] | None = None,
        close: bool = False,
        note: str = "",
    ) -> Reply:
        path = self.show(request.target)
        _LOG.warning(
            "refused %s (%d): %s %s from %s%s",
            code,
            status,
            _clip(request.method, 20),
            path,
            request.peer or "unknown client",
            note,
        )
        return json_reply(status, {"error": code, "detail": self._redact(detail)}, dict(headers or {}), close=close)

    # ---- 1. request target --------------------------------------------------------------------

    def check_target(self, request: GuardedRequest) -> Reply | None:
        method = request.method.upper()
        raw = request.target
        if method == "CONNECT":
            return self.refuse(
                request,
                405,
                "connect_refused",
                "This is a reverse proxy for configured upstream APIs, not a forward proxy: CONNECT "
                "tunnels are not supported. Send requests to http://HOST:PORT/<route path> instead, "
                "and do not configure this proxy as an HTTP(S) proxy in your client.",
                headers={"Allow": _CORS_METHODS},
                close=True,
            )
        if method in ("TRACE", "TRACK"):
            return self.refuse(
                request,
                405,
                "trace_refused",
                f"{method} is not forwarded: the upstream would echo back the bearer token this proxy "
                "adds. Use GET, HEAD, POST, PUT, PATCH, MERGE, DELETE or OPTIONS.",
                headers={"Allow": _CORS_METHODS},
                close=True,
            )
        if not raw.startswith("/"):
            if _SCHEME_RE.match(raw):
                return self.refuse(
                    request,
                    400,
                    "absolute_form_refused",
                    "The request target is an absolute URL (forward-proxy style, "
                    f"'{self.show(raw)}'); this reverse proxy only accepts paths such as "
                    "'GET /<route path> HTTP/1.1'. Call http://HOST:PORT/<route path> directly "
                    "and do not configure this proxy as an HTTP(S) proxy in your client.",
                    close=True,
                )
            return self.refuse(
                request,
                400,
                "invalid_request_target",
                f"The request target '{self.show(raw)}' is not a path; send 'METHOD /<route path> HTTP/1.1'.",
                close=True,
            )
        problem = _path_problem(raw)
        if problem is not None:
            return self.refuse(
                request,
                400,
                "path_traversal_refused",
                f"The request path contains {problem}, which could reach a different upstream "
                "resource than the route allows. Send the path in normalised form: no '.' or '..' "
                "segments, no backslashes, no leading '//'. A percent-encoded slash inside an OData key "
                "value is fine as long as it does not form such a segment.",
                close=True,
            )
        return None

    # ---- 2. Host allow-list -------------------------------------------------------------------

    def host_allowed(self, host: str, port: str | None) -> bool:
        if is_loopback(host):
            return True
        canonical = _canonical_host(host)
        return any(name == canonical and (want is None or want == port) for name, want in self.allowed_hosts)

    def _host_value_allowed(self, value: bytes) -> bool:
        """``host_allowed`` for a raw ``Host`` value, remembered: clients send the same few values all day."""
        known = self._host_verdicts.get(value)
        if known is None:
            parsed = _split_host_port(value.decode("latin-1"))
            known = parsed is not None and self.host_allowed(*parsed)
            if len(self._host_verdicts) < _HOST_CACHE_LIMIT:
                self._host_verdicts[value] = known
        return known

    def check_host(self, request: GuardedRequest) -> Reply | None:
        values = request.headers.getall("Host", [])
        if not values:
            if request.version != "1.1":
                return None  # HTTP/1.0 clients may omit Host; they cannot be a rebinding browser
            return self.refuse(
                request,
                400,
                "host_not_allowed",
                "HTTP/1.1 requests must carry a Host header; send Host: 127.0.0.1:PORT or localhost:PORT.",
                close=True,
            )
        if len(values) == 1 and self._host_value_allowed(values[0].encode("latin-1")):  # the view decoded it
            return None
        shown = self.show(", ".join(values))
        return self.refuse(
            request,
            421,
            "host_not_allowed",
            f"Host '{shown}' is not allowed: this proxy answers only to 127.0.0.1, localhost, [::1], "
            "its listen address and explicitly allowed names, to stop DNS-rebinding attacks from web "
            "pages. If you reach the proxy under this name on purpose (e.g. a sidecar service name), "
            "add it to 'allowed_hosts:' in the config file or pass --allowed-host NAME.",
            close=True,
        )

    # ---- 3. cross-site / CORS -----------------------------------------------------------------

    def origin_allowed(self, origin: str, request: GuardedRequest) -> bool:
        """Same origin (a page served through this proxy: an allowed host on the port the request came to),
        or listed in allowed_origins.

        A loopback page on another port (another local web app) is another origin to the browser and must
        not borrow the proxy's credentials; ``localhost`` and ``127.0.0.1`` on the proxy's own port are
        treated alike.
        """
        if _normalise_origin(origin) in self.cors_origins:
            return True
        parsed = _parse_origin(origin)
        target = _split_host_port(request.headers.get("Host", "") or "")
        if parsed is None or target is None or parsed[0] != "http":
            return False
        if (parsed[2] or "80") != (target[1] or "80"):
            return False
        if parsed[1] == target[0]:
            return True
        # localhost and 127.0.0.1 name the same listener on this port; other 127.x addresses may not
        return {parsed[1], target[0]} <= {"localhost", "127.0.0.1"}

    def check_cross_site(self, request: GuardedRequest) -> tuple[Reply | None, str | None]:
        """(refusal or preflight answer, or None; the origin to add CORS headers for, or None)."""
        origins = request.headers.getall("Origin", [])
        origin = origins[0] if len(origins) == 1 else None
        cors_origin = origin if origin is not None and _normalise_origin(origin) in self.cors_origins else None
        fetch_site = (request.headers.get("Sec-Fetch-Site", "") or "").strip().lower()
        if fetch_site == "cross-site" and cors_origin is None:
            return (
                self.refuse(
                    request,
                    403,
                    "cross_site_refused",
                    "The browser marked this request as cross-site (Sec-Fetch-Site: cross-site): a web "
                    "page from another site must not use this proxy's credentials. To call the proxy "
                    "from your own web app, add its origin (e.g. http://localhost:3000) to "
                    "'allowed_origins:' in the config file.",
                ),
                None,
            )
        if origins and (origin is None or not self.origin_allowed(origin, request)):
            return (
                self.refuse(
                    request,
                    403,
                    "origin_not_allowed",
                    f"Origin '{self.show(', '.join(origins))}' is not allowed to use this proxy. To call "
                    "the proxy from your own web app, add its exact origin (scheme://host[:port], "
                    "e.g. http://localhost:3000) to 'allowed_origins:' in the config file.",
                ),
                None,
            )
        is_preflight = (
            request.method.upper() == "OPTIONS"
            and origin is not None
            and "Access-Control-Request-Method" in request.headers
        )
        if is_preflight:
            if cors_origin is None:
                return (
                    self.refuse(
                        request,
                        403,
                        "origin_not_allowed",
                        f"CORS preflight from origin '{self.show(origin or '')}' refused: only origins listed "
                        "in 'allowed_origins:' in the config file may call this proxy cross-origin; add "
                        "the exact origin (scheme://host[:port]) there.",
                    ),
                    None,
                )
            headers = {
                "Access-Control-Allow-Origin": cors_origin,
                "Access-Control-Allow-Methods": _CORS_METHODS,
                "Access-Control-Max-Age": _CORS_MAX_AGE,
                "Vary": "Origin",
            }
            requested = _requested_headers(request.headers.get("Access-Control-Request-Headers", "") or "")
            if requested:
                headers["Access-Control-Allow-Headers"] = requested
            return Reply(204, b"", list(headers.items())), None
        return None, cors_origin

    # ---- 4. inbound API key -------------------------------------------------------------------

    def _candidates(self, request: GuardedRequest) -> Iterable[str]:
        yield from request.headers.getall(self.key_header, [])
        for value in request.headers.getall("Proxy-Authorization", []):
            token = _bearer_token(value)
            if token is not None:
                yield token

    def check_api_key(self, request: GuardedRequest) -> Reply | None:
        """None when the key is right (or none is configured); the caller then drops the key's headers."""
        if self._key is None or request.target.split("?", 1)[0] in _KEYLESS_PATHS:
            return None
        matched = False
        presented = False
        for candidate in self._candidates(request):
            presented = True
            value = candidate.encode("utf-8", errors="surrogateescape")
            # evaluate every candidate (no short-circuit) so timing does not tell which one matched
            equal = hmac.compare_digest(value, self._key)
            matched = matched or (equal and bool(value))
        if not matched:
            return self.refuse(
                request,
                401,
                "proxy_auth_required",
                f"This proxy requires its inbound API key: send it in the {self.key_header} header "
                "or as 'Proxy-Authorization: Bearer <key>'. The key is the one configured as "
                "inbound_api_key (or ODATA_AUTH_PROXY_INBOUND_API_KEY) for this proxy.",
                headers={"Proxy-Authenticate": _REALM_CHALLENGE},
                note=" (credential presented but wrong)" if presented else " (no credential presented)",
            )
        return None

    # ---- all together -------------------------------------------------------------------------

    def plainly_fine(self, head: RequestHead) -> bool:
        """The common case decided in one pass, without building anything: no inbound key configured, an
        ordinary method and path, one allowed ``Host`` and no cross-site markers. False means "run ``check``",
        not "refuse"."""
        if self._key is not None or head.method in _REFUSED_METHODS:
            return False
        target = head.target
        if not target.startswith("/"):
            return False
        # the whole target (query included) plain enough to say so without splitting; otherwise the path proper
        plain = target.isascii() and "%" not in target and "\\" not in target and "/." not in target
        if (not plain or target.startswith("//")) and _path_problem(target) is not None:
            return False
        host: bytes | None = None
        for lname, _, value in head.headers:
            if lname == b"host":
                if host is not None:
                    return False
                host = value
            elif lname == b"origin" or lname == b"sec-fetch-site":
                return False
        return host is not None and self._host_value_allowed(host)

    def check(self, request: GuardedRequest) -> tuple[Reply | None, str | None]:
        """All four checks in order: (the refusal or preflight answer, or None; the CORS origin, or None)."""
        refusal = self.check_target(request) or self.check_host(request)
        if refusal is not None:
            return refusal, None
        answer, cors_origin = self.check_cross_site(request)
        if answer is not None:
            return answer, None
        refusal = self.check_api_key(request)
        if refusal is not None and cors_origin is not None:
            refusal.headers.extend(cors_headers(cors_origin))
        return refusal, cors_origin

    @property
    def dropped_headers(self) -> frozenset[bytes]:
        """The inbound credential's headers: never forwarded upstream."""
        return frozenset({self.key_header.lower().encode("latin-1"), b"proxy-authorization"})


def cors_headers(origin: str) -> list[tuple[str, str]]:
    return [("Access-Control-Allow-Origin", origin), ("Access-Control-Expose-Headers", "*"), ("Vary", "Origin")]


class GuardedRequest:
    """What the guard looks at: a request head and the client's address."""

    __slots__ = ("headers", "method", "peer", "target", "version")

    def __init__(self, head: RequestHead, peer: str) -> None:
        self.method = head.method
        self.target = head.target
        self.version = head.version
        self.headers = head.view
        self.peer = peer
