"""Build the aiohttp application: guard, routes, admin endpoints, and the resources they own.

``prepare`` does the synchronous, fail-early part (certificates loaded and matched, TLS contexts built) so
that a broken key stops start-up with exit code 2; ``Runtime`` owns the sessions and token managers and
is swapped whole on reload. Everything lives behind typed ``web.AppKey``s; there is no global state.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import secrets
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Middleware

from proxy.certificates import CertificateError, ClientIdentity, key_file_permission_warning, load_client_identity
from proxy.config import Config, ConfigError, Route
from proxy.credentials import Credentials
from proxy.exchange import EXCHANGE, Exchange, exchange_of
from proxy.forward import CLIENT_DISCONNECTED, Forwarder, ForwardSettings, json_error
from proxy.guard import GuardHolder, GuardSettings, install_guard
from proxy.logs import ACCESS_LOGGER, access_log_line, log_event
from proxy.metrics import ProxyMetrics
from proxy.outbound import OutboundProxies
from proxy.router import Router
from proxy.tls import TlsConfigError, client_ssl_context
from proxy.tokens import ClientCredentialsSource, FetchObserver, TokenManager, TokenSource

log = logging.getLogger("odata_auth_proxy")
access_log = logging.getLogger(ACCESS_LOGGER)

CERTIFICATE_CHECK_INTERVAL = 86400.0
ADMIN_PATHS = ("/-/healthz", "/-/readyz", "/-/metrics")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")


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
    """Sessions, token managers, router and forwarder for one version of the configuration.

    ``token_sources``, when given, makes each manager's source (a worker's broker client); the token fetch
    metrics are then left to whoever really asks the token server (the broker).
    """

    def __init__(
        self, prepared: Prepared, metrics: ProxyMetrics, token_sources: TokenSourceFactory | None = None
    ) -> None:
        config = prepared.config
        self.prepared = prepared
        self.config = config
        self.router = Router(config.routes)
        timeouts = config.timeouts
        connector = aiohttp.TCPConnector(
            ssl=client_ssl_context(config.ca_bundle),
            limit=0,
            limit_per_host=0,
            ttl_dns_cache=300,
            keepalive_timeout=30,
            enable_cleanup_closed=False,
        )
        self.upstream_session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, connect=timeouts.connect, sock_read=timeouts.read),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),  # never carry one client's cookies into another's request
            trust_env=False,  # proxies come from OutboundProxies (env proxies yes, ~/.netrc no)
            read_bufsize=256 * 1024,
        )
        self.token_session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(), trust_env=False)
        self.proxies = OutboundProxies(config.outbound_proxy)
        self.forwarder = Forwarder(
            self.upstream_session,
            ForwardSettings(
                replay_limit=config.limits.replay_buffer,
                max_body=config.limits.max_body_size,
                proxies=self.proxies,
                drop_headers=frozenset({config.inbound_api_key_header.lower()}),
            ),
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
        self._watch: asyncio.Task[None] | None = None

    def start(self) -> None:
        for manager in self.distinct_managers:
            manager.start()
        if any(cred.identity is not None for cred in self.prepared.credentials.values()):
            self._watch = asyncio.get_running_loop().create_task(self._certificate_watch())

    async def _certificate_watch(self, interval: float = CERTIFICATE_CHECK_INTERVAL) -> None:
        """Repeat the "expires within 30 days" warning every day while running: daemons run for weeks."""
        while True:
            await asyncio.sleep(interval)
            for cred in self.prepared.credentials.values():
                warning = cred.identity.expiry_warning() if cred.identity is not None else None
                if warning:
                    log.warning("%s (%s)", warning, cred.credentials.source)

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        for manager in self.distinct_managers:
            await manager.close()
        await self.upstream_session.close()
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


PREPARED_KEY = web.AppKey("prepared", Prepared)
METRICS_KEY = web.AppKey("metrics", ProxyMetrics)
STATE_KEY = web.AppKey("state", ProxyState)
GUARD_KEY = web.AppKey("guard", GuardHolder)
TOKEN_SOURCES_KEY: web.AppKey[TokenSourceFactory] = web.AppKey("token_sources")


async def _runtime_ctx(app: web.Application) -> AsyncIterator[None]:
    runtime = Runtime(app[PREPARED_KEY], app[METRICS_KEY], app.get(TOKEN_SOURCES_KEY))
    state = ProxyState(runtime=runtime, metrics=app[METRICS_KEY])
    state.runtime.start()
    app[STATE_KEY] = state
    yield
    for task in state.retired:
        task.cancel()
    await state.runtime.close()


# --------------------------------------------------------------------------- handlers


async def forward_handler(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    runtime = state.runtime
    if request.path.startswith("/-/"):
        return json_error(404, {"error": "not_found", "detail": "admin endpoints: " + ", ".join(ADMIN_PATHS)})
    match = runtime.router.match(request.raw_path)
    if match is None:
        prefixes = runtime.router.prefixes
        return json_error(
            404,
            {
                "error": "no_route",
                "detail": "no route matches this path; configured prefixes: " + ", ".join(prefixes),
                "prefixes": prefixes,
            },
        )
    route = match.route
    record = exchange_of(request)
    record.route = route.name
    state.metrics.request_started(route.name)
    try:
        return await runtime.forwarder.forward(request, route, match.url, runtime.managers[route.name])
    finally:
        if record.replayed:
            state.metrics.upstream_replay(route.name, record.replayed)
        if record.error and record.error != CLIENT_DISCONNECTED:
            state.metrics.upstream_errors(route.name, record.error)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    if state.draining:
        return web.json_response({"status": "draining", "detail": "shutting down"}, status=503)
    not_ready: dict[str, str] = {}
    for name, manager in state.runtime.managers.items():
        if manager.current is None:
            error = manager.last_error
            not_ready[name] = error.detail if error else "no token yet (first fetch in progress)"
    if not_ready:
        return web.json_response({"status": "not_ready", "routes": not_ready}, status=503)
    return web.json_response({"status": "ready", "routes": sorted(state.runtime.managers)})


async def metrics_handler(request: web.Request) -> web.Response:
    body, content_type = request.app[METRICS_KEY].render()
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


# --------------------------------------------------------------------------- middlewares


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def observe_middleware(initial: Config, worker: int | None = None) -> Middleware:
    """Request id, access log line and request metrics; the one place that times a request.

    ``worker``: this process's number when several serve the port (``workers`` > 1), for the access log."""

    # request ids: a random per-process prefix and a counter, unique and far cheaper than uuid4 per request
    id_prefix = secrets.token_hex(6)
    id_counter = itertools.count(1)

    @web.middleware
    async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        incoming = request.headers.get("X-Request-Id", "")
        request_id = incoming if incoming and _REQUEST_ID.match(incoming) else f"{id_prefix}-{next(id_counter):x}"
        record = Exchange(request_id=request_id)
        request[EXCHANGE] = record
        status = 500
        try:
            response = await handler(request)
            status = 499 if record.error == CLIENT_DISCONNECTED else response.status
            if not record.bytes_out and isinstance(response, web.Response):
                record.bytes_out = response.content_length or 0  # the proxy's own answers (errors, admin)
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            status = 499  # client went away (nginx's convention)
            raise
        except Exception as exc:
            log.error("internal error on %s %s: %s", request.method, request.path, exc.__class__.__name__)
            status = 500
            return json_error(500, {"error": "internal_error", "detail": exc.__class__.__name__})
        finally:
            duration = time.perf_counter() - started
            state = request.app.get(STATE_KEY)
            config = state.runtime.config if state is not None else initial  # follows reloads
            if record.route is not None and state is not None:
                state.metrics.request_finished(
                    record.route, request.method, status, duration, record.bytes_in, record.bytes_out
                )
            if config.access_log:
                target = request.raw_path if config.log_query else request.raw_path.partition("?")[0]
                api_key = config.inbound_api_key.reveal() if config.inbound_api_key else None
                if api_key and api_key in target:
                    target = target.replace(api_key, "[redacted]")  # a client put the key in the URL
                message, fields = access_log_line(
                    client=request.remote,
                    method=request.method,
                    target=target,
                    status=status,
                    bytes_out=record.bytes_out,
                    duration=duration,
                    route=record.route,
                    upstream_status=record.upstream_status,
                    token_fp=record.token_fp,
                    request_id=request_id,
                )
                if worker is not None:  # only with several worker processes
                    fields["worker"] = worker
                    message += f" worker={worker}"
                level = logging.DEBUG if request.path.startswith("/-/") else logging.INFO
                if access_log.isEnabledFor(level):
                    log_event(access_log, level, message, **fields)

    return observe


async def _add_request_id(request: web.BaseRequest, response: web.StreamResponse) -> None:
    record = request.get(EXCHANGE)
    if record is not None:
        response.headers["X-Request-Id"] = record.request_id


# --------------------------------------------------------------------------- assembly


def add_admin_routes(app: web.Application) -> None:
    app.router.add_get("/-/healthz", healthz)
    app.router.add_get("/-/readyz", readyz)
    app.router.add_get("/-/metrics", metrics_handler)


def guard_settings(config: Config) -> GuardSettings:
    return GuardSettings(
        listen_host=config.listen_host,
        listen_port=config.listen_port,
        allowed_hosts=config.allowed_hosts,
        allowed_origins=config.allowed_origins,
        api_key=config.inbound_api_key,
        api_key_header=config.inbound_api_key_header,
    )


def build_app(
    prepared: Prepared,
    metrics: ProxyMetrics | None = None,
    *,
    token_sources: TokenSourceFactory | None = None,
    worker: int | None = None,
) -> web.Application:
    config = prepared.config
    app = web.Application(
        middlewares=[observe_middleware(config, worker)],
        client_max_size=0,
        handler_args={
            "max_line_size": config.limits.max_header_size,
            "max_field_size": config.limits.max_header_size,
            "max_headers": config.limits.max_headers,
            "keepalive_timeout": 75.0,
        },
    )
    app[GUARD_KEY] = install_guard(app, guard_settings(config))  # inside observe: refusals are logged too
    app[PREPARED_KEY] = prepared
    app[METRICS_KEY] = metrics or ProxyMetrics()
    if token_sources is not None:
        app[TOKEN_SOURCES_KEY] = token_sources
    app.cleanup_ctx.append(_runtime_ctx)
    app.on_response_prepare.append(_add_request_id)
    if config.admin_listen is None:
        add_admin_routes(app)
    app.router.add_route("*", "/{tail:.*}", forward_handler)
    return app


def build_admin_app(main: web.Application) -> web.Application:
    """The admin endpoints on their own listener (``--admin-listen``), sharing the main app's state."""
    admin = web.Application()
    admin[PREPARED_KEY] = main[PREPARED_KEY]
    admin[METRICS_KEY] = main[METRICS_KEY]

    async def share_state(app: web.Application) -> None:
        with contextlib.suppress(KeyError):
            app[STATE_KEY] = main[STATE_KEY]

    admin.on_startup.append(share_state)
    add_admin_routes(admin)
    return admin
