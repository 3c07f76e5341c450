"""``run --workers N``: a supervisor that fetches each token once and shares it with N worker processes.

Every test runs ``python -m proxy run --config F --workers 2`` as a subprocess against the real HTTPS test
backend of ``conftest.py`` (which lives in the test's event loop), on 127.0.0.1 only, with a deadline on
every wait; the process (and so its workers) is killed in ``finally`` whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import signal
import socket
import stat
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.config import ConfigError, Overrides, load_config
from proxy.workers import BrokerTokenSource, bind_listeners, close_all, token_error_from_json, token_error_to_json
from tests.conftest import CLIENT_SECRET, Backend, child_env, free_port, run_cli, secret_route, write_yaml

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX processes and signals")

ERROR_PREFIX = "odata-auth-proxy: error:"


# --------------------------------------------------------------------------- helpers


def config_file(tmp_path: Path, backend: Backend, port: int, **top: Any) -> Path:
    data: dict[str, Any] = {
        "listen": f"127.0.0.1:{port}",
        "tls": {"ca_bundle": str(backend.tls.ca_path)},
        "routes": [secret_route(backend)],
        "log_format": "json",
    }
    data.update(top)
    return write_yaml(tmp_path / "proxy.yaml", data)


def children_of(pid: int) -> list[int]:
    """Child processes of ``pid``, from /proc (no psutil)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2 :].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry))
    return sorted(found)


class Proxy:
    """A running ``python -m proxy run ...``; stdout/stderr go to files (no pipe can fill up)."""

    def __init__(self, process: asyncio.subprocess.Process, port: int, err: Path) -> None:
        self.process = process
        self.base = f"http://127.0.0.1:{port}"
        self._err = err

    @property
    def stderr(self) -> str:
        return self._err.read_text()

    def entries(self) -> list[dict[str, Any]]:
        """Every line of a JSON-logging proxy as an object (each one must be)."""
        out = []
        for line in self.stderr.splitlines():
            if line.strip():
                entry = json.loads(line)
                assert isinstance(entry, dict), line
                out.append(entry)
        return out

    def access(self) -> list[dict[str, Any]]:
        return [e for e in self.entries() if e.get("logger") == "odata_auth_proxy.access"]

    def workers_seen(self, since_request_id: str = "") -> set[int]:
        return {e["worker"] for e in self.access() if e.get("request_id", "").startswith(since_request_id)}

    async def wait_for(self, pattern: str, deadline: float = 10) -> re.Match[str]:
        end = time.monotonic() + deadline
        while True:
            match = re.search(pattern, self.stderr)
            if match:
                return match
            assert self.process.returncode is None, f"exited {self.process.returncode}: {self.stderr}"
            assert time.monotonic() < end, f"no {pattern!r} in the log: {self.stderr}"
            await asyncio.sleep(0.05)

    async def wait_status(self, path: str, status: int, deadline: float = 15, base: str = "") -> None:
        end = time.monotonic() + deadline
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as probe:
            while True:
                assert self.process.returncode is None, f"exited {self.process.returncode}: {self.stderr}"
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with probe.get((base or self.base) + path) as resp:
                        if resp.status == status:
                            return
                assert time.monotonic() < end, f"{path} never answered {status}: {self.stderr}"
                await asyncio.sleep(0.05)

    async def exit_code(self, deadline: float = 10) -> int:
        return await asyncio.wait_for(self.process.wait(), deadline)


@contextlib.asynccontextmanager
async def running(
    tmp_path: Path, config: Path, *extra: str, ready: bool = True, admin: str = "", wait: bool = True
) -> AsyncIterator[Proxy]:
    port = int(re.search(r"^listen: 127\.0\.0\.1:(\d+)", config.read_text(), re.M).group(1))  # type: ignore[union-attr]
    err = tmp_path / f"stderr-{port}.log"
    with open(err, "wb") as err_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            "run",
            "--config",
            str(config),
            "--workers",
            "2",
            *extra,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=err_file,
            stderr=err_file,
            env=child_env(),
            cwd=tmp_path,
        )
    proxy = Proxy(process, port, err)
    try:
        if wait:
            await proxy.wait_status("/-/readyz" if ready else "/-/healthz", 200, base=admin)
        yield proxy
    finally:
        if process.returncode is None:
            # SIGTERM first, so that the supervisor removes its broker directory; SIGKILL if it takes too long
            process.send_signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), 5)
        if process.returncode is None:
            for pid in children_of(process.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            process.kill()
            await process.wait()


def fresh_connections(total: float = 10) -> aiohttp.ClientSession:
    """A client that opens a new connection per request: SO_REUSEPORT spreads them over the workers."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True, limit=0), timeout=aiohttp.ClientTimeout(total=total)
    )


async def get(http: aiohttp.ClientSession, url: str, **kwargs: Any) -> tuple[int, str]:
    async with http.get(url, **kwargs) as resp:
        return resp.status, await resp.text()


async def until_both_workers(proxy: Proxy, http: aiohttp.ClientSession, tag: str, tries: int = 60) -> int:
    """Send requests (request ids ``tag-N``) until both workers have answered one; all must succeed."""
    sent = 0
    for sent in range(1, tries + 1):
        status, body = await get(http, proxy.base + f"/api/v1/echo/{tag}", headers={"X-Request-Id": f"{tag}-{sent}"})
        assert status == 200, body
        if sent % 4 == 0 and len(await settled_workers(proxy, tag, sent)) == 2:
            return sent
    raise AssertionError(f"only workers {proxy.workers_seen(tag)} answered {tries} requests: {proxy.stderr}")


async def settled_workers(proxy: Proxy, tag: str, count: int, deadline: float = 5) -> set[int]:
    """The workers that answered requests ``tag-*``, once all ``count`` access lines are written."""
    end = time.monotonic() + deadline
    while True:
        lines = [e for e in proxy.access() if e.get("request_id", "").startswith(tag + "-")]
        if len(lines) >= count or time.monotonic() > end:
            return {e["worker"] for e in lines}
        await asyncio.sleep(0.02)


# --------------------------------------------------------------------------- one token for every worker


@pytest.mark.timeout(30)
async def test_two_workers_serve_200_concurrent_requests_with_one_token(tmp_path: Path, backend: Backend) -> None:
    config = config_file(tmp_path, backend, free_port())
    async with running(tmp_path, config) as proxy:
        children = children_of(proxy.process.pid)
        assert len(children) == 2, children
        banner = await proxy.wait_for(r"workers: 2 \(pid (\d+), (\d+)\)")
        assert sorted(map(int, banner.groups())) == children

        async with fresh_connections(20) as http:
            results = await asyncio.gather(
                *(get(http, proxy.base + f"/api/v1/echo/{i}", headers={"X-Request-Id": f"c-{i}"}) for i in range(200))
            )
        assert [status for status, _ in results] == [200] * 200
        assert backend.tokens.requests == 1
        served = await settled_workers(proxy, "c", 200)
        assert served == {1, 2}, served

        # each worker has its own registry: /-/metrics shows the one that answered
        async with aiohttp.ClientSession() as http, http.get(proxy.base + "/-/metrics") as resp:
            assert resp.status == 200
            assert "odata_auth_proxy_requests_total" in await resp.text()

        proxy.process.send_signal(signal.SIGTERM)
        assert await proxy.exit_code() == 0
    entries = proxy.entries()  # JSON mode: every line of every process is one object
    assert {e["worker"] for e in entries if "worker" in e} == {1, 2}
    assert CLIENT_SECRET not in proxy.stderr
    for token in backend.tokens.issued:
        assert token not in proxy.stderr


@pytest.mark.timeout(40)
async def test_token_rotation_is_done_once_for_all_workers(tmp_path: Path, backend: Backend) -> None:
    backend.tokens.lifetime = 4
    config = config_file(tmp_path, backend, free_port(), access_log=False)
    started = time.monotonic()
    async with running(tmp_path, config) as proxy, fresh_connections() as http:
        failures = 0
        sent = 0
        end = time.monotonic() + 6
        while time.monotonic() < end:
            results = await asyncio.gather(*(get(http, proxy.base + "/api/v1/echo/r") for _ in range(8)))
            failures += sum(status != 200 for status, _ in results)
            sent += len(results)
            await asyncio.sleep(0.05)
        elapsed = time.monotonic() - started
    assert failures == 0
    assert sent > 100
    # what one process would fetch: at least one token per lifetime, at most one per half lifetime (+2)
    assert math.ceil(elapsed / 4) <= backend.tokens.requests <= 2 + math.floor(elapsed / 2), (
        backend.tokens.requests,
        elapsed,
    )
    used = {bearer for request in backend.upstream.requests for bearer in bearer_of(request)}
    assert used <= set(backend.tokens.issued)


def bearer_of(request: dict[str, Any]) -> list[str]:
    return [v.removeprefix("Bearer ") for k, v in request["headers"] if k.lower() == "authorization"]


@pytest.mark.timeout(30)
async def test_upstream_401_is_one_new_token_for_all_workers(tmp_path: Path, backend: Backend) -> None:
    config = config_file(tmp_path, backend, free_port())
    async with running(tmp_path, config) as proxy, fresh_connections() as http:
        await until_both_workers(proxy, http, "before")
        assert backend.tokens.requests == 1
        (old,) = backend.tokens.issued
        backend.upstream.revoked.add(old)  # both workers hold it

        sent = await until_both_workers(proxy, http, "after")  # every one of them 200, after one replay
        assert backend.tokens.requests == 2
        refused = [r for r in backend.upstream.requests if old in bearer_of(r) and "/after" in r["raw_path"]]
        # both workers sent the revoked token once and learned the new one from the broker
        assert len(refused) == 2, refused
        assert sent >= 2
        await proxy.wait_for("upstream answered 401 with token fp")


@pytest.mark.timeout(30)
async def test_wrong_secret_is_a_502_from_the_workers_and_does_not_hammer_the_token_server(
    tmp_path: Path, backend: Backend
) -> None:
    route = secret_route(backend)
    route["credentials"]["client_secret"] = "not-the-secret"
    config = config_file(tmp_path, backend, free_port(), routes=[route])
    async with running(tmp_path, config, ready=False) as proxy, fresh_connections() as http:
        await proxy.wait_status("/-/readyz", 503)
        before = backend.tokens.requests
        bodies = []
        for i in range(10):  # 50 requests in 2 s
            bodies += await asyncio.gather(
                *(get(http, proxy.base + "/api/v1/echo/x", headers={"X-Request-Id": f"w-{i}-{j}"}) for j in range(5))
            )
            await asyncio.sleep(0.2)
        during = backend.tokens.requests - before
        assert during <= 3, during
        for status, body in bodies:
            assert status == 502, body
            data = json.loads(body)
            assert data["error"] == "token_unavailable"
            assert data["token_server_error"] == "invalid_client"
            assert data["token_url"] == backend.tokens.url + "/oauth/token"
            assert data["token_server_status"] == 401
        assert await settled_workers(proxy, "w", 50)  # answered by the workers (access log lines with "worker")
    assert "not-the-secret" not in proxy.stderr


# --------------------------------------------------------------------------- signals and restarts


@pytest.mark.timeout(30)
async def test_sigterm_drains_a_request_in_flight_and_removes_the_broker_directory(
    tmp_path: Path, backend: Backend
) -> None:
    config = config_file(tmp_path, backend, free_port(), log_format="text")
    async with running(tmp_path, config) as proxy:
        socket_path = Path((await proxy.wait_for(r"--unix-socket (\S+)")).group(1))
        directory = socket_path.parent
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        assert directory.stat().st_uid == os.getuid()
        assert stat.S_ISSOCK(socket_path.stat().st_mode)
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(socket_path))) as broker:
            async with broker.get("http://broker/metrics") as resp:
                assert resp.status == 200
                assert 'odata_auth_proxy_token_fetches_total{outcome="ok",route="api"} 1.0' in await resp.text()

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http:
            request = asyncio.ensure_future(get(http, proxy.base + "/api/v1/slow?seconds=2"))
            end = time.monotonic() + 5
            while not any(r["raw_path"].startswith("/api/v1/slow") for r in backend.upstream.requests):
                assert time.monotonic() < end and not request.done()
                await asyncio.sleep(0.02)
            started = time.monotonic()
            proxy.process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(request, 10) == (200, "slow done")
            assert await proxy.exit_code() == 0, proxy.stderr
            assert time.monotonic() - started < 5
        assert not directory.exists()
        stderr = proxy.stderr
    assert "SIGTERM received: draining 2 worker(s)" in stderr
    assert re.search(r'"GET /api/v1/slow\?seconds=2" 200 .* worker=[12]\b', stderr), stderr
    assert "Traceback" not in stderr


@pytest.mark.timeout(30)
async def test_sighup_reloads_a_changed_secret_for_the_broker_and_the_workers(tmp_path: Path, backend: Backend) -> None:
    secret_file = tmp_path / "secret.txt"
    secret_file.write_text(CLIENT_SECRET + "\n")
    route = secret_route(backend)
    del route["credentials"]["client_secret"]
    route["credentials"]["client_secret_file"] = "secret.txt"
    config = config_file(tmp_path, backend, free_port(), routes=[route])
    async with running(tmp_path, config) as proxy, fresh_connections() as http:
        await until_both_workers(proxy, http, "before")
        assert backend.tokens.requests == 1

        new_secret = "rotated-s3cret+after/reload"
        backend.tokens.client_secret = new_secret
        secret_file.write_text(new_secret + "\n")
        backend.upstream.revoked.update(backend.tokens.issued)
        proxy.process.send_signal(signal.SIGHUP)
        await proxy.wait_for(r"reloaded credentials: 1 route\(s\); 2 worker\(s\)")
        end = time.monotonic() + 10
        while proxy.stderr.count("reloaded configuration: 1 route(s)") < 2:
            assert time.monotonic() < end, proxy.stderr
            await asyncio.sleep(0.05)

        await until_both_workers(proxy, http, "after")
        assert backend.tokens.requests == 2  # one new token, with the new secret, for both workers
        assert backend.tokens.forms[-1]["client_secret"] == new_secret
    assert new_secret not in proxy.stderr


@pytest.mark.timeout(30)
async def test_sighup_while_the_workers_start_is_passed_on_once_they_can_take_it(
    tmp_path: Path, backend: Backend
) -> None:
    config = config_file(tmp_path, backend, free_port())
    async with running(tmp_path, config, wait=False) as proxy:
        await proxy.wait_for(r"workers: 2 \(pid")  # the supervisor handles signals; the workers are starting
        proxy.process.send_signal(signal.SIGHUP)
        await proxy.wait_for(r"reloaded credentials: 1 route\(s\); 2 worker\(s\)")
        await proxy.wait_status("/-/readyz", 200)
        end = time.monotonic() + 10
        while len(re.findall(r"worker \d: reloaded configuration", proxy.stderr)) < 2:
            assert time.monotonic() < end, proxy.stderr
            await asyncio.sleep(0.05)
        assert "killed by SIGHUP" not in proxy.stderr
        assert len(children_of(proxy.process.pid)) == 2


@pytest.mark.timeout(30)
async def test_a_killed_worker_is_restarted(tmp_path: Path, backend: Backend) -> None:
    config = config_file(tmp_path, backend, free_port())
    async with running(tmp_path, config) as proxy, fresh_connections() as http:
        before = children_of(proxy.process.pid)
        assert len(before) == 2
        os.kill(before[0], signal.SIGKILL)
        await proxy.wait_for(rf"worker \d \(pid {before[0]}\) was killed by SIGKILL")
        restarted = await proxy.wait_for(r"worker \d restarted \(pid (\d+)\)")
        new_pid = int(restarted.group(1))
        assert sorted(children_of(proxy.process.pid)) == sorted([before[1], new_pid])
        await until_both_workers(proxy, http, "again")  # nothing fails meanwhile; the new worker serves too
        assert backend.tokens.requests == 1  # the token lives in the supervisor: the new worker got it there


@pytest.mark.timeout(30)
async def test_the_admin_listener_is_shared_by_the_workers(tmp_path: Path, backend: Backend) -> None:
    admin = f"http://127.0.0.1:{free_port()}"
    config = config_file(tmp_path, backend, free_port(), admin_listen=admin.removeprefix("http://"))
    async with running(tmp_path, config, admin=admin) as proxy, fresh_connections() as http:
        await until_both_workers(proxy, http, "main")
        for _ in range(6):
            assert (await get(http, admin + "/-/readyz"))[0] == 200
        status, body = await get(http, proxy.base + "/-/metrics")  # not on the main port
        assert status == 404 and json.loads(body)["error"] == "not_found"
        await proxy.wait_for(rf"admin: {admin}/-/healthz")


# --------------------------------------------------------------------------- configuration and start-up


def test_workers_setting_from_file_flag_and_environment(tmp_path: Path, backend: Backend) -> None:
    def load(env: dict[str, str] | None = None, flag: int | None = None, **top: Any) -> int:
        path = config_file(tmp_path, backend, 8080, **top)
        return load_config(Overrides(config=str(path), workers=flag), env=env or {}).workers

    assert load() == 1
    assert load(workers=3) == 3
    assert load({"ODATA_AUTH_PROXY_WORKERS": "4"}, workers=3) == 4
    assert load({"ODATA_AUTH_PROXY_WORKERS": "4"}, flag=2, workers=3) == 2
    for top, env, flag, where in (
        ({"workers": 0}, None, None, "workers: must be at least 1"),
        ({"workers": "two"}, None, None, "workers: expected a whole number"),
        ({"workers": 1.5}, None, None, "workers: expected a whole number"),
        ({"workers": True}, None, None, "workers: expected a whole number"),
        ({}, {"ODATA_AUTH_PROXY_WORKERS": "0"}, None, "ODATA_AUTH_PROXY_WORKERS: must be at least 1"),
        ({}, {"ODATA_AUTH_PROXY_WORKERS": "x"}, None, "ODATA_AUTH_PROXY_WORKERS: expected a whole number"),
        ({}, None, -1, "--workers: must be at least 1"),
    ):
        with pytest.raises(ConfigError) as caught:
            load(env, flag, **top)
        assert str(caught.value).startswith(where), caught.value


@pytest.mark.parametrize(
    ("top", "flags", "needle"),
    [({"workers": 0}, [], "workers: must be at least 1"), ({}, ["--workers", "-1"], "--workers: must be at least 1")],
    ids=["yaml-0", "flag-minus-1"],
)
async def test_invalid_workers_exit_2_with_the_key_path(
    tmp_path: Path, backend: Backend, top: dict[str, Any], flags: list[str], needle: str
) -> None:
    config = config_file(tmp_path, backend, free_port(), **top)
    result = await run_cli("run", "--config", str(config), *flags)
    code, stderr = result.returncode, result.stderr
    assert code == 2, stderr
    (line,) = [line for line in stderr.splitlines() if line.strip()]
    assert line.startswith(ERROR_PREFIX) and needle in line, line


async def test_port_in_use_with_workers_is_one_error_line(tmp_path: Path, backend: Backend) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = config_file(tmp_path, backend, port)
        result = await run_cli("run", "--config", str(config), "--workers", "2")
    code, stderr = result.returncode, result.stderr
    assert code == 1, stderr
    assert "Traceback" not in stderr
    matching = [line for line in stderr.splitlines() if "already in use" in line]
    assert len(matching) == 1 and matching[0].startswith(ERROR_PREFIX), stderr
    assert f"127.0.0.1:{port}" in matching[0]


def test_a_second_proxy_with_workers_cannot_join_the_port() -> None:
    """SO_REUSEPORT would let a second group share the port silently: the probe bind refuses it."""
    first = bind_listeners("127.0.0.1", 0, 2)
    try:
        port = first[0][0].getsockname()[1]
        assert all(group[0].getsockname()[1] == port for group in first)
        with pytest.raises(Exception, match="already in use"):
            bind_listeners("127.0.0.1", port, 2)
    finally:
        close_all(first)


def test_token_errors_cross_the_broker_unchanged() -> None:
    from proxy.tokens import TokenError

    original = TokenError(
        status=502,
        error="invalid_client",
        detail="the token server refused the request: invalid_client",
        token_url="https://t.example/oauth/token",
        description="Bad credentials",
        http_status=401,
    )
    copy = token_error_from_json(json.loads(json.dumps(token_error_to_json(original))), "-")
    assert copy.as_json() == original.as_json()
    assert (copy.status, copy.outcome) == (502, "invalid_client")
    garbage = token_error_from_json({"status": 200, "error": 5}, "https://t.example/oauth/token")
    assert garbage.status == 502 and garbage.error == "broker_error"


async def test_broker_source_reports_a_rejected_token_once() -> None:
    from aiohttp import web

    from proxy.redact import Secret
    from proxy.tokens import Token

    seen: list[tuple[str, Any]] = []

    async def token(request: web.Request) -> web.Response:
        assert request.match_info["route"] == "a/b"
        seen.append(("get", None))
        return web.json_response({"access_token": "t1", "expires_in": 100, "scope": "s"})

    async def rejected(request: web.Request) -> web.Response:
        assert request.match_info["route"] == "a/b"
        seen.append(("rejected", (await request.json())["fingerprint"]))
        return web.json_response({"access_token": "t2", "expires_in": 50})

    app = web.Application()
    app.router.add_get("/token/{route}", token)
    app.router.add_post("/token/{route}/rejected", rejected)
    runner = web.AppRunner(app)
    await runner.setup()
    path = Path(f"/tmp/odata-auth-proxy-test-{os.getpid()}.sock")
    site = web.UnixSite(runner, str(path))
    await site.start()
    try:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path))) as session:
            source = BrokerTokenSource(session, "a/b", "https://t.example/oauth/token", 5)
            first = await source.fetch()
            assert (first.access_token.reveal(), first.expires_in, first.scope) == ("t1", 100, "s")
            source.rejected(Token(value=Secret("t1"), obtained_at=0, lifetime=100))
            second = await source.fetch()
            assert (second.access_token.reveal(), second.expires_in) == ("t2", 50)
            await source.fetch()
            assert seen == [("get", None), ("rejected", Secret("t1").fingerprint), ("get", None)]
    finally:
        await runner.cleanup()
        path.unlink(missing_ok=True)
