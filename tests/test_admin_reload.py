"""``POST /-/reload`` and ``odata-auth-proxy reload``: the reload without SIGHUP (Windows has none).

Every test runs the real proxy as a subprocess (``python -m proxy run``) on loopback with ``watch: false``, so
that only the admin call can have made a change take effect; the config file is rewritten on disk in between.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import Backend, child_env, free_port, run_cli, secret_route, write_yaml
from tests.test_cli import ProxyProcess, proxy_process
from tests.test_windows_mode import windows_env

API_KEY = "k3y-for-the-reload-test"
TIMEOUT = aiohttp.ClientTimeout(total=20)


def proxy_config(path: Path, backend: Backend, port: int, prefix: str, **top: Any) -> Path:
    """One route ``api`` under ``prefix`` to the test upstream; no file watch (only the admin call reloads)."""
    data: dict[str, Any] = {
        "listen": f"127.0.0.1:{port}",
        "watch": False,
        "tls": {"ca_bundle": str(backend.tls.ca_path)},
        "routes": [secret_route(backend, prefix=prefix)],
    }
    data.update(top)
    return write_yaml(path, data)


async def status_of(client: aiohttp.ClientSession, url: str, **headers: str) -> int:
    async with client.get(url, headers=headers) as resp:
        await resp.read()
        return resp.status


async def post_reload(client: aiohttp.ClientSession, url: str, **headers: str) -> tuple[int, dict[str, Any]]:
    async with client.post(url, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None)


async def wait_admin_healthy(running: ProxyProcess, admin: str, deadline: float = 15) -> None:
    end = time.monotonic() + deadline
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as probe:
        while True:
            assert running.process.returncode is None, running.stderr
            try:
                async with probe.get(admin + "/-/healthz") as resp:
                    if resp.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            assert time.monotonic() < end, "no admin /-/healthz: " + running.stderr
            await asyncio.sleep(0.05)


async def test_post_reload_applies_the_changed_file_and_says_why_when_it_cannot(
    tmp_path: Path, backend: Backend
) -> None:
    port = free_port()
    config = proxy_config(tmp_path / "proxy.yaml", backend, port, "/a/")
    async with proxy_process(tmp_path, "run", "--config", str(config), port=port) as running:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as client:
            assert await status_of(client, running.base + "/a/api/v1/echo/x") == 200
            assert await status_of(client, running.base + "/b/api/v1/echo/x") == 404  # no_route

            proxy_config(config, backend, port, "/b/")
            await asyncio.sleep(0.3)
            assert await status_of(client, running.base + "/b/api/v1/echo/x") == 404  # not before the call

            status, body = await post_reload(client, running.base + "/-/reload")
            assert status == 200, body
            assert body["status"] == "reloaded"
            assert body["detail"].startswith("reloaded configuration: 1 route(s)"), body
            assert await status_of(client, running.base + "/b/api/v1/echo/x") == 200
            assert await status_of(client, running.base + "/a/api/v1/echo/x") == 404

            # new credentials the token server refuses: 409 in the reload's own words, the old ones keep serving
            write_yaml(
                config,
                {
                    "listen": f"127.0.0.1:{port}",
                    "watch": False,
                    "tls": {"ca_bundle": str(backend.tls.ca_path)},
                    "routes": [
                        secret_route(
                            backend,
                            prefix="/c/",
                            credentials={**secret_route(backend)["credentials"], "client_secret": "wrong-secret"},
                        )
                    ],
                },
            )
            status, body = await post_reload(client, running.base + "/-/reload")
            assert status == 409, body
            assert body["error"] == "reload_refused"
            assert body["detail"].startswith("reload refused: route api: the token server answered invalid_client")
            assert "wrong-secret" not in str(body)
            assert await status_of(client, running.base + "/b/api/v1/echo/x") == 200

            # a file that is not valid: 409 naming the problem
            config.write_text("routes: [\n")
            status, body = await post_reload(client, running.base + "/-/reload")
            assert status == 409, body
            assert "reload failed, still serving with the previous configuration: config" in body["detail"]
            assert "not valid YAML" in body["detail"]

            # only POST reloads
            async with client.get(running.base + "/-/reload") as resp:
                assert resp.status == 405
                assert resp.headers["Allow"] == "POST"
    assert "Traceback" not in running.stderr


async def test_reload_needs_the_api_key_and_refuses_cross_site_requests(tmp_path: Path, backend: Backend) -> None:
    port = free_port()
    config = proxy_config(tmp_path / "proxy.yaml", backend, port, "/a/", inbound_api_key=API_KEY)
    key = {"X-Proxy-Api-Key": API_KEY}
    async with proxy_process(tmp_path, "run", "--config", str(config), port=port) as running:
        proxy_config(config, backend, port, "/b/", inbound_api_key=API_KEY)
        url = running.base + "/-/reload"
        async with aiohttp.ClientSession(timeout=TIMEOUT) as client:
            status, body = await post_reload(client, url)
            assert (status, body["error"]) == (401, "proxy_auth_required")
            status, body = await post_reload(client, url, **{"X-Proxy-Api-Key": "not-the-key"})
            assert (status, body["error"]) == (401, "proxy_auth_required")
            # a web page in the browser, even one that somehow has the key
            status, body = await post_reload(client, url, Origin="https://evil.example", **key)
            assert (status, body["error"]) == (403, "origin_not_allowed")
            status, body = await post_reload(client, url, **{"Sec-Fetch-Site": "cross-site"}, **key)
            assert (status, body["error"]) == (403, "cross_site_refused")
            status, body = await post_reload(client, url, Host="rebound.example", **key)
            assert (status, body["error"]) == (421, "host_not_allowed")
            assert await status_of(client, running.base + "/b/api/v1/echo/x", **key) == 404  # nothing reloaded

            status, body = await post_reload(client, url, **{"Proxy-Authorization": f"Bearer {API_KEY}"})
            assert status == 200, body
            assert await status_of(client, running.base + "/b/api/v1/echo/x", **key) == 200
    assert API_KEY not in running.stderr


async def test_reload_on_the_admin_port_only(tmp_path: Path, backend: Backend) -> None:
    port, admin_port = free_port(), free_port()
    admin = f"http://127.0.0.1:{admin_port}"
    config = proxy_config(
        tmp_path / "proxy.yaml", backend, port, "/a/", admin_listen=f"127.0.0.1:{admin_port}", inbound_api_key=API_KEY
    )
    key = {"X-Proxy-Api-Key": API_KEY}
    async with proxy_process(tmp_path, "run", "--config", str(config), port=port, healthy=False) as running:
        await wait_admin_healthy(running, admin)
        proxy_config(config, backend, port, "/b/", admin_listen=f"127.0.0.1:{admin_port}", inbound_api_key=API_KEY)
        async with aiohttp.ClientSession(timeout=TIMEOUT) as client:
            status, body = await post_reload(client, running.base + "/-/reload", **key)
            assert (status, body["error"]) == (404, "not_found")  # the main port has no admin endpoints
            # the admin port is guarded like the main one
            status, body = await post_reload(client, admin + "/-/reload")
            assert (status, body["error"]) == (401, "proxy_auth_required")
            status, body = await post_reload(client, admin + "/-/reload", Origin="http://127.0.0.1:1", **key)
            assert (status, body["error"]) == (403, "origin_not_allowed")
            status, body = await post_reload(client, admin + "/-/reload", Host="rebound.example", **key)
            assert (status, body["error"]) == (421, "host_not_allowed")

            status, body = await post_reload(client, admin + "/-/reload", **key)
            assert (status, body["status"]) == (200, "reloaded"), body
            assert await status_of(client, running.base + "/b/api/v1/echo/x", **key) == 200


@pytest.mark.parametrize("windows", [False, True], ids=["posix", "windows-sim"])
async def test_the_reload_command_against_a_running_proxy(tmp_path: Path, backend: Backend, windows: bool) -> None:
    env = windows_env() if windows else child_env()
    port = free_port()
    config = proxy_config(tmp_path / "proxy.yaml", backend, port, "/a/", inbound_api_key=API_KEY)
    async with proxy_process(tmp_path, "run", "--config", str(config), port=port, env=env) as running:
        key = {"X-Proxy-Api-Key": API_KEY}
        proxy_config(config, backend, port, "/b/", inbound_api_key=API_KEY)
        result = await run_cli("reload", "--config", str(config), env=env)
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        assert result.stdout.startswith("reloaded configuration: 1 route(s)"), result.stdout
        assert len(result.stdout.splitlines()) == 1
        async with aiohttp.ClientSession(timeout=TIMEOUT) as client:
            assert await status_of(client, running.base + "/b/api/v1/echo/x", **key) == 200

        # refused by the proxy: one error line with its reason, exit 1
        routes = [secret_route(backend, prefix="/c/")]
        routes[0]["credentials"]["client_secret"] = "wrong-secret"
        write_yaml(config, {**yaml_top(backend, port), "inbound_api_key": API_KEY, "routes": routes})
        result = await run_cli("reload", "--config", str(config), env=env)
        assert result.returncode == 1, result.stderr
        (line,) = result.stderr.splitlines()
        assert line.startswith("odata-auth-proxy: error: not reloaded: reload refused: route api:"), line

        # no API key given: the proxy's 401, said so with the hint
        result = await run_cli("reload", "--admin", running.base, env=env)
        assert result.returncode == 1
        (line,) = result.stderr.splitlines()
        assert "answered 401 proxy_auth_required" in line and "inbound_api_key" in line, line
        if windows:
            assert "(event loop: asyncio; " in running.stderr  # really ran under the simulation
    assert API_KEY not in running.stderr

    # nothing listens any more: one line, exit 1
    result = await run_cli("reload", "--admin", f"127.0.0.1:{port}", env=env)
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"odata-auth-proxy: error: cannot reach the proxy at http://127.0.0.1:{port}/-/reload")


def yaml_top(backend: Backend, port: int) -> dict[str, Any]:
    return {"listen": f"127.0.0.1:{port}", "watch": False, "tls": {"ca_bundle": str(backend.tls.ca_path)}}


async def test_reload_command_goes_to_the_admin_port_from_the_config(tmp_path: Path, backend: Backend) -> None:
    port, admin_port = free_port(), free_port()
    admin = f"http://127.0.0.1:{admin_port}"
    config = proxy_config(tmp_path / "proxy.yaml", backend, port, "/a/", admin_listen=f"127.0.0.1:{admin_port}")
    async with proxy_process(tmp_path, "run", "--config", str(config), port=port, healthy=False) as running:
        await wait_admin_healthy(running, admin)
        proxy_config(config, backend, port, "/b/", admin_listen=f"127.0.0.1:{admin_port}")
        result = await run_cli("reload", "--config", str(config))
        assert result.returncode == 0, result.stderr
        async with aiohttp.ClientSession(timeout=TIMEOUT) as client:
            assert await status_of(client, running.base + "/b/api/v1/echo/x") == 200
        # the main port does not serve it: the command says where to go instead
        result = await run_cli("reload", "--admin", running.base)
        assert result.returncode == 1
        assert "--admin URL" in result.stderr and "admin port" in result.stderr, result.stderr


async def test_reload_with_workers_goes_through_the_supervisor(tmp_path: Path, backend: Backend) -> None:
    port = free_port()
    config = proxy_config(tmp_path / "proxy.yaml", backend, port, "/a/", workers=2)
    async with proxy_process(tmp_path, "run", "--config", str(config), port=port) as running:
        proxy_config(config, backend, port, "/b/", workers=2)
        async with aiohttp.ClientSession(timeout=TIMEOUT) as client:
            status, body = await post_reload(client, running.base + "/-/reload")
            assert status == 200, body
            assert body["detail"].startswith("reloaded credentials: 1 route(s); 2 worker(s) reload theirs"), body
            # each worker reloads against the broker right after the supervisor signalled it
            end = time.monotonic() + 10
            seen = 0
            while seen < 20:  # 20 answers in a row from the new configuration, from whichever worker
                fresh = aiohttp.ClientSession(timeout=TIMEOUT)  # a new connection each time: both workers answer
                async with fresh:
                    ok = await status_of(fresh, running.base + "/b/api/v1/echo/x") == 200
                seen = seen + 1 if ok else 0
                assert time.monotonic() < end, running.stderr
    assert "Traceback" not in running.stderr


async def test_the_demo_says_it_has_nothing_to_reload(tmp_path: Path) -> None:
    port = free_port()
    async with proxy_process(tmp_path, "demo", "--listen", f"127.0.0.1:{port}", port=port) as running:
        result = await run_cli("reload", "--admin", running.base)
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("odata-auth-proxy: error: not reloaded: reload: this proxy has no configuration to re-read")
    assert line.endswith("(the demo's is built in)")
