"""The inspector's answers: its page's files and the JSON behind them, the same on both ports.

Built per runtime (``proxy.app.Runtime``), because what may be shown depends on the configuration: whether the
query string is shown (``log_query``, as in the access log), the inbound API key's header name, and the secrets
to take out of every header value. The recorded exchanges come from the shared ``Recorder``.

Redaction rule for headers: the values of ``Authorization``, ``Proxy-Authorization``, ``Cookie``,
``Set-Cookie``, ``X-CSRF-Token`` (except its ``Fetch``/``Required`` protocol words) and the inbound API key's
header are replaced by ``[redacted]``; every other value has the configured secrets (client secrets, key and
proxy passwords, the inbound API key) and the current tokens taken out by ``proxy.redact.Redactor``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from proxy.filters.admin import not_ready_reason
from proxy.guard import ADMIN_PREFIX, Guard
from proxy.http.heads import Reply
from proxy.inspector.recorder import (
    ANSWER,
    BUCKET_S,
    BYTES_IN,
    BYTES_OUT,
    COOKIE_ADDED,
    CSRF_ADDED,
    DURATION,
    ERROR,
    EXTRA,
    FLAGS,
    HEADERS,
    MAX_STREAMS,
    METHOD,
    NO_HEADERS,
    REPLAYED,
    REQUEST_ID,
    ROUTE,
    SENT_UPSTREAM,
    SEQ,
    STATUS,
    TARGET,
    TIME,
    TOKEN_FP,
    UPSTREAM_STATUS,
    WATCH_S,
    WINDOW_S,
    Entry,
    Recorder,
)
from proxy.redact import REDACTED, Redactor, Secret
from proxy.tokens import TokenError, TokenManager, credential_secrets

if TYPE_CHECKING:
    from proxy.certificates import ClientIdentity
    from proxy.config import Config
    from proxy.credentials import Credentials

PAGE_FILES = {
    f"{ADMIN_PREFIX}": ("index.html", "text/html; charset=utf-8"),
    f"{ADMIN_PREFIX}inspector.js": ("inspector.js", "text/javascript; charset=utf-8"),
    f"{ADMIN_PREFIX}inspector.css": ("inspector.css", "text/css; charset=utf-8"),
}
API_PREFIX = f"{ADMIN_PREFIX}api/"
REQUESTS_PATH = f"{API_PREFIX}requests"
ROUTES_PATH = f"{API_PREFIX}routes"
STATS_PATH = f"{API_PREFIX}stats"
EVENTS_PATH = f"{API_PREFIX}events"
API_PATHS = (REQUESTS_PATH, f"{REQUESTS_PATH}/{{seq}}", ROUTES_PATH, STATS_PATH, EVENTS_PATH)

#: on every inspector answer: nothing from elsewhere may load into the page, nothing is cached or framed
SECURITY_HEADERS = (
    ("Content-Security-Policy", "default-src 'self'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Cache-Control", "no-store"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
)
_ALWAYS_REDACTED = frozenset({b"authorization", b"proxy-authorization", b"cookie", b"set-cookie", b"x-csrf-token"})
_CSRF_WORDS = frozenset({"fetch", "required"})  # X-CSRF-Token values that are protocol, not a token
_STATUS_CLASSES = {"1xx": 1, "2xx": 2, "3xx": 3, "4xx": 4, "5xx": 5}
_HEADER_LIMIT = 4096
_ERROR_LIMIT = 1000


def is_inspector_path(path: str) -> bool:
    """The page's files and everything under ``/-/api/``."""
    return path in PAGE_FILES or path.startswith(API_PREFIX)


def _json(status: int, body: dict[str, Any], headers: Iterable[tuple[str, str]] = ()) -> Reply:
    data = json.dumps(body, separators=(",", ":")).encode()
    return Reply(status, data, [("Content-Type", "application/json; charset=utf-8"), *SECURITY_HEADERS, *headers])


def _error(status: int, code: str, detail: str, headers: Iterable[tuple[str, str]] = ()) -> Reply:
    return _json(status, {"error": code, "detail": detail}, headers)


def too_many_streams() -> Reply:
    return _error(
        503,
        "too_many_event_streams",
        f"at most {MAX_STREAMS} inspector pages (event streams) may be open at once; close one and reload",
        [("Retry-After", "5")],
    )


def method_not_allowed(path: str) -> Reply:
    return _error(405, "method_not_allowed", f"{path} answers GET (and HEAD)", [("Allow", "GET, HEAD")])


def _epoch(monotonic_time: float, wall: float, mono: float) -> float:
    return round(wall + (monotonic_time - mono), 3)


def _identity_json(identity: ClientIdentity | None) -> dict[str, Any] | None:
    if identity is None:
        return None
    return {"subject": identity.subject, "not_after": identity.not_after_timestamp}


class InspectorApi:
    """The JSON answers and the page for one runtime; ``recorder`` outlives it (reloads)."""

    def __init__(
        self,
        recorder: Recorder,
        config: Config,
        managers: dict[str, TokenManager],
        identity: Callable[[Credentials], ClientIdentity | None],
        *,
        proxy_for: Callable[[str], str | None],
        admin_guard: Guard | None = None,
    ) -> None:
        self.recorder = recorder
        self.config = config
        self.managers = managers
        self._identity = identity
        #: the guard for ``--admin-listen`` (its own address allowed as Host); the main port's guard is a filter
        self.admin_guard = admin_guard
        key = config.inbound_api_key.reveal() if config.inbound_api_key is not None else ""
        self._api_key = key
        self._log_query = config.log_query
        self._redacted_names = _ALWAYS_REDACTED | {config.inbound_api_key_header.lower().encode("latin-1")}
        found: list[Secret | str | None] = [config.inbound_api_key]
        for route in config.routes:
            found += credential_secrets(route.credentials, proxy_for(route.credentials.token_url))
        self._secrets = Redactor(found)
        self.instance = recorder.instance

    # ---------------------------------------------------------------- dispatch

    def reply(self, method: str, path: str, query: str) -> Reply | None:
        """The answer for an inspector path (not the event stream), or None when ``path`` is none of them."""
        if not is_inspector_path(path) or path == EVENTS_PATH:
            return None
        if method not in ("GET", "HEAD"):
            return method_not_allowed(path)
        self.recorder.watched()
        page = PAGE_FILES.get(path)
        if page is not None:
            return page_reply(*page)
        if path == REQUESTS_PATH:
            return self.requests_reply(query)
        if path.startswith(REQUESTS_PATH + "/"):
            return self.detail_reply(path[len(REQUESTS_PATH) + 1 :])
        if path == ROUTES_PATH:
            return _json(200, self.routes())
        if path == STATS_PATH:
            return _json(200, self.stats())
        return _error(404, "not_found", "inspector API: " + ", ".join(API_PATHS))

    # ---------------------------------------------------------------- requests

    def _shown(self, text: str) -> str:
        key = self._api_key
        return text.replace(key, REDACTED) if key and key in text else text

    def summary(self, entry: Entry) -> dict[str, Any]:
        target = entry[TARGET] if self._log_query else entry[TARGET].partition("?")[0]
        return {
            "seq": entry[SEQ],
            "id": self._shown(entry[REQUEST_ID]),
            "time": round(entry[TIME], 3),
            "method": entry[METHOD],
            "path": self._shown(target),
            "status": entry[STATUS],
            "upstream_status": entry[UPSTREAM_STATUS],
            "duration_ms": round(entry[DURATION] * 1000.0, 3),
            "bytes_in": entry[BYTES_IN],
            "bytes_out": entry[BYTES_OUT],
            "route": entry[ROUTE],
            "replayed": entry[REPLAYED],
            "error": entry[ERROR],
            "token_fp": entry[TOKEN_FP],
        }

    def requests(self, *, limit: int, status_class: int | None, text: str | None) -> list[dict[str, Any]]:
        """Newest first, at most ``limit``, filtered by status class and a case-insensitive text."""
        found: list[dict[str, Any]] = []
        needle = text.lower() if text else None
        for entry in reversed(self.recorder.ring):
            if status_class is not None and entry[STATUS] // 100 != status_class:
                continue
            item = self.summary(entry)
            if needle is not None:
                haystack = " ".join(
                    str(item[k]) for k in ("method", "path", "status", "upstream_status", "id", "route", "error")
                )
                if needle not in haystack.lower():
                    continue
            found.append(item)
            if len(found) >= limit:
                break
        return found

    def requests_reply(self, query: str) -> Reply:
        params = parse_qs(query, keep_blank_values=True)
        limit_text = (params.get("limit") or [""])[-1]
        limit = self.recorder.ring.maxlen or 500
        if limit_text:
            if not limit_text.isdigit() or int(limit_text) < 1:
                return _error(400, "bad_limit", "limit must be a whole number from 1 to 500")
            limit = min(limit, int(limit_text))
        status_text = (params.get("status") or [""])[-1].lower()
        status_class = _STATUS_CLASSES.get(status_text) if status_text else None
        if status_text and status_class is None:
            return _error(400, "bad_status", "status must be one of 1xx, 2xx, 3xx, 4xx, 5xx")
        text = (params.get("q") or [""])[-1].strip() or None
        items = self.requests(limit=limit, status_class=status_class, text=text)
        return _json(200, {"instance": self.instance, "requests": items})

    def detail(self, seq: int) -> dict[str, Any] | None:
        """A summary plus the headers as received from the client, the lines the proxy added upstream, and the
        upstream's answer headers: every value redacted by the rule in the module docstring."""
        entry = self.recorder.entry(seq)
        if entry is None:
            return None
        redactor = self._redactor()
        item = self.summary(entry)
        request = [self._header(name, value, redactor) for _, name, value in entry[HEADERS]]
        added: list[list[str]] = []
        for line in entry[EXTRA]:
            name, _, value = line.rstrip(b"\r\n").partition(b":")
            added.append(self._header(name.strip(), value.strip(), redactor))
        flags = entry[FLAGS]
        if flags & SENT_UPSTREAM:  # what the filters add to every request they send, in their order
            added.append(["X-Request-Id", self._shown(entry[REQUEST_ID])])
            if flags & CSRF_ADDED:
                added.append(["X-CSRF-Token", REDACTED])
            if flags & COOKIE_ADDED:
                added.append(["Cookie", REDACTED])
            if entry[TOKEN_FP] is not None:
                added.append(["Authorization", REDACTED])
        answer = entry[ANSWER]
        item["request_headers"] = request + added
        item["proxy_added"] = [name for name, _ in added]
        item["response_headers"] = [self._header(name, value, redactor) for _, name, value in answer or ()]
        item["headers_kept"] = not flags & NO_HEADERS
        if flags & NO_HEADERS:
            item["request_headers"] = item["response_headers"] = []
            item["proxy_added"] = []
            item["answered_by"] = "upstream" if flags & SENT_UPSTREAM else "proxy"
            item["headers_note"] = (
                "not kept: this request succeeded while no inspector page or API client was active; headers are "
                f"kept for every request while one is (and {WATCH_S // 60} minutes after), and always for failed ones"
            )
            return item
        item["answered_by"] = "upstream" if answer is not None else "proxy"
        return item

    def detail_reply(self, seq_text: str) -> Reply:
        if not seq_text.isdigit():
            return _error(400, "bad_seq", "the request number (seq) must be a whole number")
        item = self.detail(int(seq_text))
        if item is None:
            return _error(
                404,
                "request_gone",
                f"request {seq_text} is not among the last {self.recorder.ring.maxlen} the inspector keeps",
            )
        return _json(200, item)

    def _redactor(self) -> Redactor:
        """The configured secrets plus every token in use now (a header may quote one)."""
        tokens = [m.current.value for m in self.managers.values() if m.current is not None]
        return self._secrets.with_secrets(tokens) if tokens else self._secrets

    def _header(self, name: bytes, value: bytes, redactor: Redactor) -> list[str]:
        text = value.decode("latin-1")
        lname = name.lower()
        if lname in self._redacted_names and not (lname == b"x-csrf-token" and text.strip().lower() in _CSRF_WORDS):
            text = REDACTED
        else:
            text = redactor(self._shown(text), _HEADER_LIMIT)
        return [name.decode("latin-1"), text]

    # ---------------------------------------------------------------- routes and stats

    def routes(self) -> dict[str, Any]:
        wall, mono = time.time(), time.monotonic()
        redactor = self._redactor()
        routes: list[dict[str, Any]] = []
        for route in self.config.routes:
            creds = route.credentials
            manager = self.managers[route.name]
            token = manager.current
            error = manager.last_error
            routes.append(
                {
                    "name": route.name,
                    "prefix": route.prefix,
                    "upstream": route.upstream,
                    "token_url": creds.token_url,
                    "credential": "certificate" if creds.kind == "certificate" else "secret",
                    "certificate": _identity_json(self._identity(creds)),
                    "client_id": creds.client_id,
                    "token": None
                    if token is None
                    else {
                        "fingerprint": token.fingerprint,
                        "obtained_at": _epoch(token.obtained_at, wall, mono),
                        "expires_at": _epoch(token.expires_at, wall, mono),
                        "refresh_at": _epoch(token.refresh_at, wall, mono),
                        "lifetime_s": token.lifetime,
                        "scope": redactor(token.scope, _ERROR_LIMIT) if token.scope else None,
                    },
                    "token_requests": manager.fetch_count,
                    "last_error": self._error_words(error, redactor),
                    "last_error_code": None if error is None else redactor(error.error, 100),
                }
            )
        return {"server_time": round(wall, 3), "instance": self.instance, "routes": routes}

    @staticmethod
    def _error_words(error: TokenError | None, redactor: Redactor) -> str | None:
        """Why the last token request failed, in words: the manager's redacted detail (our words around the
        token server's, cut short), redacted once more here; our own words alone when there is no detail."""
        if error is None:
            return None
        detail = redactor(error.detail, _ERROR_LIMIT) if error.detail else ""
        return detail or not_ready_reason(error)

    def stats(self) -> dict[str, Any]:
        _, buckets = self.recorder.series()
        series = [
            {
                "t": start,
                "requests": count,
                "rps": round(count / BUCKET_S, 3),
                "p50_ms": None if p50 is None else round(p50 * 1000.0, 3),
                "p99_ms": None if p99 is None else round(p99 * 1000.0, 3),
            }
            for start, count, p50, p99 in buckets
        ]
        return {"window_s": WINDOW_S, "bucket_s": BUCKET_S, "series": series}


def page_reply(name: str, content_type: str) -> Reply:
    """One of the page's files from the installed package (``proxy/inspector/page/``), or a 404 saying so."""
    try:
        data = resources.files("proxy.inspector").joinpath("page").joinpath(name).read_bytes()
    except OSError:
        return _error(
            404,
            "page_missing",
            f"the inspector page ({name}) is not installed with this copy of odata-auth-proxy; "
            "the JSON API under /-/api/ works without it",
        )
    return Reply(200, data, [("Content-Type", content_type), *SECURITY_HEADERS])
