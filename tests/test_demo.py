"""The built-in demo backend: token server and OData upstream, over real loopback HTTP."""

from __future__ import annotations

import asyncio
import base64
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote_plus

import aiohttp
import pytest
from yarl import URL

from proxy.demo import (
    DEMO_CLIENT_ID,
    DEMO_CLIENT_SECRET,
    SESSION_COOKIE,
    DemoBackend,
    csrf_fetch_count,
    start_demo_backend,
)

PACKAGES = "/api/v1/IntegrationPackages"


@pytest.fixture
async def backend() -> AsyncIterator[DemoBackend]:
    async with start_demo_backend() as b:
        yield b


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # Cookies are handled by hand so that each test decides which session it presents.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        yield session


async def get_token(http: aiohttp.ClientSession, backend: DemoBackend) -> str:
    form = {"grant_type": "client_credentials", "client_id": backend.client_id, "client_secret": backend.client_secret}
    async with http.post(backend.token_url, data=form) as resp:
        assert resp.status == 200
        token: str = (await resp.json())["access_token"]
        return token


@pytest.fixture
async def auth(http: aiohttp.ClientSession, backend: DemoBackend) -> dict[str, str]:
    return {"Authorization": f"Bearer {await get_token(http, backend)}"}


async def fetch_csrf(http: aiohttp.ClientSession, backend: DemoBackend, auth: dict[str, str]) -> tuple[str, str]:
    """(CSRF token, Cookie header) from a fetch on the service root."""
    async with http.get(f"{backend.upstream_url}/api/v1/", headers={**auth, "X-CSRF-Token": "Fetch"}) as resp:
        assert resp.status == 200
        return resp.headers["X-CSRF-Token"], f"{SESSION_COOKIE}={resp.cookies[SESSION_COOKIE].value}"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# --------------------------------------------------------------------------- token server


@pytest.mark.parametrize("style", ["form", "basic-raw", "basic-urlencoded"])
async def test_token_client_auth_styles(http: aiohttp.ClientSession, backend: DemoBackend, style: str) -> None:
    form = {"grant_type": "client_credentials"}
    headers = {}
    if style == "form":
        form |= {"client_id": DEMO_CLIENT_ID, "client_secret": DEMO_CLIENT_SECRET}
    elif style == "basic-raw":
        headers["Authorization"] = basic(DEMO_CLIENT_ID, DEMO_CLIENT_SECRET)
    else:
        headers["Authorization"] = basic(quote_plus(DEMO_CLIENT_ID), quote_plus(DEMO_CLIENT_SECRET))
    async with http.post(backend.token_url, data=form, headers=headers) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 60
    assert body["scope"] == "WorkspacePackagesRead WorkspacePackagesEdit"
    assert body["jti"]
    assert backend.store.is_valid(body["access_token"])
    assert backend.store.issued == 1


async def test_grant_type_in_query(http: aiohttp.ClientSession, backend: DemoBackend) -> None:
    url = f"{backend.token_url}?grant_type=client_credentials"
    async with http.post(url, headers={"Authorization": basic(DEMO_CLIENT_ID, DEMO_CLIENT_SECRET)}) as resp:
        assert resp.status == 200


@pytest.mark.parametrize("use_basic", [False, True])
async def test_wrong_secret_is_invalid_client(
    http: aiohttp.ClientSession, backend: DemoBackend, use_basic: bool
) -> None:
    form = {"grant_type": "client_credentials"}
    headers = {}
    if use_basic:
        headers["Authorization"] = basic(DEMO_CLIENT_ID, "nope")
    else:
        form |= {"client_id": DEMO_CLIENT_ID, "client_secret": "nope"}
    async with http.post(backend.token_url, data=form, headers=headers) as resp:
        assert resp.status == 401
        assert await resp.json() == {"error": "invalid_client", "error_description": "Bad credentials"}
    assert backend.store.issued == 0


async def test_wrong_grant_type(http: aiohttp.ClientSession, backend: DemoBackend) -> None:
    form = {"grant_type": "password", "client_id": DEMO_CLIENT_ID, "client_secret": DEMO_CLIENT_SECRET}
    async with http.post(backend.token_url, data=form) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"] == "unsupported_grant_type"


# --------------------------------------------------------------------------- OData reads


@pytest.mark.parametrize("authorization", [None, "Bearer not-a-token", "Basic Zm9vOmJhcg=="])
async def test_odata_requires_bearer(
    http: aiohttp.ClientSession, backend: DemoBackend, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    async with http.get(f"{backend.upstream_url}{PACKAGES}", headers=headers) as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert await resp.text()


async def test_paging_follows_next_links(
    http: aiohttp.ClientSession, backend: DemoBackend, auth: dict[str, str]
) -> None:
    url: str | None = f"{backend.upstream_url}{PACKAGES}?$format=json&$inlinecount=allpages"
    ids: list[str] = []
    pages = 0
    while url:
        assert url.startswith(backend.upstream_url)  # absolute, upstream's own base
        async with http.get(url, headers=auth) as resp:
            assert resp.status == 200
            d = (await resp.json())["d"]
        assert d["__count"] == "12"
        for row in d["results"]:
            assert row["__metadata"]["uri"] == f"{backend.upstream_url}{PACKAGES}('{row['Id']}')"
            assert row["__metadata"]["type"] == "com.sap.hci.api.IntegrationPackage"
        ids += [row["Id"] for row in d["results"]]
        url = d.get("__next")
        pages += 1
    assert pages == 3
    assert len(ids) == 12 == len(set(ids))


async def odata_json(http: aiohttp.ClientSession, url: str, auth: dict[str, str]) -> Any:
    async with http.get(url, headers={**auth, "Accept": "application/json"}) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def test_filter_and_top(http: aiohttp.ClientSession, backend: DemoBackend, auth: dict[str, str]) -> None:
    base = f"{backend.upstream_url}{PACKAGES}"
    d = (await odata_json(http, f"{base}?$filter=Name eq 'Order to Cash'", auth))["d"]
    assert [r["Id"] for r in d["results"]] == ["OrderToCash"]
    d = (await odata_json(http, f"{base}?$filter=Vendor eq 'SAP'", auth))["d"]
    assert len(d["results"]) == 4 and {r["Vendor"] for r in d["results"]} == {"SAP"}
    d = (await odata_json(http, f"{base}?$filter=substringof('Sync',Name)", auth))["d"]
    assert [r["Name"] for r in d["results"]] == ["Customer Master Sync"]
    d = (await odata_json(http, f"{base}?$top=3&$select=Id,Name", auth))["d"]
    assert len(d["results"]) == 3 and "__next" not in d
    assert set(d["results"][0]) == {"__metadata", "Id", "Name"}
    # $top larger than a page: the server pages, $top still caps the total
    first = (await odata_json(http, f"{base}?$top=7&$skip=2", auth))["d"]
    second = (await odata_json(http, first["__next"], auth))["d"]
    assert len(first["results"]) == 5 and len(second["results"]) == 2 and "__next" not in second
    async with http.get(f"{base}/$count", headers=auth) as resp:
        assert resp.status == 200 and await resp.text() == "12"


async def test_bad_filter_and_missing_entity(
    http: aiohttp.ClientSession, backend: DemoBackend, auth: dict[str, str]
) -> None:
    async with http.get(f"{backend.upstream_url}{PACKAGES}?$filter=Version gt '1'", headers=auth) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["message"]["lang"] == "en"
    async with http.get(f"{backend.upstream_url}{PACKAGES}('Nope')", headers=auth) as resp:
        assert resp.status == 404
        assert "Nope" in (await resp.json())["error"]["message"]["value"]


async def test_metadata_and_atom(http: aiohttp.ClientSession, backend: DemoBackend, auth: dict[str, str]) -> None:
    async with http.get(f"{backend.upstream_url}/api/v1/$metadata", headers=auth) as resp:
        assert resp.status == 200 and resp.content_type == "application/xml"
        metadata = ET.fromstring(await resp.read())
    sets = [e.get("Name") for e in metadata.iter("{http://schemas.microsoft.com/ado/2008/09/edm}EntitySet")]
    assert sets == ["IntegrationPackages"]
    async with http.get(f"{backend.upstream_url}{PACKAGES}", headers=auth) as resp:
        feed = ET.fromstring(await resp.read())
    assert feed.get("{http://www.w3.org/XML/1998/namespace}base") == f"{backend.upstream_url}/api/v1/"
    assert len(feed.findall("{http://www.w3.org/2005/Atom}entry")) == 5
    async with http.get(f"{backend.upstream_url}/api/v1/", headers=auth) as resp:
        assert "IntegrationPackages" in await resp.text()


# --------------------------------------------------------------------------- CSRF and writes


async def test_csrf_protects_writes(http: aiohttp.ClientSession, backend: DemoBackend, auth: dict[str, str]) -> None:
    url = f"{backend.upstream_url}{PACKAGES}"
    async with http.post(url, headers=auth, json={"Id": "New"}) as resp:
        assert resp.status == 403
        assert resp.headers["X-CSRF-Token"] == "Required"
        assert await resp.text() == "CSRF token validation failed"

    token, cookie = await fetch_csrf(http, backend, auth)
    other_token, _ = await fetch_csrf(http, backend, auth)
    assert other_token != token
    assert backend.odata_app is not None and csrf_fetch_count(backend.odata_app) == 2

    mixed = {**auth, "X-CSRF-Token": other_token, "Cookie": cookie}  # token of another session
    async with http.post(url, headers=mixed, json={"Id": "X"}) as resp:
        assert resp.status == 403
    async with http.post(url, headers={**auth, "X-CSRF-Token": token}, json={"Id": "X"}) as resp:
        assert resp.status == 403  # right token, no session cookie
    async with http.post(url, headers={**auth, "X-CSRF-Token": token, "Cookie": cookie}, json={"Id": "X"}) as resp:
        assert resp.status == 201
        assert resp.headers["Location"] == f"{url}('X')"


async def test_cookie_jar_client_flow(backend: DemoBackend) -> None:
    """An ordinary client with a cookie jar (unsafe=True: cookies from an IP address) just works."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        auth = {"Authorization": f"Bearer {await get_token(http, backend)}"}
        async with http.head(f"{backend.upstream_url}/api/v1/", headers={**auth, "X-CSRF-Token": "fetch"}) as resp:
            token = resp.headers["X-CSRF-Token"]
        async with http.get(f"{backend.upstream_url}/api/v1/", headers={**auth, "X-CSRF-Token": "Fetch"}) as resp:
            assert resp.headers["X-CSRF-Token"] == token  # same session, same token
        async with http.delete(
            f"{backend.upstream_url}{PACKAGES}('WeatherFeed')", headers={**auth, "X-CSRF-Token": token}
        ) as resp:
            assert resp.status == 204


async def test_create_update_delete_cycle(
    http: aiohttp.ClientSession, backend: DemoBackend, auth: dict[str, str]
) -> None:
    token, cookie = await fetch_csrf(http, backend, auth)
    write = {**auth, "X-CSRF-Token": token, "Cookie": cookie}
    coll = f"{backend.upstream_url}{PACKAGES}"
    entity = f"{coll}('Demo')"

    async def read() -> dict[str, Any]:
        result: dict[str, Any] = (await odata_json(http, entity, auth))["d"]
        return result

    async with http.post(coll, headers=write, json={"Id": "Demo", "Name": "Demo", "Vendor": "Me"}) as resp:
        assert resp.status == 201
        assert (await resp.json())["d"]["__metadata"]["uri"] == entity
    async with http.post(coll, headers=write, json={"Id": "Demo"}) as resp:
        assert resp.status == 409
    async with http.post(coll, headers=write, json={"Name": "no id"}) as resp:
        assert resp.status == 400
    async with http.patch(entity, headers=write, json={"Description": "patched"}) as resp:
        assert resp.status == 204
    assert (await read())["Description"] == "patched"
    async with http.post(entity, headers={**write, "X-HTTP-Method": "MERGE"}, json={"Version": "2.0"}) as resp:
        assert resp.status == 204
    assert (await read())["Version"] == "2.0" and (await read())["Description"] == "patched"
    async with http.request("MERGE", entity, headers=write, json={"Version": "3.0"}) as resp:
        assert resp.status == 204
    async with http.put(entity, headers=write, json={"Name": "Replaced"}) as resp:
        assert resp.status == 204
    assert (await read())["Version"] == "" and (await read())["Name"] == "Replaced"
    async with http.delete(entity, headers=write) as resp:
        assert resp.status == 204
    async with http.get(entity, headers=auth) as resp:
        assert resp.status == 404
    async with http.delete(entity, headers=write) as resp:
        assert resp.status == 404
    async with http.get(f"{coll}/$count", headers=auth) as resp:
        assert await resp.text() == "12"


# --------------------------------------------------------------------------- helpers for proxy tests


async def test_echo(http: aiohttp.ClientSession, backend: DemoBackend, auth: dict[str, str]) -> None:
    url = URL(f"{backend.upstream_url}/api/v1/echo?a=%2F&b=x%20y", encoded=True)  # sent byte for byte
    async with http.get(url, headers={**auth, "X-Custom": "1"}) as resp:
        echo = await resp.json()
    assert echo["method"] == "GET"
    assert echo["path"] == "/api/v1/echo?a=%2F&b=x%20y"
    assert echo["headers"]["X-Custom"] == "1"
    assert echo["headers"]["Authorization"] == auth["Authorization"]
    assert echo["body_length"] == 0


@pytest.mark.parametrize("chunked", [False, True])
async def test_large_streams_exact_bytes(
    http: aiohttp.ClientSession, backend: DemoBackend, auth: dict[str, str], chunked: bool
) -> None:
    size = 3 * 64 * 1024 + 123
    url = f"{backend.upstream_url}/api/v1/large?bytes={size}" + ("&chunked=1" if chunked else "")
    async with http.get(url, headers=auth) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/octet-stream"
        assert resp.content_length == (None if chunked else size)
        total = 0
        async for chunk in resp.content.iter_chunked(16 * 1024):
            total += len(chunk)
    assert total == size


async def test_large_head_sends_no_body(
    http: aiohttp.ClientSession, backend: DemoBackend, auth: dict[str, str]
) -> None:
    async with http.head(f"{backend.upstream_url}/api/v1/large?bytes=100000", headers=auth) as resp:
        assert resp.status == 200 and resp.content_length == 100000
    async with http.get(f"{backend.upstream_url}/api/v1/echo", headers=auth) as resp:  # connection still sane
        assert resp.status == 200


async def test_absolute_urls_follow_host_header(
    http: aiohttp.ClientSession, backend: DemoBackend, auth: dict[str, str]
) -> None:
    headers = {**auth, "Host": "tenant.example.com", "Accept": "application/json"}
    async with http.get(f"{backend.upstream_url}{PACKAGES}", headers=headers) as resp:
        d = (await resp.json())["d"]
    assert d["__next"].startswith(f"http://tenant.example.com{PACKAGES}?")
    assert d["results"][0]["__metadata"]["id"] == f"http://tenant.example.com{PACKAGES}('OrderToCash')"


async def test_expired_token_is_rejected(http: aiohttp.ClientSession) -> None:
    async with start_demo_backend(lifetime=1) as backend:
        auth = {"Authorization": f"Bearer {await get_token(http, backend)}"}
        async with http.get(f"{backend.upstream_url}/api/v1/", headers=auth) as resp:
            assert resp.status == 200
        await asyncio.sleep(1.2)
        async with http.get(f"{backend.upstream_url}/api/v1/", headers=auth) as resp:
            assert resp.status == 401
            assert "invalid_token" in resp.headers["WWW-Authenticate"]
