"""Real servers for the tests: an HTTPS token server and an HTTPS upstream (aiohttp on 127.0.0.1, certificates
from a throwaway CA made here), and the proxy itself started in-process on a free loopback port."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import hashlib
import itertools
import json
import os
import socket
import ssl
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
import yaml
from aiohttp import web

from proxy.app import prepare
from proxy.config import Config, Overrides, load_config
from proxy.server import ProxyServer

FIXTURES = Path(__file__).parent / "fixtures"
BIN = Path(sys.executable).parent
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "ws_proxy", "wss_proxy")


def free_port() -> int:
    """A loopback port nobody listens on right now (for a server to bind, or as a closed port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a proxy subprocess: no ODATA_AUTH_PROXY_* and no *_PROXY variables (tests talk to
    loopback only and must never detour through a proxy), this venv's bin first on PATH, unbuffered output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ODATA_AUTH_PROXY_") and k.lower() not in PROXY_VARS}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


CLIENT_ID = "sb-0a1b2c3d!b12345|it!b67890"
CLIENT_SECRET = "s3cr3t$with+plus=and/slash"


@dataclass
class Tls:
    ca: trustme.CA
    ca_path: Path
    server_ctx: ssl.SSLContext


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return Tls(ca=ca, ca_path=path, server_ctx=ctx)


def jwt_like(claims: dict[str, Any]) -> str:
    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    return f"{part({'alg': 'RS256', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJl"


@dataclass
class TokenServer:
    """An OAuth token endpoint that checks client authentication exactly as configured."""

    client_id: str = CLIENT_ID
    client_secret: str = CLIENT_SECRET
    auth_mode: str = "post"  # post | basic | basic-encoded | cert (client id in the form, identity from TLS) | any
    lifetime: float = 3600
    fail: str | None = None  # None | "invalid_client" | "500" | "html" | "hang"
    delay: float = 0.0
    scope: str = "WorkspacePackagesRead"
    requests: int = 0
    issued: list[str] = field(default_factory=list)
    forms: list[dict[str, str]] = field(default_factory=list)
    url: str = ""
    _counter: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def _authenticated(self, request: web.Request, form: dict[str, str]) -> bool:
        header = request.headers.get("Authorization", "")
        if self.auth_mode == "any":  # post with the secret, or a certificate server's client id alone
            return form.get("client_id") == self.client_id and form.get("client_secret") in (None, self.client_secret)
        if self.auth_mode == "post":
            return (
                not header
                and form.get("client_id") == self.client_id
                and form.get("client_secret") == self.client_secret
            )
        if self.auth_mode in ("basic", "basic-encoded"):
            if not header.startswith("Basic ") or "client_secret" in form:
                return False
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
            if self.auth_mode == "basic":
                return (user, password) == (self.client_id, self.client_secret)
            from urllib.parse import quote

            return (user, password) == (quote(self.client_id, safe=""), quote(self.client_secret, safe=""))
        return form.get("client_id") == self.client_id and "client_secret" not in form

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.forms.append(form)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail == "hang":
            await asyncio.sleep(3600)
        if self.fail == "500":
            return web.Response(status=500, text="internal error")
        if self.fail == "html":
            return web.Response(status=200, text="<html>login</html>", content_type="text/html")
        if self.fail == "invalid_client" or not self._authenticated(request, form):
            return web.json_response({"error": "invalid_client", "error_description": "Bad credentials"}, status=401)
        if form.get("grant_type") != "client_credentials":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        token = jwt_like({"client_id": self.client_id, "scope": self.scope.split(), "jti": next(self._counter)})
        self.issued.append(token)
        return web.json_response(
            {"access_token": token, "token_type": "bearer", "expires_in": self.lifetime, "scope": self.scope}
        )

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/oauth/token", self.handle)
        return app


@dataclass
class Upstream:
    """An HTTPS API that accepts only tokens the token server issued and not revoked; records what arrived."""

    tokens: TokenServer
    revoked: set[str] = field(default_factory=set)
    requests: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""

    def _authorized(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        token = header[7:] if header.startswith("Bearer ") else ""
        return token in self.tokens.issued and token not in self.revoked

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append(
            {"method": request.method, "raw_path": request.raw_path, "headers": list(request.headers.items())}
        )
        if not self._authorized(request):
            return web.json_response({"error": "unauthorized"}, status=401, headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    async def echo(self, request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
        return web.json_response(
            {
                "method": request.method,
                "raw_path": request.raw_path,
                "headers": list(request.headers.items()),
                "body_length": size,
                "body_sha256": digest.hexdigest(),
                "chunked": request.headers.get("Transfer-Encoding", "").lower() == "chunked",
            }
        )

    async def stream(self, request: web.Request) -> web.StreamResponse:
        total = int(request.query.get("bytes", "0"))
        resp = web.StreamResponse()
        resp.content_type = "application/octet-stream"
        if request.query.get("length") == "1":
            resp.content_length = total
        await resp.prepare(request)
        chunk = b"x" * (256 * 1024)
        sent = 0
        while sent < total:
            piece = chunk[: min(len(chunk), total - sent)]
            await resp.write(piece)
            sent += len(piece)
        await resp.write_eof()
        return resp

    async def redirect(self, request: web.Request) -> web.Response:
        return web.Response(
            status=302,
            headers={"Location": f"{self.url}/api/v1/target?x=1", "Content-Location": f"{self.url}/api/v1/here"},
        )

    async def cookies(self, request: web.Request) -> web.Response:
        resp = web.Response(text="ok")
        resp.headers.add("Set-Cookie", "a=1; Path=/")
        resp.headers.add("Set-Cookie", "b=2; Path=/; HttpOnly")
        return resp

    async def gzipped(self, request: web.Request) -> web.Response:
        body = gzip.compress(json.dumps({"hello": "world" * 100}).encode())
        return web.Response(body=body, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})

    async def hop(self, request: web.Request) -> web.Response:
        return web.Response(
            text="hop",
            headers={"Connection": "X-Private", "X-Private": "drop-me", "Keep-Alive": "timeout=5", "X-Kept": "1"},
        )

    async def slow(self, request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("seconds", "1")))
        return web.Response(text="slow done")

    async def broken(self, request: web.Request) -> web.StreamResponse:
        """Promises ``size`` bytes (default 1000) and closes the connection after a tenth of them."""
        size = int(request.query.get("size", "1000"))
        resp = web.StreamResponse()
        resp.content_length = size
        await resp.prepare(request)
        await resp.write(b"x" * (size // 10))
        assert request.transport is not None
        request.transport.close()
        return resp

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.router.add_route("*", "/api/v1/echo{tail:.*}", self.echo)
        app.router.add_get("/api/v1/stream", self.stream)
        app.router.add_get("/api/v1/redirect", self.redirect)
        app.router.add_get("/api/v1/cookies", self.cookies)
        app.router.add_get("/api/v1/gzip", self.gzipped)
        app.router.add_get("/api/v1/hop", self.hop)
        app.router.add_get("/api/v1/slow", self.slow)
        app.router.add_get("/api/v1/broken", self.broken)
        app.router.add_route("*", "/{tail:.*}", self.echo)
        return app


async def serve(app: web.Application, ssl_context: ssl.SSLContext | None) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    host, port = runner.addresses[0][:2]
    scheme = "https" if ssl_context else "http"
    return runner, f"{scheme}://{host}:{port}"


@dataclass
class Backend:
    tokens: TokenServer
    upstream: Upstream
    tls: Tls


@pytest.fixture
async def backend(tls: Tls) -> AsyncIterator[Backend]:
    tokens = TokenServer()
    upstream = Upstream(tokens)
    token_runner, tokens.url = await serve(tokens.app(), tls.server_ctx)
    up_runner, upstream.url = await serve(upstream.app(), tls.server_ctx)
    try:
        yield Backend(tokens, upstream, tls)
    finally:
        await up_runner.cleanup()
        await token_runner.cleanup()


@asynccontextmanager
async def mtls_token_server(backend: Backend, trusted: trustme.CA, seen: list[str]) -> AsyncIterator[str]:
    """An HTTPS token endpoint that requires a client certificate issued under ``trusted``; records the
    certificate's common name in ``seen`` and checks the form like SAP does (client id, no secret)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    backend.tls.ca.issue_cert("127.0.0.1").configure_cert(ctx)
    trusted.configure_trust(ctx)
    ctx.verify_mode = ssl.CERT_REQUIRED
    backend.tokens.auth_mode = "cert"

    async def token(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        peer = request.transport.get_extra_info("peercert")
        seen.append(dict(kv for rdn in peer["subject"] for kv in rdn)["commonName"])
        return await backend.tokens.handle(request)

    app = web.Application()
    app.router.add_post("/oauth/token", token)
    runner, url = await serve(app, ctx)
    try:
        yield url + "/oauth/token"
    finally:
        await runner.cleanup()


@dataclass
class CliResult:
    """What ``python -m proxy …`` printed and returned."""

    returncode: int
    stdout: str
    stderr: str


async def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 20
) -> CliResult:
    """Run the real command line (``python -m proxy ARGS``) without stdin, bounded in time."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env if env is not None else child_env(),
        cwd=cwd,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return CliResult(process.returncode, out.decode(), err.decode())


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def service_key(backend: Backend, **oauth: Any) -> dict[str, Any]:
    """A secret-kind SAP service key for ``backend`` (``oauth`` fields override or, as None, drop a field)."""
    key = {
        "clientid": backend.tokens.client_id,
        "clientsecret": backend.tokens.client_secret,
        "url": backend.upstream.url,
        "tokenurl": backend.tokens.url + "/oauth/token",
    }
    key.update(oauth)
    return {"oauth": {k: v for k, v in key.items() if v is not None}}


def secret_route(backend: Backend, **extra: Any) -> dict[str, Any]:
    route: dict[str, Any] = {
        "name": "api",
        "prefix": "/",
        "upstream": backend.upstream.url,
        "credentials": {
            "token_url": backend.tokens.url + "/oauth/token",
            "client_id": backend.tokens.client_id,
            "client_secret": backend.tokens.client_secret,
        },
    }
    route.update(extra)
    return route


def make_config(tmp_path: Path, backend: Backend, routes: list[dict[str, Any]] | None = None, **top: Any) -> Config:
    data: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "tls": {"ca_bundle": str(backend.tls.ca_path)},
        "routes": routes or [secret_route(backend)],
    }
    data.update(top)
    return load_config(Overrides(config=str(write_yaml(tmp_path / "proxy.yaml", data))), env={})


@dataclass
class RunningProxy:
    server: ProxyServer
    url: str


@asynccontextmanager
async def running_proxy(config: Config) -> AsyncIterator[RunningProxy]:
    server = ProxyServer(prepare(config))
    await server.start()
    try:
        yield RunningProxy(server, f"http://127.0.0.1:{server.port}")
    finally:
        await server.stop()


@pytest.fixture
async def proxy(tmp_path: Path, backend: Backend) -> AsyncIterator[RunningProxy]:
    async with running_proxy(make_config(tmp_path, backend)) as running:
        yield running


# --------------------------------------------------------------------------- a proxy as a subprocess, its memory


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class RssSampler:
    """The peak VmRSS of a process, sampled every 50 ms while the ``with`` block runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.peak = max(self.peak, rss_bytes(self.pid))
            await asyncio.sleep(0.05)

    def __enter__(self) -> RssSampler:
        self.peak = rss_bytes(self.pid)
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        self.peak = max(self.peak, rss_bytes(self.pid))


async def wait_until_healthy(
    process: asyncio.subprocess.Process, port: int, log_path: Path, deadline: float = 15
) -> None:
    """Poll ``/-/healthz`` of a proxy started as a subprocess until it answers 200 (its log on failure)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as probe:
        end = time.monotonic() + deadline
        while True:
            assert process.returncode is None, log_path.read_text()
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with probe.get(f"http://127.0.0.1:{port}/-/healthz") as resp:
                    if resp.status == 200:
                        return
            assert time.monotonic() < end, "proxy did not start: " + log_path.read_text()
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def proxy_subprocess(config: Path, port: int, log_path: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """``python -m proxy run --config FILE``, healthy on ``port``; killed afterwards if still running."""
    with open(log_path, "wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            "run",
            "--config",
            str(config),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            env=child_env(),
        )
    try:
        await wait_until_healthy(process, port, log_path)
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


# --------------------------------------------------------------------------- raw HTTP


def raw_request(
    method: str,
    target: str,
    port: int,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    *,
    version: str = "HTTP/1.1",
) -> bytes:
    """A request head (+ body) byte for byte; Content-Length is added for a body unless framing is given."""
    lines = [f"{method} {target} {version}", f"Host: 127.0.0.1:{port}"]
    lines += [f"{name}: {value}" for name, value in headers]
    names = {name.lower() for name, _ in headers}
    if body and "content-length" not in names and "transfer-encoding" not in names:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
