"""The proxy end to end with client certificates (mutual TLS at the token server), for every input kind:
an SAP-generated certificate service key, an external certificate key plus the user's own key file, and
certificate + key (or PKCS#12) in the config alone."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from proxy.app import Runtime, prepare
from proxy.config import ConfigError, Overrides, load_config
from proxy.metrics import ProxyMetrics
from tests.conftest import Backend, make_config, mtls_token_server, running_proxy, secret_route, write_yaml


class Pki:
    """A root CA, an intermediate, and a client certificate issued by the intermediate (chain: leaf, intermediate)."""

    def __init__(self, days: int | None = None) -> None:
        self.root = trustme.CA(organization_name="Fake SAP Root CA")
        self.intermediate = self.root.create_child_ca()
        not_after = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=days) if days is not None else None
        self.leaf = self.intermediate.issue_cert(
            "client.example.invalid", common_name="sb-cert-client", not_after=not_after
        )

    def chain_pem(self) -> str:
        """Leaf first, then the intermediate, then the root: what an SAP-generated key holds."""
        pems = [p.bytes().decode() for p in self.leaf.cert_chain_pems]
        return "".join(pems) + self.root.cert_pem.bytes().decode()

    def key_pem(self) -> str:
        return self.leaf.private_key_pem.bytes().decode()


@pytest.fixture
def pki() -> Pki:
    return Pki()


@pytest.fixture
async def mtls(backend: Backend, pki: Pki) -> AsyncIterator[tuple[str, list[str]]]:
    seen: list[str] = []
    async with mtls_token_server(backend, pki.root, seen) as url:
        yield url, seen


def certificate_key(backend: Backend, token_url: str, certificate: str, key: str | None) -> dict[str, Any]:
    oauth: dict[str, Any] = {
        "clientid": backend.tokens.client_id,
        "certificate": certificate,
        "url": backend.upstream.url,
        "tokenurl": token_url,
    }
    if key is not None:
        oauth["key"] = key
    return {"oauth": oauth}


async def get_many(url: str, count: int) -> list[int]:
    async with aiohttp.ClientSession() as client:

        async def one() -> int:
            async with client.get(url) as resp:
                await resp.read()
                return resp.status

        return list(await asyncio.gather(*(one() for _ in range(count))))


def key_config(tmp_path: Path, backend: Backend, key_file: Path, **flags: Any) -> Any:
    data = {"listen": "127.0.0.1:0", "tls": {"ca_bundle": str(backend.tls.ca_path)}}
    config_path = write_yaml(tmp_path / "proxy.yaml", data)
    return load_config(Overrides(config=str(config_path), service_key=str(key_file), **flags), env={})


async def test_sap_generated_certificate_key_serves_with_one_token_request(
    tmp_path: Path, backend: Backend, pki: Pki, mtls: tuple[str, list[str]]
) -> None:
    token_url, seen = mtls
    key_file = tmp_path / "cert-key.json"
    key_file.write_text(json.dumps(certificate_key(backend, token_url, pki.chain_pem(), pki.key_pem())))
    async with running_proxy(key_config(tmp_path, backend, key_file)) as proxy:
        assert await get_many(proxy.url + "/api/v1/echo", 20) == [200] * 20
    assert seen == ["sb-cert-client"]  # one token request, authenticated by the client certificate
    form = backend.tokens.forms[-1]
    assert form == {"grant_type": "client_credentials", "client_id": backend.tokens.client_id}  # no secret


async def test_external_certificate_key_with_separate_key_file(
    tmp_path: Path, backend: Backend, pki: Pki, mtls: tuple[str, list[str]]
) -> None:
    token_url, seen = mtls
    key_file = tmp_path / "ext-key.json"
    key_file.write_text(json.dumps(certificate_key(backend, token_url, pki.chain_pem(), None)))
    private = tmp_path / "client.key"
    private.write_text(pki.key_pem())
    private.chmod(0o600)
    with pytest.raises(ConfigError, match="--key FILE"):
        key_config(tmp_path, backend, key_file)
    async with running_proxy(key_config(tmp_path, backend, key_file, key=str(private))) as proxy:
        assert await get_many(proxy.url + "/api/v1/echo", 5) == [200] * 5
    assert seen == ["sb-cert-client"]


async def test_certificate_file_given_separately_overrides_the_keys_certificate(
    tmp_path: Path, backend: Backend, pki: Pki, mtls: tuple[str, list[str]]
) -> None:
    token_url, seen = mtls
    stranger = trustme.CA().issue_cert("x.invalid", common_name="not-this-one")
    key_file = tmp_path / "ext-key.json"  # the key shows an old certificate the user replaced since
    key_file.write_text(
        json.dumps(certificate_key(backend, token_url, stranger.cert_chain_pems[0].bytes().decode(), None))
    )
    cert, private = tmp_path / "chain.pem", tmp_path / "client.key"
    cert.write_text(pki.chain_pem())
    private.write_text(pki.key_pem())
    private.chmod(0o600)
    config = key_config(tmp_path, backend, key_file, key=str(private), certificate=str(cert))
    async with running_proxy(config) as proxy:
        assert await get_many(proxy.url + "/api/v1/echo", 2) == [200, 200]
    assert seen == ["sb-cert-client"]


@pytest.mark.parametrize("form", ["encrypted-pkcs8", "pkcs12"])
async def test_certificate_in_config_only(
    tmp_path: Path, backend: Backend, pki: Pki, mtls: tuple[str, list[str]], form: str
) -> None:
    token_url, seen = mtls
    key = serialization.load_pem_private_key(pki.leaf.private_key_pem.bytes(), None)
    credentials: dict[str, Any] = {"token_url": token_url, "client_id": backend.tokens.client_id}
    if form == "pkcs12":
        chain = [c for c in pki.leaf.cert_chain_pems]
        from cryptography import x509

        certs = [x509.load_pem_x509_certificate(p.bytes()) for p in chain]
        bundle = pkcs12.serialize_key_and_certificates(
            b"client",
            key,
            certs[0],
            certs[1:],
            serialization.BestAvailableEncryption(b"p12-pass"),  # type: ignore[arg-type]
        )
        (tmp_path / "client.p12").write_bytes(bundle)
        (tmp_path / "client.p12").chmod(0o600)
        credentials.update(pkcs12="client.p12", pkcs12_password="${P12_PASSWORD}")
        env = {"P12_PASSWORD": "p12-pass"}
    else:
        encrypted = key.private_bytes(  # type: ignore[union-attr]
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"key-pass"),
        )
        (tmp_path / "client.key").write_bytes(encrypted)
        (tmp_path / "client.key").chmod(0o600)
        (tmp_path / "chain.pem").write_text(pki.chain_pem())
        credentials.update(certificate="chain.pem", key="client.key")
        env = {"ODATA_AUTH_PROXY_KEY_PASSWORD": "key-pass"}
    data = {
        "listen": "127.0.0.1:0",
        "tls": {"ca_bundle": str(backend.tls.ca_path)},
        "routes": [{"name": "cert", "prefix": "/", "upstream": backend.upstream.url, "credentials": credentials}],
    }
    config = load_config(Overrides(config=str(write_yaml(tmp_path / "proxy.yaml", data))), env=env)
    async with running_proxy(config) as proxy:
        assert await get_many(proxy.url + "/api/v1/echo", 3) == [200] * 3
    assert seen == ["sb-cert-client"]


async def test_two_routes_secret_and_certificate_one_token_each(
    tmp_path: Path, backend: Backend, pki: Pki, mtls: tuple[str, list[str]]
) -> None:
    token_url, seen = mtls
    (tmp_path / "chain.pem").write_text(pki.chain_pem())
    (tmp_path / "client.key").write_text(pki.key_pem())
    (tmp_path / "client.key").chmod(0o600)
    secret = secret_route(backend, name="a", prefix="/a/", upstream=backend.upstream.url + "/api/v1/")
    secret["credentials"]["client_secret"] = "${CLIENT_SECRET}"
    cert = {
        "name": "b",
        "prefix": "/b/",
        "upstream": backend.upstream.url,
        "credentials": {
            "token_url": token_url,
            "client_id": backend.tokens.client_id,
            "certificate": "chain.pem",
            "key": "client.key",
        },
    }
    data = {"listen": "127.0.0.1:0", "tls": {"ca_bundle": str(backend.tls.ca_path)}, "routes": [secret, cert]}
    path = write_yaml(tmp_path / "proxy.yaml", data)
    config = load_config(Overrides(config=str(path)), env={"CLIENT_SECRET": backend.tokens.client_secret})
    backend.tokens.auth_mode = "any"  # the secret route posts client_secret, the cert route only client_id
    async with running_proxy(config) as proxy:
        assert await get_many(proxy.url + "/a/echo?x=1", 10) == [200] * 10
        assert await get_many(proxy.url + "/b/api/v1/echo", 10) == [200] * 10
        async with aiohttp.ClientSession() as client, client.get(proxy.url + "/unknown") as resp:
            assert resp.status == 404
            assert (await resp.json())["prefixes"] == ["/a/", "/b/"]
    assert backend.tokens.requests == 2  # exactly one per distinct credential
    assert seen == ["sb-cert-client"]
    paths = [r["raw_path"] for r in backend.upstream.requests]
    assert paths.count("/api/v1/echo?x=1") == 10 and paths.count("/api/v1/echo") == 10
    by_path: dict[str, set[str]] = {}
    for request in backend.upstream.requests:
        token = dict(request["headers"])["Authorization"]
        by_path.setdefault(request["raw_path"], set()).add(token)
    assert len(by_path["/api/v1/echo?x=1"]) == len(by_path["/api/v1/echo"]) == 1
    assert by_path["/api/v1/echo?x=1"] != by_path["/api/v1/echo"]  # each route with its own token


async def test_certificate_the_token_server_does_not_trust(tmp_path: Path, backend: Backend, pki: Pki) -> None:
    seen: list[str] = []
    other_root = trustme.CA()
    async with mtls_token_server(backend, other_root, seen) as token_url:
        key_file = tmp_path / "cert-key.json"
        key_file.write_text(json.dumps(certificate_key(backend, token_url, pki.chain_pem(), pki.key_pem())))
        async with running_proxy(key_config(tmp_path, backend, key_file)) as proxy:
            async with aiohttp.ClientSession() as client, client.get(proxy.url + "/api/v1/echo") as resp:
                body = await resp.json()
                assert resp.status == 503
    assert body["token_server_error"] == "tls_error"
    assert "client certificate" in body["detail"]
    assert seen == []
    assert backend.upstream.requests == []


async def test_expiring_certificate_warns_at_start_and_every_day(
    tmp_path: Path, backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    soon = Pki(days=10)
    key_file = tmp_path / "cert-key.json"
    key_file.write_text(json.dumps(certificate_key(backend, backend.tokens.url, soon.chain_pem(), soon.key_pem())))
    prepared = prepare(key_config(tmp_path, backend, key_file))
    assert any("expires in" in w and "sb-cert-client" in w for w in prepared.warnings)
    caplog.set_level(logging.WARNING)
    runtime = Runtime(prepared, ProxyMetrics())
    task = asyncio.get_running_loop().create_task(runtime._certificate_watch(interval=0.05))
    await asyncio.sleep(0.18)
    task.cancel()
    await runtime.close()
    repeats = [r for r in caplog.records if "expires in" in r.getMessage()]
    assert len(repeats) >= 2  # repeated while running, not only at start
    identity = prepared.credentials[prepared.config.routes[0].credentials].identity
    assert identity is not None
    assert abs(identity.not_after_timestamp - (datetime.datetime.now(datetime.UTC).timestamp() + 10 * 86400)) < 3600


async def test_mismatched_key_is_refused_at_start(tmp_path: Path, backend: Backend, pki: Pki) -> None:
    other_key = trustme.CA().issue_cert("x.invalid").private_key_pem.bytes().decode()
    key_file = tmp_path / "cert-key.json"
    key_file.write_text(json.dumps(certificate_key(backend, backend.tokens.url, pki.chain_pem(), other_key)))
    with pytest.raises(ConfigError) as info:
        prepare(key_config(tmp_path, backend, key_file))
    message = str(info.value)
    assert "does not match the certificate" in message and "sb-cert-client" in message
    assert "PRIVATE KEY" not in message


def test_make_config_still_builds_secret_routes(tmp_path: Path, backend: Backend) -> None:
    assert make_config(tmp_path, backend).routes[0].credentials.kind == "secret"
