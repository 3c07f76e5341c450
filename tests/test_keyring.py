"""Service keys in the OS keychain: ``keyring add|list|remove`` and ``--service-key keyring:NAME``, through the real
command line in subprocesses. keyring's file backend (``keyrings.alt.file.PlaintextKeyring``, chosen with
``PYTHON_KEYRING_BACKEND``) stands in for the OS keychain; it lives under a per-test ``XDG_DATA_HOME``, so nothing
touches the real home directory or keychain."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from keyring.backend import KeyringBackend
from keyring.errors import KeyringLocked
from keyrings.alt.file import PlaintextKeyring  # type: ignore[import-untyped]

from proxy.keychain import CHUNK_CHARS, SERVICE, Keychain
from proxy.servicekey import load_service_key_file
from tests.conftest import (
    FIXTURES,
    Backend,
    CliResult,
    child_env,
    free_port,
    mtls_token_server,
    run_cli,
    wait_until_healthy,
    write_yaml,
)
from tests.test_mtls_proxy import Pki, certificate_key

ROOT = Path(__file__).resolve().parent.parent
KEYS = FIXTURES / "service-keys"
PLAINTEXT = "keyrings.alt.file.PlaintextKeyring"
WINDOWS_BLOB_LIMIT = 2560  # CRED_MAX_CREDENTIAL_BLOB_SIZE, bytes of UTF-16


class LockedKeyring(KeyringBackend):
    """A backend that is there but refuses access, like a Secret Service whose collection stays locked."""

    priority = 1

    def get_password(self, service: str, username: str) -> str | None:
        raise KeyringLocked("Failed to unlock the collection!")

    def set_password(self, service: str, username: str, password: str) -> None:
        raise KeyringLocked("Failed to unlock the collection!")

    def delete_password(self, service: str, username: str) -> None:
        raise KeyringLocked("Failed to unlock the collection!")


@pytest.fixture(autouse=True)
def keyring_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """keyring's file backend in this test's tmp dir; ``child_env()`` hands these variables to every subprocess."""
    home = tmp_path / "keyring-home"
    monkeypatch.setenv("XDG_DATA_HOME", str(home / "data"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / "config"))
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", PLAINTEXT)
    return home


async def cli(*args: str, **env: str) -> CliResult:
    return await run_cli(*args, env=child_env(**env), cwd=ROOT)


def oauth_field(path: Path, name: str) -> str:
    value = json.loads(path.read_text())["oauth"][name]
    assert isinstance(value, str)
    return value


def pem_body_lines(pem: str) -> list[str]:
    """The base64 lines of a PEM (what would show if a key leaked into output)."""
    text = pem.replace("\\n", "\n")
    return [line for line in text.splitlines() if line and not line.startswith("-----")]


def assert_one_line_error(result: CliResult, code: int, *fragments: str) -> None:
    assert result.returncode == code, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("odata-auth-proxy: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ------------------------------------------------------------------------------------------- add / list / remove


async def test_add_list_remove_a_secret_key_never_shows_the_secret() -> None:
    key = KEYS / "api-plan-secret.json"
    secret = oauth_field(key, "clientsecret")
    client_id = oauth_field(key, "clientid")
    token_url = oauth_field(key, "tokenurl")

    empty = await cli("keyring", "list")
    assert empty.returncode == 0, empty
    assert "no service keys stored" in empty.stdout

    added = await cli("keyring", "add", "cpi-dev", str(key))
    assert added.returncode == 0, added
    assert 'stored service key "cpi-dev"' in added.stdout
    assert f"you may now delete the downloaded file {key}" in added.stdout
    assert "--service-key keyring:cpi-dev" in added.stdout

    listed = await cli("keyring", "list")
    assert listed.returncode == 0, listed
    header, row = listed.stdout.splitlines()
    assert header.split() == ["NAME", "KIND", "CLIENT", "ID", "TOKEN", "URL"]
    assert row.split() == ["cpi-dev", "secret", client_id, token_url]

    again = await cli("keyring", "add", "cpi-dev", str(key))
    assert again.returncode == 0 and 'replaced service key "cpi-dev"' in again.stdout, again

    removed = await cli("keyring", "remove", "cpi-dev")
    assert removed.returncode == 0, removed
    assert 'removed service key "cpi-dev"' in removed.stdout
    assert "no service keys stored" in (await cli("keyring", "list")).stdout

    for result in (added, listed, again, removed):
        assert secret not in result.stdout + result.stderr
    assert PlaintextKeyring().get_password(SERVICE, "cpi-dev#1") is None  # the parts are gone too


async def test_a_certificate_key_is_stored_in_chunks_under_the_windows_limit_and_comes_back_whole() -> None:
    key_file = KEYS / "api-plan-certificate.json"
    assert len(key_file.read_bytes()) > WINDOWS_BLOB_LIMIT  # too big for one Windows credential
    added = await cli("keyring", "add", "cert", str(key_file))
    assert added.returncode == 0, added

    backend = PlaintextKeyring()
    header = json.loads(backend.get_password(SERVICE, "cert") or "")
    assert header["parts"] >= 3  # ~3 KB of key, re-escaped as ASCII JSON
    for number in range(1, header["parts"] + 1):
        part = backend.get_password(SERVICE, f"cert#{number}")
        assert part is not None and part.isascii()
        assert len(part) <= CHUNK_CHARS and len(part.encode("utf-16-le")) <= WINDOWS_BLOB_LIMIT
    assert len((backend.get_password(SERVICE, "cert") or "").encode("utf-16-le")) <= WINDOWS_BLOB_LIMIT

    stored = Keychain(backend).load("cert")
    original = load_service_key_file(str(key_file))
    assert stored.source == "service key keyring:cert"
    assert (stored.kind, stored.client_id, stored.token_url, stored.upstream_url) == (
        original.kind,
        original.client_id,
        original.token_url,
        original.upstream_url,
    )
    assert stored.certificate is not None and original.certificate is not None and original.key is not None
    assert stored.certificate.text == original.certificate.text
    assert stored.key is not None and stored.key.text == original.key.text

    listed = await cli("keyring", "list")
    assert "cert  certificate" in listed.stdout
    for line in pem_body_lines(oauth_field(key_file, "key")):
        assert line not in listed.stdout + added.stdout

    checked = await cli("check", "--offline", "--no-color", "--service-key", "keyring:cert")
    assert checked.returncode == 0, checked
    assert "service key keyring:cert" in checked.stdout
    assert "[ok]   certificate" in checked.stdout


async def test_a_cut_short_entry_is_reported_not_used() -> None:
    assert (await cli("keyring", "add", "cert", str(KEYS / "api-plan-certificate.json"))).returncode == 0
    PlaintextKeyring().delete_password(SERVICE, "cert#2")
    result = await cli("check", "--offline", "--service-key", "keyring:cert")
    assert_one_line_error(result, 2, 'keychain entry "cert" is incomplete', "keyring add cert")


async def test_external_certificate_key_with_its_private_key(tmp_path: Path) -> None:
    key_file = KEYS / "api-plan-external-certificate.json"
    pem_file = KEYS / "external-client.key.pem"
    added = await cli("keyring", "add", "ext", str(key_file), "--key", str(pem_file))
    assert added.returncode == 0, added
    assert "with its private key" in added.stdout
    assert f"the proxy no longer needs {pem_file}" in added.stdout

    stored = Keychain(PlaintextKeyring()).load("ext")
    assert stored.kind == "external-certificate"
    assert stored.key is not None
    assert stored.key.text == pem_file.read_text() and stored.key.path is None  # in memory, no file

    listed = await cli("keyring", "list")
    assert "certificate (external, key stored)" in listed.stdout
    checked = await cli("check", "--offline", "--no-color", "--service-key", "keyring:ext")
    assert checked.returncode == 0, checked
    assert "CN=my-cpi-api-client" in checked.stdout
    for result in (added, listed, checked):
        for line in pem_body_lines(pem_file.read_text()):
            assert line not in result.stdout + result.stderr

    without = await cli("keyring", "add", "bare", str(key_file))
    assert without.returncode == 0, without
    assert "holds no private key" in without.stdout and "--key" in without.stdout
    assert "certificate (external, no key)" in (await cli("keyring", "list")).stdout
    refused = await cli("check", "--offline", "--service-key", "keyring:bare")
    assert_one_line_error(refused, 2, "service key keyring:bare", "--key FILE")

    stranger = tmp_path / "other.key"
    stranger.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    mismatch = await cli("keyring", "add", "wrong", str(key_file), "--key", str(stranger))
    assert_one_line_error(mismatch, 2, "does not match the certificate")
    for line in pem_body_lines(stranger.read_text()):
        assert line not in mismatch.stderr
    assert "wrong" not in (await cli("keyring", "list")).stdout


async def test_add_refuses_a_broken_key_with_the_parsers_own_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"oauth": {"clientid": "sb-x", "clientsecret": "s", "url": "https://api.example"}}))
    result = await cli("keyring", "add", "broken", str(broken))
    assert_one_line_error(result, 2, f'service key {broken}: missing "oauth.tokenurl"')
    wrong_key = await cli(
        "keyring", "add", "x", str(KEYS / "api-plan-secret.json"), "--key", str(KEYS / "external-client.key.pem")
    )
    assert_one_line_error(wrong_key, 2, "--key is only for an External Certificate key")
    bad_name = await cli("keyring", "add", "my key", str(KEYS / "api-plan-secret.json"))
    assert_one_line_error(bad_name, 2, 'keychain name "my key"')
    assert "no service keys stored" in (await cli("keyring", "list")).stdout


# ------------------------------------------------------------------------------------------- errors


async def test_unknown_name_names_the_stored_ones_for_flag_env_yaml_and_remove(tmp_path: Path) -> None:
    assert (await cli("keyring", "add", "cpi-dev", str(KEYS / "api-plan-secret.json"))).returncode == 0
    assert (await cli("keyring", "add", "cpi-prod", str(KEYS / "xsuaa-secret.json"))).returncode == 0
    expected = ('no service key named "cpi-test"', "stored: cpi-dev, cpi-prod", "keyring add cpi-test")

    flag = await cli("run", "--service-key", "keyring:cpi-test", "--listen", f"127.0.0.1:{free_port()}")
    assert_one_line_error(flag, 2, *expected)
    env = await cli("token", ODATA_AUTH_PROXY_SERVICE_KEY="keyring:cpi-test")
    assert_one_line_error(env, 2, *expected)
    config = write_yaml(
        tmp_path / "proxy.yaml",
        {"routes": [{"name": "api", "prefix": "/", "credentials": {"service_key": "keyring:cpi-test"}}]},
    )
    yaml = await cli("config", "validate", str(config))
    assert_one_line_error(yaml, 2, *expected)
    removed = await cli("keyring", "remove", "cpi-test")
    assert_one_line_error(removed, 2, *expected[:2])


@pytest.mark.parametrize(
    ("backend", "args", "code", "fragment"),
    [
        ("keyring.backends.fail.Keyring", ("keyring", "list"), 1, "no usable OS keychain"),
        ("keyring.backends.fail.Keyring", ("keyring", "add", "k", str(KEYS / "api-plan-secret.json")), 1, "Secret"),
        ("keyring.backends.fail.Keyring", ("token", "--service-key", "keyring:k"), 2, "no usable OS keychain"),
        ("tests.test_keyring.LockedKeyring", ("keyring", "remove", "k"), 1, "refused to read an entry"),
        ("tests.test_keyring.LockedKeyring", ("check", "--offline", "--service-key", "keyring:k"), 2, "unlock it"),
        ("no.such.Backend", ("keyring", "list"), 1, "check PYTHON_KEYRING_BACKEND"),
    ],
)
async def test_no_usable_keychain_is_one_line(backend: str, args: tuple[str, ...], code: int, fragment: str) -> None:
    result = await cli(*args, PYTHON_KEYRING_BACKEND=backend)
    assert_one_line_error(result, code, fragment, "--service-key FILE")


# ------------------------------------------------------------------------------------------- the proxy, end to end


@asynccontextmanager
async def proxy_process(tmp_path: Path, *args: str, **env: str) -> AsyncIterator[str]:
    """``python -m proxy run ARGS --listen 127.0.0.1:PORT``, healthy; its URL. Stopped afterwards."""
    port = free_port()
    log_path = tmp_path / "proxy.log"
    with open(log_path, "wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            "run",
            *args,
            "--listen",
            f"127.0.0.1:{port}",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            env=child_env(**env),
            cwd=ROOT,
        )
    try:
        await wait_until_healthy(process, port, log_path)
        yield f"http://127.0.0.1:{port}"
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()


async def get_echo(url: str) -> dict[str, str]:
    async with aiohttp.ClientSession() as client, client.get(url + "/api/v1/echo") as resp:
        assert resp.status == 200, await resp.text()
        return dict((await resp.json())["headers"])


async def test_proxy_runs_with_a_secret_key_from_the_keychain(tmp_path: Path, backend: Backend) -> None:
    key_file = tmp_path / "cpi-key.json"
    key_file.write_text(
        json.dumps(
            {
                "oauth": {
                    "clientid": backend.tokens.client_id,
                    "clientsecret": backend.tokens.client_secret,
                    "url": backend.upstream.url,
                    "tokenurl": backend.tokens.url + "/oauth/token",
                }
            }
        )
    )
    added = await cli("keyring", "add", "work", str(key_file))
    assert added.returncode == 0, added
    key_file.unlink()  # as the user was told: the file is not needed any more

    async with proxy_process(tmp_path, "--service-key", "keyring:work", "--ca-bundle", str(backend.tls.ca_path)) as url:
        headers = await get_echo(url)
    assert headers["Authorization"].removeprefix("Bearer ") in backend.tokens.issued
    assert backend.tokens.forms[0]["client_secret"] == backend.tokens.client_secret
    log = (tmp_path / "proxy.log").read_text()
    assert backend.tokens.client_secret not in log

    token = await cli(
        "token", ODATA_AUTH_PROXY_SERVICE_KEY="keyring:work", ODATA_AUTH_PROXY_CA_BUNDLE=str(backend.tls.ca_path)
    )
    assert token.returncode == 0, token
    assert token.stdout.strip() in backend.tokens.issued


async def test_reload_does_not_watch_a_keyring_reference_as_a_file(tmp_path: Path) -> None:
    assert (await cli("keyring", "add", "work", str(KEYS / "api-plan-secret.json"))).returncode == 0
    config = write_yaml(
        tmp_path / "proxy.yaml",
        {"routes": [{"name": "api", "prefix": "/", "credentials": {"service_key": "keyring:work"}}]},
    )
    script = (
        "import sys\n"
        "from proxy.config import Overrides, load_config\n"
        "from proxy.watch import watched_files\n"
        "for overrides in (Overrides(service_key='keyring:work'), Overrides(config=sys.argv[1])):\n"
        "    print(watched_files(load_config(overrides, env={})))\n"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=child_env(),
        cwd=ROOT,
    )
    out, err = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0, err.decode()
    assert out.decode().splitlines() == ["[]", f"[{str(config)!r}]"]


async def test_proxy_runs_with_an_external_certificate_key_and_its_private_key_from_the_keychain(
    tmp_path: Path, backend: Backend
) -> None:
    pki = Pki()
    seen: list[str] = []
    async with mtls_token_server(backend, pki.root, seen) as token_url:
        key_file = tmp_path / "ext-key.json"
        key_file.write_text(json.dumps(certificate_key(backend, token_url, pki.chain_pem(), None)))
        private = tmp_path / "client.key"
        private.write_text(pki.key_pem())
        added = await cli("keyring", "add", "ext", str(key_file), "--key", str(private))
        assert added.returncode == 0, added
        key_file.unlink()
        private.unlink()
        config = write_yaml(
            tmp_path / "proxy.yaml",
            {
                "tls": {"ca_bundle": str(backend.tls.ca_path)},
                "routes": [{"name": "cpi", "prefix": "/", "credentials": {"service_key": "keyring:ext"}}],
            },
        )
        async with proxy_process(tmp_path, "--config", str(config)) as url:
            headers = await get_echo(url)
    assert headers["Authorization"].removeprefix("Bearer ") in backend.tokens.issued
    assert seen == ["sb-cert-client"]  # mutual TLS with the certificate and the private key from the keychain
    assert backend.tokens.forms[-1] == {"grant_type": "client_credentials", "client_id": backend.tokens.client_id}
    log = (tmp_path / "proxy.log").read_text()
    for line in pem_body_lines(pki.key_pem()):
        assert line not in log
