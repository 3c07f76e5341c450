"""Safe reloads (issue 12, item 1): a reload whose credentials changed fetches a token with the *new*
credentials before it takes effect, and is refused -- the old configuration and its token keep serving -- when
that fails; a reload whose credentials did not change keeps the running token.

Everything runs against the real HTTPS token server and upstream of ``conftest.py`` on 127.0.0.1: the proxy
in-process (``ProxyServer.reload``, what SIGHUP calls), as a process sent a real SIGHUP, and with
``--workers 2`` (the supervisor's token broker and its workers).
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from proxy.app import Prepared, ProxyState, Runtime, prepare
from proxy.config import Overrides, load_config
from proxy.redact import Secret
from proxy.server import ProxyServer
from tests.conftest import (
    CLIENT_SECRET,
    Backend,
    TokenServer,
    Upstream,
    child_env,
    free_port,
    make_config,
    secret_route,
    serve,
)
from tests.test_ops import bearer_of, client, get, proxy_yaml, run_proxy_args, spawn

pytestmark = pytest.mark.timeout(30)

WRONG_SECRET = "typo-s3cret+wrong/value"
NEW_SECRET = "rotated-s3cret+after/reload"
GRACE = 0.2  # shutdown_timeout: how long a replaced runtime lives on for requests in flight


# --------------------------------------------------------------------------- helpers


def reloadable(path: Path) -> Callable[[], Prepared]:
    return lambda: prepare(load_config(Overrides(config=str(path)), env={}))


def with_secret(route: dict[str, Any], secret: str) -> dict[str, Any]:
    route["credentials"]["client_secret"] = secret
    return route


def write_config(tmp_path: Path, backend: Backend, routes: list[dict[str, Any]], **top: Any) -> None:
    """Rewrite ``proxy.yaml`` (what the next reload reads)."""
    make_config(tmp_path, backend, routes, shutdown_timeout=GRACE, **top)


class Proxy:
    """An in-process proxy that records every runtime a reload builds."""

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.url = f"http://127.0.0.1:{server.port}"
        self.built: list[Runtime] = []
        make = server._runtime

        def recording(prepared: Prepared, predecessor: Runtime | None = None) -> Runtime:
            runtime = make(prepared, predecessor)
            self.built.append(runtime)
            return runtime

        server._runtime = recording  # type: ignore[method-assign]

    @property
    def state(self) -> ProxyState:
        assert self.server.state is not None
        return self.server.state


@pytest.fixture(autouse=True)
def info_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)  # the "reloaded configuration" lines


@pytest.fixture
async def proxy(tmp_path: Path, backend: Backend) -> AsyncIterator[Proxy]:
    config = make_config(tmp_path, backend, shutdown_timeout=GRACE)
    server = ProxyServer(prepare(config), reload=reloadable(tmp_path / "proxy.yaml"))
    await server.start()
    try:
        yield Proxy(server)
    finally:
        await server.stop()


@pytest.fixture
async def other(backend: Backend) -> AsyncIterator[Backend]:
    """A second token server (another client, another secret) and an API that accepts only its tokens."""
    tokens = TokenServer(client_id="sb-other-client!b1|it!b2", client_secret="other-s3cret+x/y")
    upstream = Upstream(tokens)
    token_runner, tokens.url = await serve(tokens.app(), backend.tls.server_ctx)
    up_runner, upstream.url = await serve(upstream.app(), backend.tls.server_ctx)
    try:
        yield Backend(tokens, upstream, backend.tls)
    finally:
        await up_runner.cleanup()
        await token_runner.cleanup()


def other_route(other: Backend) -> dict[str, Any]:
    return secret_route(other, name="other", prefix="/other/")


def messages(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def token_tasks() -> list[str]:
    return sorted(t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("token-"))


def assert_closed(runtime: Runtime) -> None:
    """``runtime`` was given up: everything it built is closed, nothing of it runs."""
    assert runtime.closed and runtime.pool.closed and runtime.csrf_session.closed
    for manager in runtime.distinct_managers:
        if manager not in runtime.inherited:
            assert manager._refresher is None and manager._inflight is None


# --------------------------------------------------------------------------- (a) a wrong secret is refused


async def test_a_reload_with_a_wrong_secret_is_refused_and_the_old_token_keeps_serving(
    tmp_path: Path, backend: Backend, proxy: Proxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url = proxy.url + "/api/v1/echo/x"
    async with client() as http:
        assert (await get(http, url))[0] == 200
        assert backend.tokens.requests == 1
        first = backend.tokens.issued[0]
        running = proxy.state.runtime
        manager = running.managers["api"]

        write_config(tmp_path, backend, [with_secret(secret_route(backend), WRONG_SECRET)])
        assert await proxy.server.reload() is False

        # exactly one extra token request: the probe, with the new (wrong) secret
        assert backend.tokens.requests == 2
        assert backend.tokens.forms[-1]["client_secret"] == WRONG_SECRET
        assert proxy.state.runtime is running and running.managers["api"] is manager
        assert proxy.server.prepared.config.routes[0].credentials.client_secret == Secret(CLIENT_SECRET)
        for _ in range(3):
            status, body = await get(http, url)
            assert status == 200, body
            assert bearer_of(backend.upstream.requests[-1]) == first
        assert manager.current is not None and manager.last_error is None

        # what the refused reload built is closed; nothing of it runs; the running manager is untouched
        (refused,) = proxy.built
        assert_closed(refused)
        assert not refused.token_session.closed  # the running runtime's, lent to the refused one
        assert token_tasks() == ["token-api"] and manager._refresher is not None
        assert not manager._refresher.done()

        # the bad secret is tried once, never again (a retry would come within 0.5 s, a request-driven one
        # within 2 s); the running token keeps serving meanwhile
        await asyncio.sleep(1.2)
        assert (await get(http, url))[0] == 200
        assert backend.tokens.requests == 2

    lines = messages(caplog, "reload refused")
    assert len(lines) == 1, lines
    (line,) = lines
    assert line.startswith("reload refused: route api: the token server answered invalid_client (HTTP 401)"), line
    assert "Bad credentials" in line and "still serving with the previous configuration" in line
    assert messages(caplog, "invalid_client") == lines  # no second line about the probe
    assert not messages(caplog, "reloaded configuration")
    assert WRONG_SECRET not in caplog.text and CLIENT_SECRET not in caplog.text


async def test_a_reload_to_an_unreachable_token_server_is_refused(
    tmp_path: Path, backend: Backend, proxy: Proxy, caplog: pytest.LogCaptureFixture
) -> None:
    route = secret_route(backend)
    route["credentials"]["token_url"] = f"https://127.0.0.1:{free_port()}/oauth/token"  # nobody listens there
    write_config(tmp_path, backend, [route])
    async with client() as http:
        assert (await get(http, proxy.url + "/api/v1/echo/a"))[0] == 200
        assert await proxy.server.reload() is False
        assert (await get(http, proxy.url + "/api/v1/echo/b"))[0] == 200
    assert backend.tokens.requests == 1
    (line,) = messages(caplog, "reload refused")
    assert "route api: no token from the token server (unreachable)" in line and "cannot connect" in line
    assert_closed(proxy.built[0])


# --------------------------------------------------------------------------- (b) unchanged credentials


async def test_a_reload_that_changes_no_credentials_keeps_the_running_token(
    tmp_path: Path, backend: Backend, proxy: Proxy, caplog: pytest.LogCaptureFixture
) -> None:
    url = proxy.url + "/api/v1/echo/kept"
    async with client() as http:
        assert (await get(http, url))[0] == 200
        old = proxy.state.runtime
        manager = old.managers["api"]
        token = manager.current
        assert token is not None

        write_config(tmp_path, backend, [secret_route(backend)], log_query=False)
        assert await proxy.server.reload()
        new = proxy.state.runtime
        assert new is not old and new.config.log_query is False
        assert new.managers["api"] is manager and manager.current is token
        assert backend.tokens.requests == 1  # today's behaviour was a new token on every reload

        # the replaced runtime is closed after the grace period, the manager it handed over lives on
        await asyncio.sleep(GRACE + 0.3)
        assert old.closed and old.pool.closed
        assert manager._refresher is not None and not manager._refresher.done()
        assert not new.token_session.closed and new.token_session is old.token_session
        status, body = await get(http, url)
        assert status == 200, body
        assert bearer_of(backend.upstream.requests[-1]) == backend.tokens.issued[0]

        # and once more: a reload of the same file changes nothing either
        assert await proxy.server.reload()
        assert proxy.state.runtime.managers["api"] is manager
        assert (await get(http, url))[0] == 200
    assert backend.tokens.requests == 1
    assert token_tasks() == ["token-api"]
    assert messages(caplog, "reloaded configuration: 1 route(s); token kept for route api")


async def test_a_new_route_gets_its_token_before_the_swap_and_the_unchanged_route_keeps_its_own(
    tmp_path: Path, backend: Backend, other: Backend, proxy: Proxy, caplog: pytest.LogCaptureFixture
) -> None:
    async with client() as http:
        assert (await get(http, proxy.url + "/api/v1/echo/one"))[0] == 200
        manager = proxy.state.runtime.managers["api"]

        at_swap: list[tuple[int, int, bool]] = []
        swap = proxy.state.swap

        def recording_swap(runtime: Runtime, grace: float) -> None:
            at_swap.append(
                (backend.tokens.requests, other.tokens.requests, runtime.managers["other"].current is not None)
            )
            swap(runtime, grace)

        proxy.state.swap = recording_swap  # type: ignore[method-assign]
        write_config(tmp_path, backend, [secret_route(backend), other_route(other)])
        assert await proxy.server.reload()
        # at the swap the new route's token was there already, and the unchanged route asked for none
        assert at_swap == [(1, 1, True)]
        assert proxy.state.runtime.managers["api"] is manager

        status, body = await get(http, proxy.url + "/other/api/v1/echo/two")
        assert status == 200, body
        assert bearer_of(other.upstream.requests[-1]) == other.tokens.issued[0]
        assert (await get(http, proxy.url + "/api/v1/echo/three"))[0] == 200
        assert bearer_of(backend.upstream.requests[-1]) == backend.tokens.issued[0]
    assert (backend.tokens.requests, other.tokens.requests) == (1, 1)
    assert messages(caplog, "reloaded configuration: 2 route(s); token kept for route api, new token for route other")


async def test_a_refused_reload_leaves_the_kept_managers_running(
    tmp_path: Path, backend: Backend, other: Backend, proxy: Proxy, caplog: pytest.LogCaptureFixture
) -> None:
    """The new route's secret is wrong: refused; the refused runtime shared the unchanged route's manager with
    the running one, and closing it must not stop that manager."""
    async with client() as http:
        assert (await get(http, proxy.url + "/api/v1/echo/one"))[0] == 200
        running = proxy.state.runtime
        manager = running.managers["api"]
        write_config(tmp_path, backend, [secret_route(backend), with_secret(other_route(other), WRONG_SECRET)])
        assert await proxy.server.reload() is False
        (refused,) = proxy.built
        assert refused.managers["api"] is manager and manager in refused.inherited
        assert_closed(refused)
        assert manager._refresher is not None and not manager._refresher.done()
        assert not running.token_session.closed
        assert proxy.state.runtime is running and "other" not in running.managers
        assert (await get(http, proxy.url + "/api/v1/echo/two"))[0] == 200
        # a route the running configuration does not have: the catch-all route sends it to the first API
        assert (await get(http, proxy.url + "/other/api/v1/echo/x"))[0] == 200
    assert (backend.tokens.requests, other.tokens.requests) == (1, 1)
    assert other.upstream.requests == []
    (line,) = messages(caplog, "reload refused")
    assert line.startswith("reload refused: route other: the token server answered invalid_client (HTTP 401)")
    assert WRONG_SECRET not in caplog.text


# --------------------------------------------------------------------------- (c) corrected after refused


async def test_a_corrected_secret_after_a_refused_reload_works(
    tmp_path: Path, backend: Backend, proxy: Proxy, caplog: pytest.LogCaptureFixture
) -> None:
    """The key was rotated at the token server; the first reload has a typo, the second the right secret."""
    url = proxy.url + "/api/v1/echo/rotated"
    async with client() as http:
        assert (await get(http, url))[0] == 200
        old = proxy.state.runtime
        old_manager = old.managers["api"]
        backend.tokens.client_secret = NEW_SECRET  # the old token stays valid upstream until it expires

        write_config(tmp_path, backend, [with_secret(secret_route(backend), WRONG_SECRET)])
        assert await proxy.server.reload() is False
        assert (await get(http, url))[0] == 200
        assert bearer_of(backend.upstream.requests[-1]) == backend.tokens.issued[0]

        write_config(tmp_path, backend, [with_secret(secret_route(backend), NEW_SECRET)])
        assert await proxy.server.reload()
        assert backend.tokens.requests == 3  # first token, refused probe, accepted probe
        assert backend.tokens.forms[-1]["client_secret"] == NEW_SECRET
        new_manager = proxy.state.runtime.managers["api"]
        assert new_manager is not old_manager and new_manager.current is not None
        backend.upstream.revoked.add(backend.tokens.issued[0])
        status, body = await get(http, url)
        assert status == 200, body
        assert bearer_of(backend.upstream.requests[-1]) == backend.tokens.issued[1]

        # the replaced runtime, its manager with the old secret included, is closed after the grace period
        await asyncio.sleep(GRACE + 0.3)
        assert old.closed and old_manager._refresher is None
        assert token_tasks() == ["token-api"]
        assert (await get(http, url))[0] == 200
    assert backend.tokens.requests == 3
    assert len(messages(caplog, "reload refused")) == 1
    assert messages(caplog, "reloaded configuration: 1 route(s); new token for route api")
    assert NEW_SECRET not in caplog.text and WRONG_SECRET not in caplog.text


async def test_stopping_during_a_probe_gives_the_reload_up(tmp_path: Path, backend: Backend, proxy: Proxy) -> None:
    async with client() as http:
        assert (await get(http, proxy.url + "/api/v1/echo/x"))[0] == 200
    backend.tokens.delay = 10  # the probe hangs
    write_config(tmp_path, backend, [with_secret(secret_route(backend), WRONG_SECRET)])
    proxy.server._on_reload_signal()  # what SIGHUP does
    (task,) = proxy.server._reloading
    end = time.monotonic() + 5
    while backend.tokens.requests < 2:
        assert time.monotonic() < end
        await asyncio.sleep(0.02)
    started = time.monotonic()
    await proxy.server.stop()
    assert time.monotonic() - started < 2
    assert task.done()
    (given_up,) = proxy.built
    assert_closed(given_up)
    assert token_tasks() == []


# --------------------------------------------------------------------------- end to end: SIGHUP to a process


async def test_sighup_with_a_wrong_secret_is_refused_then_the_corrected_one_is_applied(
    tmp_path: Path, backend: Backend
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = proxy_yaml(tmp_path, backend, port)
    async with (
        spawn(run_proxy_args("--config", str(config)), child_env(), base + "/-/readyz") as proc,
        client() as http,
    ):
        assert (await get(http, base + "/api/v1/echo/before"))[0] == 200
        assert backend.tokens.requests == 1

        backend.tokens.client_secret = NEW_SECRET
        proxy_yaml(tmp_path, backend, port, routes=[with_secret(secret_route(backend), WRONG_SECRET)])
        mark = len(proc.lines)
        proc.signal(signal.SIGHUP)
        line = await proc.wait_for("reload refused", mark)
        assert "route api: the token server answered invalid_client (HTTP 401)" in line
        for _ in range(3):
            status, body = await get(http, base + "/api/v1/echo/still")
            assert status == 200, body
            assert bearer_of(backend.upstream.requests[-1]) == backend.tokens.issued[0]
        await asyncio.sleep(1.0)
        assert backend.tokens.requests == 2  # the probe, not retried

        proxy_yaml(tmp_path, backend, port, routes=[with_secret(secret_route(backend), NEW_SECRET)])
        mark = len(proc.lines)
        proc.signal(signal.SIGHUP)
        line = await proc.wait_for("reloaded configuration", mark)
        assert "1 route(s); new token for route api" in line
        backend.upstream.revoked.add(backend.tokens.issued[0])
        status, body = await get(http, base + "/api/v1/echo/after")
        assert status == 200, body
        assert bearer_of(backend.upstream.requests[-1]) == backend.tokens.issued[1]
        assert backend.tokens.requests == 3

        mark = len(proc.lines)
        proc.signal(signal.SIGTERM)
        assert await proc.exit_code() == 0, proc.output()
    output = proc.output()
    assert output.count("reload refused") == 1, output
    assert "Traceback" not in output and "Task exception was never retrieved" not in output
    for secret in (CLIENT_SECRET, WRONG_SECRET, NEW_SECRET):
        assert secret not in output


# --------------------------------------------------------------------------- (d) --workers 2


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX processes and signals")
async def test_workers_follow_the_same_rule(tmp_path: Path, backend: Backend) -> None:
    """The supervisor's broker probes new credentials before its swap and, when refused, does not signal the
    workers; unchanged credentials keep their token in the broker and in every worker."""
    from tests.test_workers import config_file, fresh_connections, running, until_both_workers

    port = free_port()
    config = config_file(tmp_path, backend, port)

    def reloads(proxy: Any, text: str) -> int:
        return len(re.findall(r"worker \d: reloaded configuration: " + re.escape(text), proxy.stderr))

    async def both_reloaded(proxy: Any, text: str) -> None:
        end = time.monotonic() + 10
        while reloads(proxy, text) < 2:
            assert time.monotonic() < end, proxy.stderr
            await asyncio.sleep(0.05)

    async with running(tmp_path, config) as proxy, fresh_connections() as http:
        await until_both_workers(proxy, http, "before")
        assert backend.tokens.requests == 1

        # nothing credential-related changes: no token request, neither in the broker nor in a worker
        config_file(tmp_path, backend, port, log_query=False)
        proxy.process.send_signal(signal.SIGHUP)
        await proxy.wait_for(re.escape("reloaded credentials: 1 route(s); 2 worker(s) reload theirs; token kept"))
        await both_reloaded(proxy, "1 route(s); token kept for route api")
        await until_both_workers(proxy, http, "kept")
        assert backend.tokens.requests == 1

        # a wrong secret: one probe by the broker, refused; the workers are not even told
        backend.tokens.client_secret = NEW_SECRET
        config_file(tmp_path, backend, port, routes=[with_secret(secret_route(backend), WRONG_SECRET)])
        proxy.process.send_signal(signal.SIGHUP)
        await proxy.wait_for(re.escape("reload refused: route api: the token server answered invalid_client"))
        mark = len(backend.upstream.requests)
        await until_both_workers(proxy, http, "refused")
        assert {bearer_of(r) for r in backend.upstream.requests[mark:]} == {backend.tokens.issued[0]}
        await asyncio.sleep(1.0)
        assert backend.tokens.requests == 2
        assert len(re.findall(r"reloaded configuration", proxy.stderr)) == 2  # only the first reload's

        # the corrected secret: one token, by the broker, before its swap; the workers take it from there
        config_file(tmp_path, backend, port, routes=[with_secret(secret_route(backend), NEW_SECRET)])
        proxy.process.send_signal(signal.SIGHUP)
        await proxy.wait_for(re.escape("2 worker(s) reload theirs; new token for route api"))
        await both_reloaded(proxy, "1 route(s); new token for route api")
        backend.upstream.revoked.add(backend.tokens.issued[0])
        mark = len(backend.upstream.requests)
        await until_both_workers(proxy, http, "after")
        assert {bearer_of(r) for r in backend.upstream.requests[mark:]} == {backend.tokens.issued[1]}
        assert backend.tokens.requests == 3
        stderr = proxy.stderr
    assert stderr.count("reload refused") == 1, stderr
    assert "Traceback" not in stderr
    for secret in (CLIENT_SECRET, WRONG_SECRET, NEW_SECRET):
        assert secret not in stderr
