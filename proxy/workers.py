"""Several serving processes that share one token per credential: ``odata-auth-proxy run --workers N``.

With ``workers`` > 1 the ``run`` process becomes the **supervisor and token broker**:

* before any event loop runs it has validated the config and prepared the credentials (exit 2 as always)
  and binds the listener(s) itself (port in use: the usual one-line error, exit 1). On Linux each worker
  gets its own ``SO_REUSEPORT`` socket on the same port, so the kernel spreads connections evenly (one
  shared socket lets whichever process wakes first accept a whole burst of keep-alive connections);
  elsewhere, where ``SO_REUSEPORT`` does not balance, all workers share one socket. The supervisor keeps
  its copies, so a restarted worker serves the same socket and nothing queued on it is lost;
* it runs the real token managers (one ``Runtime``, exactly as a single process has) and serves them to
  the workers over HTTP on a Unix socket in a private directory (``tempfile.mkdtemp``: mode 0700, removed
  at exit): ``GET /token/<route>`` answers ``access_token``, ``expires_in`` (seconds *left*) and ``scope``
  from the broker's cache, or the ``TokenError`` fields; ``POST /token/<route>/rejected`` with the
  fingerprint of a token an upstream refused invalidates it once for all workers; ``GET /metrics`` is the
  broker's own registry (token fetches, token and certificate expiry); ``POST /workers/<n>/ready`` is a
  worker saying that it handles signals now;
* it starts the workers as fresh interpreters (``python -m proxy.workers``) with the listening sockets
  passed as inherited file descriptors. Not ``fork``: a worker that dies must be replaced while the
  supervisor's event loop runs, and a child forked from a running loop (asyncio or uvloop) would inherit
  its selector, signal wake-up fd and threads. A worker re-reads the configuration from the same flags and
  environment (listen address pinned to what the supervisor bound), so a reload is the ordinary one;
* ``POST /-/reload`` reaches a worker, which asks the broker (``POST /reload``): the supervisor reloads as on
  SIGHUP and the worker answers with its outcome;
* it forwards SIGTERM/SIGINT (drain) and SIGHUP (after reloading its own credentials; to a worker that
  has not said "ready" yet only once it does, as SIGHUP's default action would kill it), and restarts a
  worker that died, with a short backoff. A second stop signal kills the workers and exits 1.
  A reload follows the single process's rule (``proxy.app.ProxyState.replace``) twice: the broker keeps the
  tokens of unchanged credentials and fetches one, once, for new or changed ones before its swap; when that
  fails the reload is refused there (one ``reload refused: route …`` line) and the workers are not told at
  all. Otherwise each worker reloads the same way against the broker: it keeps its token for unchanged
  credentials and asks the broker (which has the new token already) for the others.

A worker is an ordinary ``ProxyServer`` (guard, forwarder, metrics, admin endpoints) whose token managers
fetch from the broker (``BrokerTokenSource``) instead of the token server: the hot path stays a dict
lookup in the worker, its refresh ahead of expiry asks the broker, which answers from its cache.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web

from proxy.app import Prepared, PreparedCredential, ProxyState, Reloader, ReloadRefused, ReloadResult, Runtime
from proxy.config import Config, ConfigError, Overrides, Route
from proxy.guard import listen_address_problem
from proxy.logs import ACCESS_LOGGER, setup_logging
from proxy.metrics import ProxyMetrics
from proxy.redact import Secret
from proxy.server import (
    ProxyServer,
    StartupError,
    bind_error,
    install_lifecycle_signals,
    refused_reload,
    token_summary,
)
from proxy.tokens import MAX_TOKEN_RESPONSE, Token, TokenError, TokenManager, TokenResponse
from proxy.watch import FileWatcher, watched_files

log = logging.getLogger("odata_auth_proxy")

BROKER_SOCKET = "broker.sock"
BROKER_URL = "http://broker"  # the host is ignored: the connector goes to the Unix socket
RESTART_FIRST = 0.5  # seconds before the first restart of a worker that died
RESTART_CAP = 30.0
RESTART_RESET_AFTER = 10.0  # a worker that lived this long gets the short delay again
BROKER_RETRY = 1.0  # a worker asks the broker again after a failed answer this much later (± jitter)
STOP_MARGIN = 5.0  # on top of shutdown_timeout before workers that are still draining are killed
PARENT_CHECK_INTERVAL = 1.0


# --------------------------------------------------------------------------- the worker's token source


class BrokerTokenSource:
    """A ``TokenSource`` that asks the supervisor's token broker instead of the token server.

    Same interface as ``ClientCredentialsSource`` (``fetch()``, ``token_url``), plus ``rejected(token)``:
    the manager calls it when an upstream answered 401 and it drops the token; the next fetch then tells
    the broker, which invalidates that token once for every worker (or answers with its successor when
    another worker already did)."""

    # the broker is local and cheap, and it already keeps the token server from being hammered (one fetch per
    # 2 s during an outage): a worker may ask it again sooner
    request_retry_interval = BROKER_RETRY

    def __init__(self, session: aiohttp.ClientSession, route: str, token_url: str, timeout: float) -> None:
        self._session = session
        self.route = route
        self._token_url = token_url
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._rejected: str | None = None

    @property
    def token_url(self) -> str:
        return self._token_url

    def rejected(self, token: Token) -> None:
        self._rejected = token.fingerprint

    @staticmethod
    def backoff(failures: int) -> float:
        return BROKER_RETRY * (0.75 + random.random() / 2)

    def _take_rejected(self) -> str | None:
        fingerprint, self._rejected = self._rejected, None
        return fingerprint

    async def fetch(self) -> TokenResponse:
        response = await self._ask(self._take_rejected())
        late = self._take_rejected()
        if late is not None and response.access_token.fingerprint == late:
            # the 401 arrived while this fetch was under way and the broker answered with that very token:
            # ask again with the rejection instead of installing a token the upstream just refused
            response = await self._ask(late)
        return response

    async def _ask(self, rejected: str | None) -> TokenResponse:
        url = f"{BROKER_URL}/token/{quote(self.route, safe='')}"
        try:
            if rejected is None:
                request = self._session.get(url, timeout=self._timeout)
            else:
                request = self._session.post(url + "/rejected", json={"fingerprint": rejected}, timeout=self._timeout)
            async with request as resp:
                body = await resp.content.read(MAX_TOKEN_RESPONSE)
        except TimeoutError:
            raise TokenError(
                status=504,
                error="timeout",
                outcome="timeout",
                detail=f"the token broker (supervisor process) did not answer within {self._timeout.total:g} s",
                token_url=self._token_url,
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise TokenError(
                status=503,
                error="broker_unreachable",
                outcome="network",
                detail=f"cannot reach the token broker (the supervisor process): {exc.__class__.__name__}; "
                "is the odata-auth-proxy supervisor still running?",
                token_url=self._token_url,
            ) from None
        return self._interpret(body)

    def _interpret(self, body: bytes) -> TokenResponse:
        data: Any = None
        with contextlib.suppress(ValueError):
            data = json.loads(body)
        if isinstance(data, dict) and isinstance(data.get("access_token"), str) and data["access_token"]:
            scope = data.get("scope")
            expires_in = data.get("expires_in")
            return TokenResponse(
                access_token=Secret(data["access_token"]),
                expires_in=float(expires_in) if isinstance(expires_in, int | float) and expires_in > 0 else 1.0,
                token_type="bearer",
                scope=scope if isinstance(scope, str) else None,
                raw={},
            )
        error = data.get("token_error") if isinstance(data, dict) else None
        if isinstance(error, dict):
            raise token_error_from_json(error, self._token_url)
        raise TokenError(
            status=502,
            error="broker_error",
            detail="the token broker (supervisor process) gave an answer this worker does not understand",
            token_url=self._token_url,
        )


def token_error_to_json(exc: TokenError) -> dict[str, Any]:
    return {
        "status": exc.status,
        "error": exc.error,
        "detail": exc.detail,
        "token_url": exc.token_url,
        "description": exc.description,
        "http_status": exc.http_status,
        "outcome": exc.outcome,
    }


def token_error_from_json(data: dict[str, Any], token_url: str) -> TokenError:
    def text(name: str, default: str) -> str:
        value = data.get(name)
        return value if isinstance(value, str) and value else default

    status = data.get("status")
    http_status = data.get("http_status")
    description = data.get("description")
    return TokenError(
        status=status if status in (502, 503, 504) else 502,
        error=text("error", "broker_error"),
        detail=text("detail", "the token broker reported an error"),
        token_url=text("token_url", token_url),
        description=description if isinstance(description, str) else None,
        http_status=http_status if isinstance(http_status, int) else None,
        outcome=text("outcome", text("error", "broker_error")),
    )


# --------------------------------------------------------------------------- the broker (in the supervisor)


class Broker:
    """The supervisor's token managers (one ``Runtime``, swapped on reload) served on a Unix socket."""

    def __init__(
        self,
        prepared: Prepared,
        directory: Path,
        on_ready: Callable[[int, int], None] = lambda index, pid: None,
        on_reload: Reloader | None = None,
    ) -> None:
        self.metrics = ProxyMetrics()
        self._on_ready = on_ready
        self._on_reload = on_reload
        self.state = ProxyState(runtime=Runtime(prepared, self.metrics), metrics=self.metrics)
        self.path = directory / BROKER_SOCKET
        self._replaced: list[Runtime] = []
        app = web.Application()
        app.router.add_get("/token/{route}", self._token)
        app.router.add_post("/token/{route}/rejected", self._rejected)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/workers/{index:[0-9]+}/ready", self._ready)
        app.router.add_post("/reload", self._reload)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        self._started = False

    async def start(self) -> None:
        self.state.runtime.start()
        self._started = True
        await self._runner.setup()
        try:
            await web.UnixSite(self._runner, str(self.path)).start()
        except OSError as exc:
            raise StartupError(f"cannot start the token broker on {self.path}: {exc.strerror or exc}") from None
        os.chmod(self.path, 0o600)  # the directory is 0700 already; belt and braces

    async def swap(self, prepared: Prepared, grace: float) -> Runtime:
        """Reload the broker's token managers by the reload rule (``ProxyState.replace``): unchanged credentials
        keep their manager and token, new or changed ones must get a token before the swap. Raises
        ``ReloadRefused`` (the running managers stay) or returns the new runtime. The caller runs one at a time."""
        previous = self.state.runtime
        await self.state.replace(Runtime(prepared, self.metrics, predecessor=previous), grace=grace)
        self._replaced = [r for r in self._replaced if not r.closed]
        self._replaced.append(previous)
        return self.state.runtime

    async def close(self) -> None:
        if self._started:
            await self._runner.cleanup()
        for task in self.state.retired:
            task.cancel()
        for runtime in [*self._replaced, self.state.runtime]:
            await runtime.close()  # idempotent; each closes only what it still owns

    def _manager(self, request: web.Request) -> TokenManager | None:
        return self.state.runtime.managers.get(request.match_info["route"])

    async def _token(self, request: web.Request) -> web.Response:
        manager = self._manager(request)
        if manager is None:
            return _unknown_route(request.match_info["route"])
        try:
            token = await manager.get()
        except TokenError as exc:
            return _error_response(exc)
        return _token_response(token)

    async def _rejected(self, request: web.Request) -> web.Response:
        manager = self._manager(request)
        if manager is None:
            return _unknown_route(request.match_info["route"])
        fingerprint = None
        with contextlib.suppress(ValueError):
            data = await request.json()
            fingerprint = data.get("fingerprint") if isinstance(data, dict) else None
        try:
            current = manager.current
            if current is not None and current.fingerprint == fingerprint:
                # the first worker to report it: drop it (unless the manager refuses to loop) and fetch anew
                token = await manager.get_after_invalidation() if manager.invalidate(current) else current
            else:
                token = await manager.get()  # already replaced (another worker reported it first)
        except TokenError as exc:
            return _error_response(exc)
        return _token_response(token)

    async def _ready(self, request: web.Request) -> web.Response:
        """A worker has installed its signal handlers: from now on it may be sent SIGHUP."""
        pid = None
        with contextlib.suppress(ValueError):
            data = await request.json()
            pid = data.get("pid") if isinstance(data, dict) else None
        if isinstance(pid, int):
            self._on_ready(int(request.match_info["index"]), pid)
        return web.json_response({})

    async def _reload(self, request: web.Request) -> web.Response:
        """A worker got ``POST /-/reload``: the supervisor's reload (as on SIGHUP), answered with its outcome."""
        if self._on_reload is None:
            result = ReloadResult(501, "reload: the supervisor has nothing to reload from")
        else:
            result = await self._on_reload()
        return web.json_response({"status": result.status, "detail": result.detail})

    async def _metrics(self, request: web.Request) -> web.Response:
        body, content_type = self.metrics.render()
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response


def _token_response(token: Token) -> web.Response:
    return web.json_response(
        {
            "access_token": token.value.reveal(),
            "expires_in": max(0.001, token.expires_at - time.monotonic()),
            "scope": token.scope,
        }
    )


def _error_response(exc: TokenError) -> web.Response:
    return web.json_response({"token_error": token_error_to_json(exc)}, status=exc.status)


def _unknown_route(name: str) -> web.Response:
    exc = TokenError(
        status=503,
        error="unknown_route",
        detail=f"the token broker has no route {name!r}: the worker and the supervisor read different "
        "configurations; send SIGHUP to the supervisor to reload both",
        token_url="-",
    )
    return _error_response(exc)


# --------------------------------------------------------------------------- listening sockets


def balanced_reuseport() -> bool:
    """Linux spreads connections over ``SO_REUSEPORT`` sockets; the BSDs and macOS do not."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def _addresses(host: str, port: int) -> list[tuple[int, Any]]:
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    seen: list[tuple[int, Any]] = []
    for family, _, _, _, address in infos:
        if (family, address) not in seen:
            seen.append((family, address))
    return seen


def _socket(family: int, address: Any, *, reuse_port: bool) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port and sys.platform != "win32":  # (never true there; the guard is for mypy --platform win32)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio does
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


def bind_listeners(host: str, port: int, count: int, what: str = "listen") -> list[list[socket.socket]]:
    """Listening sockets for ``count`` workers (one list per worker, one socket per address of ``host``).

    With ``SO_REUSEPORT`` (Linux) every worker has its own sockets on the same port; the port is first
    bound once without it, so that another process already listening there (another odata-auth-proxy,
    even one with workers) fails us with "address in use" instead of silently sharing the port."""
    per_worker: list[list[socket.socket]] = [[] for _ in range(count)]
    reuse_port = count > 1 and balanced_reuseport()
    try:
        for family, address in _addresses(host, port):
            try:
                probe = _socket(family, address, reuse_port=False)
            except OSError as exc:
                raise bind_error(host, port, exc, what) from None
            try:
                probe.listen(1024)
            except OSError as exc:
                probe.close()
                raise bind_error(host, port, exc, what) from None
            if not reuse_port:  # one socket, shared by every worker
                for group in per_worker:
                    group.append(probe)
                continue
            address = probe.getsockname()  # the real port, when 0 was asked for
            probe.close()
            for group in per_worker:
                try:
                    sock = _socket(family, address, reuse_port=True)
                    sock.listen(1024)
                except OSError as exc:
                    raise bind_error(host, port, exc, what) from None
                group.append(sock)
    except BaseException:
        close_all(per_worker)
        raise
    return per_worker


def close_all(groups: Sequence[Sequence[socket.socket]]) -> None:
    for group in groups:
        for sock in group:
            sock.close()


def _bound_addresses(groups: Sequence[Sequence[socket.socket]]) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for sock in groups[0] if groups else ():
        address = sock.getsockname()
        out.append((address[0], address[1]))
    return out


def _host_port(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --------------------------------------------------------------------------- the supervisor


def run_workers(prepared: Prepared, overrides: Overrides, reload: Any) -> int:
    """``run`` with ``workers`` > 1: bind, then supervise the workers and broker the tokens until stopped."""
    from proxy.cli import EXIT_FAILURE, error, run_async

    config = prepared.config
    listeners: list[list[socket.socket]] = []
    admin: list[list[socket.socket]] = []
    try:
        listeners = bind_listeners(config.listen_host, config.listen_port, config.workers)
        if config.admin_listen is not None:
            host, port = config.admin_listen
            admin = bind_listeners(host, port, 1, "serve the admin endpoints")
    except StartupError as exc:
        close_all(listeners)
        error(str(exc))
        return EXIT_FAILURE
    try:
        supervisor = Supervisor(prepared, overrides, reload, listeners, admin[0] if admin else [])
        return run_async(supervisor.run())
    finally:
        close_all(listeners)
        close_all(admin)


@dataclasses.dataclass
class _Worker:
    index: int
    process: asyncio.subprocess.Process | None = None
    keeper: asyncio.Task[None] | None = None
    # SIGHUP is sent only once the process has said it handles it (before that it would kill it); a reload
    # that comes earlier is passed on when it says so
    ready: bool = False
    reload_pending: bool = False


class Supervisor:
    def __init__(
        self,
        prepared: Prepared,
        overrides: Overrides,
        reload: Any,
        listeners: list[list[socket.socket]],
        admin: list[socket.socket],
    ) -> None:
        self.prepared = prepared
        self.overrides = overrides
        self._reload = reload
        self.listeners = listeners
        self.admin = admin
        self.addresses = _bound_addresses(listeners)
        self.admin_addresses = _bound_addresses([admin]) if admin else []
        self.workers = [_Worker(i + 1) for i in range(prepared.config.workers)]
        self._stop = asyncio.Event()
        self._signals = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._watcher: FileWatcher | None = None
        self._reload_lock = asyncio.Lock()
        self.directory: Path | None = None
        self.broker: Broker | None = None

    # -- life cycle ---------------------------------------------------------------------------

    async def run(self) -> int:
        from proxy.banner import log_banner
        from proxy.cli import EXIT_FAILURE, EXIT_OK, error, event_loop_name

        self.directory = Path(tempfile.mkdtemp(prefix="odata-auth-proxy-"))  # mode 0700, ours alone
        try:
            self.broker = Broker(self.prepared, self.directory, self._worker_ready, self._reload_requested)
            try:
                await self.broker.start()
            except StartupError as exc:
                error(str(exc))
                return EXIT_FAILURE
            self._install_signal_handlers()
            if self.prepared.config.watch:  # the same reload as SIGHUP when a file the config came from changes
                self._watcher = FileWatcher(lambda: watched_files(self.prepared.config), self._files_changed)
                self._watcher.start()
            try:
                for worker in self.workers:
                    worker.process = await self._spawn(worker.index)
            except OSError as exc:
                error(f"cannot start the worker processes: {exc.strerror or exc}")
                for process in self._alive():
                    process.kill()
                    await process.wait()
                return EXIT_FAILURE
            for worker in self.workers:
                worker.keeper = asyncio.get_running_loop().create_task(self._keep(worker))
            pids = ", ".join(str(w.process.pid) for w in self.workers if w.process is not None)
            log_banner(
                self.prepared,
                self.addresses,
                self.admin_addresses,
                event_loop_name(),
                [
                    f"workers: {len(self.workers)} (pid {pids}); tokens are fetched once, by this supervisor "
                    f"(pid {os.getpid()}), and shared with them",
                    f"token broker: curl --unix-socket {self.broker.path} {BROKER_URL}/metrics (token fetch metrics)",
                ],
            )
            await self._stop.wait()
            if self._watcher is not None:
                await self._watcher.stop()
            await self._drain()
            log.info("stopped")
            return EXIT_OK
        finally:
            # a reload still waiting for a token is given up (it closes what it built)
            reloads = list(self._tasks)
            for task in reloads:
                task.cancel()
            await asyncio.gather(*reloads, return_exceptions=True)
            if self.broker is not None:
                await self.broker.close()
            shutil.rmtree(self.directory, ignore_errors=True)

    def _command(self, index: int) -> tuple[list[str], list[int]]:
        fds = [s.fileno() for s in self.listeners[index - 1]]
        admin_fds = [s.fileno() for s in self.admin]
        overrides = replace(self.overrides, listen=_host_port(self.addresses[0]))
        if self.admin_addresses:
            overrides.admin_listen = _host_port(self.admin_addresses[0])
        assert self.broker is not None
        command = [
            sys.executable,
            "-m",
            "proxy.workers",
            "--index",
            str(index),
            "--fds",
            ",".join(map(str, fds)),
            "--broker",
            str(self.broker.path),
            "--overrides",
            json.dumps(dataclasses.asdict(overrides)),
        ]
        if admin_fds:
            command += ["--admin-fds", ",".join(map(str, admin_fds))]
        return command, fds + admin_fds

    async def _spawn(self, index: int) -> asyncio.subprocess.Process:
        command, fds = self._command(index)
        worker = self.workers[index - 1]
        worker.ready = worker.reload_pending = False
        return await asyncio.create_subprocess_exec(*command, pass_fds=fds, stdin=asyncio.subprocess.DEVNULL)

    def _worker_ready(self, index: int, pid: int) -> None:
        if not 1 <= index <= len(self.workers):
            return
        worker = self.workers[index - 1]
        process = worker.process
        if process is None or process.pid != pid or process.returncode is not None:
            return
        worker.ready = True
        log.debug("worker %d (pid %d) is serving", index, pid)
        if worker.reload_pending:
            worker.reload_pending = False
            _send_reload(process)

    async def _keep(self, worker: _Worker) -> None:
        """Wait for the worker; restart it (with a growing delay while it keeps dying young) unless stopping."""
        loop = asyncio.get_running_loop()
        delay = RESTART_FIRST
        process = worker.process
        while process is not None:
            started = loop.time()
            code = await process.wait()
            if self._stop.is_set():
                return
            lived = loop.time() - started
            if lived >= RESTART_RESET_AFTER:
                delay = RESTART_FIRST
            log.warning(
                "worker %d (pid %d) %s after %.1f s; starting a new one in %.1f s",
                worker.index,
                process.pid,
                _describe_exit(code),
                lived,
                delay,
            )
            process = None
            while process is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                if self._stop.is_set():
                    return
                delay = min(RESTART_CAP, delay * 2)
                try:
                    process = await self._spawn(worker.index)
                except OSError as exc:
                    log.error("worker %d: cannot start a new process: %s", worker.index, exc.strerror or exc)
            worker.process = process
            log.info("worker %d restarted (pid %d)", worker.index, process.pid)

    def _alive(self) -> list[asyncio.subprocess.Process]:
        return [w.process for w in self.workers if w.process is not None and w.process.returncode is None]

    async def _drain(self) -> None:
        # our copies of the listening sockets first: once every worker has closed its own, the port refuses
        # new connections, as a single process's does when it drains
        close_all(self.listeners)
        close_all([self.admin])
        for process in self._alive():
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        timeout = self.prepared.config.shutdown_timeout + STOP_MARGIN
        alive = self._alive()
        if alive:
            await asyncio.wait([asyncio.ensure_future(p.wait()) for p in alive], timeout=timeout)
            for process in self._alive():
                log.warning("worker pid %d did not stop within %.0f s: killing it", process.pid, timeout)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        for worker in self.workers:
            if worker.keeper is not None:
                worker.keeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await worker.keeper

    # -- signals ------------------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        install_lifecycle_signals(self._on_stop_signal, self._on_reload_signal)

    def _on_stop_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second %s: killing the workers, exiting now without waiting for in-flight requests", sig.name)
            for process in self._alive():
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
            if self.directory is not None:
                shutil.rmtree(self.directory, ignore_errors=True)
            os._exit(1)
        log.info(
            "%s received: draining %d worker(s) (new connections refused, in-flight requests get up to %.0f s); "
            "send it again to exit at once",
            sig.name,
            len(self._alive()),
            self.prepared.config.shutdown_timeout,
        )
        self._stop.set()

    async def _files_changed(self, changed: list[str]) -> None:
        await self.reload()

    def _on_reload_signal(self) -> None:
        self._start_reload()

    def _start_reload(self) -> asyncio.Task[ReloadResult]:
        task = asyncio.get_running_loop().create_task(self.reload_result())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _reload_requested(self) -> ReloadResult:
        """A worker's ``POST /-/reload`` (through the broker): runs to its end even if the worker hangs up."""
        return await asyncio.shield(self._start_reload())

    async def reload(self) -> bool:
        """``reload_result`` as a yes/no (SIGHUP and the file watch only log the outcome)."""
        return (await self.reload_result()).ok

    async def reload_result(self) -> ReloadResult:
        """Reload the broker's credentials, then tell the workers to reload (guard, routes, logging).

        The broker applies the reload rule (``Broker.swap``): when new or changed credentials get no token the
        reload is refused with one ``reload refused: route …`` line, nothing changes here, and the workers are
        not signalled, so they keep serving with their tokens. Reloads run one at a time."""
        async with self._reload_lock:
            return await self._reload_locked()

    async def _reload_locked(self) -> ReloadResult:
        if self._stop.is_set():
            return refused_reload(409, "reload while draining: not reloading", level=logging.WARNING)
        running = self.prepared.config
        try:
            prepared = self._reload()
            new: Config = prepared.config
            problem = listen_address_problem(
                running.listen_host, allow_remote=new.allow_remote, has_api_key=new.inbound_api_key is not None
            )
            if problem:
                raise ConfigError(f"still listening on {running.listen_host}: {problem}")
        except ConfigError as exc:
            return refused_reload(
                409, f"reload failed, the supervisor and its workers keep the previous configuration: {exc}"
            )
        except Exception as exc:
            return refused_reload(
                500,
                f"reload failed (internal error: {exc.__class__.__name__}), the supervisor and its workers keep the "
                "previous configuration",
            )
        assert self.broker is not None
        try:
            runtime = await self.broker.swap(prepared, grace=running.shutdown_timeout)
        except ReloadRefused as exc:
            return refused_reload(
                409, f"reload refused: {exc}; the supervisor and its workers keep the previous configuration"
            )
        except Exception as exc:
            return refused_reload(
                500,
                f"reload refused (internal error: {exc.__class__.__name__}), the supervisor and its workers keep the "
                "previous configuration",
            )
        if (new.log_format, new.verbose) != (running.log_format, running.verbose):
            setup_logging(new.log_format, new.verbose)
        if new.workers != running.workers:
            log.warning("reload: workers changed; the number of worker processes only changes with a restart")
        self.prepared = replace(prepared, config=replace(new, workers=running.workers))
        alive = self._alive()
        for worker in self.workers:
            process = worker.process
            if process is None or process.returncode is not None:
                continue
            if not worker.ready:
                worker.reload_pending = True  # still starting: SIGHUP would kill it; sent once it is ready
                continue
            _send_reload(process)
        summary = f"reloaded credentials: {len(new.routes)} route(s); {len(alive)} worker(s) reload theirs"
        summary += token_summary(runtime)
        log.info("%s", summary)
        return ReloadResult(200, summary)


def _send_reload(process: asyncio.subprocess.Process) -> None:
    """SIGHUP to a worker. Workers exist only where there is one (``config.workers_supported``: POSIX); the
    platform check says so to ``mypy --platform win32``."""
    if sys.platform != "win32":
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGHUP)


def _describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with code {code}"


# --------------------------------------------------------------------------- the worker process


def _parse_fds(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def worker_main(argv: Sequence[str] | None = None) -> int:
    """``python -m proxy.workers``: one worker, started by the supervisor (not meant to be run by hand)."""
    from proxy.app import prepare
    from proxy.cli import EXIT_CONFIG, EXIT_FAILURE, _checked_config, error, run_async

    parser = argparse.ArgumentParser(prog="python -m proxy.workers", description="an odata-auth-proxy worker")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--fds", required=True)
    parser.add_argument("--admin-fds", default="")
    parser.add_argument("--broker", required=True)
    parser.add_argument("--overrides", required=True)
    args = parser.parse_args(argv)
    index: int = args.index
    overrides = Overrides(**json.loads(args.overrides))
    _tag_log_records(index)
    try:
        config = _checked_config(overrides)
        setup_logging(config.log_format, config.verbose)
        prepared = prepare(config)
    except ConfigError as exc:
        error(f"worker {index}: {exc}")
        return EXIT_CONFIG
    socks = [socket.socket(fileno=fd) for fd in _parse_fds(args.fds)]
    admin_socks = [socket.socket(fileno=fd) for fd in _parse_fds(args.admin_fds)]
    for sock in socks + admin_socks:
        sock.setblocking(False)

    def reload() -> Prepared:
        return prepare(_checked_config(overrides))

    try:
        return run_async(_serve_worker(prepared, reload, socks, admin_socks, args.broker, index))
    except StartupError as exc:
        error(f"worker {index}: {exc}")
        return EXIT_FAILURE


def _tag_log_records(index: int) -> None:
    """Start every log message of this worker with "worker N: " (text and JSON alike; a record factory, so it
    survives the handler swap of a reload). The access log carries its own ``worker`` field instead."""
    make = logging.getLogRecordFactory()
    prefix = f"worker {index}: "

    def tagged(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        if record.name != ACCESS_LOGGER and isinstance(record.msg, str):
            record.msg = prefix + record.msg
        return record

    logging.setLogRecordFactory(tagged)


async def _serve_worker(
    prepared: Prepared,
    reload: Any,
    socks: list[socket.socket],
    admin_socks: list[socket.socket],
    broker_path: str,
    index: int,
) -> int:
    config = prepared.config
    session = aiohttp.ClientSession(
        connector=aiohttp.UnixConnector(path=broker_path),
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
    )
    timeout = config.timeouts.token + config.timeouts.connect + 5.0  # the broker may be waiting on a fetch

    def sources(route: Route, cred: PreparedCredential) -> BrokerTokenSource:
        return BrokerTokenSource(session, route.name, route.credentials.token_url, timeout)

    async def reload_via_supervisor() -> ReloadResult:
        """``POST /-/reload`` to this worker: the supervisor reloads (and signals every worker, this one too)."""
        try:
            async with session.post(f"{BROKER_URL}/reload", timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                data = await resp.json()
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            return ReloadResult(
                500, f"reload: no answer from the supervisor process ({exc.__class__.__name__}); is it still running?"
            )
        status, detail = (data.get("status"), data.get("detail")) if isinstance(data, dict) else (None, None)
        if not isinstance(status, int) or not isinstance(detail, str):
            return ReloadResult(500, "reload: the supervisor process gave an answer this worker does not understand")
        return ReloadResult(status, detail)

    server = ProxyServer(
        prepared,
        reload=reload,
        socks=socks,
        admin_socks=admin_socks,
        token_sources=sources,
        worker=index,
        reload_via=reload_via_supervisor,
    )
    try:
        await server.start()
        server.install_signal_handlers()
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):  # the supervisor may send SIGHUP now
            async with session.post(
                f"{BROKER_URL}/workers/{index}/ready", json={"pid": os.getpid()}, timeout=aiohttp.ClientTimeout(total=5)
            ):
                pass
        watch = asyncio.get_running_loop().create_task(_watch_parent(server, Path(broker_path).parent))
        log.debug("serving (pid %d)", os.getpid())
        await server.wait()
        watch.cancel()
        await server.stop()
    finally:
        await session.close()
    return 0


async def _watch_parent(server: ProxyServer, broker_directory: Path) -> None:
    """Drain and exit when the supervisor is gone (killed with SIGKILL: it could neither stop us nor remove
    the broker's directory, so we do that too)."""
    parent = os.getppid()
    while True:
        await asyncio.sleep(PARENT_CHECK_INTERVAL)
        if os.getppid() != parent:
            log.warning("the supervisor (pid %d) is gone; draining and exiting", parent)
            shutil.rmtree(broker_directory, ignore_errors=True)
            server.request_stop()
            return


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(worker_main())
