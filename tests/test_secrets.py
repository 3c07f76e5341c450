"""No token, client secret, private key, key password or inbound API key ever appears in the proxy's own output.

The proxy runs in-process (every logger at DEBUG, captured with caplog) and as a subprocess
(``python -m proxy run --config F -v``, text and JSON logs) through success, token failures (wrong secret,
token server 500, token server unreachable, client certificate refused), an upstream 401 with a replay,
inbound API key checks and guard refusals. Everything the proxy itself produced is collected: log records,
stdout/stderr, the status line, headers and body of every response it generated (its own error JSON, and
for forwarded requests the headers; upstream bodies are the user's data and pass through unchanged, so
upstream echo bodies are never collected), ``/-/metrics``, ``/-/readyz``, and ``repr()``/``str()`` of the
objects that hold the secrets. None of it may contain a secret, an access token or a 20-character piece of
one, or a line of the private key; and the token fingerprint must be in the access log, so that the test
notices when logging disappears altogether.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import signal
import ssl
import sys
import traceback
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
import trustme
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from yarl import URL

from proxy.app import prepare
from proxy.config import ConfigError, Overrides, load_config
from proxy.logs import ACCESS_LOGGER, JsonFormatter, TextFormatter
from proxy.redact import fingerprint
from proxy.tokens import TokenError
from tests.conftest import (
    CLIENT_SECRET,
    Backend,
    Tls,
    TokenServer,
    child_env,
    free_port,
    running_proxy,
    serve,
    write_yaml,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures" / "service-keys"

API_KEY = "inbound-Key-6d0c9e1f2a3b4c5d6e7f8091"
WRONG_SECRET = "wr0ng-Secret-9a8b7c6d5e4f3a2b1c0d"
KEY_PASSWORD = "kp-Passw0rd-1e2d3c4b5a69788796a5"
WRONG_KEY_PASSWORD = "kp-Wr0ngPass-0f1e2d3c4b5a6978"
MIN_TOKEN_PIECE = 20


# --------------------------------------------------------------------------------------------------
# the secrets and how to look for them


def pem_body_lines(pem: str) -> list[str]:
    """The base64 lines of a PEM text (armour and RFC 1421 headers left out; very short last lines too)."""
    lines = []
    for line in pem.replace("\\n", "\n").splitlines():
        line = line.strip()
        if not line or line.startswith("-----") or ":" in line or len(line) < 16:
            continue
        lines.append(line)
    return lines


@dataclass
class Secrets:
    """Everything that must never show: named values, key PEM lines, and (filled in late) issued tokens."""

    values: dict[str, str] = field(default_factory=dict)
    key_lines: list[str] = field(default_factory=list)

    def add_client_secret(self, name: str, client_id: str, secret: str) -> None:
        self.values[name] = secret
        self.values[name + " (form-encoded)"] = quote(secret, safe="")
        self.values[name + " (HTTP Basic)"] = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
        self.values[name + " (HTTP Basic, encoded)"] = base64.b64encode(
            f"{quote(client_id, safe='')}:{quote(secret, safe='')}".encode()
        ).decode()

    def leaks(self, haystack: str, tokens: list[str]) -> list[str]:
        found: list[str] = []

        def context(value: str) -> str:
            at = haystack.find(value)
            return haystack[max(0, at - 80) : at + len(value) + 40]

        for name, value in self.values.items():
            if value and value in haystack:
                found.append(f"{name}: ...{context(value)}...")
        for line in self.key_lines:
            if line in haystack:
                found.append(f"private key line {line[:12]}...: ...{context(line)}...")
        for index, token in enumerate(tokens):
            if token in haystack:
                found.append(f"access token #{index}: ...{context(token)}...")
                continue
            for start in range(len(token) - MIN_TOKEN_PIECE + 1):
                piece = token[start : start + MIN_TOKEN_PIECE]
                if piece in haystack:
                    found.append(f"a {MIN_TOKEN_PIECE}-char piece of access token #{index}: ...{context(piece)}...")
                    break
        return found


def assert_no_leaks(what: str, haystack: str, secrets: Secrets, tokens: list[str]) -> None:
    found = secrets.leaks(haystack, tokens)
    assert not found, f"{what} shows secrets:\n" + "\n".join(found)


# --------------------------------------------------------------------------------------------------
# the world: backend + failing token servers + a client certificate


@dataclass
class World:
    backend: Backend
    token500: TokenServer
    secrets: Secrets
    config_data: dict[str, Any]
    config_path: Path
    client_key_pem: str
    runners: list[web.AppRunner]

    def tokens(self) -> list[str]:
        return list(self.backend.tokens.issued) + list(self.token500.issued)


def mtls_server_context(tls: Tls) -> ssl.SSLContext:
    """An HTTPS server the proxy trusts, which demands a client certificate from a CA nobody uses: mTLS fails."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    trustme.CA().configure_trust(ctx)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


@pytest.fixture
async def world(tmp_path: Path, backend: Backend, tls: Tls) -> AsyncIterator[World]:
    secrets = Secrets()
    secrets.add_client_secret("client secret", backend.tokens.client_id, CLIENT_SECRET)
    secrets.add_client_secret("wrong client secret", backend.tokens.client_id, WRONG_SECRET)
    secrets.values["inbound API key"] = API_KEY
    secrets.values["key password"] = KEY_PASSWORD
    secrets.values["wrong key password"] = WRONG_KEY_PASSWORD

    token500 = TokenServer(fail="500")
    runner500, token500.url = await serve(token500.app(), tls.server_ctx)
    mtls = TokenServer(auth_mode="cert")
    runner_mtls, mtls.url = await serve(mtls.app(), mtls_server_context(tls))

    client_ca = trustme.CA(organization_name="Secrets Test Client CA")
    leaf = client_ca.issue_cert("client.example.invalid", common_name="secrets-test-client")
    key_pem = leaf.private_key_pem.bytes().decode()
    private_key = serialization.load_pem_private_key(key_pem.encode(), None)
    encrypted_pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(KEY_PASSWORD.encode()),
    ).decode()
    pkcs1ish_pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    ).decode()
    secrets.key_lines += pem_body_lines(key_pem) + pem_body_lines(encrypted_pem) + pem_body_lines(pkcs1ish_pem)
    cert_path = tmp_path / "client-chain.pem"
    cert_path.write_text(leaf.cert_chain_pems[0].bytes().decode() + client_ca.cert_pem.bytes().decode())
    key_path = tmp_path / "client.key.pem"
    key_path.write_text(encrypted_pem)
    key_path.chmod(0o600)

    def route(name: str, token_url: str, **credentials: Any) -> dict[str, Any]:
        creds: dict[str, Any] = {"token_url": token_url, "client_id": backend.tokens.client_id}
        creds.update(credentials)
        return {"name": name, "prefix": f"/{name}/", "upstream": backend.upstream.url, "credentials": creds}

    token_url = backend.tokens.url + "/oauth/token"
    cert = {"certificate": str(cert_path), "key": str(key_path), "key_password": KEY_PASSWORD}
    data: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "tls": {"ca_bundle": str(backend.tls.ca_path)},
        "inbound_api_key": API_KEY,
        "shutdown_timeout": 0,
        "timeouts": {"token": 5},
        "routes": [
            route("ok", token_url, client_secret=CLIENT_SECRET),
            route("wrong", token_url, client_secret=WRONG_SECRET),
            route("t500", token500.url + "/oauth/token", client_secret=CLIENT_SECRET),
            route("down", f"https://127.0.0.1:{free_port()}/oauth/token", client_secret=CLIENT_SECRET),
            route("basic", token_url, client_secret=CLIENT_SECRET, client_auth="basic"),
            route("mtls", mtls.url + "/oauth/token", **cert),
            route("cert", token_url, **cert),
        ],
    }
    path = write_yaml(tmp_path / "proxy.yaml", data)
    try:
        yield World(backend, token500, secrets, data, path, key_pem, [runner500, runner_mtls])
    finally:
        for runner in (runner500, runner_mtls):
            await runner.cleanup()


# --------------------------------------------------------------------------------------------------
# the scenario, identical for the in-process and the subprocess proxy

KEYED = {"X-Proxy-Api-Key": API_KEY}


def describe(resp: aiohttp.ClientResponse, body: str) -> str:
    headers = "\n".join(f"{name}: {value}" for name, value in resp.headers.items())
    return f"{resp.status} {resp.reason}\n{headers}\n\n{body}"


async def exercise(base: str, world: World) -> tuple[list[str], dict[str, int]]:
    """Drive every scenario; returns what the proxy answered (never an upstream echo body) and the statuses."""
    collected: list[str] = []
    statuses: dict[str, int] = {}
    backend = world.backend

    async with aiohttp.ClientSession(trust_env=False) as client:

        async def call(label: str, path: str, *, method: str = "GET", echo: bool = False, **kwargs: Any) -> int:
            url = URL(base + path, encoded=True)
            async with client.request(method, url, allow_redirects=False, **kwargs) as resp:
                body = await resp.text(errors="replace")
                if echo and resp.status == 200:  # the upstream's echo of what it received: user data, not ours
                    assert "raw_path" in body
                    body = "(upstream echo body left out)"
                collected.append(f"[{label}] {method} {path}\n" + describe(resp, body))
                statuses[label] = resp.status
                return resp.status

        await call("healthz", "/-/healthz")
        # success, the key given both ways the proxy accepts
        await call("ok", "/ok/api/v1/cookies", headers=KEYED)
        await call("ok proxy-auth", "/ok/api/v1/cookies", headers={"Proxy-Authorization": "Bearer " + API_KEY})
        # inbound API key refused
        await call("no key", "/ok/api/v1/cookies")
        await call("wrong key", "/ok/api/v1/cookies", headers={"X-Proxy-Api-Key": API_KEY[:-1] + "X"})
        await call("wrong proxy-auth", "/ok/api/v1/cookies", headers={"Proxy-Authorization": "Bearer " + API_KEY[1:]})
        # token failures
        for name in ("wrong", "t500", "down", "basic", "mtls", "cert"):
            await call(name, f"/{name}/api/v1/cookies", headers=KEYED)
            await call(name + " again", f"/{name}/api/v1/cookies", headers=KEYED)  # the remembered failure
        # the upstream rejects the token: one replay with a fresh one
        issued = len(backend.tokens.issued)
        backend.upstream.revoked.update(backend.tokens.issued)
        await call("replay", "/ok/api/v1/cookies", headers=KEYED)
        assert len(backend.tokens.issued) == issued + 1, "the 401 did not lead to a new token"
        # ... and rejects the fresh one at once too: no second replay, the upstream's 401 goes to the client
        backend.upstream.revoked.update(backend.tokens.issued)
        await call("rejected again", "/ok/api/v1/cookies", headers=KEYED)
        backend.upstream.revoked.clear()
        # a write with a body the proxy may have to replay
        await call("post", "/ok/api/v1/echo", method="POST", echo=True, headers=KEYED, data=b'{"a": 1}')
        # guard refusals (echo the request's own values back)
        await call("evil host", "/ok/api/v1/cookies", headers={**KEYED, "Host": "evil.example"})
        await call("evil origin", "/ok/api/v1/cookies", headers={**KEYED, "Origin": "https://evil.example"})
        await call("traversal", "/ok/%2e%2e/api/v1/cookies", headers=KEYED)
        await call("trace", "/ok/api/v1/cookies", method="TRACE", headers=KEYED)
        await call("no route", "/nothing/here", headers=KEYED)
        await call("admin 404", "/-/nothing", headers=KEYED)
        # admin endpoints
        await call("readyz", "/-/readyz", headers=KEYED)
        await call("metrics", "/-/metrics", headers=KEYED)
    return collected, statuses


def check_statuses(statuses: dict[str, int]) -> None:
    assert statuses["ok"] == 200 and statuses["ok proxy-auth"] == 200, statuses
    assert statuses["no key"] == statuses["wrong key"] == statuses["wrong proxy-auth"] == 401, statuses
    assert statuses["wrong"] == 502 and statuses["basic"] == 502 and statuses["t500"] == 502, statuses
    assert statuses["down"] == 503, statuses
    assert statuses["mtls"] in (502, 503) and statuses["cert"] == 502, statuses
    assert statuses["replay"] == 200, statuses
    assert statuses["evil host"] == 421 and statuses["evil origin"] == 403 and statuses["traversal"] == 400
    assert statuses["post"] == 200, statuses
    assert statuses["readyz"] == 503 and statuses["metrics"] == 200, statuses


# --------------------------------------------------------------------------------------------------
# collecting in-process output


def render_records(records: list[logging.LogRecord]) -> list[str]:
    """Every way a log record can be shown: message, args, extra fields, with and without the traceback."""
    formatters: list[logging.Formatter] = [
        logging.Formatter("%(name)s %(levelname)s %(message)s"),
        TextFormatter(),
        JsonFormatter(),
    ]
    out: list[str] = []
    for record in records:
        out += [record.getMessage(), repr(record.args), repr(getattr(record, "fields", None)), str(record.msg)]
        for formatter in formatters:
            record.exc_text = None
            out.append(formatter.format(record))
        if record.exc_info and record.exc_info[0] is not None:
            out.append("".join(traceback.format_exception(*record.exc_info)))
        if record.stack_info:
            out.append(record.stack_info)
    return out


def object_views(*objects: Any) -> list[str]:
    return [text for obj in objects for text in (repr(obj), str(obj), f"{obj}")]


def token_error_views(exc: TokenError) -> list[str]:
    return [
        *object_views(exc),
        repr(exc.args),
        json.dumps(exc.as_json()),
        "".join(traceback.format_exception(exc)),
        repr(vars(exc)),
    ]


def debug_everything(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    names = {"odata_auth_proxy", ACCESS_LOGGER, "aiohttp", "aiohttp.access", "aiohttp.server", "aiohttp.client"}
    names |= {name for name, obj in logging.root.manager.loggerDict.items() if isinstance(obj, logging.Logger)}
    for name in sorted(names):
        caplog.set_level(logging.DEBUG, logger=name)


# --------------------------------------------------------------------------------------------------
# in-process


async def test_in_process_output_holds_no_secrets(world: World, caplog: pytest.LogCaptureFixture) -> None:
    debug_everything(caplog)
    config = load_config(Overrides(config=str(world.config_path)), env={})
    async with running_proxy(config) as proxy:
        collected, statuses = await exercise(proxy.url, world)
        check_statuses(statuses)

        state = proxy.server.state
        runtime = state.runtime
        ok = runtime.managers["ok"]
        assert ok.current is not None
        views = object_views(config, proxy.server.prepared, *(route.credentials for route in config.routes))
        views += object_views(*(route.credentials.certificate for route in config.routes))
        views += object_views(*proxy.server.prepared.credentials.values())
        for name, manager in runtime.managers.items():
            views += object_views(manager.current, manager.last_error, manager.source.credentials)
            views.append(repr({k: v for k, v in vars(manager).items() if not k.startswith("_fetch")}))
            views.append(repr(vars(manager.source)))
            if manager.last_error is not None:
                views += token_error_views(manager.last_error)
            else:
                assert name == "ok", f"route {name} should have failed"
        response = await ok.source.fetch()  # a TokenResponse (one more issued token to look for)
        views += object_views(response, response.access_token)
        for name in ("wrong", "t500", "down", "basic", "mtls", "cert"):
            with pytest.raises(TokenError) as raised:
                await runtime.managers[name].source.fetch()
            views += token_error_views(raised.value)
        metrics_body, _ = state.metrics.render()
        views.append(metrics_body.decode())

    records = caplog.records
    logged = [*render_records(records), caplog.text]
    tokens = world.tokens()
    assert len(tokens) >= 3
    assert_no_leaks("responses", "\n".join(collected), world.secrets, tokens)
    assert_no_leaks("object reprs", "\n".join(views), world.secrets, tokens)
    assert_no_leaks("log records", "\n".join(logged), world.secrets, tokens)

    access = "\n".join(render_records([r for r in records if r.name == ACCESS_LOGGER]))
    for token in world.backend.tokens.issued[:2]:  # the first token and the one fetched for the replay
        assert f"token={fingerprint(token)}" in access, "token fingerprint missing from the access log"
        assert f'"token_fp": "{fingerprint(token)}"' in access
    # the failures were logged (so the absence of secrets above means something)
    assert any(r.name == "odata_auth_proxy.tokens" and r.levelno == logging.WARNING for r in records)
    assert any(r.name == "odata_auth_proxy.guard" for r in records)
    assert "invalid_client" in "\n".join(logged)


# --------------------------------------------------------------------------------------------------
# subprocess


@contextlib.asynccontextmanager
async def proxy_process(*args: str) -> AsyncIterator[tuple[str, list[bytes], list[bytes], list[int]]]:
    """Run ``python -m proxy run ARGS``; yields (base URL, stdout chunks, stderr chunks, [exit code])."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "run",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=child_env(),
        cwd=str(PROJECT_ROOT),
    )
    stdout: list[bytes] = []
    stderr: list[bytes] = []

    async def pump(stream: asyncio.StreamReader | None, into: list[bytes]) -> None:
        assert stream is not None
        while chunk := await stream.read(65536):
            into.append(chunk)

    pumps = [asyncio.create_task(pump(process.stdout, stdout)), asyncio.create_task(pump(process.stderr, stderr))]
    exit_code: list[int] = []
    try:
        port = None
        for _ in range(300):
            match = re.search(rb"listening on http://127\.0\.0\.1:(\d+)", b"".join(stderr))
            if match:
                port = int(match.group(1))
                break
            if process.returncode is not None:
                break
            await asyncio.sleep(0.02)
        assert port is not None, b"".join(stderr).decode(errors="replace")
        yield f"http://127.0.0.1:{port}", stdout, stderr, exit_code
        process.send_signal(signal.SIGTERM)
        exit_code.append(await asyncio.wait_for(process.wait(), 15))
        await asyncio.wait_for(asyncio.gather(*pumps), 5)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        for task in pumps:
            task.cancel()


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_subprocess_output_holds_no_secrets(world: World, log_format: str) -> None:
    async with proxy_process("--config", str(world.config_path), "-v", "--log-format", log_format) as (
        base,
        stdout,
        stderr,
        exit_code,
    ):
        collected, statuses = await exercise(base, world)
        check_statuses(statuses)
        await asyncio.sleep(0.2)  # let the last access log lines reach the pipe
    assert exit_code == [0]
    out = b"".join(stdout).decode(errors="replace")
    err = b"".join(stderr).decode(errors="replace")
    tokens = world.tokens()
    assert_no_leaks("responses", "\n".join(collected), world.secrets, tokens)
    assert_no_leaks("stdout", out, world.secrets, tokens)
    assert_no_leaks("stderr", err, world.secrets, tokens)

    for token in world.backend.tokens.issued[:2]:
        fp = fingerprint(token)
        assert (f"token={fp}" if log_format == "text" else f'"token_fp": "{fp}"') in err, err[-3000:]
    assert "invalid_client" in err and "refused proxy_auth_required" in err
    if log_format == "json":
        for line in err.splitlines():
            if line.strip():
                assert isinstance(json.loads(line), dict), line


async def test_subprocess_certificate_errors_hold_no_key(world: World, tmp_path: Path) -> None:
    """A wrong key password stops start-up (exit 2): the message names the file, never the key or a password."""
    data = json.loads(json.dumps(world.config_data))
    mtls = next(r for r in data["routes"] if r["name"] == "mtls")
    mtls["credentials"]["key_password"] = WRONG_KEY_PASSWORD
    data["routes"] = [mtls]
    path = write_yaml(tmp_path / "wrong-password.yaml", data)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "run",
        "--config",
        str(path),
        "-v",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=child_env(),
        cwd=str(PROJECT_ROOT),
    )
    out, err = await asyncio.wait_for(process.communicate(), 15)
    assert process.returncode == 2, (out, err)
    text = out.decode() + err.decode()
    assert "password is wrong" in text, text
    assert_no_leaks("start-up error", text, world.secrets, [])


# --------------------------------------------------------------------------------------------------
# configuration objects and certificate errors, without network


def test_config_objects_with_inline_key_material_hold_no_key(world: World, tmp_path: Path) -> None:
    """Inline PEM in the YAML and in a downloaded service key: reprs and start-up errors never show it."""
    secrets = Secrets(values=dict(world.secrets.values), key_lines=list(world.secrets.key_lines))
    service_key = json.loads((FIXTURES / "api-plan-certificate.json").read_text())
    secrets.key_lines += pem_body_lines(service_key["oauth"]["key"])
    chain = Path(world.config_data["routes"][5]["credentials"]["certificate"]).read_text()
    encrypted = Path(world.config_data["routes"][5]["credentials"]["key"]).read_text()

    def config_with(credentials: dict[str, Any], name: str) -> Overrides:
        data = {
            "listen": "127.0.0.1:0",
            "inbound_api_key": API_KEY,
            "routes": [
                {"name": "r", "prefix": "/", "upstream": "https://api.example.invalid", "credentials": credentials}
            ],
        }
        return Overrides(config=str(write_yaml(tmp_path / name, data)))

    base = {"token_url": "https://auth.example.invalid/oauth/token", "client_id": "cid"}
    good_inline = {**base, "certificate": chain, "key": encrypted, "key_password": KEY_PASSWORD}
    views: list[str] = []
    for overrides in (
        config_with(good_inline, "inline.yaml"),
        Overrides(service_key=str(FIXTURES / "api-plan-certificate.json")),
        Overrides(config=str(world.config_path)),
    ):
        config = load_config(overrides, env={})
        prepared = prepare(config)
        views += object_views(config, prepared, *(r.credentials for r in config.routes))
        views += object_views(*(r.credentials.certificate for r in config.routes))
        views += object_views(*(p.identity for p in prepared.credentials.values()))

    # broken material: every error message must describe, never quote
    damaged = encrypted.replace(pem_body_lines(encrypted)[2], pem_body_lines(encrypted)[2][:-4] + "!!!!")
    unencrypted_other = trustme.CA().issue_cert("other.example.invalid").private_key_pem.bytes().decode()
    secrets.key_lines += pem_body_lines(unencrypted_other)
    broken = {
        "wrong password": {**good_inline, "key_password": WRONG_KEY_PASSWORD},
        "no password": {**base, "certificate": chain, "key": encrypted},
        "damaged key": {**good_inline, "key": damaged},
        "swapped": {**base, "certificate": world.client_key_pem, "key": chain},
        "key only": {**base, "certificate": world.client_key_pem},
        "other key": {**base, "certificate": chain, "key": unencrypted_other},
        "truncated key": {**good_inline, "key": encrypted[: len(encrypted) // 2]},
    }
    errors: list[str] = []
    for index, (label, credentials) in enumerate(broken.items()):
        with pytest.raises(ConfigError) as raised:
            prepare(load_config(config_with(credentials, f"broken{index}.yaml"), env={}))
        errors.append(f"[{label}] {raised.value}")
        errors += ["".join(traceback.format_exception(raised.value)), repr(raised.value.args)]
    assert_no_leaks("config reprs", "\n".join(views), secrets, [])
    assert_no_leaks("certificate errors", "\n".join(errors), secrets, [])


# --------------------------------------------------------------------------------------------------
# the inbound API key in a URL


async def test_api_key_in_the_query_string_is_not_logged(world: World, caplog: pytest.LogCaptureFixture) -> None:
    debug_everything(caplog)
    config = load_config(Overrides(config=str(world.config_path)), env={})
    async with running_proxy(config) as proxy, aiohttp.ClientSession(trust_env=False) as client:
        bodies = []
        for headers in ({}, KEYED):
            url = URL(f"{proxy.url}/ok/api/v1/cookies?api_key={API_KEY}", encoded=True)
            async with client.get(url, headers=headers) as resp:
                bodies.append(describe(resp, await resp.text()))
    guard_lines = [r.getMessage() for r in caplog.records if r.name == "odata_auth_proxy.guard"]
    assert guard_lines and all(API_KEY not in line for line in guard_lines), guard_lines  # the guard redacts
    assert all(API_KEY not in body for body in bodies)
    logged = "\n".join(render_records(caplog.records))
    assert API_KEY not in logged, [line for line in logged.splitlines() if API_KEY in line][:3]
