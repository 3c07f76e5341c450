"""Assemble the proxy for one version of the configuration: TLS contexts, token managers, upstream pool and
the filter chain.

``prepare`` does the synchronous, fail-early part (certificates loaded and matched, TLS contexts built) so
that a broken key stops start-up with exit code 2; ``Runtime`` owns the pool, the token managers and the
pipeline, and is swapped whole on reload (requests in flight finish on the runtime they started with).
``ProxyState`` holds the current runtime; the server owns it. There is no module-level state.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from proxy.certificates import CertificateError, ClientIdentity, key_file_permission_warning, load_client_identity
from proxy.config import Config, ConfigError, Route
from proxy.credentials import Credentials
from proxy.filters.admin import ADMIN_PATHS, AdminFilter, admin_reply, not_found
from proxy.filters.base import Chain
from proxy.filters.credentials import CredentialsFilter
from proxy.filters.csrf import CsrfFilter
from proxy.filters.guard import GuardFilter
from proxy.filters.links import LinksFilter
from proxy.filters.observe import InFlightFilter, ObserveFilter
from proxy.filters.route import LocationFilter, RouteFilter
from proxy.guard import Guard, GuardSettings
from proxy.http.upstream import UpstreamPool
from proxy.logs import AccessLog
from proxy.metrics import ProxyMetrics
from proxy.outbound import OutboundProxies
from proxy.pipeline import Pipeline, PipelineSettings
from proxy.router import Router
from proxy.tls import TlsConfigError, client_ssl_context
from proxy.tokens import ClientCredentialsSource, FetchObserver, TokenManager, TokenSource

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


class Runtime:
    """Upstream pool, token managers, filter chain and pipeline for one version of the configuration.

    ``token_sources``, when given, makes each manager's source (a worker's broker client); the token fetch
    metrics are then left to whoever really asks the token server (the broker).
    """

    def __init__(
        self,
        prepared: Prepared,
        metrics: ProxyMetrics,
        token_sources: TokenSourceFactory | None = None,
        *,
        state: Callable[[], ProxyState] | None = None,
        access_log: AccessLog | None = None,
        worker: int | None = None,
    ) -> None:
        config = prepared.config
        self.prepared = prepared
        self.config = config
        self.router = Router(config.routes)
        timeouts = config.timeouts
        self.proxies = OutboundProxies(config.outbound_proxy)
        upstream_tls = client_ssl_context(config.ca_bundle)
        self.pool = UpstreamPool(upstream_tls, self.proxies, timeouts.connect)
        self.token_session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(), trust_env=False)
        # the CSRF fetch: one aiohttp session to the upstreams, never carrying one client's cookies to another
        self.csrf_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=upstream_tls, limit=0, enable_cleanup_closed=False),
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )
        shared: dict[Credentials, TokenManager] = {}
        self.managers: dict[str, TokenManager] = {}
        for route in config.routes:
            creds = route.credentials
            manager = shared.get(creds)
            if manager is None:
                cred = prepared.credentials[creds]
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
                    )
                    route_name = route.name

                    def observe(outcome: str, seconds: float, name: str = route_name) -> None:
                        metrics.token_fetch(name, outcome, seconds)

                    observer = FetchObserver(on_fetch=observe)
                # a broker source retries the (local, cheap) broker on its own short schedule: the broker already
                # backs off from the token server, and a long second backoff here would only delay recovery
                manager = TokenManager(source, route.name, observer=observer, backoff=getattr(source, "backoff", None))
                shared[creds] = manager
                if cred.identity is not None:
                    metrics.set_certificate_expiry(route.name, cred.identity.not_after_timestamp)
            self.managers[route.name] = manager
            metrics.track_token_expiry(route.name, manager.seconds_to_expiry)
        self.distinct_managers = list(shared.values())
        self.csrf = CsrfFilter(self.csrf_session, self.proxies.for_url)
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
                AdminFilter(state or (lambda: ProxyState(self, metrics)), serve=config.admin_listen is None),
                RouteFilter(self.router),
                InFlightFilter(metrics),
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

    def start(self) -> None:
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
        for manager in self.distinct_managers:
            await manager.close()
        await self.pool.close()
        await self.csrf_session.close()
        await self.token_session.close()


@dataclass
class ProxyState:
    """The mutable heart of a running proxy: the current runtime (swapped on reload) and the drain flag."""

    runtime: Runtime
    metrics: ProxyMetrics
    draining: bool = False
    retired: list[asyncio.Task[None]] = field(default_factory=list)

    def swap(self, runtime: Runtime, grace: float) -> None:
        """Install a new runtime; close the old one once in-flight requests had ``grace`` seconds to finish."""
        old, self.runtime = self.runtime, runtime
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


async def _admin_handler(request: web.Request) -> web.Response:
    reply = admin_reply(request.path, request.app[STATE_KEY])
    if reply is None:
        reply = not_found()
    response = web.Response(status=reply.status, body=reply.body)
    for name, value in reply.headers:
        response.headers[name] = value
    return response


def build_admin_app(state: ProxyState) -> web.Application:
    """The admin endpoints on their own listener (``--admin-listen``): an aiohttp app, since speed does not
    matter there; the answers are the main port's (``proxy.filters.admin``)."""
    admin = web.Application()
    admin[STATE_KEY] = state
    for path in ADMIN_PATHS:
        admin.router.add_get(path, _admin_handler)
    return admin
