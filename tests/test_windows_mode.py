"""The real proxy under Windows' constraints, on Linux: ``tests/windows_sim/sitecustomize.py`` on ``PYTHONPATH``
takes away ``os.memfd_create``, ``signal.SIGHUP``, ``socket.SO_REUSEPORT``, ``socket.AF_UNIX`` and uvloop, and
makes the loop's ``add_signal_handler`` raise NotImplementedError (as the Proactor loop does). Every command here
is ``python -m proxy ...`` in a subprocess with that environment, on loopback, bounded in time."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import Backend, child_env, free_port, mtls_token_server, run_cli, secret_route, write_yaml
from tests.test_cli import assert_one_error_line, proxy_process
from tests.test_mtls_proxy import Pki, certificate_key

SIM = Path(__file__).parent / "windows_sim"


def windows_env() -> dict[str, str]:
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SIM), env.get("PYTHONPATH", "")) if p)
    return env


@pytest.fixture
async def mtls(backend: Backend) -> AsyncIterator[tuple[Pki, str, list[str]]]:
    pki = Pki()
    seen: list[str] = []
    async with mtls_token_server(backend, pki.root, seen) as url:
        yield pki, url, seen


async def test_the_constraints_are_active_in_the_child() -> None:
    probe = (
        "import asyncio, os, signal, socket\n"
        "async def main():\n"
        "    try:\n"
        "        asyncio.get_running_loop().add_signal_handler(signal.SIGINT, print)\n"
        "    except NotImplementedError:\n"
        "        return 'NotImplementedError'\n"
        "    return 'installed'\n"
        "try:\n"
        "    import uvloop\n"
        "    uv = 'uvloop'\n"
        "except ImportError:\n"
        "    uv = 'no uvloop'\n"
        "a, b = socket.socketpair()\n"
        "print(hasattr(os, 'memfd_create'), hasattr(signal, 'SIGHUP'), hasattr(socket, 'SO_REUSEPORT'),"
        " hasattr(socket, 'AF_UNIX'), uv, asyncio.run(main()))\n"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        probe,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=windows_env(),
    )
    out, err = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0, err.decode()
    assert out.decode().split() == ["False"] * 4 + ["no", "uvloop", "NotImplementedError"]


async def test_serves_with_a_certificate_key_and_drains_on_sigint(
    tmp_path: Path, backend: Backend, mtls: tuple[Pki, str, list[str]]
) -> None:
    pki, token_url, seen = mtls
    key = tmp_path / "cert-key.json"
    key.write_text(json.dumps(certificate_key(backend, token_url, pki.chain_pem(), pki.key_pem())))
    port = free_port()
    config = write_yaml(
        tmp_path / "proxy.yaml", {"listen": f"127.0.0.1:{port}", "tls": {"ca_bundle": str(backend.tls.ca_path)}}
    )
    args = ("run", "--config", str(config), "--service-key", str(key), "--shutdown-timeout", "5")
    async with proxy_process(tmp_path, *args, port=port, env=windows_env()) as running:
        await running.wait_ready()
        assert "(event loop: asyncio; request path: " in running.stderr
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as client:
            async with client.get(running.base + "/api/v1/echo/win") as resp:
                assert resp.status == 200, await resp.text()
            assert seen == ["sb-cert-client"]  # the token came over mTLS: the key was loaded without memfd

            async def slow() -> tuple[int, str]:
                async with client.get(running.base + "/api/v1/slow?seconds=1") as resp:
                    return resp.status, await resp.text()

            request = asyncio.ensure_future(slow())
            end = time.monotonic() + 5
            while not any(r["raw_path"].startswith("/api/v1/slow") for r in backend.upstream.requests):
                assert time.monotonic() < end and not request.done()
                await asyncio.sleep(0.02)
            code, took = await running.stop(signal.SIGINT, deadline=10)
            assert await asyncio.wait_for(request, 5) == (200, "slow done")  # drained, not cut
        assert code == 0, running.stderr
        assert took < 5
    assert "SIGINT received: draining" in running.stderr
    assert running.stderr.rstrip().endswith("stopped"), running.stderr
    assert "Traceback" not in running.stderr


async def test_token_command_with_a_certificate_key(
    tmp_path: Path, backend: Backend, mtls: tuple[Pki, str, list[str]]
) -> None:
    pki, token_url, seen = mtls
    key = tmp_path / "cert-key.json"
    key.write_text(json.dumps(certificate_key(backend, token_url, pki.chain_pem(), pki.key_pem())))
    result = await run_cli(
        "token", "--service-key", str(key), "--ca-bundle", str(backend.tls.ca_path), env=windows_env()
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == backend.tokens.issued[-1]
    assert seen == ["sb-cert-client"]


async def test_workers_2_is_refused_with_one_line(tmp_path: Path, backend: Backend) -> None:
    port = free_port()
    data = {"listen": f"127.0.0.1:{port}", "routes": [secret_route(backend)]}
    config = write_yaml(tmp_path / "proxy.yaml", data)
    result = await run_cli("run", "--config", str(config), "--workers", "2", env=windows_env())
    assert result.returncode == 2
    assert_one_error_line(result, "--workers: 2", "Unix sockets", f"({sys.platform}) lacks", "use 1")

    # the same from the file and from the environment: only ``run`` refuses
    write_yaml(config, {**data, "workers": 2})
    result = await run_cli("run", "--config", str(config), env=windows_env())
    assert result.returncode == 2
    assert_one_error_line(result, "workers: 2 serving processes", "use 1")
    result = await run_cli("run", "--config", str(config), env={**windows_env(), "ODATA_AUTH_PROXY_WORKERS": "3"})
    assert result.returncode == 2
    assert_one_error_line(result, "ODATA_AUTH_PROXY_WORKERS: 3 serving processes", "use 1")


async def test_token_check_and_config_validate_work_with_workers_in_the_file(tmp_path: Path, backend: Backend) -> None:
    """``workers: 2`` in a file shared with a Linux host, or in the environment, does not stop the other commands."""
    data = {"tls": {"ca_bundle": str(backend.tls.ca_path)}, "workers": 2, "routes": [secret_route(backend)]}
    config = write_yaml(tmp_path / "proxy.yaml", data)
    env = {**windows_env(), "ODATA_AUTH_PROXY_WORKERS": "2"}

    result = await run_cli("token", "--config", str(config), env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == backend.tokens.issued[-1]

    result = await run_cli("check", "--config", str(config), "--no-color", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[ok]   token" in result.stdout and "[ok]   upstream" in result.stdout, result.stdout

    result = await run_cli("config", "validate", str(config), env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{config}: OK, 1 route(s)"), result.stdout
    assert "warning: workers: 2 serving processes need Unix sockets" in result.stdout
    assert "'run' refuses this here" in result.stdout
    assert "Traceback" not in result.stderr


async def test_demo_serves_and_stops_on_sigint(tmp_path: Path) -> None:
    port = free_port()
    async with proxy_process(
        tmp_path, "demo", "--listen", f"127.0.0.1:{port}", port=port, env=windows_env()
    ) as running:
        await running.wait_ready()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as client:
            url = running.base + "/api/v1/IntegrationPackages?$format=json&$top=1"
            async with client.get(url) as resp:
                assert resp.status == 200, await resp.text()
                assert len((await resp.json())["d"]["results"]) == 1
        code, took = await running.stop(signal.SIGINT, deadline=10)
    assert code == 0, running.stderr
    assert took < 5
    assert "(event loop: asyncio; request path: " in running.stderr
    assert "SIGINT received: draining" in running.stderr
    assert running.stderr.rstrip().endswith("stopped"), running.stderr
    assert "Traceback" not in running.stderr
