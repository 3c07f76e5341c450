"""``odata-auth-proxy check``: a checklist against real HTTPS servers on 127.0.0.1 (and ``.invalid`` names, which
resolve nothing), exit codes, and never a secret or token in the output."""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from proxy.config import Config, ConfigError, Overrides, Route, load_config
from proxy.doctor import check_probe, cmd_check, probe_url, run_checks
from proxy.redact import fingerprint
from tests.conftest import Backend, free_port, make_config, mtls_token_server, secret_route, serve, write_yaml

FAST = {"connect": 3, "token": 5}


async def check(config: Config, **kwargs: Any) -> tuple[bool, str]:
    out = io.StringIO()
    passed = await run_checks(config, out=out, **kwargs)
    return passed, out.getvalue()


def line_of(output: str, mark: str, step: str) -> str:
    """The checklist line for ``step`` with ``mark`` (e.g. "[FAIL]", "dns"), or fail the test."""
    for line in output.splitlines():
        if line.strip().startswith(mark) and line.split(maxsplit=2)[1:2] == [step]:
            return line
    raise AssertionError(f"no {mark} {step} line in:\n{output}")


def steps(output: str) -> list[str]:
    """The step names of the checklist lines, in order."""
    return [line.split()[1] for line in output.splitlines() if line.startswith("  [")]


# --------------------------------------------------------------------------------------------- secrets


async def test_good_secret_config_passes_without_showing_secret_or_token(tmp_path: Path, backend: Backend) -> None:
    config = make_config(tmp_path, backend, timeouts=FAST)
    passed, output = await check(config)
    assert passed, output
    token = backend.tokens.issued[-1]
    assert line_of(output, "[ok]", "config")
    assert "127.0.0.1 -> 127.0.0.1" in line_of(output, "[ok]", "dns")
    assert "TLSv1." in line_of(output, "[ok]", "tls")
    token_line = line_of(output, "[ok]", "token")
    assert f"fp {fingerprint(token)}" in token_line
    assert "expires in 3600 s" in token_line and "scopes: WorkspacePackagesRead" in token_line
    assert f"GET {backend.upstream.url}/api/v1/ -> 200 in " in line_of(output, "[ok]", "upstream")
    assert backend.upstream.requests[-1]["raw_path"] == "/api/v1/"
    assert output.rstrip().endswith("all checks passed")
    assert backend.tokens.client_secret not in output
    assert token not in output and token.split(".")[1] not in output
    assert output.isascii()


async def test_colour_marks(tmp_path: Path, backend: Backend) -> None:
    passed, output = await check(make_config(tmp_path, backend, timeouts=FAST), color=True)
    assert passed
    assert "\x1b[32m✓\x1b[0m token" in output and " → 200 in " in output


def test_colour_only_on_a_capable_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy.doctor import _color_wanted

    class Terminal(io.StringIO):
        def __init__(self, encoding: str) -> None:
            super().__init__()
            self._encoding = encoding

        @property
        def encoding(self) -> str:  # type: ignore[override]
            return self._encoding

        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    assert _color_wanted(Terminal("utf-8"))
    assert not _color_wanted(Terminal("ascii"))  # no ✓ on an ASCII console
    assert not _color_wanted(io.StringIO())  # a pipe or file
    monkeypatch.setenv("NO_COLOR", "1")
    assert not _color_wanted(Terminal("utf-8"))


async def test_bad_secret_shows_invalid_client_in_the_servers_words(tmp_path: Path, backend: Backend) -> None:
    config = make_config(tmp_path, backend, timeouts=FAST)
    backend.tokens.client_secret = "the-server-expects-another-secret"
    passed, output = await check(config)
    assert not passed
    failed = line_of(output, "[FAIL]", "token")
    assert "HTTP 401" in failed and "invalid_client" in failed and "Bad credentials" in failed
    assert "check the client id and secret" in failed
    assert "skipped (no token)" in line_of(output, "[skip]", "upstream")
    assert output.rstrip().endswith("1 check failed: api token (the token server answered and refused the credentials)")
    assert secret_route(backend)["credentials"]["client_secret"] not in output


async def test_dead_token_port_names_host_and_port(tmp_path: Path, backend: Backend) -> None:
    port = free_port()
    route = secret_route(backend)
    route["credentials"]["token_url"] = f"https://127.0.0.1:{port}/oauth/token"
    passed, output = await check(make_config(tmp_path, backend, [route], timeouts=FAST))
    assert not passed
    assert line_of(output, "[ok]", "dns")
    failed = line_of(output, "[FAIL]", "tls")
    assert f"cannot connect to 127.0.0.1:{port}" in failed and "connection refused" in failed
    assert line_of(output, "[skip]", "token") and line_of(output, "[skip]", "upstream")
    # not the same story as refused credentials: the summary says which it is
    assert output.rstrip().endswith("1 check failed: api tls (the token server could not be reached)")


async def test_unresolvable_token_host(tmp_path: Path, backend: Backend) -> None:
    route = secret_route(backend)
    route["credentials"]["token_url"] = "https://token.example.invalid/oauth/token"
    passed, output = await check(make_config(tmp_path, backend, [route], timeouts=FAST))
    assert not passed
    assert "cannot resolve the token host token.example.invalid" in line_of(output, "[FAIL]", "dns")
    for step in ("tls", "token", "upstream"):
        assert "skipped (" in line_of(output, "[skip]", step)


async def test_untrusted_server_certificate_hints_ca_bundle(tmp_path: Path, backend: Backend) -> None:
    config = make_config(tmp_path, backend, tls={}, timeouts=FAST)  # no ca_bundle: the test CA is unknown
    passed, output = await check(config)
    assert not passed
    assert "certificate verify failed" in line_of(output, "[FAIL]", "tls")
    assert "--ca-bundle FILE" in output
    assert backend.tokens.requests == 0


async def test_upstream_rejecting_the_token_hints_roles(
    tmp_path: Path, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backend.upstream, "_authorized", lambda request: False)
    passed, output = await check(
        make_config(tmp_path, backend, timeouts=FAST), probe="/api/v1/IntegrationPackages?$top=1"
    )
    assert not passed
    failed = line_of(output, "[FAIL]", "upstream")
    assert f"GET {backend.upstream.url}/api/v1/IntegrationPackages?$top=1 -> 401" in failed
    assert "role collection / roles assigned to the service instance" in output
    assert "WWW-Authenticate: Bearer" in output
    assert backend.upstream.requests[-1]["raw_path"] == "/api/v1/IntegrationPackages?$top=1"
    assert backend.tokens.issued[-1] not in output


async def test_plain_http_token_server(tmp_path: Path, backend: Backend) -> None:
    runner, url = await serve(backend.tokens.app(), None)
    try:
        plain = secret_route(backend, name="plain")
        plain["credentials"]["token_url"] = url + "/oauth/token"
        wrong = secret_route(backend, name="wrong", prefix="/wrong/")
        wrong["credentials"]["token_url"] = url.replace("http://", "https://") + "/oauth/token"
        passed, output = await check(make_config(tmp_path, backend, [plain, wrong], timeouts=FAST))
    finally:
        await runner.cleanup()
    assert not passed
    host_port = url.removeprefix("http://")
    assert f"connected to {host_port} (plain HTTP, no TLS)" in line_of(output, "[ok]", "tcp")
    assert f"TLS handshake with {host_port} failed" in line_of(output, "[FAIL]", "tls")
    assert "should the URL be http://" in output
    assert output.rstrip().endswith("1 check failed: wrong tls")


async def test_slow_servers_time_out_instead_of_hanging(tmp_path: Path, backend: Backend) -> None:
    config = make_config(tmp_path, backend, timeouts={"connect": 0.5, "token": 1})
    backend.tokens.fail = "hang"
    started = time.perf_counter()
    passed, output = await check(config)
    assert not passed
    assert "did not answer within 1 s" in line_of(output, "[FAIL]", "token")
    backend.tokens.fail = None
    passed, output = await check(config, probe="/api/v1/slow?seconds=5")
    assert not passed
    assert "/api/v1/slow?seconds=5: no answer within 1.5 s" in line_of(output, "[FAIL]", "upstream")
    assert time.perf_counter() - started < 4


async def test_offline_needs_no_servers(tmp_path: Path) -> None:
    port = free_port()
    data = {
        "routes": [
            {
                "name": "api",
                "upstream": f"https://127.0.0.1:{port}",
                "credentials": {
                    "token_url": "https://token.example.invalid/oauth/token",
                    "client_id": "sb-offline",
                    "client_secret": "offline-secret-value",
                },
            }
        ]
    }
    config = load_config(Overrides(config=str(write_yaml(tmp_path / "p.yaml", data))), env={})
    passed, output = await check(config, offline=True)
    assert passed, output
    assert line_of(output, "[ok]", "config")
    assert steps(output) == ["config"]
    assert "all offline checks passed" in output
    assert "offline-secret-value" not in output


async def test_offline_sample_certificate_key_and_the_cert_host_warning(tmp_path: Path) -> None:
    key = Path(__file__).parent / "fixtures" / "service-keys" / "api-plan-certificate.json"
    passed, output = await check(load_config(Overrides(service_key=str(key)), env={}), offline=True)
    assert passed, output
    assert steps(output) == ["config", "certificate"]  # SAP-generated: full chain, authentication.cert. host
    assert "chain 3: " in output and "days left" in output
    plain_host = "https://mysubaccount.authentication.eu10.hana.ondemand.com/oauth/token"
    data = {"routes": [{"name": "cert", "credentials": {"service_key": str(key), "token_url": plain_host}}]}
    config = load_config(Overrides(config=str(write_yaml(tmp_path / "p.yaml", data))), env={})
    passed, output = await check(config, offline=True)
    assert passed  # a warning, not a failure
    warning = line_of(output, "[warn]", "config")
    assert "a certificate key must use the authentication.cert. host" in warning
    assert "mysubaccount.authentication.eu10.hana.ondemand.com" in warning


def test_cmd_check_offline_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = Path(__file__).parent / "fixtures" / "service-keys" / "api-plan-secret.json"
    args = argparse.Namespace(route=None, probe=None, offline=True, no_color=False)
    assert cmd_check(args, Overrides(service_key=str(key))) == 0
    output = capsys.readouterr().out
    assert output.startswith(f"route default  (service key {key}, client id ")
    assert "[ok]   config" in output  # not a TTY: plain ASCII even without --no-color


async def test_route_selection_and_probe_validation(tmp_path: Path, backend: Backend) -> None:
    second = secret_route(backend, name="second", prefix="/second/")
    second["credentials"]["token_url"] = "https://token.example.invalid/oauth/token"
    config = make_config(tmp_path, backend, [secret_route(backend), second], timeouts=FAST)
    passed, output = await check(config, route="api")
    assert passed and "route second" not in output
    passed, output = await check(config)
    assert not passed and "route api" in output and "route second" in output
    assert output.rstrip().endswith("1 check failed: second dns")
    with pytest.raises(ConfigError, match="no such route"):
        await check(config, route="nope")
    with pytest.raises(ConfigError, match="--probe"):
        await check(config, probe="https://elsewhere.example.invalid/")


def test_probe_url() -> None:
    def route(upstream: str) -> Route:
        return Route(name="r", prefix="/", upstream=upstream, credentials=None)  # type: ignore[arg-type]

    assert probe_url(route("https://tenant.example.invalid/"), None) == "https://tenant.example.invalid/api/v1/"
    assert probe_url(route("https://h.example.invalid/odata/v2/"), None) == "https://h.example.invalid/odata/v2/"
    assert probe_url(route("https://h.example.invalid/base/"), "/api/v1/X?$top=1") == (
        "https://h.example.invalid/base/api/v1/X?$top=1"
    )
    check_probe("/api/v1/")
    with pytest.raises(ConfigError):
        check_probe("//evil.example.invalid/x")


# ------------------------------------------------------------------------------------ client certificates


@dataclass(frozen=True)
class Pki:
    root: trustme.CA
    leaf: trustme.LeafCert
    other_leaf: trustme.LeafCert

    def chain_pem(self, *, with_root: bool = True) -> str:
        pems = [p.bytes().decode() for p in self.leaf.cert_chain_pems]
        return "".join(pems) + (self.root.cert_pem.bytes().decode() if with_root else "")


@pytest.fixture(scope="module")
def pki() -> Pki:
    root = trustme.CA(organization_name="Doctor Test Root CA")
    intermediate = root.create_child_ca()
    leaf = intermediate.issue_cert("client.example.invalid", common_name="test-client")
    other = intermediate.issue_cert("other.example.invalid", common_name="other-client")
    return Pki(root, leaf, other)


def cert_route(backend: Backend, tmp_path: Path, token_url: str, cert_pem: str, key_pem: str) -> dict[str, Any]:
    cert_file, key_file = tmp_path / "client.pem", tmp_path / "client.key"
    cert_file.write_text(cert_pem)
    key_file.write_text(key_pem)
    key_file.chmod(0o600)
    return {
        "name": "cert",
        "upstream": backend.upstream.url,
        "credentials": {
            "token_url": token_url,
            "client_id": backend.tokens.client_id,
            "certificate": str(cert_file),
            "key": str(key_file),
        },
    }


async def test_certificate_route_passes_and_shows_the_certificate(tmp_path: Path, backend: Backend, pki: Pki) -> None:
    seen: list[str] = []
    async with mtls_token_server(backend, pki.root, seen) as token_url:
        key = pki.leaf.private_key_pem.bytes().decode()
        route = cert_route(backend, tmp_path, token_url, pki.chain_pem(), key)
        passed, output = await check(make_config(tmp_path, backend, [route], timeouts=FAST))
    assert passed, output
    assert seen == ["test-client"]
    cert_line = line_of(output, "[ok]", "certificate")
    assert "CN=test-client" in cert_line and "issued by " in cert_line
    assert f"notAfter {pki_leaf_not_after(pki)}" in cert_line and "days left" in cert_line
    assert "chain 1: subject=CN=test-client," in output
    assert "chain 3: subject=" in output and "O=Doctor Test Root CA, issuer=" in output
    assert steps(output) == ["config", "certificate", "dns", "tls", "token", "upstream"]
    assert "[warn]" not in output  # the full chain, up to the self-signed root
    assert line_of(output, "[ok]", "tls") and line_of(output, "[ok]", "upstream")
    assert "client certificate" in output.splitlines()[0]
    assert "PRIVATE KEY" not in output and key.splitlines()[1] not in output


def pki_leaf_not_after(pki: Pki) -> str:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(pki.leaf.cert_chain_pems[0].bytes())
    return f"{cert.not_valid_after_utc:%Y-%m-%d}"


async def test_chain_below_root_is_a_warning_not_a_failure(tmp_path: Path, backend: Backend, pki: Pki) -> None:
    seen: list[str] = []
    async with mtls_token_server(backend, pki.root, seen) as token_url:
        key = pki.leaf.private_key_pem.bytes().decode()
        route = cert_route(backend, tmp_path, token_url, pki.chain_pem(with_root=False), key)
        passed, output = await check(make_config(tmp_path, backend, [route], timeouts=FAST))
    assert passed, output
    assert "below its root" in line_of(output, "[warn]", "certificate")
    assert output.rstrip().endswith("all checks passed (1 warning)")


async def test_client_certificate_refused_by_the_token_server(tmp_path: Path, backend: Backend, pki: Pki) -> None:
    seen: list[str] = []
    async with mtls_token_server(backend, backend.tls.ca, seen) as token_url:  # trusts another CA
        key = pki.leaf.private_key_pem.bytes().decode()
        route = cert_route(backend, tmp_path, token_url, pki.chain_pem(), key)
        passed, output = await check(make_config(tmp_path, backend, [route], timeouts=FAST))
    assert not passed
    assert seen == [] and backend.tokens.requests == 0
    # the TLS 1.3 handshake completes on the client side; the refusal shows on the first read
    assert "it may have refused the client certificate" in line_of(output, "[warn]", "tls")
    assert line_of(output, "[FAIL]", "token")
    assert "the token server probably refused the client certificate" in output


async def test_mismatched_key_fails_the_certificate_step_and_raises(tmp_path: Path, backend: Backend, pki: Pki) -> None:
    wrong_key = pki.other_leaf.private_key_pem.bytes().decode()
    route = cert_route(backend, tmp_path, backend.tokens.url + "/oauth/token", pki.chain_pem(), wrong_key)
    config = make_config(tmp_path, backend, [route], timeouts=FAST)
    out = io.StringIO()
    with pytest.raises(ConfigError, match=r"^route cert: the private key \(.*\) does not match the certificate"):
        await run_checks(config, out=out)
    output = out.getvalue()
    assert "does not match the certificate" in line_of(output, "[FAIL]", "certificate")
    for step in ("dns", "tls", "token", "upstream"):
        assert "skipped (the certificate cannot be used)" in line_of(output, "[skip]", step)
    assert output.rstrip().endswith("1 check failed: cert certificate")
    assert backend.tokens.requests == 0
    with pytest.raises(ConfigError, match="does not match"):
        await check(config, offline=True)


# ------------------------------------------------------------------------------------ through a proxy


async def test_through_an_outbound_connect_proxy(tmp_path: Path, backend: Backend) -> None:
    tunnels: list[str] = []

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
        assert method == "CONNECT"
        tunnels.append(target)
        host, _, port = target.rpartition(":")
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    proxy_port = server.sockets[0].getsockname()[1]
    try:
        config = make_config(tmp_path, backend, timeouts=FAST, outbound_proxy=f"http://127.0.0.1:{proxy_port}")
        passed, output = await check(config)
    finally:
        server.close()
    assert passed, output
    token_target = backend.tokens.url.removeprefix("https://")
    assert f"outbound proxy http://127.0.0.1:{proxy_port}" in line_of(output, "[ok]", "dns")
    assert f"with {token_target} via http://127.0.0.1:{proxy_port}" in line_of(output, "[ok]", "tls")
    assert tunnels.count(token_target) == 2  # the tls step and the token request
    assert backend.upstream.url.removeprefix("https://") in tunnels


# ------------------------------------------------------------------------------------ the real command


async def test_cli_subprocess_exit_codes(tmp_path: Path, backend: Backend, pki: Pki) -> None:
    data = {"tls": {"ca_bundle": str(backend.tls.ca_path)}, "timeouts": FAST, "routes": [secret_route(backend)]}
    path = write_yaml(tmp_path / "proxy.yaml", data)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ODATA_AUTH_PROXY_")}

    async def run(config: Path) -> tuple[int, str, str]:
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "proxy", "check", "--config", str(config), "--no-color"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode is not None
        return process.returncode, stdout.decode(), stderr.decode()

    code, output, errors = await run(path)
    assert code == 0, output + errors
    assert "[ok]   upstream" in output and "all checks passed" in output
    backend.tokens.fail = "invalid_client"
    code, output, errors = await run(path)
    assert code == 1, output + errors
    assert "invalid_client" in line_of(output, "[FAIL]", "token") and errors == ""
    assert backend.tokens.client_secret not in output
    wrong_key = pki.other_leaf.private_key_pem.bytes().decode()
    route = cert_route(backend, tmp_path, backend.tokens.url + "/oauth/token", pki.chain_pem(), wrong_key)
    code, output, errors = await run(write_yaml(tmp_path / "cert.yaml", {**data, "routes": [route]}))
    assert code == 2, output + errors
    assert line_of(output, "[FAIL]", "certificate")
    assert errors.startswith("odata-auth-proxy: error: route cert: the private key (")
