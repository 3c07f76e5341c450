"""Operations: the proxy as a process (signals, reload, drain, JSON logs), its admin port, outbound HTTP
proxies, and the deployment files (Dockerfile, compose, systemd, launchd), all against real sockets on
127.0.0.1. No Docker engine is needed: the image's entrypoint and health check are run as they would be.
"""

from __future__ import annotations

import asyncio
import base64
import configparser
import contextlib
import inspect
import json
import os
import plistlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import Prepared, prepare
from proxy.cli import build_parser
from proxy.compiled import COMPILE_ENV, PURE_ENV
from proxy.config import ENV_PREFIX, ConfigError, Overrides, load_config, overrides_from_env
from proxy.guard import listen_address_problem
from proxy.metrics import ProxyMetrics
from proxy.server import ProxyServer
from tests.conftest import (
    BIN,
    CLIENT_SECRET,
    PROXY_VARS,
    Backend,
    child_env,
    free_port,
    make_config,
    running_proxy,
    secret_route,
    service_key,
    write_yaml,
)

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- helpers


@dataclass
class ProxyProcess:
    """A proxy running as a child process; every line it writes is kept (stdout and stderr apart)."""

    process: asyncio.subprocess.Process
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    readers: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def lines(self) -> list[str]:
        return self.stderr + self.stdout

    def output(self) -> str:
        return "".join(self.stderr) + "".join(self.stdout)

    async def _read(self, stream: asyncio.StreamReader | None, into: list[str]) -> None:
        assert stream is not None
        while line := await stream.readline():
            into.append(line.decode("utf-8", "replace"))

    def signal(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    async def wait_for(self, text: str, start: int = 0, timeout: float = 10) -> str:
        """The first line (from index ``start`` of ``lines``) that contains ``text``."""
        end = time.monotonic() + timeout
        while True:
            for line in self.lines[start:]:
                if text in line:
                    return line
            assert self.process.returncode is None, f"exited {self.process.returncode}:\n{self.output()}"
            assert time.monotonic() < end, f"no log line with {text!r} within {timeout} s:\n{self.output()}"
            await asyncio.sleep(0.02)

    async def exit_code(self, timeout: float = 10) -> int:
        code = await asyncio.wait_for(self.process.wait(), timeout)
        await asyncio.wait_for(asyncio.gather(*self.readers), 5)
        return code


@contextlib.asynccontextmanager
async def spawn(args: list[str], env: Mapping[str, str], ready_url: str) -> AsyncIterator[ProxyProcess]:
    """Start ``args`` and wait until ``ready_url`` answers 200 (the process is killed afterwards if still up)."""
    process = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=dict(env)
    )
    proc = ProxyProcess(process)
    proc.readers = [
        asyncio.create_task(proc._read(process.stdout, proc.stdout)),
        asyncio.create_task(proc._read(process.stderr, proc.stderr)),
    ]
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as probe:
            end = time.monotonic() + 15
            while True:
                assert process.returncode is None, f"exited {process.returncode}:\n{proc.output()}"
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with probe.get(ready_url) as resp:
                        if resp.status == 200:
                            break
                assert time.monotonic() < end, "proxy did not start:\n" + proc.output()
                await asyncio.sleep(0.05)
        yield proc
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        for task in proc.readers:
            task.cancel()


def run_proxy_args(*args: str) -> list[str]:
    return [sys.executable, "-m", "proxy", "run", *args]


def proxy_yaml(tmp_path: Path, backend: Backend, port: int, **top: Any) -> Path:
    data: dict[str, Any] = {
        "listen": f"127.0.0.1:{port}",
        "tls": {"ca_bundle": str(backend.tls.ca_path)},
        "routes": [secret_route(backend)],
    }
    data.update(top)
    return write_yaml(tmp_path / "proxy.yaml", data)


def client(total: float = 10) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=total))


async def get(http: aiohttp.ClientSession, url: str, **kwargs: Any) -> tuple[int, str]:
    async with http.get(url, **kwargs) as resp:
        return resp.status, await resp.text()


def bearer_of(request: dict[str, Any]) -> str:
    value: str = next(v for k, v in request["headers"] if k.lower() == "authorization")
    return value.removeprefix("Bearer ")


def hostport(url: str) -> str:
    return url.split("://", 1)[1].rstrip("/")


# --------------------------------------------------------------------------- 1. SIGHUP reload


@pytest.mark.timeout(30)
async def test_sighup_reloads_a_changed_secret_and_keeps_serving_after_a_broken_config(
    tmp_path: Path, backend: Backend
) -> None:
    port = free_port()
    secret_file = tmp_path / "secret.txt"
    secret_file.write_text(CLIENT_SECRET + "\n")
    route = secret_route(backend)
    del route["credentials"]["client_secret"]
    route["credentials"]["client_secret_file"] = "secret.txt"  # relative to the config file
    config = proxy_yaml(tmp_path, backend, port, routes=[route])
    base = f"http://127.0.0.1:{port}"

    async with (
        spawn(run_proxy_args("--config", str(config)), child_env(), base + "/-/healthz") as proc,
        client() as http,
    ):
        assert (await get(http, base + "/api/v1/echo/before"))[0] == 200
        assert backend.tokens.forms[-1]["client_secret"] == CLIENT_SECRET

        # the key is rotated: new secret at the token server and in the file, old tokens revoked upstream
        new_secret = "rotated-s3cret+after/reload"
        backend.tokens.client_secret = new_secret
        secret_file.write_text(new_secret + "\n")
        backend.upstream.revoked.update(backend.tokens.issued)
        mark = len(proc.lines)
        proc.signal(signal.SIGHUP)
        line = await proc.wait_for("reloaded", mark)
        assert "1 route(s)" in line

        status, body = await get(http, base + "/api/v1/echo/after")
        assert status == 200, body
        assert backend.tokens.forms[-1]["client_secret"] == new_secret
        used = bearer_of(backend.upstream.requests[-1])
        assert used in backend.tokens.issued and used not in backend.upstream.revoked

        # a broken config: the reload is refused, the running configuration stays
        config.write_text("routes: [\n  - name: api\n    prefix: /\n  upstream: x\n")
        mark = len(proc.lines)
        proc.signal(signal.SIGHUP)
        line = await proc.wait_for("reload failed", mark)
        assert "still serving with the previous configuration" in line
        assert "not valid YAML" in line and str(config) in line
        for _ in range(3):
            status, body = await get(http, base + "/api/v1/echo/still")
            assert status == 200, body

        # a semantically wrong value (was an OverflowError traceback once): refused the same way
        mark = len(proc.lines)
        write_yaml(config, {"routes": [route], "limits": {"max_body_size": float("inf")}})
        proc.signal(signal.SIGHUP)
        line = await proc.wait_for("reload failed", mark)
        assert "limits.max_body_size: expected a finite number" in line and "still serving" in line
        assert (await get(http, base + "/api/v1/echo/still"))[0] == 200

        mark = len(proc.lines)
        proc.signal(signal.SIGTERM)
        assert await proc.exit_code() == 0, proc.output()
        await proc.wait_for("stopped", mark)
    assert "Task exception was never retrieved" not in proc.output()
    # nothing the proxy writes may carry the secrets
    assert CLIENT_SECRET not in proc.output() and new_secret not in proc.output()


def reloadable(path: Path) -> Callable[[], Prepared]:
    return lambda: prepare(load_config(Overrides(config=str(path)), env={}))


async def test_reload_then_stop_closes_the_replaced_runtime(tmp_path: Path, backend: Backend) -> None:
    config = make_config(tmp_path, backend)
    server = ProxyServer(prepare(config), reload=reloadable(tmp_path / "proxy.yaml"))
    await server.start()
    try:
        old = server.state.runtime
        assert await server.reload()
        assert server.state.runtime is not old
    finally:
        await server.stop()  # well within the 30 s grace period of the replaced runtime
    assert old.closed and old.pool.closed and old.token_session.closed
    assert all(m._refresher is None for m in old.distinct_managers), "the old token refresher still runs"


async def test_reload_survives_an_unexpected_error(
    tmp_path: Path, backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> Prepared:
        raise OverflowError("cannot convert float infinity to integer: s3cr3t-in-a-message")

    async with running_proxy(make_config(tmp_path, backend)) as running, client() as http:
        running.server._reload = broken
        runtime = running.server.state.runtime
        running.server._on_reload_signal()  # what SIGHUP does: a task nobody awaits
        await asyncio.gather(*running.server._reloading)
        assert running.server.state.runtime is runtime
        assert (await get(http, running.url + "/api/v1/echo/x"))[0] == 200
    message = next(r.getMessage() for r in caplog.records if "reload failed" in r.getMessage())
    assert "internal error: OverflowError" in message and "still serving" in message
    assert "s3cr3t" not in caplog.text
    assert "Task exception was never retrieved" not in caplog.text


async def test_reload_is_refused_while_draining(
    tmp_path: Path, backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    server = ProxyServer(prepare(make_config(tmp_path, backend)), reload=reloadable(tmp_path / "proxy.yaml"))
    await server.start()
    try:
        runtime = server.state.runtime
        server.request_stop()
        assert await server.reload() is False
        assert server.state.runtime is runtime
        assert "while draining" in caplog.text
    finally:
        await server.stop()


async def test_reload_names_settings_that_need_a_restart(
    tmp_path: Path, backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    server = ProxyServer(prepare(make_config(tmp_path, backend)), reload=reloadable(tmp_path / "proxy.yaml"))
    await server.start()
    try:
        make_config(tmp_path, backend, shutdown_timeout=5, inbound_api_key="new-inbound-key")
        assert await server.reload()
    finally:
        await server.stop()
    warning = next(r.getMessage() for r in caplog.records if "after a restart" in r.getMessage())
    assert "shutdown_timeout" in warning
    assert "inbound_api_key" not in warning  # applied by the reload, see below
    assert "new-inbound-key" not in caplog.text
    # what the server reports as its configuration is what it runs with (the drain message quotes it)
    assert server.prepared.config.shutdown_timeout == 30
    assert server.prepared.config.inbound_api_key is not None


async def test_reload_cannot_drop_the_api_key_of_a_non_loopback_listener(
    tmp_path: Path, backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    """The file may now say 127.0.0.1 without a key, but the socket still listens on 0.0.0.0: refuse that."""
    config = make_config(tmp_path, backend, listen="0.0.0.0:0", inbound_api_key="running-key")
    async with running_proxy(config) as running, client() as http:  # traffic only to 127.0.0.1
        running.server._reload = reloadable(tmp_path / "proxy.yaml")
        make_config(tmp_path, backend, listen="127.0.0.1:0")  # rewrites proxy.yaml: loopback, no key
        assert await running.server.reload() is False
        url = running.url + "/api/v1/echo/guarded"
        assert (await get(http, url))[0] == 401
        assert (await get(http, url, headers={"X-Proxy-Api-Key": "running-key"}))[0] == 200
    message = next(r.getMessage() for r in caplog.records if "reload failed" in r.getMessage())
    assert "still listening on 0.0.0.0" in message and "Refusing to listen" in message


async def test_reload_applies_a_rotated_inbound_api_key(tmp_path: Path, backend: Backend) -> None:
    key_file = tmp_path / "inbound.key"
    key_file.write_text("first-inbound-key\n")
    config = make_config(tmp_path, backend, inbound_api_key_file=str(key_file))
    async with running_proxy(config) as running, client() as http:
        running.server._reload = reloadable(tmp_path / "proxy.yaml")
        url = running.url + "/api/v1/echo/k"
        assert (await get(http, url, headers={"X-Proxy-Api-Key": "first-inbound-key"}))[0] == 200
        key_file.write_text("second-inbound-key\n")
        assert await running.server.reload()
        assert (await get(http, url, headers={"X-Proxy-Api-Key": "second-inbound-key"}))[0] == 200
        assert (await get(http, url, headers={"X-Proxy-Api-Key": "first-inbound-key"}))[0] == 401


def test_infinite_limit_is_a_config_error(tmp_path: Path) -> None:
    path = write_yaml(
        tmp_path / "proxy.yaml",
        {
            "limits": {"max_body_size": float("inf")},
            "routes": [
                {
                    "upstream": "https://127.0.0.1:9",
                    "credentials": {"token_url": "https://127.0.0.1:9/t", "client_id": "a", "client_secret": "b"},
                }
            ],
        },
    )
    with pytest.raises(ConfigError):
        load_config(Overrides(config=str(path)), env={})


# --------------------------------------------------------------------------- 2. outbound HTTP proxy


@dataclass
class ConnectProxy:
    """A minimal HTTP CONNECT proxy: records each tunnel's target and Proxy-Authorization, pipes bytes."""

    targets: list[str] = field(default_factory=list)
    authorizations: list[str | None] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> ConnectProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        for writer in self._writers:
            writer.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(ConnectionError, OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            request_line, *header_lines = head.split("\r\n")
            method, target, _ = request_line.split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines if h)}
            if method != "CONNECT":
                self.refused.append(request_line)
                writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return
            self.targets.append(target)
            self.authorizations.append(headers.get("proxy-authorization"))
            host, _, port = target.rpartition(":")
            up_reader, up_writer = await asyncio.open_connection(host.strip("[]"), int(port))
            self._writers.add(up_writer)
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        except (asyncio.IncompleteReadError, ConnectionError, OSError, ValueError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)


@pytest.fixture
async def connect_proxy() -> AsyncIterator[ConnectProxy]:
    proxy = await ConnectProxy().start()
    try:
        yield proxy
    finally:
        await proxy.close()


async def test_outbound_proxy_from_config_tunnels_token_server_and_upstream(
    tmp_path: Path, backend: Backend, connect_proxy: ConnectProxy
) -> None:
    config = make_config(tmp_path, backend, outbound_proxy=connect_proxy.url)
    async with running_proxy(config) as running, client() as http:
        status, body = await get(http, running.url + "/api/v1/echo/via-proxy")
    assert status == 200, body
    assert hostport(backend.tokens.url) in connect_proxy.targets
    assert hostport(backend.upstream.url) in connect_proxy.targets
    assert connect_proxy.refused == []


@pytest.mark.timeout(30)
async def test_https_proxy_environment_variable_is_used_for_loopback_too(
    tmp_path: Path, backend: Backend, connect_proxy: ConnectProxy
) -> None:
    """HTTPS_PROXY (with credentials) is honoured, also for 127.0.0.1: with HTTPS_PROXY set and NO_PROXY unset,
    Python's NO_PROXY matching (``urllib.request.proxy_bypass_environment``) exempts no loopback address."""
    port = free_port()
    config = proxy_yaml(tmp_path, backend, port)
    env = child_env(HTTPS_PROXY=f"http://corp%40user:p%3Ass@127.0.0.1:{connect_proxy.port}")
    base = f"http://127.0.0.1:{port}"
    async with spawn(run_proxy_args("--config", str(config)), env, base + "/-/healthz") as proc, client() as http:
        status, body = await get(http, base + "/api/v1/echo/env-proxy")
        assert status == 200, body
        proc.signal(signal.SIGTERM)
        assert await proc.exit_code() == 0
    assert hostport(backend.tokens.url) in connect_proxy.targets
    assert hostport(backend.upstream.url) in connect_proxy.targets
    expected = "Basic " + base64.b64encode(b"corp@user:p:ss").decode()
    assert set(connect_proxy.authorizations) == {expected}
    assert "p:ss" not in proc.output() and "p%3Ass" not in proc.output()


async def test_no_proxy_exempts_hosts_from_https_proxy(
    tmp_path: Path, backend: Backend, connect_proxy: ConnectProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.setenv("HTTPS_PROXY", connect_proxy.url)
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    async with running_proxy(make_config(tmp_path, backend)) as running, client() as http:
        status, body = await get(http, running.url + "/api/v1/echo/direct")
    assert status == 200, body
    assert connect_proxy.targets == []


def test_loopback_is_not_bypassed_without_no_proxy() -> None:
    """The finding the docs rely on, pinned: only NO_PROXY exempts hosts; loopback is not special (urllib's
    ``proxy_bypass`` uses only the environment as soon as a ``*_PROXY`` variable is set, on every platform)."""
    code = (
        "import json, urllib.request as u; "
        "print(json.dumps([u.proxy_bypass(h) for h in ('127.0.0.1', 'localhost', 'example.com')]))"
    )
    env = child_env(HTTPS_PROXY="http://127.0.0.1:9")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [False, False, False]
    env["NO_PROXY"] = "127.0.0.1,localhost"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [True, True, False]


async def test_outbound_proxy_with_credentials(tmp_path: Path, backend: Backend, connect_proxy: ConnectProxy) -> None:
    config = make_config(tmp_path, backend, outbound_proxy=f"http://corp:pw@127.0.0.1:{connect_proxy.port}")
    async with running_proxy(config) as running, client() as http:
        status, _ = await get(http, running.url + "/api/v1/echo/x")
    assert status == 200
    assert connect_proxy.authorizations[0] == "Basic " + base64.b64encode(b"corp:pw").decode()


async def test_proxy_refusing_the_tunnel_is_reported_as_such(
    tmp_path: Path, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=corp\r\n"
            b"Content-Length: 0\r\n\r\n"
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    try:
        config = make_config(tmp_path, backend, outbound_proxy=f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        async with running_proxy(config) as running, client() as http:
            status, body = await get(http, running.url + "/api/v1/echo/x")
    finally:
        server.close()
    assert status in (502, 503)
    error = json.loads(body)
    assert error["token_server_error"] != "internal_error"
    assert "407" in error["detail"] and "proxy" in error["detail"].lower()


async def test_a_netrc_file_does_not_interfere(
    tmp_path: Path, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login curl-user password curl-pass\nmachine localhost login a password b\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    upstream = backend.upstream.url.replace("127.0.0.1", "localhost")
    config = make_config(tmp_path, backend, [secret_route(backend, upstream=upstream)])
    async with running_proxy(config) as running, client() as http:
        status, body = await get(http, running.url + "/api/v1/echo/netrc")
    assert status == 200, body
    assert backend.tokens.forms[-1]["client_secret"] == CLIENT_SECRET


# --------------------------------------------------------------------------- 3. admin endpoints


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples ``name`` whose labels include ``labels``."""
    return sum(v for n, lab, v in samples(text) if n == name and labels.items() <= lab.items())


@pytest.mark.timeout(30)
async def test_admin_listener_readiness_metrics_and_main_port_404(tmp_path: Path, backend: Backend) -> None:
    port, admin_port = free_port(), free_port()
    backend.tokens.fail = "invalid_client"
    config = proxy_yaml(tmp_path, backend, port)
    admin = f"http://127.0.0.1:{admin_port}"
    base = f"http://127.0.0.1:{port}"
    args = run_proxy_args("--config", str(config), "--admin-listen", f"127.0.0.1:{admin_port}")
    async with spawn(args, child_env(), admin + "/-/healthz") as proc, client() as http:
        # not ready while the token server refuses: 503 naming the route and the reason
        end = time.monotonic() + 10
        while True:
            async with http.get(admin + "/-/readyz") as resp:
                assert resp.status == 503
                ready = await resp.json()
            if "invalid_client" in json.dumps(ready):
                break
            assert time.monotonic() < end, ready
            await asyncio.sleep(0.05)
        assert ready["status"] == "not_ready"
        assert set(ready["routes"]) == {"api"}
        # the error code only: /-/readyz needs no API key, so never the token server's own words (issue 12)
        assert ready["routes"]["api"] == "token server refused: invalid_client"

        backend.tokens.fail = None  # the background refresh retries with backoff and readiness turns green
        end = time.monotonic() + 10
        while True:
            async with http.get(admin + "/-/readyz") as resp:
                if resp.status == 200:
                    assert await resp.json() == {"status": "ready", "routes": ["api"]}
                    break
            assert time.monotonic() < end, "never became ready:\n" + proc.output()
            await asyncio.sleep(0.1)

        status, before = await get(http, admin + "/-/metrics")
        assert status == 200
        for _ in range(3):
            assert (await get(http, base + "/api/v1/echo/m"))[0] == 200
        _, after = await get(http, admin + "/-/metrics")
        p = "odata_auth_proxy_"
        ok = {"route": "api", "method": "GET", "status_class": "2xx"}
        assert metric(after, p + "requests_total", **ok) == metric(before, p + "requests_total", **ok) + 3
        assert metric(after, p + "token_fetches_total", route="api", outcome="ok") >= 1
        assert metric(after, p + "token_fetches_total", route="api", outcome="invalid_client") >= 1
        expiry = metric(after, p + "token_expiry_seconds", route="api")
        assert 3000 < expiry <= 3600
        names = {n for n, _, _ in samples(after)}
        assert {"process_resident_memory_bytes", "process_cpu_seconds_total", p + "build_info"} <= names
        assert p + "request_duration_seconds_bucket" in names

        # the main port has no admin endpoints, and /-/ is never forwarded upstream
        forwarded = len(backend.upstream.requests)
        for path in ("/-/healthz", "/-/readyz", "/-/metrics"):
            async with http.get(base + path) as resp:
                assert resp.status == 404
                assert (await resp.json())["error"] == "not_found"
        assert len(backend.upstream.requests) == forwarded
        assert not any(r["raw_path"].startswith("/-/") for r in backend.upstream.requests)


# --------------------------------------------------------------------------- 4. JSON logs


@pytest.mark.timeout(30)
async def test_json_logs_every_line_is_a_json_object(tmp_path: Path, backend: Backend) -> None:
    port = free_port()
    config = proxy_yaml(tmp_path, backend, port)
    base = f"http://127.0.0.1:{port}"
    args = run_proxy_args("--config", str(config), "--log-format", "json")
    async with spawn(args, child_env(), base + "/-/healthz") as proc, client() as http:
        async with http.get(base + "/api/v1/echo/ok?$top=1", headers={"X-Request-Id": "req-ops-1"}) as resp:
            assert resp.status == 200
            assert resp.headers["X-Request-Id"] == "req-ops-1"
        async with http.get(base + "/api/v1/echo/auto") as resp:
            generated_id = resp.headers["X-Request-Id"]
        assert (await get(http, base + "/api/v1/echo/x", headers={"Host": "evil.example"}))[0] == 421
        with contextlib.suppress(aiohttp.ClientPayloadError):
            await get(http, base + "/api/v1/broken")  # upstream cuts the body: a warning, connection closed
        # the token is revoked and the token server now refuses: 502 token_unavailable, warnings logged
        backend.upstream.revoked.update(backend.tokens.issued)
        backend.tokens.fail = "invalid_client"
        status, body = await get(http, base + "/api/v1/echo/fails")
        assert status == 502 and json.loads(body)["error"] == "token_unavailable"
        proc.signal(signal.SIGTERM)
        assert await proc.exit_code() == 0

    assert proc.stderr, "no log output"
    entries = []
    for line in proc.stdout + proc.stderr:
        entry = json.loads(line)
        assert isinstance(entry, dict), line
        assert {"time", "level", "message", "logger"} <= entry.keys(), line
        entries.append(entry)
    access = [e for e in entries if e["logger"] == "odata_auth_proxy.access"]
    first = next(e for e in access if e["path"] == "/api/v1/echo/ok?$top=1")
    assert first["method"] == "GET" and first["status"] == 200 and first["route"] == "api"
    assert first["request_id"] == "req-ops-1"
    assert re.fullmatch(r"[0-9a-f]{8,}", first["token_fp"]), first
    assert isinstance(first["duration_ms"], int | float) and first["duration_ms"] >= 0
    assert first["upstream_status"] == 200
    assert any(e["request_id"] == generated_id for e in access)
    statuses = {e["path"]: e["status"] for e in access}
    assert statuses["/api/v1/echo/x"] == 421 and statuses["/api/v1/echo/fails"] == 502
    levels = {e["level"] for e in entries}
    assert {"info", "warning"} <= levels
    assert any(e.get("event") == "start" for e in entries)
    assert entries[-1]["message"] == "stopped"


# --------------------------------------------------------------------------- 5. drain


@pytest.mark.timeout(30)
async def test_sigterm_drains_in_flight_requests_then_exits_0(tmp_path: Path, backend: Backend) -> None:
    port, admin_port = free_port(), free_port()
    config = proxy_yaml(tmp_path, backend, port)
    base, admin = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
    args = run_proxy_args(
        "--config", str(config), "--admin-listen", f"127.0.0.1:{admin_port}", "--shutdown-timeout", "10"
    )
    async with spawn(args, child_env(), admin + "/-/readyz") as proc, client() as http:
        slow = asyncio.create_task(get(http, base + "/api/v1/slow?seconds=2"))
        end = time.monotonic() + 5
        while not any(r["raw_path"].startswith("/api/v1/slow") for r in backend.upstream.requests):
            assert time.monotonic() < end and not slow.done()
            await asyncio.sleep(0.02)
        started = time.monotonic()
        proc.signal(signal.SIGTERM)
        await proc.wait_for("draining")

        # during the drain: not ready (the admin listener stays up until the main one has drained) ...
        async with http.get(admin + "/-/readyz") as resp:
            assert resp.status == 503
            assert (await resp.json())["status"] == "draining"
        async with http.get(admin + "/-/healthz") as resp:
            assert resp.status == 200
        # ... and new connections to the main port are refused
        with pytest.raises(aiohttp.ClientConnectorError):
            await get(http, base + "/api/v1/echo/late")

        assert await slow == (200, "slow done")
        assert await proc.exit_code() == 0, proc.output()
        assert time.monotonic() - started < 8
        await proc.wait_for("stopped")


@pytest.mark.timeout(30)
async def test_second_sigterm_exits_at_once_non_zero(tmp_path: Path, backend: Backend) -> None:
    port = free_port()
    config = proxy_yaml(tmp_path, backend, port)
    base = f"http://127.0.0.1:{port}"
    args = run_proxy_args("--config", str(config), "--shutdown-timeout", "30")
    async with spawn(args, child_env(), base + "/-/healthz") as proc, client(total=30) as http:
        slow = asyncio.create_task(get(http, base + "/api/v1/slow?seconds=20"))
        end = time.monotonic() + 5
        while not any(r["raw_path"].startswith("/api/v1/slow") for r in backend.upstream.requests):
            assert time.monotonic() < end and not slow.done()
            await asyncio.sleep(0.02)
        proc.signal(signal.SIGTERM)
        await proc.wait_for("draining")
        await asyncio.sleep(0.3)
        assert proc.process.returncode is None  # still draining
        started = time.monotonic()
        proc.signal(signal.SIGTERM)
        code = await proc.exit_code(timeout=5)
        assert time.monotonic() - started < 2
        assert code != 0
        await proc.wait_for("second SIGTERM")
        with pytest.raises(aiohttp.ClientError):
            await slow


# --------------------------------------------------------------------------- 6. Dockerfile, run without an engine


@dataclass
class Instruction:
    keyword: str
    args: str


def dockerfile_stages(text: str) -> list[list[Instruction]]:
    """Instructions per build stage (comments dropped, continuation lines joined); the global ``ARG``s (before
    the first ``FROM``) are not a stage: their defaults are put into the ``FROM`` lines, as a plain build does."""
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") and not current:
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        if current.strip():
            logical.append(current.strip())
        current = ""
    stages: list[list[Instruction]] = []
    global_args: dict[str, str] = {}
    for line in logical:
        keyword, _, args = line.partition(" ")
        if keyword.upper() == "ARG" and not stages:
            name, _, default = args.strip().partition("=")
            global_args[name] = default
            continue
        if keyword.upper() == "FROM":
            stages.append([])
            args = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: global_args[m[1] or m[2]], args)
        assert stages, f"instruction before FROM: {line}"
        stages[-1].append(Instruction(keyword.upper(), args.strip()))
    return stages


def dockerfile_env(stage: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in stage:
        if ins.keyword == "ENV":
            for item in shlex.split(ins.args):
                name, sep, value = item.partition("=")
                assert sep, f"use ENV NAME=value, not the legacy form: {ins.args}"
                env[name] = value
    return env


def one(stage: list[Instruction], keyword: str) -> str:
    found = [i.args for i in stage if i.keyword == keyword]
    assert len(found) == 1, (keyword, found)
    return found[0]


def healthcheck_command(stage: list[Instruction]) -> list[str]:
    args = one(stage, "HEALTHCHECK")
    options, sep, command = args.partition("CMD ")
    assert sep, args
    assert re.search(r"--timeout=\d+s", options) and re.search(r"--interval=\d+s", options)
    parsed = json.loads(command)
    assert isinstance(parsed, list) and all(isinstance(a, str) for a in parsed)
    return parsed


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""

    def regex(pattern: str) -> re.Pattern[str]:
        out = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out += "(?:.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                out += ".*"
                i += 2
            elif pattern[i] == "*":
                out += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                out += "[^/]"
                i += 1
            else:
                out += re.escape(pattern[i])
                i += 1
        return re.compile(out)

    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        compiled = regex(os.path.normpath(pattern.lstrip("!")))
        if any(compiled.fullmatch(c) for c in candidates):
            excluded = not negate
    return excluded


def read_dockerfile() -> list[list[Instruction]]:
    return dockerfile_stages((ROOT / "Dockerfile").read_text())


def test_dockerfile_shape() -> None:
    stages = read_dockerfile()
    final = stages[-1]
    assert one(final, "FROM").split()[0] == "python:3.12-slim"
    # the base is a build argument (CI builds on a stand-in, ci/container-image.sh), the same for both stages
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.12-slim$", text, flags=re.MULTILINE)
    assert re.findall(r"^FROM (\S+)", text, flags=re.MULTILINE) == ["${PYTHON_IMAGE}", "${PYTHON_IMAGE}"]
    assert len(stages) >= 2, "multi-stage: build the wheel in a builder stage"
    builder = stages[0]
    assert any("pip wheel" in i.args for i in builder if i.keyword == "RUN")
    installs = [i.args for i in final if i.keyword == "RUN" and "pip install" in i.args]
    assert installs and "--no-index" in installs[0] and "from=build" in installs[0]
    assert not any(i.keyword in ("COPY", "ADD") and "proxy" in i.args.split() for i in final), "no sources in the image"

    # a non-root user whose uid and gid both exist in the image (created by the install step), numeric for
    # Kubernetes' runAsNonRoot, and not "proxy" (Debian-based images have that system user, uid 13, already)
    assert one(final, "USER") == "10001:10001"
    assert re.search(r"groupadd [^&]*--gid 10001 ", installs[0]), "the group 10001 exists"
    assert re.search(r"useradd [^&]*--uid 10001 [^&]*--gid 10001 ", installs[0]), "user 10001 in group 10001"
    assert not installs[0].rstrip().endswith(" proxy"), "Debian-based images have a user proxy (uid 13) already"
    assert one(final, "EXPOSE") == "8080"
    assert json.loads(one(final, "ENTRYPOINT")) == ["odata-auth-proxy", "run"]  # exec form
    env = dockerfile_env(final)
    assert env["ODATA_AUTH_PROXY_LISTEN"] == "0.0.0.0:8080"
    assert env["ODATA_AUTH_PROXY_LOG_FORMAT"] == "json"
    assert env["PYTHONUNBUFFERED"] == "1"
    check = healthcheck_command(final)
    assert check[:2] == ["python", "-c"] and "/-/healthz" in check[2] and "127.0.0.1" in check[2]
    assert "curl" not in check[2] and "wget" not in check[2]
    assert "ODATA_AUTH_PROXY_INBOUND_API_KEY" in text and "ODATA_AUTH_PROXY_ALLOW_REMOTE=true" in text

    # every file the build copies is in the build context, and no key material is
    patterns = [
        p.strip()
        for p in (ROOT / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.strip().startswith("#")
    ]
    for ins in builder:
        if ins.keyword == "COPY":
            for source in ins.args.split()[:-1]:
                assert (ROOT / source).exists(), source
                files = (
                    [source]
                    if (ROOT / source).is_file()
                    else [str(f.relative_to(ROOT)) for f in (ROOT / source).rglob("*.py")]
                )
                for f in files:
                    assert not dockerignore_excludes(patterns, f), f"{f} is excluded by .dockerignore"
    for secret in (
        "service-key.json",
        "tests/fixtures/service-keys/api-plan-secret.json",
        "client.key",
        "x.pem",
        ".env",
    ):
        assert dockerignore_excludes(patterns, secret), secret


@pytest.mark.timeout(30)
async def test_docker_entrypoint_with_image_env_and_healthcheck(tmp_path: Path, backend: Backend) -> None:
    final = read_dockerfile()[-1]
    entrypoint = json.loads(one(final, "ENTRYPOINT"))
    port = free_port()
    api_key = "inbound-key-0123456789abcdef"
    env = child_env(
        **dockerfile_env(final),
        ODATA_AUTH_PROXY_SERVICE_KEY_JSON=json.dumps(service_key(backend)),
        ODATA_AUTH_PROXY_CA_BUNDLE=str(backend.tls.ca_path),
        ODATA_AUTH_PROXY_INBOUND_API_KEY=api_key,
    )
    assert shutil.which(entrypoint[0], path=env["PATH"]), "the console script is installed"

    # the image's default, 0.0.0.0 without a key, is refused with exit code 2 and a reason
    no_key = {k: v for k, v in env.items() if k != "ODATA_AUTH_PROXY_INBOUND_API_KEY"}
    refused = subprocess.run(entrypoint, env=no_key, capture_output=True, text=True, timeout=20)
    assert refused.returncode == 2
    assert "ODATA_AUTH_PROXY_INBOUND_API_KEY" in refused.stderr and "--allow-remote" in refused.stderr

    env["ODATA_AUTH_PROXY_LISTEN"] = f"127.0.0.1:{port}"  # the test's only change to the image's settings
    base = f"http://127.0.0.1:{port}"
    async with spawn(entrypoint, env, base + "/-/healthz") as proc, client() as http:
        # the banner's curl line names the API key header (a bare curl would only get a 401), never the key
        example = json.loads(await proc.wait_for('"event": "example"'))
        assert "-H 'X-Proxy-Api-Key: <inbound API key>'" in example["message"]
        assert example["api_key_header"] == "X-Proxy-Api-Key"
        # the HEALTHCHECK command exactly as written, even with a (dead) HTTP proxy in the environment
        check = healthcheck_command(final)
        dead_proxy = f"http://127.0.0.1:{free_port()}"
        result = await asyncio.to_thread(
            subprocess.run,
            check,
            env={**env, "HTTP_PROXY": dead_proxy, "http_proxy": dead_proxy},
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert result.returncode == 0, result.stderr
        # it follows ODATA_AUTH_PROXY_ADMIN_LISTEN when that is set (nothing listens there: unhealthy)
        result = await asyncio.to_thread(
            subprocess.run,
            check,
            env={**env, "ODATA_AUTH_PROXY_ADMIN_LISTEN": f"127.0.0.1:{free_port()}"},
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert result.returncode != 0

        status, body = await get(http, base + "/api/v1/echo/docker", headers={"X-Proxy-Api-Key": api_key})
        assert status == 200, body
        assert "x-proxy-api-key" not in {k.lower() for k, _ in json.loads(body)["headers"]}
        status, body = await get(http, base + "/api/v1/echo/docker")
        assert status == 401 and json.loads(body)["error"] == "proxy_auth_required"
        proc.signal(signal.SIGTERM)
        assert await proc.exit_code() == 0
    for line in proc.stdout + proc.stderr:  # the image's LOG_FORMAT=json
        assert isinstance(json.loads(line), dict), line
    assert api_key not in proc.output()


# --------------------------------------------------------------------------- compose, systemd, launchd, docs


def known_env_names() -> set[str]:
    source = inspect.getsource(overrides_from_env)
    names = {ENV_PREFIX + n for n in re.findall(r'get\("([A-Z_]+)"\)', source)}
    assert len(names) >= 10, names
    # and the two that choose compiled or pure Python (at install and at run time; proxy/compiled.py)
    return names | {ENV_PREFIX + "INBOUND_API_KEY", ENV_PREFIX + "KEY_PASSWORD", COMPILE_ENV, PURE_ENV}


def test_compose_example_uses_known_variables_and_a_valid_sidecar_config(tmp_path: Path) -> None:
    text = (ROOT / "docker-compose.example.yml").read_text()
    compose = yaml.safe_load(text)
    proxy_service = compose["services"]["odata-proxy"]
    assert "legacy-app" in compose["services"]
    used = set(re.findall(r"\bODATA_AUTH_PROXY_[A-Z_]+", text))
    unknown = used - known_env_names()
    assert not unknown, f"variables the proxy does not read: {sorted(unknown)}"
    assert {"ODATA_AUTH_PROXY_SERVICE_KEY_JSON", "ODATA_AUTH_PROXY_INBOUND_API_KEY"} <= used

    environment = proxy_service["environment"]
    assert environment["ODATA_AUTH_PROXY_ALLOWED_HOSTS"] == "odata-proxy"
    key_path = environment["ODATA_AUTH_PROXY_SERVICE_KEY"]
    assert key_path == "/run/secrets/service-key.json"
    assert "service-key.json" in proxy_service["secrets"]
    legacy = compose["services"]["legacy-app"]
    assert legacy["depends_on"]["odata-proxy"]["condition"] == "service_healthy"
    assert "http://odata-proxy:8080/api/v1/IntegrationPackages" in " ".join(legacy["command"])
    assert "X-Proxy-Api-Key" in " ".join(legacy["command"])

    # the image's env + the compose env form a configuration the proxy accepts (key file stood in for)
    key_file = tmp_path / "service-key.json"
    shutil.copy(ROOT / "tests/fixtures/service-keys/api-plan-secret.json", key_file)
    env = {**dockerfile_env(read_dockerfile()[-1]), **{k: str(v) for k, v in environment.items()}}
    env["ODATA_AUTH_PROXY_SERVICE_KEY"] = str(key_file)
    env["ODATA_AUTH_PROXY_INBOUND_API_KEY"] = "from-.env"
    config = load_config(env=env)
    assert (config.listen_host, config.listen_port) == ("0.0.0.0", 8080)
    assert "odata-proxy" in config.allowed_hosts
    assert listen_address_problem(config.listen_host, allow_remote=config.allow_remote, has_api_key=True) is None
    assert listen_address_problem(config.listen_host, allow_remote=config.allow_remote, has_api_key=False)
    grace = float(str(proxy_service["stop_grace_period"]).rstrip("s"))
    assert grace > config.shutdown_timeout


def test_compose_env_names_check_catches_a_typo() -> None:
    assert "ODATA_AUTH_PROXY_SERVICE_KEY_JSON" in known_env_names()
    assert "ODATA_AUTH_PROXY_ALLOWED_HOST" not in known_env_names()
    with pytest.raises(ConfigError):
        load_config(env={"ODATA_AUTH_PROXY_ALLOW_REMOTE": "maybe", "ODATA_AUTH_PROXY_SERVICE_KEY_JSON": "{}"})


def test_systemd_user_unit(tmp_path: Path) -> None:
    path = ROOT / "examples/workstation/odata-auth-proxy.service"
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(path.read_text())
    service = unit["Service"]
    command = shlex.split(service["ExecStart"])
    assert command[:2] == ["%h/.local/bin/odata-auth-proxy", "run"]
    assert command[2:] == ["--service-key", "%h/.config/odata-auth-proxy/service-key.json"]
    build_parser().parse_args(command[1:])  # flags the CLI knows
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"] == "2"
    assert float(service["TimeoutStopSec"]) > 30  # > the default drain time
    assert unit["Install"]["WantedBy"] == "default.target"  # a --user unit

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    home = tmp_path / "home"
    (home / ".local/bin").mkdir(parents=True)
    (home / ".local/bin/odata-auth-proxy").symlink_to(BIN / "odata-auth-proxy")
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    shutil.copy(path, tmp_path / path.name)
    env = {**os.environ, "HOME": str(home), "XDG_RUNTIME_DIR": str(runtime)}
    result = subprocess.run(
        [analyze, "verify", "--user", str(tmp_path / path.name)], env=env, capture_output=True, text=True, timeout=20
    )
    if "Failed to initialize manager" in result.stderr:
        pytest.skip(f"systemd-analyze cannot run here: {result.stderr.strip()}")
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_launchd_plist() -> None:
    plist = plistlib.loads((ROOT / "examples/workstation/com.example.odata-auth-proxy.plist").read_bytes())
    assert plist["Label"] == "com.example.odata-auth-proxy"
    program = plist["ProgramArguments"]
    assert program[0].endswith("/.local/bin/odata-auth-proxy") and program[0].startswith("/")
    assert program[1] == "run"
    build_parser().parse_args(program[1:])
    assert all("~" not in a and "$" not in a for a in program), "launchd expands neither ~ nor $HOME"
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["ExitTimeOut"] > 30
    assert plist["StandardErrorPath"].startswith("/")


def test_windows_task_script() -> None:
    """The Task Scheduler script (not run here: no PowerShell): what it registers runs a command the CLI knows."""
    text = (ROOT / "examples/workstation/register-task.ps1").read_text()
    (argument,) = re.findall(r'New-ScheduledTaskAction -Execute \$exe -Argument "([^"]+?)`"\$Config`""', text)
    assert argument == "run --config "
    build_parser().parse_args(["run", "--config", "C:\\Users\\me\\AppData\\Roaming\\odata-auth-proxy\\proxy.yaml"])
    assert "& $exe config validate $Config" in text  # checked before anything is registered
    for needed in (
        "-AtLogOn",
        "-LogonType Interactive",
        "-RunLevel Limited",
        "[TimeSpan]::Zero",
        "Register-ScheduledTask",
    ):
        assert needed in text, needed
    assert "~" not in text  # Task Scheduler expands no ~; paths come from $env: variables
    readme = (ROOT / "README.md").read_text()
    assert "examples\\workstation\\register-task.ps1" in readme


def test_operations_doc_lists_every_metric_and_real_commands() -> None:
    text = (ROOT / "README.md").read_text()
    for heading in (
        "Running as a sidecar",
        "Running as a workstation daemon",
        "Monitoring",
        "Health, readiness, drain and reload",
        "Behind a corporate proxy",
    ):
        assert re.search(rf"^#+ {re.escape(heading)}$", text, flags=re.MULTILINE), heading
    registry = ProxyMetrics().registry
    families = [m for m in registry.collect() if m.name.startswith("odata_auth_proxy_")]
    assert len(families) >= 10
    for family in families:
        exposed = family.name + ("_total" if family.type == "counter" else "")
        assert f"`{exposed}`" in text, f"README.md does not list {exposed}"
    documented = set(re.findall(r"`(odata_auth_proxy_[a-z_]+)`", text))
    real = {m.name + ("_total" if m.type == "counter" else "") for m in families}
    assert documented <= real, f"documented but not exported: {sorted(documented - real)}"
    # the flags the doc uses exist
    parser = build_parser()
    for line in re.findall(r"^\s*(?:\$ )?odata-auth-proxy (run [^\n#|\\]*)", text, flags=re.MULTILINE):
        if "[" in line:
            continue  # a synopsis ("run [--config FILE] …"), not a command line
        parser.parse_args(shlex.split(line.replace("~", "/home/you")))
    for name in set(re.findall(r"\bODATA_AUTH_PROXY_[A-Z_]+", text)):
        assert name in known_env_names(), name
