"""OData conveniences through the real proxy: transparent CSRF tokens and links that stay on the proxy."""

from __future__ import annotations

import gzip
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.config import Config, Overrides, load_config
from proxy.demo import DemoBackend, csrf_fetch_count, start_demo_backend
from tests.conftest import Backend, make_config, running_proxy, secret_route, serve, write_yaml


def demo_config(tmp_path: Path, demo: DemoBackend, **route: Any) -> Config:
    data = {
        "listen": "127.0.0.1:0",
        "routes": [
            {
                "name": "cpi",
                "prefix": "/",
                "upstream": demo.upstream_url,
                "credentials": {
                    "token_url": demo.token_url,
                    "client_id": demo.client_id,
                    "client_secret": demo.client_secret,
                },
                **route,
            }
        ],
    }
    return load_config(Overrides(config=str(write_yaml(tmp_path / "demo.yaml", data))), env={})


@pytest.fixture
async def demo() -> AsyncIterator[DemoBackend]:
    async with start_demo_backend(page_size=5) as backend:
        yield backend


async def test_writes_without_csrf_token_succeed_with_one_fetch(tmp_path: Path, demo: DemoBackend) -> None:
    assert demo.odata_app is not None
    async with running_proxy(demo_config(tmp_path, demo)) as proxy, aiohttp.ClientSession() as client:
        packages = proxy.url + "/api/v1/IntegrationPackages"
        for i in range(3):
            body = {"Id": f"NewPkg{i}", "Name": f"New {i}"}
            async with client.post(packages, json=body) as resp:
                assert resp.status == 201, await resp.text()
        async with client.patch(packages + "('NewPkg0')", json={"Name": "Renamed"}) as resp:
            assert resp.status == 204
        async with client.delete(packages + "('NewPkg1')") as resp:
            assert resp.status == 204
        async with client.get(packages + "('NewPkg0')?$format=json") as resp:
            assert (await resp.json())["d"]["Name"] == "Renamed"
    assert csrf_fetch_count(demo.odata_app) == 1  # fetched once, then attached proactively


async def test_client_managing_csrf_itself_is_left_alone(tmp_path: Path, demo: DemoBackend) -> None:
    assert demo.odata_app is not None
    async with running_proxy(demo_config(tmp_path, demo)) as proxy, aiohttp.ClientSession() as client:
        headers = {"X-CSRF-Token": "my-own-stale-token"}
        async with client.post(proxy.url + "/api/v1/IntegrationPackages", json={"Id": "X"}, headers=headers) as resp:
            assert resp.status == 403  # the upstream's answer, untouched: no fetch, no replay
            assert resp.headers["X-CSRF-Token"].lower() == "required"
    assert csrf_fetch_count(demo.odata_app) == 0


async def test_csrf_off_passes_403_through(tmp_path: Path, demo: DemoBackend) -> None:
    async with running_proxy(demo_config(tmp_path, demo, csrf="off")) as proxy, aiohttp.ClientSession() as client:
        async with client.post(proxy.url + "/api/v1/IntegrationPackages", json={"Id": "X"}) as resp:
            assert resp.status == 403


async def test_next_links_are_rewritten_and_followed_through_the_proxy(tmp_path: Path, demo: DemoBackend) -> None:
    async with running_proxy(demo_config(tmp_path, demo)) as proxy, aiohttp.ClientSession() as client:
        url: str | None = proxy.url + "/api/v1/IntegrationPackages?$format=json"
        seen: list[str] = []
        pages = 0
        while url:
            assert url.startswith(proxy.url), url  # every link points at the proxy
            async with client.get(url) as resp:
                assert resp.status == 200
                assert "Content-Length" not in resp.headers or resp.content_length == len(await resp.read())
                data = (await resp.json())["d"]
            pages += 1
            for item in data["results"]:
                assert item["__metadata"]["uri"].startswith(proxy.url + "/api/v1/IntegrationPackages('")
                seen.append(item["Id"])
            url = data.get("__next")
        assert pages == 3 and len(seen) == len(set(seen)) == 12
        async with client.get(proxy.url + "/api/v1/IntegrationPackages") as resp:  # Atom XML
            text = await resp.text()
        assert demo.upstream_url not in text and proxy.url in text


async def test_rewrite_links_off_keeps_upstream_urls(tmp_path: Path, demo: DemoBackend) -> None:
    config = demo_config(tmp_path, demo, rewrite_links=False)
    async with running_proxy(config) as proxy, aiohttp.ClientSession() as client:
        async with client.get(proxy.url + "/api/v1/IntegrationPackages?$format=json") as resp:
            data = await resp.json()
    assert data["d"]["__next"].startswith(demo.upstream_url)


class SplitUpstream:
    """Serves a JSON body whose upstream URLs are cut across many small chunks, and echoes request bodies."""

    def __init__(self) -> None:
        self.url = ""
        self.received: list[bytes] = []

    async def split(self, request: web.Request) -> web.StreamResponse:
        # larger than the proxy's one-write limit (64 KiB), so the body is streamed and rewritten chunk by chunk
        pad = "p" * int(request.query.get("pad", "100000"))
        body = json.dumps(
            {"d": {"__next": f"{self.url}/api/v1/X?$skiptoken=5", "uri": f"{self.url}/api/v1/Y", "pad": pad}}
        )
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = len(body)
        await resp.prepare(request)
        data = body.encode()
        head = 203  # both URLs lie in the first 203 bytes
        for i in range(0, head, 7):  # 7-byte chunks there: every URL is split somewhere
            await resp.write(data[i : min(i + 7, head)])
        await resp.write(data[head:])
        await resp.write_eof()
        return resp

    async def gz(self, request: web.Request) -> web.Response:
        body = json.dumps({"uri": f"{self.url}/api/v1/Z", "pad": "p" * 5000}).encode()
        return web.Response(
            body=gzip.compress(body), headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}
        )

    async def echo(self, request: web.Request) -> web.Response:
        self.received.append(await request.read())
        return web.Response(status=204)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/v1/split", self.split)
        app.router.add_get("/api/v1/gz", self.gz)
        app.router.add_route("*", "/api/v1/echo", self.echo)
        return app


@pytest.fixture
async def split_upstream(backend: Backend) -> AsyncIterator[SplitUpstream]:
    upstream = SplitUpstream()
    runner, upstream.url = await serve(upstream.app(), backend.tls.server_ctx)
    try:
        yield upstream
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("pad", [100000, 10])  # streamed, and read whole (small)
async def test_url_split_across_chunks_is_rewritten(
    tmp_path: Path, backend: Backend, split_upstream: SplitUpstream, pad: int
) -> None:
    config = make_config(tmp_path, backend, [secret_route(backend, upstream=split_upstream.url)])
    async with running_proxy(config) as proxy, aiohttp.ClientSession() as client:
        async with client.get(proxy.url + f"/api/v1/split?pad={pad}") as resp:
            assert resp.status == 200
            raw = await resp.read()
            if pad > 65536:
                assert "Content-Length" not in resp.headers  # streamed: the new length is not known up front
            else:
                assert resp.content_length == len(raw)  # read whole: the new, correct length
    expected = {"__next": proxy.url + "/api/v1/X?$skiptoken=5", "uri": proxy.url + "/api/v1/Y", "pad": "p" * pad}
    assert json.loads(raw) == {"d": expected}


async def test_gzip_json_is_rewritten_and_stays_gzip(
    tmp_path: Path, backend: Backend, split_upstream: SplitUpstream
) -> None:
    config = make_config(tmp_path, backend, [secret_route(backend, upstream=split_upstream.url)])
    async with running_proxy(config) as proxy, aiohttp.ClientSession(auto_decompress=False) as client:
        async with client.get(proxy.url + "/api/v1/gz", headers={"Accept-Encoding": "gzip"}) as resp:
            raw = await resp.read()
            assert resp.headers["Content-Encoding"] == "gzip"
            assert resp.content_length in (None, len(raw))  # never the upstream's stale length
    assert json.loads(gzip.decompress(raw)) == {"uri": proxy.url + "/api/v1/Z", "pad": "p" * 5000}


async def test_gzip_passes_untouched_when_rewriting_is_off(
    tmp_path: Path, backend: Backend, split_upstream: SplitUpstream
) -> None:
    route = secret_route(backend, upstream=split_upstream.url, rewrite_links=False)
    config = make_config(tmp_path, backend, [route])
    async with running_proxy(config) as proxy, aiohttp.ClientSession(auto_decompress=False) as client:
        async with client.get(proxy.url + "/api/v1/gz") as resp:
            raw = await resp.read()
            assert resp.headers["Content-Encoding"] == "gzip"
    assert json.loads(gzip.decompress(raw))["uri"] == split_upstream.url + "/api/v1/Z"


async def test_request_body_links_are_rewritten_back(
    tmp_path: Path, backend: Backend, split_upstream: SplitUpstream
) -> None:
    config = make_config(tmp_path, backend, [secret_route(backend, upstream=split_upstream.url)])
    async with running_proxy(config) as proxy, aiohttp.ClientSession() as client:
        body = {"__metadata": {"uri": proxy.url + "/api/v1/IntegrationPackages('A')"}, "Name": "x"}
        async with client.patch(proxy.url + "/api/v1/echo", json=body) as resp:
            assert resp.status == 204
    sent = json.loads(split_upstream.received[-1])
    assert sent["__metadata"]["uri"] == split_upstream.url + "/api/v1/IntegrationPackages('A')"


async def test_accept_encoding_is_narrowed_to_what_the_rewriter_can_open(tmp_path: Path, backend: Backend) -> None:
    async with running_proxy(make_config(tmp_path, backend)) as proxy, aiohttp.ClientSession() as client:
        headers = {"Accept-Encoding": "gzip, deflate, br, zstd;q=0.5"}  # what Postman sends, and more
        async with client.get(proxy.url + "/api/v1/echo", headers=headers) as resp:
            seen = dict((await resp.json())["headers"])
        assert seen["Accept-Encoding"] == "gzip, deflate"
        async with client.get(proxy.url + "/api/v1/echo", headers={"Accept-Encoding": "br"}) as resp:
            assert "Accept-Encoding" not in dict((await resp.json())["headers"])
    route = secret_route(backend, rewrite_links=False)
    async with running_proxy(make_config(tmp_path, backend, [route])) as proxy, aiohttp.ClientSession() as client:
        async with client.get(proxy.url + "/api/v1/echo", headers={"Accept-Encoding": "br"}) as resp:
            assert dict((await resp.json())["headers"])["Accept-Encoding"] == "br"  # untouched without rewriting
