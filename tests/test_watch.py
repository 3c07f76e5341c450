"""Secrets that rotate without a signal: the proxy reloads when a file its configuration came from changes.

The Kubernetes way is reproduced for real: the service key lives in a timestamped directory behind a
``..data`` symlink, and an update swaps the link atomically (what the kubelet does for a mounted Secret).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.app import Prepared, prepare
from proxy.config import Overrides, load_config
from proxy.server import ProxyServer
from proxy.watch import watched_files
from tests.conftest import Backend, service_key, write_yaml

NEW_SECRET = "rotated-secret-0123456789"


class SecretMount:
    """A directory laid out like a mounted Kubernetes Secret: ``key.json -> ..data/key.json``, ``..data -> ..v1``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.version = 0

    @property
    def key(self) -> Path:
        return self.root / "key.json"

    def publish(self, content: dict[str, Any]) -> None:
        self.version += 1
        data = self.root / f"..v{self.version}"
        data.mkdir(parents=True)
        (data / "key.json").write_text(json.dumps(content))
        link = self.root / "..data_tmp"
        link.symlink_to(data.name)
        os.replace(link, self.root / "..data")  # the atomic swap
        if not self.key.is_symlink():
            self.key.symlink_to("..data/key.json")


def proxy_config(tmp_path: Path, backend: Backend, mount: SecretMount, **top: Any) -> Path:
    data: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "tls": {"ca_bundle": str(backend.tls.ca_path)},
        "routes": [{"name": "api", "prefix": "/", "credentials": {"service_key": str(mount.key)}}],
    }
    data.update(top)
    return write_yaml(tmp_path / "proxy.yaml", data)


def reloader(path: Path) -> Callable[[], Prepared]:
    return lambda: prepare(load_config(Overrides(config=str(path)), env={}))


@asynccontextmanager
async def serving(path: Path) -> AsyncIterator[ProxyServer]:
    server = ProxyServer(reloader(path)(), reload=reloader(path))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def status(client: aiohttp.ClientSession, server: ProxyServer) -> int:
    async with client.get(f"http://127.0.0.1:{server.port}/api/v1/echo/watch") as resp:
        await resp.read()
        return resp.status


async def until(predicate: Callable[[], bool], seconds: float) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < seconds, "not within the time allowed"
        await asyncio.sleep(0.1)
    return time.monotonic() - started


def test_every_file_the_configuration_came_from_is_watched(tmp_path: Path, backend: Backend) -> None:
    mount = SecretMount(tmp_path / "mount")
    mount.publish(service_key(backend, clientsecret=backend.tokens.client_secret))
    secret_file = tmp_path / "api-key.txt"
    secret_file.write_text("inbound-key-0123456789\n")
    path = proxy_config(tmp_path, backend, mount, inbound_api_key_file=str(secret_file))
    config = load_config(Overrides(config=str(path)), env={})
    assert watched_files(config) == [str(path), str(backend.tls.ca_path), str(secret_file), str(mount.key)]
    assert config.watch is True
    assert load_config(Overrides(config=str(path)), env={"ODATA_AUTH_PROXY_WATCH": "false"}).watch is False


@pytest.mark.timeout(60)
async def test_a_swapped_secret_mount_is_in_use_within_10_s(
    tmp_path: Path, backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="odata_auth_proxy")
    mount = SecretMount(tmp_path / "mount")
    mount.publish(service_key(backend, clientsecret=backend.tokens.client_secret))
    path = proxy_config(tmp_path, backend, mount)
    async with serving(path) as server, aiohttp.ClientSession() as client:
        assert await status(client, server) == 200
        first = server.state.runtime.managers["api"].current if server.state else None
        assert first is not None

        # a broken rotation (wrong secret): refused, the running token keeps serving, tried once only
        requests_before = backend.tokens.requests
        mount.publish(service_key(backend, clientsecret="wrong-secret-9876543210"))
        await until(lambda: "reload refused" in caplog.text, 10)
        assert await status(client, server) == 200
        await asyncio.sleep(4.5)  # two more checks of the files: the refused content is not retried
        assert backend.tokens.requests == requests_before + 1

        # the corrected key: the token server now expects the new secret, and the proxy uses it
        backend.tokens.client_secret = NEW_SECRET
        mount.publish(service_key(backend, clientsecret=NEW_SECRET))
        took = await until(lambda: "reloaded configuration" in caplog.text, 10)
        assert took < 10
        assert await status(client, server) == 200
        current = server.state.runtime.managers["api"].current if server.state else None
        assert current is not None and current.value != first.value
        assert backend.tokens.forms[-1]["client_secret"] == NEW_SECRET
    assert "wrong-secret-9876543210" not in caplog.text and NEW_SECRET not in caplog.text


async def test_watch_false_leaves_a_changed_file_alone(
    tmp_path: Path, backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="odata_auth_proxy")
    mount = SecretMount(tmp_path / "mount")
    mount.publish(service_key(backend, clientsecret=backend.tokens.client_secret))
    path = proxy_config(tmp_path, backend, mount, watch=False)
    async with serving(path) as server, aiohttp.ClientSession() as client:
        mount.publish(service_key(backend, clientsecret="wrong-secret-9876543210"))
        await asyncio.sleep(3.0)
        assert await status(client, server) == 200
    assert "watch:" not in caplog.text and "reload" not in caplog.text
