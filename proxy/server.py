"""The proxy's lifecycle in one place: bind, serve, reload (SIGHUP, file watch, ``POST /-/reload``), drain on
SIGTERM/SIGINT (Ctrl+C, and Ctrl+Break on Windows).

A reload (``ProxyServer.reload``, whatever starts it) keeps the running token for every credential that did
not change and fetches one, once, for every credential that did, *before* the new configuration takes
effect; if that fails the reload is refused and the old configuration keeps serving (``proxy.app``).

First signal: readiness turns 503, the listener stops accepting, answers on kept-alive connections say
``Connection: close``, in-flight requests get ``shutdown_timeout`` seconds in total, what is left is cut,
and the process exits 0. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

from aiohttp import web

from proxy.app import (
    Prepared,
    ProxyState,
    Reloader,
    ReloadRefused,
    ReloadResult,
    Runtime,
    TokenSourceFactory,
    build_admin_app,
)
from proxy.config import Config, ConfigError
from proxy.guard import listen_address_problem
from proxy.http.listener import Listener, ListenerSettings
from proxy.logs import AccessLog, setup_logging
from proxy.metrics import ProxyMetrics
from proxy.watch import FileWatcher, watched_files

log = logging.getLogger("odata_auth_proxy")


def install_lifecycle_signals(on_stop: Callable[[signal.Signals], None], on_reload: Callable[[], None]) -> None:
    """SIGINT/SIGTERM → ``on_stop(signal)`` (drain), SIGHUP → ``on_reload()``, on the running loop.

    Where the loop has no ``add_signal_handler`` (Windows' Proactor loop raises NotImplementedError), the
    handlers are installed with ``signal.signal`` and hand over to the loop; Ctrl+Break (SIGBREAK) stops
    too, and there is no SIGHUP (reload through the file watch)."""
    loop = asyncio.get_running_loop()
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_stop, sig)
        if hasattr(signal, "SIGHUP"):
            loop.add_signal_handler(signal.SIGHUP, on_reload)
    except NotImplementedError:
        _install_signal_handover(loop, on_stop, on_reload)


def _install_signal_handover(
    loop: asyncio.AbstractEventLoop, on_stop: Callable[[signal.Signals], None], on_reload: Callable[[], None]
) -> None:
    """``signal.signal`` handlers that run the callbacks on ``loop`` (``call_soon_threadsafe`` wakes it)."""

    def handover(callback: Callable[..., None], *args: object) -> Callable[[int, object], None]:
        def handler(signum: int, frame: object) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed: the process is ending
                loop.call_soon_threadsafe(callback, *args)

        return handler

    stops = [signal.SIGINT, signal.SIGTERM]
    sigbreak = getattr(signal, "SIGBREAK", None)  # Windows: Ctrl+Break
    if sigbreak is not None:
        stops.append(sigbreak)
    for sig in stops:
        signal.signal(sig, handover(on_stop, sig))
    sighup = getattr(signal, "SIGHUP", None)
    if sighup is not None:
        signal.signal(sighup, handover(on_reload))


class StartupError(Exception):
    """Could not start serving (port in use, address not available): one actionable line."""


def bind_error(host: str, port: int, exc: OSError, what: str = "listen") -> StartupError:
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return StartupError(
            f"cannot {what} on {where}: the address is already in use (another odata-auth-proxy?); "
            f"stop the other process or choose another port, e.g. --listen {host}:{port + 1 if port else 8081}"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return StartupError(f"cannot {what} on {where}: this machine has no such address")
    if exc.errno == errno.EACCES:
        return StartupError(f"cannot {what} on {where}: permission denied (ports below 1024 need privileges)")
    return StartupError(f"cannot {what} on {where}: {exc.strerror or exc}")


class ProxyServer:
    """One serving process. Alone it binds its own listeners; as one of several workers (``proxy.workers``)
    it serves on sockets the supervisor bound (``socks``, ``admin_socks``), gets its tokens from the supervisor's
    broker (``token_sources``), tags its access log with its number (``worker``) and leaves the "second signal
    exits at once" to the supervisor (which then kills it)."""

    def __init__(
        self,
        prepared: Prepared,
        *,
        reload: Callable[[], Prepared] | None = None,
        socks: Sequence[socket.socket] = (),
        admin_socks: Sequence[socket.socket] = (),
        token_sources: TokenSourceFactory | None = None,
        worker: int | None = None,
        reload_via: Reloader | None = None,
    ) -> None:
        self.prepared = prepared
        self._reload = reload
        self._reload_via = reload_via  # a worker: POST /-/reload asks the supervisor (which signals every worker)
        self._socks = list(socks)
        self._admin_socks = list(admin_socks)
        self._token_sources = token_sources
        self._worker = worker
        self.metrics = ProxyMetrics()
        self.access_log = AccessLog()
        self.state: ProxyState | None = None
        self.listener: Listener | None = None
        self._watcher: FileWatcher | None = None
        self._admin_runner: web.AppRunner | None = None
        self.addresses: list[tuple[str, int]] = []
        self.admin_addresses: list[tuple[str, int]] = []
        self._stop = asyncio.Event()
        self._stop_requested_at: float | None = None
        self._signals = 0
        self._reloading: set[asyncio.Task[ReloadResult]] = set()
        self._reload_lock = asyncio.Lock()  # one reload at a time: each builds on the runtime the last one left
        # runtimes replaced by a reload: closed by ProxyState after the grace period, or by stop() when the
        # process stops first
        self._replaced: list[Runtime] = []

    def _runtime(self, prepared: Prepared, predecessor: Runtime | None = None) -> Runtime:
        return Runtime(
            prepared,
            self.metrics,
            self._token_sources,
            state=self._current_state,
            access_log=self.access_log,
            worker=self._worker,
            predecessor=predecessor,
        )

    def _current_state(self) -> ProxyState:
        assert self.state is not None
        return self.state

    async def start(self) -> None:
        config = self.prepared.config
        runtime = self._runtime(self.prepared)
        self.state = ProxyState(
            runtime=runtime, metrics=self.metrics, reloader=self._reload_via or self._reload_requested
        )
        runtime.start()
        timeouts, limits = config.timeouts, config.limits
        self.listener = Listener(
            runtime.pipeline,  # swapped on reload: requests in flight finish on the runtime they started with
            ListenerSettings(
                max_header_size=limits.max_header_size,
                max_headers=limits.max_headers,
                client_header=timeouts.client_header,
                client_body=timeouts.client_body,
                client_write=timeouts.client_write,
                client_idle=timeouts.client_idle,
            ),
        )
        self.listener.tighten_sweep(timeouts.read)
        self.metrics.count_in_flight(self.listener.routes_in_flight)
        try:
            if self._socks:
                servers = [await self.listener.serve(sock=sock) for sock in self._socks]
            else:
                servers = [await self.listener.serve(host=config.listen_host, port=config.listen_port)]
        except OSError as exc:
            await self._close_runtimes()
            raise bind_error(config.listen_host, config.listen_port, exc) from None
        self.addresses = _bound(servers)
        if config.admin_listen is not None:
            host, port = config.admin_listen
            self._admin_runner = web.AppRunner(build_admin_app(self.state), access_log=None, handle_signals=False)
            await self._admin_runner.setup()
            admin_sites: list[web.BaseSite] = [web.SockSite(self._admin_runner, s) for s in self._admin_socks]
            if not admin_sites:
                admin_sites.append(web.TCPSite(self._admin_runner, host, port, reuse_address=True))
            try:
                for admin_site in admin_sites:
                    await admin_site.start()
            except OSError as exc:
                await self.stop()
                raise bind_error(host, port, exc, "serve the admin endpoints") from None
            self.admin_addresses = [
                address for site in self._admin_runner.sites for address in _bound([getattr(site, "_server", None)])
            ]
        if config.watch and self._reload is not None and self._worker is None:  # workers: the supervisor watches
            self._watcher = FileWatcher(lambda: watched_files(self.prepared.config), self._files_changed)
            self._watcher.start()

    async def _files_changed(self, changed: list[str]) -> None:
        await self.reload()

    @property
    def port(self) -> int:
        return self.addresses[0][1]

    def install_signal_handlers(self) -> None:
        install_lifecycle_signals(self._on_stop_signal, self._on_reload_signal)

    def _on_stop_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        if self._worker is not None:
            # a worker: the supervisor forwards the first signal (it may also arrive directly, e.g. from a
            # Ctrl-C to the process group or systemd's KillMode=control-group); a second one is the
            # supervisor's to act on, by killing the workers
            if self._signals == 1:
                log.info("%s received: draining", sig.name)  # the worker's log lines carry its number
                self.request_stop()
            return
        if self._signals > 1:
            log.warning("second %s: exiting now without waiting for in-flight requests", sig.name)
            self.access_log.flush()
            os._exit(1)
        log.info(
            "%s received: draining (new connections refused, in-flight requests get up to %.0f s); "
            "send it again to exit at once",
            sig.name,
            self.prepared.config.shutdown_timeout,
        )
        self.request_stop()

    def request_stop(self) -> None:
        """Begin the drain: readiness turns 503, no new connections, ``Connection: close`` on every answer."""
        if self._stop_requested_at is None:
            self._stop_requested_at = time.monotonic()
        if self.state is not None:
            self.state.draining = True
        if self.listener is not None:
            self.listener.start_drain()
        self._stop.set()

    def _on_reload_signal(self) -> None:
        self._start_reload()

    def _start_reload(self) -> asyncio.Task[ReloadResult]:
        # keep a reference: the loop holds tasks only weakly; stop() cancels what is still running
        task = asyncio.get_running_loop().create_task(self.reload_result())
        self._reloading.add(task)
        task.add_done_callback(self._reloading.discard)
        return task

    async def _reload_requested(self) -> ReloadResult:
        """``POST /-/reload``: the reload runs to its end even if the caller hangs up."""
        return await asyncio.shield(self._start_reload())

    async def reload(self) -> bool:
        """``reload_result`` as a yes/no (SIGHUP and the file watch only log the outcome)."""
        return (await self.reload_result()).ok

    async def reload_result(self) -> ReloadResult:
        """Re-read config and keys; keep the old ones (and say why) when the new ones are invalid or new
        credentials get no token.

        Every reload trigger calls this (SIGHUP, the file watch, ``POST /-/reload``; in a single process and in a
        worker), and reloads run one at a time. The new runtime keeps the running token managers of unchanged
        credentials (no token request for them) and gets one token for each new or changed one before the swap
        (``ProxyState.replace``); a failure there logs one ``reload refused: route …: …`` line (the token
        server's error, never a secret), closes what the reload built, and returns a 409 result carrying that
        line (the admin call answers with it). Nothing of the new configuration (log setup, warnings, the
        listener's handler) is applied before the swap."""
        async with self._reload_lock:
            return await self._reload_locked()

    async def _reload_locked(self) -> ReloadResult:
        if self._reload is None:
            return refused_reload(
                501,
                "reload: this proxy has no configuration to re-read (the demo's is built in)",
                level=logging.WARNING,
            )
        if self._stop.is_set():
            return refused_reload(409, "reload while draining: not reloading", level=logging.WARNING)
        assert self.state is not None
        running = self.prepared.config
        try:
            prepared = self._reload()
            new = prepared.config
            # the sockets stay where they are: the new settings are judged (and the guard built) for the
            # address actually bound, not the one the file may now name
            problem = listen_address_problem(
                running.listen_host, allow_remote=new.allow_remote, has_api_key=new.inbound_api_key is not None
            )
            if problem:
                raise ConfigError(f"still listening on {running.listen_host}: {problem}")
            prepared = replace(prepared, config=_pinned(new, running))
            previous = self.state.runtime
            runtime = self._runtime(prepared, predecessor=previous)
        except ConfigError as exc:
            return refused_reload(409, f"reload failed, still serving with the previous configuration: {exc}")
        except Exception as exc:  # a bug must neither end the reload task silently nor stop the proxy
            # the class only, as everywhere: a message could quote a secret it choked on
            return refused_reload(
                500,
                f"reload failed (internal error: {exc.__class__.__name__}), "
                "still serving with the previous configuration",
            )
        try:
            # tokens for new or changed credentials first; the swap only when they all came (closed otherwise)
            await self.state.replace(runtime, grace=running.shutdown_timeout)
        except ReloadRefused as exc:
            return refused_reload(409, f"reload refused: {exc}; still serving with the previous configuration")
        except Exception as exc:
            return refused_reload(
                500,
                f"reload refused (internal error: {exc.__class__.__name__}), "
                "still serving with the previous configuration",
            )
        # swapped: no await since, so no request has seen the new runtime without the listener's handler
        if self.listener is not None:
            self.listener.handler = runtime.pipeline
        self._replaced = [r for r in self._replaced if not r.closed]
        self._replaced.append(previous)
        old = running
        if (new.listen_host, new.listen_port, new.admin_listen) != (old.listen_host, old.listen_port, old.admin_listen):
            log.warning("reload: listen addresses cannot change while running; restart to apply them")
        kept = restart_only_changes(old, new)
        if kept:
            log.warning(
                "reload: %s changed, but only take(s) effect after a restart; the running proxy keeps the "
                "previous value(s)",
                ", ".join(kept),
            )
        for warning in prepared.warnings:
            log.warning(warning)
        if (new.log_format, new.verbose) != (old.log_format, old.verbose):
            self.access_log.flush()
            setup_logging(new.log_format, new.verbose)
        self.prepared = prepared
        summary = f"reloaded configuration: {len(new.routes)} route(s){token_summary(runtime)}"
        log.info("%s", summary)
        return ReloadResult(200, summary)

    async def wait(self) -> None:
        await self._stop.wait()

    async def stop(self) -> None:
        """Drain: in-flight requests get ``shutdown_timeout`` seconds in total, counted from the stop request;
        what is left then is cut (and logged as cut by the drain)."""
        self.request_stop()
        assert self._stop_requested_at is not None
        deadline = self._stop_requested_at + self.prepared.config.shutdown_timeout
        if self._watcher is not None:
            await self._watcher.stop()
        # a reload still waiting for a token is given up (it closes what it built): we are stopping anyway
        reloading = list(self._reloading)
        for task in reloading:
            task.cancel()
        if reloading:
            await asyncio.gather(*reloading, return_exceptions=True)
        if self.listener is not None:
            cut = await self.listener.drain(deadline)
            if cut:
                log.warning(
                    "drain: %d request(s) still in flight after %.0f s (shutdown_timeout) were cut",
                    cut,
                    self.prepared.config.shutdown_timeout,
                )
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
            self._admin_runner = None
        await self._close_runtimes()
        self.access_log.flush()

    async def _close_runtimes(self) -> None:
        if self.state is not None:
            for task in self.state.retired:
                task.cancel()
            await self.state.runtime.close()
        replaced, self._replaced = self._replaced, []
        for runtime in replaced:
            await runtime.close()


def refused_reload(status: int, detail: str, *, level: int = logging.ERROR) -> ReloadResult:
    """Log why a reload did not take effect and say it (``POST /-/reload`` answers with it)."""
    log.log(level, "%s", detail)
    return ReloadResult(status, detail)


def token_summary(runtime: Runtime) -> str:
    """``; token kept for route a, new token for routes b, c`` after a reload (for the log line)."""
    kept = [name for name, manager in runtime.managers.items() if manager in runtime.inherited]
    fresh = [name for name in runtime.managers if name not in kept]
    parts = []
    for what, names in (("token kept for", kept), ("new token for", fresh)):
        if names:
            parts.append(f"{what} {'route' if len(names) == 1 else 'routes'} {', '.join(names)}")
    return "; " + ", ".join(parts) if parts else ""


def restart_only_changes(old: Config, new: Config) -> list[str]:
    """Settings that changed but are fixed for the life of the server: the HTTP parser limits and the drain
    timeout belong to the listener built in ``start``; a reload swaps everything else (routes, credentials,
    TLS, timeouts, outbound proxy, the guard, logging). (The listen addresses are reported separately.)"""
    fixed: dict[str, Callable[[Config], object]] = {
        "shutdown_timeout": lambda c: c.shutdown_timeout,
        "workers": lambda c: c.workers,
        "limits.max_header_size": lambda c: c.limits.max_header_size,
        "limits.max_headers": lambda c: c.limits.max_headers,
    }
    return [name for name, value in fixed.items() if value(old) != value(new)]


def _pinned(new: Config, running: Config) -> Config:
    """``new`` with the settings a reload cannot change (listen addresses and ``restart_only_changes``) kept at
    the values the server runs with, so that guard, log lines and the next reload's comparison tell the truth."""
    return replace(
        new,
        listen_host=running.listen_host,
        listen_port=running.listen_port,
        admin_listen=running.admin_listen,
        shutdown_timeout=running.shutdown_timeout,
        workers=running.workers,
        limits=replace(
            new.limits, max_header_size=running.limits.max_header_size, max_headers=running.limits.max_headers
        ),
    )


def _bound(servers: Sequence[object]) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for server in servers:
        for sock in getattr(server, "sockets", None) or ():
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                address = sock.getsockname()
                out.append((address[0], address[1]))
    return out
