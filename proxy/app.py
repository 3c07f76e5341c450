"""Assemble the proxy for one version of the configuration: TLS contexts, token managers, upstream pool and
the filter chain.

``prepare`` does the synchronous, fail-early part (certificates loaded and matched, TLS contexts built) so
that a broken key stops start-up with exit code 2; ``Runtime`` owns the pool, the token managers and the
pipeline, and is swapped whole on reload (requests in flight finish on the runtime they started with).
``ProxyState`` holds the current runtime; the server owns it. There is no module-level state.

Reloads are safe (``ProxyState.replace``, the one path every reload takes: SIGHUP, the file watch and
``POST /-/reload``, in a single process, in the supervisor's token broker and in a worker). The successor
runtime is built with the running one as its ``predecessor``:

* a credential whose token is fetched exactly as before (``token_key``: same route name, same ``Credentials``,
  same client certificate chain, same CA bundle file and contents, same outbound proxy, same token timeouts)
  keeps its running ``TokenManager`` -- and with it the current token, its refresh schedule and backoff. The
  manager (and the token session it fetches through) changes owner at the swap: the replaced runtime's
  ``close()`` leaves it alone;
* every other credential (new, or changed in any of those ways) gets a new manager that fetches **one** token
  before the swap (``TokenManager.fetch_once``: no retry, no backoff, no background loop yet). If any of
  those fetches fails, the reload is refused (``ReloadRefused``, its message names the route and the token
  server's error, never a secret), everything built for it is closed, and the running runtime keeps serving
  with its token.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import aiohttp
from aiohttp import web
from cryptography.hazmat.primitives import hashes

from proxy.certificates import CertificateError, ClientIdentity, key_file_permission_warning, load_client_identity
from proxy.config import Config, ConfigError, Route
from proxy.credentials import Credentials
from proxy.filters.admin import (
    ADMIN_PATHS,
    RELOAD_PATH,
    AdminFilter,
    admin_reply,
    not_found,
    reload_refusal,
    reload_reply,
)
from proxy.filters.base import Chain, Filter
from proxy.filters.credentials import CredentialsFilter
from proxy.filters.csrf import CsrfFilter
from proxy.filters.guard import GuardFilter
from proxy.filters.inspect import InspectFilter
from proxy.filters.links import LinksFilter
from proxy.filters.observe import ObserveFilter
from proxy.filters.route import LocationFilter, RouteFilter
from proxy.guard import Guard, GuardedRequest, GuardSettings
from proxy.http.heads import Reply, RequestHead
from proxy.http.upstream import UpstreamPool
from proxy.inspector.adminapp import add_inspector_routes
from proxy.inspector.api import InspectorApi
from proxy.inspector.recorder import Recorder
from proxy.logs import AccessLog
from proxy.metrics import ProxyMetrics
from proxy.outbound import OutboundProxies
from proxy.pipeline import Pipeline, PipelineSettings
from proxy.router import Router
from proxy.tls import TlsConfigError, client_ssl_context
from proxy.tokens import ClientCredentialsSource, FetchObserver, TokenError, TokenManager, TokenSource

log = logging.getLogger("odata_auth_proxy")

CERTIFICATE_CHECK_INTERVAL = 86400.0
IDLE_CHECK_INTERVAL = 5.0


# --------------------------------------------------------------------------- preparation (sync, fail early)


@dataclass(frozen=True)
class PreparedCredential:
    credentials: Credentials
    ssl_context: ssl.SSLContext
    identity: ClientIdentity | None


@dataclass(frozen=True)
class Prepared:
    """A validated config with every credential's TLS context built once."""

    config: Config
    credentials: dict[Credentials, PreparedCredential]
    warnings: tuple[str, ...] = ()


def prepare(config: Config) -> Prepared:
    """Load and check certificates and CA bundles; raise ``ConfigError`` with an actionable line."""
    warnings: list[str] = []
    prepared: dict[Credentials, PreparedCredential] = {}
    for route in config.routes:
        creds = route.credentials
        if creds in prepared:
            continue
        try:
            ctx = client_ssl_context(config.ca_bundle)
        except TlsConfigError as exc:
            raise ConfigError(str(exc)) from None
        identity = None
        if creds.certificate is not None:
            try:
                identity = load_client_identity(creds.certificate)
                identity.apply_to(ctx)
            except CertificateError as exc:
                raise ConfigError(f"route {route.name}: {exc}") from None
            for warning in (
                identity.chain_warning(),
                identity.expiry_warning(),
                key_file_permission_warning(creds.certificate.key),
                key_file_permission_warning(creds.certificate.pkcs12),
            ):
                if warning:
                    warnings.append(f"route {route.name}: {warning}")
        prepared[creds] = PreparedCredential(creds, ctx, identity)
    return Prepared(config=config, credentials=prepared, warnings=tuple(warnings))


# --------------------------------------------------------------------------- runtime (async resources)

# Where a worker process's token managers fetch from instead of the token server (``proxy.workers``).
TokenSourceFactory = Callable[[Route, PreparedCredential], TokenSource]

# What decides whether a reload may keep a running token manager (``token_key``).
TokenKey = tuple[object, ...]


class ReloadRefused(Exception):
    """A reload must not take effect (new credentials got no token): the message says why, without secrets."""


@dataclass(frozen=True)
class ReloadResult:
    """What one reload came to, for whoever asked: ``POST /-/reload`` answers with it (SIGHUP and the file
    watch only log). ``status`` is the HTTP status of that answer: 200 reloaded; 409 refused (invalid file,
    new credentials without a token, draining: the running configuration keeps serving); 500 internal error;
    501 this process cannot reload. ``detail`` is the reload's log line (never a secret)."""

    status: int
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200


# How ``POST /-/reload`` starts a reload: the serving process's own, or (a worker) the supervisor's.
Reloader = Callable[[], Awaitable[ReloadResult]]


def token_key(route: str, cred: PreparedCredential, config: Config, proxy: str | None, trust: str | None) -> TokenKey:
    """Everything that decides how a manager named ``route`` gets its tokens. Equal keys before and after a
    reload: the running manager (and its token) is kept. The route name is part of it because the manager
    is named after it (log lines, metrics, the token broker's route); the certificate chain and the CA bundle's
    contents because a file may change under the same path."""
    chain = tuple(c.fingerprint(hashes.SHA256()) for c in cred.identity.chain) if cred.identity is not None else ()
    timeouts = config.timeouts
    return (route, cred.credentials, chain, config.ca_bundle, trust, proxy, timeouts.token, timeouts.connect)


def _file_digest(path: str | None) -> str | None:
    if not path:
        return None
    try:
        return hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()
    except OSError:
        return None


def refusal(routes: list[str], exc: BaseException) -> str:
    """Why new credentials got no token, in one line for ``reload refused: …`` (never a secret: ``TokenError``
    texts carry none, and of anything else only the class is named)."""
    where = ("route " if len(routes) == 1 else "routes ") + ", ".join(routes)
    if not isinstance(exc, TokenError):
        return f"{where}: internal error while fetching a token with the new credentials ({exc.__class__.__name__})"
    if exc.http_status is not None and exc.error != "bad_response":
        what = f"the token server answered {exc.error} (HTTP {exc.http_status})"
    elif exc.http_status is not None:
        what = f"the token server answered HTTP {exc.http_status}"
    else:
        what = f"no token from the token server ({exc.error})"
    return f"{where}: {what} to the new credentials at {exc.token_url}: {exc.detail}"


class Runtime:
    """Upstream pool, token managers, filter chain and pipeline for one version of the configuration.

    ``token_sources``, when given, makes each manager's source (a worker's broker client); the token fetch
    metrics are then left to whoever really asks the token server (the broker).

    ``predecessor``, on reload, is the running runtime: its managers whose ``token_key`` is unchanged are used
    as they are (``inherited``; listed in ``distinct_managers`` too), and so is its token session (it does not
    depend on the configuration). Both become this runtime's own only at the swap (``take_over``); until then
    ``close()`` (a refused reload) closes just what was built here. The other managers are new and get their
    first token from ``fetch_new_tokens`` before the swap, or from their refresh loop at ``start()`` when there
    is no predecessor.
    """

    closed: bool
    token_session: aiohttp.ClientSession

    def __init__(
        self,
        prepared: Prepared,
        metrics: ProxyMetrics,
        token_sources: TokenSourceFactory | None = None,
        *,
        state: Callable[[], ProxyState] | None = None,
        access_log: AccessLog | None = None,
        worker: int | None = None,
        predecessor: Runtime | None = None,
    ) -> None:
        config = prepared.config
        self.prepared = prepared
        self.config = config
        self._metrics = metrics
        if predecessor is not None and predecessor.closed:
            predecessor = None
        self.predecessor = predecessor  # until the swap (dropped then: no chain of old runtimes stays alive)
        self.router = Router(config.routes)
        timeouts = config.timeouts
        self.proxies = OutboundProxies(config.outbound_proxy)
        upstream_tls = client_ssl_context(config.ca_bundle)
        self.pool = UpstreamPool(upstream_tls, self.proxies, timeouts.connect)
        if predecessor is not None:
            self.token_session = predecessor.token_session
        else:
            self.token_session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(), trust_env=False)
        self._owns_token_session = predecessor is None
        # the CSRF fetch: one aiohttp session to the upstreams, never carrying one client's cookies to another
        self.csrf_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=upstream_tls, limit=0, enable_cleanup_closed=False),
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )
        shared: dict[Credentials, TokenManager] = {}
        self.managers: dict[str, TokenManager] = {}
        self.inherited: list[TokenManager] = []
        self._keys: dict[TokenKey, TokenManager] = {}
        self._certificate_expiry: list[tuple[str, float]] = []
        trust = _file_digest(config.ca_bundle)
        for route in config.routes:
            creds = route.credentials
            manager = shared.get(creds)
            if manager is None:
                cred = prepared.credentials[creds]
                key = token_key(route.name, cred, config, self.proxies.for_url(creds.token_url), trust)
                kept = predecessor.reusable(key) if predecessor is not None else None
                if kept is not None:
                    self.inherited.append(kept)
                    manager = kept
                else:
                    manager = self._new_manager(route, cred, metrics, token_sources)
                shared[creds] = self._keys[key] = manager
                if cred.identity is not None:
                    self._certificate_expiry.append((route.name, cred.identity.not_after_timestamp))
            self.managers[route.name] = manager
        self.distinct_managers = list(shared.values())
        # what close() closes: the managers built here; the inherited ones join at the swap (take_over)
        self._owned = [m for m in self.distinct_managers if m not in self.inherited]
        self.csrf = CsrfFilter(self.csrf_session, self.proxies.for_url)
        current_state = state or (lambda: ProxyState(self, metrics))
        self.inspector = self._inspector(prepared, predecessor)
        admin: Filter = AdminFilter(current_state, serve=config.admin_listen is None)
        if self.inspector is not None:  # the admin filter with the inspector added (records; serves /-/, /-/api/)
            admin = InspectFilter(
                self.inspector, current_state, serve=config.admin_listen is None, stall_limit=timeouts.client_write
            )
        self.chain = Chain(
            [
                ObserveFilter(
                    metrics,
                    access_log if config.access_log else None,
                    log_query=config.log_query,
                    api_key=config.inbound_api_key,
                    worker=worker,
                ),
                GuardFilter(Guard(guard_settings(config))),
                admin,
                RouteFilter(self.router),
                LinksFilter(),
                LocationFilter(),
                self.csrf,
                CredentialsFilter(self.managers),
            ]
        )
        self.pipeline = Pipeline(
            self.chain,
            self.pool,
            PipelineSettings(
                replay_limit=config.limits.replay_buffer,
                max_body=config.limits.max_body_size,
                read_timeout=timeouts.read,
            ),
        )
        self.closed = False
        self._watch: asyncio.Task[None] | None = None
        self._expiry: asyncio.Task[None] | None = None

    def _inspector(self, prepared: Prepared, predecessor: Runtime | None) -> InspectorApi | None:
        """The inspector's answers for this configuration (None with ``ui: false``); the recorded exchanges
        carry over from the running runtime on reload."""
        config = prepared.config
        if not config.ui:
            return None
        before = predecessor.inspector if predecessor is not None else None
        admin_guard = None
        if config.admin_listen is not None:  # the admin port's own address is an allowed Host there
            host, port = config.admin_listen
            admin_guard = Guard(replace(guard_settings(config), listen_host=host, listen_port=port))

        def identity(creds: Credentials) -> ClientIdentity | None:
            cred = prepared.credentials.get(creds)
            return cred.identity if cred is not None else None

        return InspectorApi(
            before.recorder if before is not None else Recorder(),
            config,
            self.managers,
            identity,
            proxy_for=self.proxies.for_url,
            admin_guard=admin_guard,
        )

    def _new_manager(
        self, route: Route, cred: PreparedCredential, metrics: ProxyMetrics, token_sources: TokenSourceFactory | None
    ) -> TokenManager:
        creds = route.credentials
        timeouts = self.config.timeouts
        source: TokenSource
        observer = None
        if token_sources is not None:
            source = token_sources(route, cred)
        else:
            source = ClientCredentialsSource(
                creds,
                self.token_session,
                cred.ssl_context,
                timeout=timeouts.token,
                connect_timeout=timeouts.connect,
                proxy=self.proxies.for_url(creds.token_url),
                redact=(self.config.inbound_api_key,),  # a token server may quote anything it was sent
            )
            route_name = route.name

            def observe(outcome: str, seconds: float, name: str = route_name) -> None:
                metrics.token_fetch(name, outcome, seconds)

            observer = FetchObserver(on_fetch=observe)
        # a broker source retries the (local, cheap) broker on its own short schedule: the broker already
        # backs off from the token server, and a long second backoff here would only delay recovery
        return TokenManager(
            source,
            route.name,
            observer=observer,
            backoff=getattr(source, "backoff", None),
            redact=(self.config.inbound_api_key,),
        )

    def reusable(self, key: TokenKey) -> TokenManager | None:
        """The running manager a successor may keep for ``key`` (None: the successor needs a new one)."""
        manager = self._keys.get(key)
        if self.closed or manager is None or manager not in self._owned:
            return None
        return manager

    async def fetch_new_tokens(self) -> None:
        """Before the swap: one token for each manager built here (not inherited), all at once, each tried once.

        Raises ``ReloadRefused`` naming every route that got none and why; the managers that did get one keep
        it (they are closed with the runtime when the caller gives up on it)."""
        fresh = [m for m in self.distinct_managers if m not in self.inherited]
        if not fresh:
            return
        results = await asyncio.gather(*(m.fetch_once() for m in fresh), return_exceptions=True)
        problems = [
            refusal([name for name, m in self.managers.items() if m is manager], result)
            for manager, result in zip(fresh, results, strict=True)
            if isinstance(result, BaseException)
        ]
        if problems:
            raise ReloadRefused("; ".join(problems))

    def take_over(self, old: Runtime) -> None:
        """At the swap: become the owner of what this runtime shares with ``old`` (the inherited token managers,
        the token session), so that ``old.close()`` after its grace period leaves them running. Routes that are
        gone are no longer reported in ``token_expiry_seconds``."""
        for manager in self.inherited:
            if manager in old._owned:
                old._owned.remove(manager)
                self._owned.append(manager)
        if self.token_session is old.token_session and old._owns_token_session:
            old._owns_token_session = False
            self._owns_token_session = True
        for name in old.managers.keys() - self.managers.keys():
            self._metrics.untrack_token_expiry(name)
        self.predecessor = None

    def start(self) -> None:
        for name, manager in self.managers.items():
            self._metrics.track_token_expiry(name, manager.seconds_to_expiry)
        for name, not_after in self._certificate_expiry:
            self._metrics.set_certificate_expiry(name, not_after)
        for manager in self.distinct_managers:
            manager.start()
        self._expiry = asyncio.get_running_loop().create_task(self._expire_idle_connections())
        if any(cred.identity is not None for cred in self.prepared.credentials.values()):
            self._watch = asyncio.get_running_loop().create_task(self._certificate_watch())

    async def _expire_idle_connections(self, interval: float = IDLE_CHECK_INTERVAL) -> None:
        """Pooled upstream connections unused for 30 s are closed, also when no request comes to notice."""
        while True:
            await asyncio.sleep(interval)
            self.pool.expire_idle()

    async def _certificate_watch(self, interval: float = CERTIFICATE_CHECK_INTERVAL) -> None:
        """Repeat the "expires within 30 days" warning every day while running: daemons run for weeks."""
        while True:
            await asyncio.sleep(interval)
            for cred in self.prepared.credentials.values():
                warning = cred.identity.expiry_warning() if cred.identity is not None else None
                if warning:
                    log.warning("%s (%s)", warning, cred.credentials.source)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for task in (self._watch, self._expiry):
            if task is not None:
                task.cancel()
        for manager in self._owned:
            await manager.close()
        self.pipeline.log.flush()  # pending "… N more in the last 10 s" summaries
        await self.pool.close()
        await self.csrf_session.close()
        if self._owns_token_session:
            await self.token_session.close()


@dataclass
class ProxyState:
    """The mutable heart of a running proxy: the current runtime (swapped on reload) and the drain flag."""

    runtime: Runtime
    metrics: ProxyMetrics
    draining: bool = False
    retired: list[asyncio.Task[None]] = field(default_factory=list)
    #: what ``POST /-/reload`` runs (None: this process has nothing to reload from)
    reloader: Reloader | None = None

    async def replace(self, runtime: Runtime, grace: float) -> None:
        """The reload rule, for every way a reload starts: ``runtime`` (built with the current runtime as its
        ``predecessor``) fetches a token for each new or changed credential, once, and is swapped in only if
        every one of them got one; otherwise ``ReloadRefused`` is raised and ``runtime`` is closed (nothing it
        built keeps running; the current runtime, its managers and their tokens are untouched). Also refused:
        a runtime built on another predecessor (a concurrent reload won), or a proxy that began to drain
        during the fetch. The swap itself is synchronous: nothing runs between it and the caller's next step."""
        try:
            if runtime.predecessor is not None and runtime.predecessor is not self.runtime:
                raise ReloadRefused("another reload took effect meanwhile")
            await runtime.fetch_new_tokens()
            if self.draining:
                raise ReloadRefused("the proxy is draining")
        except BaseException:
            await runtime.close()
            raise
        self.swap(runtime, grace)

    def swap(self, runtime: Runtime, grace: float) -> None:
        """Install a new runtime; close the old one once in-flight requests had ``grace`` seconds to finish.
        Reloads go through ``replace`` (which calls this); what the new runtime kept from the old one is its own
        from here on (``Runtime.take_over``)."""
        old, self.runtime = self.runtime, runtime
        runtime.take_over(old)
        runtime.start()

        async def retire() -> None:
            await asyncio.sleep(grace)
            await old.close()

        self.retired.append(asyncio.get_running_loop().create_task(retire()))


def guard_settings(config: Config) -> GuardSettings:
    return GuardSettings(
        listen_host=config.listen_host,
        listen_port=config.listen_port,
        allowed_hosts=config.allowed_hosts,
        allowed_origins=config.allowed_origins,
        api_key=config.inbound_api_key,
        api_key_header=config.inbound_api_key_header,
    )


STATE_KEY = web.AppKey("state", ProxyState)


def _web_response(reply: Reply) -> web.Response:
    response = web.Response(status=reply.status, body=reply.body)
    for name, value in reply.headers:
        response.headers[name] = value
    return response


async def _admin_handler(request: web.Request) -> web.Response:
    reply = admin_reply(request.path, request.app[STATE_KEY])
    if reply is None:
        reply = not_found()
    return _web_response(reply)


async def _admin_reload(request: web.Request) -> web.Response:
    """``POST /-/reload`` on the admin port: the main port's guard (Host allow-list for the admin address,
    no cross-site request, the inbound API key when configured) and loopback rule, then the reload."""
    state = request.app[STATE_KEY]
    config = state.runtime.config
    settings = guard_settings(config)
    if config.admin_listen is not None:
        settings = replace(settings, listen_host=config.admin_listen[0], listen_port=config.admin_listen[1])
    head = RequestHead()
    head.method = request.method
    head.target = request.raw_path
    head.version = f"{request.version.major}.{request.version.minor}"
    head.headers = [(name.lower(), name, value) for name, value in request.raw_headers]
    peer = request.remote or "-"
    refusal, _ = Guard(settings).check(GuardedRequest(head, peer))
    if refusal is None:
        refusal = reload_refusal(peer, state)
    return _web_response(refusal if refusal is not None else await reload_reply(state))


def build_admin_app(state: ProxyState) -> web.Application:
    """The admin endpoints on their own listener (``--admin-listen``): an aiohttp app, since speed does not
    matter there; the answers are the main port's (``proxy.filters.admin``)."""
    admin = web.Application()
    admin[STATE_KEY] = state
    for path in ADMIN_PATHS:
        admin.router.add_get(path, _admin_handler)
    admin.router.add_post(RELOAD_PATH, _admin_reload)
    add_inspector_routes(admin, lambda request: request.app[STATE_KEY])
    return admin
