"""Where bearer tokens come from (``TokenSource``) and how they are kept fresh (``TokenManager``).

The manager is the heart of the proxy: one token request serves every concurrent caller (single
flight), the token is refreshed in the background before it expires, a failed refresh keeps the
still-valid token and retries with jittered exponential backoff. Requests that wait while no valid token
exists retry on their own, shorter schedule (at most one token request per ``REQUEST_RETRY_INTERVAL``,
still single flight), so that the first request after an outage succeeds within seconds. An upstream 401
purges the shared token once; a 401 to a *fresh* token pauses purging for a while (``invalidate``).
Every text that comes from outside (token server answers, TLS and connection errors) has the configured
secrets redacted and is cut short before it is shown (``proxy.redact.Redactor``).
Token sources know nothing about forwarding; the forwarder knows nothing about how tokens are made.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import random
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import quote, unquote, urlsplit

import aiohttp

from proxy.credentials import Credentials
from proxy.redact import Redactor, Secret

log = logging.getLogger("odata_auth_proxy.tokens")

MAX_TOKEN_RESPONSE = 1024 * 1024
BACKOFF_FIRST = 0.5
BACKOFF_CAP = 30.0
#: while requests wait and no valid token exists, the token server is asked at most this often
REQUEST_RETRY_INTERVAL = 2.0
#: how long upstream 401s stop purging the shared token after a fresh token got one too
INVALIDATION_PAUSE = 30.0
DETAIL_LIMIT = 1000  # our own words plus at most 300 characters of the remote's
ERROR_CODE_LIMIT = 100


@dataclass(frozen=True)
class TokenResponse:
    """A successful token endpoint answer; ``raw`` is the JSON minus nothing (for ``token --json``)."""

    access_token: Secret
    expires_in: float
    token_type: str
    scope: str | None
    raw: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class Token:
    """A token in use, with its schedule on the monotonic clock."""

    value: Secret
    obtained_at: float
    lifetime: float
    scope: str | None = None
    via_invalidation: bool = False  # fetched because the upstream rejected its predecessor

    #: treated as expired a little early (clock skew, latency): min(30 s, 10 % of its life) before it expires;
    #: worked out once, since every request asks
    usable_until: float = field(init=False, repr=False, compare=False)
    #: the value's short fingerprint (the access log shows it on every line): an attribute, not a property chain
    fingerprint: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "usable_until", self.expires_at - min(30.0, 0.1 * self.lifetime))
        object.__setattr__(self, "fingerprint", self.value.fingerprint)

    @property
    def expires_at(self) -> float:
        return self.obtained_at + self.lifetime

    @property
    def refresh_at(self) -> float:
        """After half its life or 5 minutes before expiry, whichever comes later."""
        return self.obtained_at + max(self.lifetime / 2, self.lifetime - 300.0)


class TokenError(Exception):
    """No token could be obtained. Carries what the 502/503/504 JSON body says; never a secret.

    ``status``: 502 when the token server answered with an error, 503 when it could not be reached,
    504 when it timed out. ``error`` is the server's own OAuth ``error`` code or our category.
    """

    def __init__(
        self,
        *,
        status: int,
        error: str,
        detail: str,
        token_url: str,
        description: str | None = None,
        http_status: int | None = None,
        outcome: str | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail
        self.token_url = token_url
        self.description = description
        self.http_status = http_status
        self.outcome = outcome or error

    def redact(self, redactor: Redactor) -> TokenError:
        """Take the secrets out of every text in here and cut them short (in place; returns self).

        ``error`` and ``description`` are the token server's words, ``detail`` is ours with the remote's
        words (a description, a TLS or connection reason) inside. Idempotent: a source redacts, and the
        manager redacts again with the secrets only it knows (the inbound API key).
        """
        error = redactor(self.error, ERROR_CODE_LIMIT)
        if self.outcome == self.error:
            self.outcome = error
        self.error = error
        self.detail = redactor(self.detail, DETAIL_LIMIT)
        if self.description is not None:
            self.description = redactor(self.description) or None
        self.args = (self.detail,)
        return self

    def as_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "error": "token_unavailable",
            "token_server_error": self.error,
            "detail": self.detail,
            "token_url": self.token_url,
        }
        if self.description:
            body["token_server_error_description"] = self.description
        if self.http_status is not None:
            body["token_server_status"] = self.http_status
        return body


# --------------------------------------------------------------------------- sources


class TokenSource(Protocol):
    """What a ``TokenManager`` fetches from: the token server itself (``ClientCredentialsSource``) or, in a
    worker process, the supervisor's token broker (``proxy.workers.BrokerTokenSource``). A source may also
    have ``rejected(token)``, called when the manager drops a token because an upstream answered 401 to it."""

    @property
    def token_url(self) -> str: ...

    async def fetch(self) -> TokenResponse: ...


_HINTS = {
    "invalid_client": "check the client id and secret (or certificate) of the service key; a deleted or "
    "recreated key has a new secret",
    "unauthorized_client": "the client may not use the client_credentials grant: create the service key with "
    "grant type Client Credentials",
    "invalid_scope": "the requested scope is not granted to this client",
    "unsupported_grant_type": "the token server does not accept client_credentials at this URL",
}


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


def _form_encode(value: str) -> str:
    return quote(value, safe="")


def credential_secrets(credentials: Credentials, proxy: str | None = None) -> list[Secret]:
    """Every configured secret of a credential, and the forms in which it travels, for redaction.

    The client secret (also inside the Basic header values that carry it), the key password and the
    PKCS#12 password, and the password of an outbound proxy URL (also inside its ``Proxy-Authorization``
    value). A token server or proxy that quotes what it received gives any of these back.
    """
    values: list[str] = []
    secret = credentials.client_secret.reveal() if credentials.client_secret is not None else ""
    if secret:
        client_id = credentials.client_id
        values += [secret, _basic(client_id, secret)[6:], _basic(_form_encode(client_id), _form_encode(secret))[6:]]
    spec = credentials.certificate
    if spec is not None:
        values += [s.reveal() for s in (spec.key_password, spec.pkcs12_password) if s is not None]
    if proxy:
        with contextlib.suppress(ValueError):
            parts = urlsplit(proxy)
            if parts.password:
                user, password = unquote(parts.username or ""), unquote(parts.password)
                values += [parts.password, password, _basic(user, password)[6:]]
    return [Secret(value) for value in values if value]


class ClientCredentialsSource:
    """Fetches tokens with the client credentials grant, by client secret or by client certificate (mTLS).

    Owns nothing: the ``aiohttp.ClientSession`` (with its connection pool) and the TLS context are built
    once by the application and handed in. ``redact``: secrets besides the credential's own (the inbound
    API key) to take out of the texts of a ``TokenError``; the credential's are always taken out.
    """

    def __init__(
        self,
        credentials: Credentials,
        session: aiohttp.ClientSession,
        ssl_context: ssl.SSLContext,
        *,
        timeout: float = 15.0,
        connect_timeout: float = 10.0,
        proxy: str | None = None,
        redact: Iterable[Secret | str | None] = (),
    ) -> None:
        self.credentials = credentials
        self._session = session
        self._ssl = ssl_context
        self._timeout = aiohttp.ClientTimeout(total=timeout, connect=min(timeout, connect_timeout))
        self._proxy = proxy
        self.redactor = Redactor([*credential_secrets(credentials, proxy), *redact])

    @property
    def token_url(self) -> str:
        return self.credentials.token_url

    def _request_parts(self) -> tuple[dict[str, str], dict[str, str]]:
        creds = self.credentials
        form = {"grant_type": "client_credentials"}
        headers = {"Accept": "application/json"}
        secret = creds.client_secret
        if creds.certificate is not None or secret is None:
            form["client_id"] = creds.client_id
        elif creds.client_auth == "post":
            form["client_id"] = creds.client_id
            form["client_secret"] = secret.reveal()
        elif creds.client_auth == "basic":
            headers["Authorization"] = _basic(creds.client_id, secret.reveal())
        else:  # basic-encoded, RFC 6749 §2.3.1
            headers["Authorization"] = _basic(_form_encode(creds.client_id), _form_encode(secret.reveal()))
        form.update(creds.form_params())
        return form, headers

    async def fetch(self) -> TokenResponse:
        form, headers = self._request_parts()
        url = self.token_url
        try:
            async with self._session.post(
                url,
                data=form,
                headers=headers,
                ssl=self._ssl,
                timeout=self._timeout,
                allow_redirects=False,
                proxy=self._proxy,
            ) as resp:
                body = await resp.content.read(MAX_TOKEN_RESPONSE)
                status = resp.status
                content_type = resp.content_type
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise self._transport_error(exc).redact(self.redactor) from None
        try:
            return self._interpret(status, content_type, body)
        except TokenError as exc:
            raise exc.redact(self.redactor) from None

    def _transport_error(self, exc: BaseException) -> TokenError:
        """No HTTP answer from the token server: say why, in words that point at the fix.

        The reason strings inside (TLS library, operating system, an outbound proxy's reason phrase) come
        from outside: each is redacted, then cut to 300 characters, before it goes into ``detail``.
        """
        with_cert = self.credentials.certificate is not None
        clean = self.redactor
        status, error, outcome = 503, "unreachable", "network"
        if isinstance(exc, TimeoutError):
            status, error, outcome = 504, "timeout", "timeout"
            detail = f"the token server did not answer within {self._timeout.total:g} s"
        elif isinstance(exc, aiohttp.ClientHttpProxyError):
            error, outcome = "proxy_error", "proxy"
            detail = outbound_proxy_detail(exc, "the token server", clean)
        elif isinstance(exc, aiohttp.ClientConnectorCertificateError):
            error, outcome = "tls_error", "tls"
            detail = (
                f"the token server's TLS certificate is not trusted: {clean(str(exc.certificate_error))}; "
                "if a corporate proxy inspects TLS, add its CA with --ca-bundle FILE"
            )
        elif isinstance(exc, aiohttp.ClientSSLError):
            error, outcome = "tls_error", "tls"
            detail = _tls_detail(exc, with_cert, clean)
        elif isinstance(exc, aiohttp.ClientConnectorError):
            detail = f"cannot connect to the token server: {_describe(exc, clean)}"
        elif with_cert:
            # TLS 1.3: the server checks the client certificate after the handshake has "succeeded" on our
            # side, so a refusal shows up as a reset/closed connection on the first read
            error, outcome = "tls_error", "tls"
            detail = (
                "the token server closed the connection right after the TLS handshake "
                f"({_describe(exc, clean)}): with a client certificate this usually means it rejected the "
                "certificate; check that it belongs to this service key, that its chain reaches a root the "
                "server trusts, and that the token URL is the authentication.cert. host"
            )
        else:
            detail = f"the connection to the token server failed: {_describe(exc, clean)}"
        return TokenError(status=status, error=error, outcome=outcome, detail=detail, token_url=self.token_url)

    def _interpret(self, status: int, content_type: str, body: bytes) -> TokenResponse:
        url = self.token_url
        data: Any = None
        with contextlib.suppress(ValueError):
            data = json.loads(body)
        if status != 200 or not isinstance(data, dict) or "access_token" not in data:
            error = data.get("error") if isinstance(data, dict) else None
            description = data.get("error_description") if isinstance(data, dict) else None
            # the server's own words: secrets out first, then cut (a token server may quote what it received)
            if isinstance(error, str):
                error = self.redactor(error, ERROR_CODE_LIMIT)
            description = self.redactor(description) if isinstance(description, str) else None
            if isinstance(error, str) and error:
                hint = _HINTS.get(error)
                if error in ("invalid_client", "unauthorized_client") and self.credentials.certificate is not None:
                    hint = (
                        "the token server did not accept the client certificate for this client id; a certificate "
                        "key must use the authentication.cert. host, and the chain must reach a root SAP trusts"
                    )
                detail = f"the token server refused the request: {error}"
                if description:
                    detail += f" ({description})"
                if hint:
                    detail += f"; {hint}"
                raise TokenError(
                    status=502,
                    error=error,
                    description=description or None,
                    detail=detail,
                    token_url=url,
                    http_status=status,
                )
            if status == 200:
                detail = "the token server answered 200 but without an access_token in a JSON body"
                if content_type == "text/html":
                    detail += " (an HTML page: is the token URL right? it usually ends in /oauth/token)"
            else:
                detail = f"the token server answered HTTP {status} without an OAuth error"
                if status == 404:
                    detail += " (not found: is the token URL right? it usually ends in /oauth/token)"
            raise TokenError(
                status=502,
                error="bad_response",
                outcome="bad_response",
                detail=detail,
                token_url=url,
                http_status=status,
            )
        access_token = data["access_token"]
        if not isinstance(access_token, str) or not access_token:
            raise TokenError(
                status=502,
                error="bad_response",
                detail="the token server returned an empty access_token",
                token_url=url,
                http_status=status,
            )
        expires_in = data.get("expires_in", 3600)
        try:
            lifetime = float(expires_in)
        except (TypeError, ValueError):
            lifetime = 3600.0
        if lifetime <= 0:
            lifetime = 60.0
        scope = data.get("scope")
        return TokenResponse(
            access_token=Secret(access_token),
            expires_in=lifetime,
            token_type=str(data.get("token_type", "bearer")),
            scope=scope if isinstance(scope, str) else None,
            raw=data,
        )


def outbound_proxy_detail(exc: aiohttp.ClientHttpProxyError, target: str, redactor: Redactor | None = None) -> str:
    """The corporate proxy refused the CONNECT tunnel: say so, with its status, and how to fix a 407.

    Its reason phrase comes from outside: redacted and cut short (``redactor``, or none but the cut).
    """
    reason = (redactor or Redactor())(str(exc.message))
    detail = f"the outbound HTTP proxy refused the tunnel to {target}: HTTP {exc.status} {reason}".rstrip()
    if exc.status == 407:
        detail += "; it wants credentials: put them into the proxy URL (http://user:password@proxy:port) in "
        detail += "outbound_proxy or HTTPS_PROXY"
    return detail


def _describe(exc: BaseException, redactor: Redactor) -> str:
    """A short cause without secrets (and without reprs of SSL contexts that aiohttp puts into its texts):
    the reason comes from outside, so it is redacted, then cut to 300 characters."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        os_error = exc.os_error
        reason = os_error.strerror or str(os_error) or os_error.__class__.__name__
        return redactor(f"{exc.host}:{exc.port}: {reason}")
    return redactor(str(exc) or exc.__class__.__name__)


def _tls_detail(exc: aiohttp.ClientSSLError, with_cert: bool, redactor: Redactor) -> str:
    reason = _describe(exc, redactor)
    lowered = reason.lower()
    if with_cert and any(
        word in lowered for word in ("alert", "certificate required", "bad certificate", "unknown ca", "handshake")
    ):
        return (
            "the token server rejected the client certificate during the TLS handshake: "
            f"{reason}; check that the certificate belongs to this service key, that its chain reaches a root the "
            "server trusts, and that the token URL is the authentication.cert. host"
        )
    if "wrong version number" in lowered:
        return f"TLS handshake with the token server failed: {reason} (is the URL http:// instead of https://?)"
    return f"TLS handshake with the token server failed: {reason}"


# --------------------------------------------------------------------------- manager


@dataclass
class FetchObserver:
    """Hooks for metrics: called with (outcome, seconds) after each fetch."""

    on_fetch: Callable[[str, float], None] = lambda outcome, seconds: None


class TokenManager:
    """Cache, single flight, background refresh ahead of expiry, and backoff on failure for one credential.

    Two retry schedules after a failed fetch, both single flight (one fetch at a time, shared by everyone):

    * the background loop (``_refresh_loop``) retries with jittered exponential backoff (``backoff``,
      0.5 s … 30 s): a token server that is down for long is asked rarely when nobody waits;
    * requests that find no valid token (``get``) get the remembered error at once for
      ``request_retry_interval`` seconds (2 s) after the last failure, and then the next of them asks the
      token server again, whatever the backoff says. So during an outage the token server gets at most one
      token request per 2 s (the background loop, too, waits at least that long while no valid token
      exists), and the first request after it is back succeeds within about 2 s instead of up to 30 s.
      ``None`` takes the source's ``request_retry_interval`` attribute if it has one (a worker's broker
      source may want a shorter one), else ``REQUEST_RETRY_INTERVAL``.

    ``invalidation_pause``: after an upstream rejected a *fresh* token, upstream 401s stop purging the
    shared token for this long (30 s); see ``invalidate``. ``redact``: secrets besides the credential's
    own (the inbound API key) to take out of every ``TokenError`` before anyone sees it; the source's own
    ``redactor`` (a ``ClientCredentialsSource``'s: client secret, key and PKCS#12 passwords) is included.
    """

    def __init__(
        self,
        source: TokenSource,
        name: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        observer: FetchObserver | None = None,
        backoff: Callable[[int], float] | None = None,
        request_retry_interval: float | None = None,
        invalidation_pause: float = INVALIDATION_PAUSE,
        redact: Iterable[Secret | str | None] = (),
    ) -> None:
        self.source = source
        self.name = name
        self._clock = clock
        self._observer = observer or FetchObserver()
        self._current: Token | None = None
        self._inflight: asyncio.Future[Token] | None = None
        self._fetch_task: asyncio.Task[None] | None = None
        self._last_error: TokenError | None = None
        self._retry_at = 0.0
        self._failures = 0
        self._refresher: asyncio.Task[None] | None = None
        self._wakeup = asyncio.Event()
        self._backoff = backoff or self.backoff_delay
        if request_retry_interval is None:
            request_retry_interval = getattr(source, "request_retry_interval", REQUEST_RETRY_INTERVAL)
        self._request_retry_interval = float(request_retry_interval)
        self._request_retry_at = 0.0
        self._invalidation_pause = invalidation_pause
        self._pause_until = 0.0  # upstream 401s do not purge the token before this (monotonic clock)
        self._pause_scope: str | None = None  # the scope of the token that started the pause
        source_redactor = getattr(source, "redactor", None)
        self._redactor = (
            source_redactor.with_secrets(redact) if isinstance(source_redactor, Redactor) else Redactor(redact)
        )
        self.fetch_count = 0

    # -- public API ---------------------------------------------------------------------------

    @property
    def current(self) -> Token | None:
        return self.usable()

    def usable(self) -> Token | None:
        """The current token while it is usable, else None (``current`` as a method: the request path asks
        once per request, and a property is a slow attribute lookup on CPython 3.11)."""
        token = self._current
        clock = self._clock  # an instance attribute: called through a local, the lookup specializes
        if token is not None and clock() < token.usable_until:
            return token
        return None

    @property
    def last_error(self) -> TokenError | None:
        return self._last_error

    async def get(self) -> Token:
        """The current token, or a fresh one (shared with every concurrent caller)."""
        token = self.current
        if token is not None:
            return token
        if self._inflight is None and self._last_error is not None and self._clock() < self._request_retry_at:
            # fail fast: the token server was asked less than request_retry_interval ago and refused / was
            # unreachable; the background backoff does not matter here (see the class docstring)
            raise self._last_error
        return await self._fetch_shared(invalidation=False)

    def invalidate(self, token: Token) -> bool:
        """The upstream answered 401 to ``token``. Returns True when the request may be replayed with a new token.

        * ``token`` is not the current token any more (another request replaced it): True, the replay takes
          the current one; nothing is dropped.
        * The token is **fresh** — fetched for a 401 replay (``via_invalidation``) less than
          ``invalidation_pause`` seconds ago — so the upstream rejects a brand-new token as well: the 401 is
          not about the token (most likely the client lacks a role or authorisation for that path), and
          purging would only replace the token every client shares, once per request. Purging pauses for
          ``invalidation_pause`` seconds (30 s), with one WARNING: False, the client gets the upstream's
          401 unchanged and every other client keeps the shared token.
        * During the pause: False (logged at DEBUG only), unless the current token is older than
          ``invalidation_pause`` (it is not fresh any more, so a 401 may be about it again). The pause also
          ends when the token server's answer changes: a new token (a refresh) with another scope than
          the one that started the pause (``_note_new_token``).
        * Otherwise the token is dropped: True, the replay fetches a new one (``get_after_invalidation``).

        The pause is per manager, i.e. per credential (routes with equal credentials share one manager).
        """
        current = self._current
        if current is None or current.value != token.value:
            return True  # already replaced by another request; the replay takes the new one
        now = self._clock()
        age = now - current.obtained_at
        if age < self._invalidation_pause:
            if now < self._pause_until:
                log.debug(
                    "route %s: upstream answered 401 with token fp %s; purging is paused", self.name, token.fingerprint
                )
                return False
            if current.via_invalidation:
                self._pause_until = now + self._invalidation_pause
                self._pause_scope = current.scope
                log.warning(
                    "route %s: the upstream answered 401 also to a fresh token (fp %s, fetched %.1f s ago for a 401 "
                    "replay): the 401 is not about the token; most likely the client lacks a role or authorisation "
                    "for that path. For the next %.0f s such 401s go to the client unchanged and the token every "
                    "client shares stays in use",
                    self.name,
                    token.fingerprint,
                    age,
                    self._invalidation_pause,
                )
                return False
        self._pause_until = 0.0
        log.info("route %s: upstream answered 401 with token fp %s; fetching a new one", self.name, token.fingerprint)
        self._current = None
        rejected = getattr(self.source, "rejected", None)
        if rejected is not None:
            rejected(token)  # a broker source passes it on, so that one invalidation serves every worker
        return True

    async def get_after_invalidation(self) -> Token:
        token = self.current
        if token is not None:
            return token
        return await self._fetch_shared(invalidation=True)

    async def fetch_once(self) -> Token:
        """Ask the source once, now, and make the answer the current token; raise ``TokenError`` otherwise.

        No single flight, no retry, no backoff, and a failure leaves nothing behind (no ``last_error``, no
        retry time): for a reload that tries *new* credentials exactly once before it takes effect
        (``proxy.app.Runtime.fetch_new_tokens``), on a manager nobody else uses yet. Success and failure
        are reported to the observer (metrics) like any fetch. Other exceptions propagate unchanged.
        """
        started = self._clock()
        self.fetch_count += 1
        try:
            response = await self.source.fetch()
        except TokenError as exc:
            exc.redact(self._redactor)  # as in _run_fetch: the caller logs it (``reload refused: …``)
            self._observer.on_fetch(exc.outcome, self._clock() - started)
            raise
        now = self._clock()
        token = Token(value=response.access_token, obtained_at=now, lifetime=response.expires_in, scope=response.scope)
        self._current = token
        self._last_error = None
        self._failures = 0
        self._retry_at = 0.0
        self._observer.on_fetch("ok", now - started)
        log.info("route %s: token fp %s obtained, expires_in %.0f s", self.name, token.fingerprint, token.lifetime)
        self._wakeup.set()
        return token

    def start(self) -> None:
        """Begin the background loop: fetch now (so readiness turns green) and refresh ahead of expiry."""
        if self._refresher is None:
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop(), name=f"token-{self.name}")

    async def close(self) -> None:
        task, self._refresher = self._refresher, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._inflight is not None and not self._inflight.done():
            self._inflight.cancel()

    def seconds_to_expiry(self) -> float | None:
        token = self._current
        return None if token is None else token.expires_at - self._clock()

    # -- internals ----------------------------------------------------------------------------

    async def _fetch_shared(self, *, invalidation: bool) -> Token:
        if self._inflight is None:
            loop = asyncio.get_running_loop()
            self._inflight = loop.create_future()
            self._fetch_task = loop.create_task(
                self._run_fetch(self._inflight, invalidation), name=f"token-fetch-{self.name}"
            )
        # shield: one caller giving up (client disconnect) must not cancel the fetch for the others
        return await asyncio.shield(self._inflight)

    async def _run_fetch(self, future: asyncio.Future[Token], invalidation: bool) -> None:
        started = self._clock()
        self.fetch_count += 1
        try:
            response = await self.source.fetch()
        except TokenError as exc:
            exc.redact(self._redactor)  # before anyone sees it: 502 body, log, readiness, the broker's answer
            self._record_failure(exc, self._clock() - started)
            if not future.done():
                future.set_exception(exc)
                future.exception()  # mark retrieved: nobody may be waiting
        except asyncio.CancelledError:
            if not future.done():
                future.cancel()
            raise
        except Exception as exc:  # defensive: a bug must not leave waiters hanging
            error = TokenError(
                status=502,
                error="internal_error",
                detail=f"token fetch failed: {exc.__class__.__name__}",
                token_url=self.source.token_url,
            )
            self._record_failure(error, self._clock() - started)
            log.exception("route %s: unexpected error while fetching a token", self.name)
            if not future.done():
                future.set_exception(error)
                future.exception()
        else:
            now = self._clock()
            token = Token(
                value=response.access_token,
                obtained_at=now,
                lifetime=response.expires_in,
                scope=response.scope,
                via_invalidation=invalidation,
            )
            self._current = token
            self._last_error = None
            self._failures = 0
            self._retry_at = 0.0
            self._request_retry_at = 0.0
            self._observer.on_fetch("ok", now - started)
            log.info(
                "route %s: token fp %s obtained, expires_in %.0f s",
                self.name,
                token.fingerprint,
                token.lifetime,
            )
            self._note_new_token(token)
            if not future.done():
                future.set_result(token)
            self._wakeup.set()
        finally:
            if self._inflight is future:
                self._inflight = None

    def _note_new_token(self, token: Token) -> None:
        """A paused 401 purge ends early when the token server's answer changes (another scope: a role may
        have been granted since)."""
        if self._pause_until and token.scope != self._pause_scope:
            self._pause_until = 0.0
            log.info(
                "route %s: the new token fp %s has another scope than the one the upstream rejected; "
                "upstream 401s purge the token again",
                self.name,
                token.fingerprint,
            )

    def _record_failure(self, exc: TokenError, seconds: float) -> None:
        now = self._clock()
        self._failures += 1
        delay = self._backoff(self._failures)
        self._last_error = exc
        self._retry_at = now + delay
        self._request_retry_at = now + self._request_retry_interval
        self._observer.on_fetch(exc.outcome, seconds)
        if self.current is not None:
            plan = f"the current token stays in use until it expires; next attempt in {delay:.1f} s"
        else:
            plan = (
                f"no valid token: requests get this error for {self._request_retry_interval:g} s, then the next "
                f"one asks again (without requests: in {max(delay, self._request_retry_interval):.1f} s)"
            )
        log.warning(
            "route %s: token request to %s failed (%s): %s; %s",
            self.name,
            exc.token_url,
            exc.error,
            exc.detail,
            plan,
        )

    @staticmethod
    def backoff_delay(failures: int) -> float:
        """Exponential backoff with full jitter in its upper half: 0.5 s, 1 s, 2 s … capped at 30 s."""
        base = min(BACKOFF_CAP, BACKOFF_FIRST * float(1 << min(max(0, failures - 1), 16)))
        return base / 2 + random.random() * base / 2

    async def _refresh_loop(self) -> None:
        """Fetch when there is no token, refresh ahead of expiry; after a failure wait for the backoff, and
        while no valid token exists at least ``request_retry_interval`` (the token server is then asked at
        most that often, by requests or by this loop)."""
        while True:
            token = self._current
            now = self._clock()
            if token is None or now >= token.refresh_at:
                retry_at = self._retry_at
                if self.current is None:
                    retry_at = max(retry_at, self._request_retry_at)
                if self._last_error is not None and now < retry_at:
                    await self._sleep(retry_at - now)
                    continue
                with contextlib.suppress(TokenError):
                    await self._fetch_shared(invalidation=False)
                continue
            await self._sleep(token.refresh_at - now)

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake early when a request-driven fetch installs a new token."""
        self._wakeup.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), timeout=max(0.01, seconds))
