"""The container image for real: built with podman from ./Dockerfile by ci/container-image.sh (on a stand-in for
python:3.12-slim made from Debian packages, where no registry is reachable) and run against the test token server
and upstream on 127.0.0.1 (``--network host``, the throwaway CA mounted and named by ODATA_AUTH_PROXY_CA_BUNDLE).

Opt-in: CONTAINER_TESTS=1. The first test builds the image once per session (the script only
checks when an image from the same sources exists); skipped with the reason where podman cannot run.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from tests.conftest import CLIENT_SECRET, Backend, child_env, free_port, mtls_token_server, service_key

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "ci" / "container-image.sh"
IMAGE = "localhost/odata-auth-proxy:ci"  # the script's default tag
OPT_IN = "CONTAINER_TESTS"
API_KEY = "container-inbound-key-0123456789abcdef"
CA_IN_CONTAINER = "/run/odata-auth-proxy/ca.pem"
# what these machines need (../shared/containers.md): runc and cgroupfs, ulimits that need no raising
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
"""

pytestmark = [
    pytest.mark.skipif(
        os.environ.get(OPT_IN) != "1",
        reason=f"container tests are opt-in: {OPT_IN}=1 builds the image with podman (ci/container-image.sh), runs it",
    ),
    # the first test to run builds the image (about a minute from scratch); every podman call has its own bound
    pytest.mark.timeout(900),
]


# --------------------------------------------------------------------------- podman


@dataclass(frozen=True)
class Podman:
    env: dict[str, str]
    image: str

    def run_sync(
        self, *args: str, timeout: float = 60, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["podman", *args],
            env={**self.env, **(env or {})},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    async def run(
        self, *args: str, timeout: float = 60, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        # in a thread: the token server and upstream the container talks to run on this event loop
        return await asyncio.to_thread(self.run_sync, *args, timeout=timeout, env=env)

    async def check(self, *args: str, timeout: float = 60) -> str:
        result = await self.run(*args, timeout=timeout)
        assert result.returncode == 0, f"podman {' '.join(args)}: exit {result.returncode}\n{result.stderr}"
        return result.stdout


@pytest.fixture(scope="session")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    """podman with the settings these machines need, and the image, built by ci/container-image.sh."""
    if shutil.which("podman") is None:
        pytest.skip("podman cannot run here: not installed (Debian: apt-get install podman runc mmdebstrap)")
    env = child_env()
    if "CONTAINERS_CONF" not in os.environ:
        conf = tmp_path_factory.mktemp("podman") / "containers.conf"
        conf.write_text(CONTAINERS_CONF)
        env["CONTAINERS_CONF"] = str(conf)
    info = subprocess.run(["podman", "info"], env=env, capture_output=True, text=True, timeout=60, check=False)
    if info.returncode != 0:
        reason = (info.stderr.strip().splitlines() or [f"exit {info.returncode}"])[-1]
        pytest.skip(f"podman cannot run here: `podman info` failed: {reason}")
    # the script checks whether the image is up to date (a label with the sources' hash) and builds it if not;
    # it gets the whole environment: a build may need the machine's HTTP proxy settings to reach the index
    build = subprocess.run(
        [str(SCRIPT)],
        env={**os.environ, "CONTAINERS_CONF": env["CONTAINERS_CONF"]},
        capture_output=True,
        text=True,
        timeout=840,
        check=False,
    )
    log = build.stdout + build.stderr
    if build.returncode != 0:
        pytest.fail(f"ci/container-image.sh failed with exit {build.returncode}:\n{log[-6000:]}")
    print(log)  # the script's timings and the image size, shown with -s or on a failure
    return Podman(env=env, image=IMAGE)


_names = itertools.count(1)


@dataclass
class Container:
    podman: Podman
    name: str
    port: int

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def logs(self) -> str:
        result = await self.podman.run("logs", self.name)
        return result.stdout + result.stderr

    async def inspect(self, template: str) -> str:
        return (await self.podman.check("inspect", "--format", template, self.name)).strip()


def run_args(podman: Podman, name: str, env: Mapping[str, str], options: list[str], *, detach: bool) -> list[str]:
    """``podman run``: host network (the test servers are on 127.0.0.1), no proxy variables passed in, and the
    variables by name only (``-e NAME``: podman takes the value from its own environment, so no secret is in argv)."""
    args = ["run", "--name", name, "--network", "host", "--http-proxy=false", *options]
    if detach:
        args.insert(1, "-d")
    for key in env:
        args += ["-e", key]
    return [*args, podman.image]


@contextlib.asynccontextmanager
async def container(
    podman: Podman, env: Mapping[str, str], options: list[str] | None = None
) -> AsyncIterator[Container]:
    """The image running with ``env`` (the proxy on 0.0.0.0:<a free port>) until /-/healthz answers 200;
    removed afterwards (killed if still running)."""
    port = free_port()
    env = {"ODATA_AUTH_PROXY_LISTEN": f"0.0.0.0:{port}", **env}
    running = Container(podman, f"oap-test-{os.getpid()}-{next(_names)}", port)
    try:
        started = await podman.run(*run_args(podman, running.name, env, options or [], detach=True), env=env)
        assert started.returncode == 0, started.stderr
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as probe:
            end = time.monotonic() + 30
            while True:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with probe.get(running.base + "/-/healthz") as resp:
                        if resp.status == 200:
                            break
                if time.monotonic() > end or await running.inspect("{{.State.Running}}") != "true":
                    state = await running.inspect("{{.State.Status}} exit {{.State.ExitCode}}")
                    raise AssertionError(f"the container did not get healthy ({state}):\n{await running.logs()}")
                await asyncio.sleep(0.1)
        yield running
    finally:
        await podman.run("rm", "--force", "--time", "0", running.name)


def ca_mount(backend: Backend) -> list[str]:
    return ["-v", f"{backend.tls.ca_path}:{CA_IN_CONTAINER}:ro"]


def key_env(backend: Backend, **extra: str) -> dict[str, str]:
    """Env-only configuration: the service key's JSON itself, the test CA, the inbound API key."""
    return {
        "ODATA_AUTH_PROXY_SERVICE_KEY_JSON": json.dumps(service_key(backend)),
        "ODATA_AUTH_PROXY_CA_BUNDLE": CA_IN_CONTAINER,
        "ODATA_AUTH_PROXY_INBOUND_API_KEY": API_KEY,
        **extra,
    }


def json_records(logs: str, *secrets: str) -> list[dict[str, Any]]:
    """Every line the container wrote is a JSON object (the image's LOG_FORMAT=json), and none carries a secret."""
    records = []
    for line in logs.splitlines():
        if line.strip():
            record = json.loads(line)
            assert isinstance(record, dict), line
            records.append(record)
    assert records, "the container wrote nothing"
    for secret in secrets:
        assert secret and secret not in logs, f"a secret in the container's log: {secret[:6]}…"
    return records


def http(total: float = 10) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=total))


async def get(session: aiohttp.ClientSession, url: str, **kwargs: Any) -> tuple[int, str]:
    async with session.get(url, **kwargs) as resp:
        return resp.status, await resp.text()


def status_ids(pid: int) -> tuple[list[int], list[int]]:
    """Real, effective, saved and filesystem uid and gid of a process, as the host sees them."""
    text = Path(f"/proc/{pid}/status").read_text()
    uids = re.search(r"^Uid:\s+(.*)$", text, re.MULTILINE)
    gids = re.search(r"^Gid:\s+(.*)$", text, re.MULTILINE)
    assert uids and gids, text
    return [int(v) for v in uids[1].split()], [int(v) for v in gids[1].split()]


def listening_on(pid: int, port: int) -> list[str]:
    """The IPv4 addresses with a listening TCP socket on ``port`` in the network namespace of ``pid``."""
    found = []
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, _, hex_port = local.partition(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            found.append(".".join(str(b) for b in reversed(bytes.fromhex(address))))
    return found


# --------------------------------------------------------------------------- the image


async def test_image_is_small_runs_as_an_existing_non_root_user_and_keeps_the_healthcheck(podman: Podman) -> None:
    raw = await podman.check("image", "inspect", podman.image)
    image = json.loads(raw)[0]
    config = image["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["odata-auth-proxy", "run"]
    assert "8080/tcp" in config["ExposedPorts"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["ODATA_AUTH_PROXY_LISTEN"] == "0.0.0.0:8080" and env["ODATA_AUTH_PROXY_LOG_FORMAT"] == "json"
    health = image.get("Healthcheck") or config.get("Healthcheck")  # kept by --format docker (OCI drops it)
    assert health and health["Test"][:3] == ["CMD", "python", "-c"], health
    assert health["Interval"] == 30 * 10**9 and health["Timeout"] == 5 * 10**9

    # uid 10001 and gid 10001 both have a name; nothing of the build stage (sources, wheels) is in the image
    probe = await podman.run(
        "run", "--rm", "--network", "none", "--entrypoint", "sh", podman.image, "-c",
        "id -u; id -g; id -un; id -gn; getent group 10001; test ! -e /src && test ! -e /wheels && echo clean; "
        "python -c 'import proxy; print(proxy.__file__)'",
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    lines = probe.stdout.split()
    assert lines[:4] == ["10001", "10001", "odata-auth-proxy", "odata-auth-proxy"], probe.stdout
    assert lines[4].startswith("odata-auth-proxy:x:10001:") and lines[5] == "clean", probe.stdout
    assert "/dist-packages/proxy/" in lines[6] or "/site-packages/proxy/" in lines[6], lines[6]

    # small: what the project adds to its base (the wheels installed, with their .pyc) stays well under 80 MB
    base = config["Labels"]["odata-auth-proxy.base"]
    base_size = json.loads(await podman.check("image", "inspect", base))[0]["Size"]
    added = image["Size"] - base_size
    print(f"image {podman.image}: {image['Size'] / 1e6:.0f} MB, base {base}: {base_size / 1e6:.0f} MB")
    assert 0 < added < 80e6, f"the project adds {added / 1e6:.0f} MB to its base"


# --------------------------------------------------------------------------- env-only start, 0.0.0.0, API key


async def test_env_only_start_on_all_interfaces_needs_the_api_key(podman: Podman, backend: Backend) -> None:
    # the image's 0.0.0.0 without an inbound API key: refused with exit code 2 and the reason
    env = key_env(backend)
    del env["ODATA_AUTH_PROXY_INBOUND_API_KEY"]
    name = f"oap-test-{os.getpid()}-{next(_names)}"
    try:
        refused = await podman.run(
            *run_args(podman, name, env, ["--rm", *ca_mount(backend)], detach=False), env=env, timeout=60
        )
    finally:
        await podman.run("rm", "--force", "--time", "0", name)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "Refusing to listen on 0.0.0.0" in refused.stdout + refused.stderr
    assert "ODATA_AUTH_PROXY_INBOUND_API_KEY" in refused.stdout + refused.stderr

    async with container(podman, key_env(backend), ca_mount(backend)) as running, http() as session:
        url = running.base + "/api/v1/echo/container"
        status, body = await get(session, url)
        assert status == 401 and json.loads(body)["error"] == "proxy_auth_required", body
        assert not backend.upstream.requests, "a request without the key reached the upstream"
        status, body = await get(session, url, headers={"X-Proxy-Api-Key": API_KEY})
        assert status == 200, body
        headers = {k.lower(): v for k, v in json.loads(body)["headers"]}
        assert "x-proxy-api-key" not in headers
        assert headers["authorization"].removeprefix("Bearer ") in backend.tokens.issued

        # PID 1 is the proxy, running as uid and gid 10001 (the host's view: no user namespace here)
        pid = int(await running.inspect("{{.State.Pid}}"))
        uids, gids = status_ids(pid)
        assert set(uids) == {10001} and set(gids) == {10001}, (uids, gids)
        assert "odata-auth-proxy" in Path(f"/proc/{pid}/cmdline").read_bytes().decode()
        assert listening_on(pid, running.port) == ["0.0.0.0"]  # all interfaces, as the image says
        logs = await running.logs()

    records = json_records(logs, CLIENT_SECRET, API_KEY, *backend.tokens.issued)
    start = next(r for r in records if r.get("event") == "start")
    assert start["listen"] == f"http://127.0.0.1:{running.port}", start  # the banner names a usable address
    # the build stage had a C compiler: the image runs the request path compiled (mypyc), not the slow fallback
    assert start["request_path"] == "compiled", start
    assert any(r.get("event") == "route" and r.get("upstream", "").startswith(backend.upstream.url) for r in records)


# --------------------------------------------------------------------------- read-only root, certificate key


async def test_read_only_root_filesystem_with_a_certificate_service_key(
    podman: Podman, backend: Backend, tmp_path: Path
) -> None:
    root = trustme.CA(organization_name="Fake SAP Root CA")
    leaf = root.create_child_ca().issue_cert("client.example.invalid", common_name="sb-cert-client")
    chain = "".join(p.bytes().decode() for p in leaf.cert_chain_pems) + root.cert_pem.bytes().decode()
    private_key = leaf.private_key_pem.bytes().decode()
    seen: list[str] = []
    async with mtls_token_server(backend, root, seen) as token_url:
        key_file = tmp_path / "service-key.json"
        key_file.write_text(
            json.dumps(
                {
                    "oauth": {
                        "clientid": backend.tokens.client_id,
                        "certificate": chain,
                        "key": private_key,
                        "url": backend.upstream.url,
                        "tokenurl": token_url,
                    }
                }
            )
        )
        key_file.chmod(0o644)  # readable by uid 10001, as the README asks of a mounted key
        env = {
            "ODATA_AUTH_PROXY_SERVICE_KEY": "/run/secrets/service-key.json",
            "ODATA_AUTH_PROXY_CA_BUNDLE": CA_IN_CONTAINER,
            "ODATA_AUTH_PROXY_INBOUND_API_KEY": API_KEY,
        }
        options = [
            *ca_mount(backend),
            "-v", f"{key_file}:/run/secrets/service-key.json:ro",
            # read-only like Kubernetes' readOnlyRootFilesystem: not even podman's tmpfs on /tmp and /run
            "--read-only", "--read-only-tmpfs=false",
            "--cap-drop", "all", "--security-opt", "no-new-privileges",
        ]  # fmt: skip
        async with container(podman, env, options) as running, http() as session:
            status, body = await get(session, running.base + "/api/v1/echo/cert", headers={"X-Proxy-Api-Key": API_KEY})
            assert status == 200, body
            assert seen == ["sb-cert-client"]  # the token came by mutual TLS with the key's certificate
            assert await running.inspect("{{.HostConfig.ReadonlyRootfs}}") == "true"
            for path in ("/probe", "/tmp/probe", "/run/probe"):
                touched = await podman.run("exec", running.name, "touch", path)
                assert touched.returncode != 0 and "Read-only file system" in touched.stderr, (path, touched)
            logs = await running.logs()

    key_lines = [line for line in private_key.splitlines() if "-----" not in line and len(line) > 20]
    records = json_records(logs, API_KEY, *backend.tokens.issued, *key_lines)
    assert any("certificate" in r.get("auth", "") or "certificate" in r["message"] for r in records), records


# --------------------------------------------------------------------------- HEALTHCHECK


async def test_the_images_healthcheck_passes_in_the_running_container(podman: Podman, backend: Backend) -> None:
    async with container(podman, key_env(backend), ca_mount(backend)) as running:
        check = await podman.run("healthcheck", "run", running.name, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
        assert await running.inspect("{{.State.Health.Status}}") == "healthy"
        # the command the image names, no curl: Python's urllib on /-/healthz
        test = json.loads(await running.inspect("{{json .Config.Healthcheck.Test}}"))
        assert test[:3] == ["CMD", "python", "-c"] and "/-/healthz" in test[3]
        logs = await running.logs()
    json_records(logs, CLIENT_SECRET, API_KEY, *backend.tokens.issued)


# --------------------------------------------------------------------------- podman stop drains


async def test_podman_stop_drains_an_in_flight_request_and_exits_0(podman: Podman, backend: Backend) -> None:
    async with container(podman, key_env(backend), ca_mount(backend)) as running, http(total=30) as session:
        slow = asyncio.create_task(
            get(session, running.base + "/api/v1/slow?seconds=3", headers={"X-Proxy-Api-Key": API_KEY})
        )
        end = time.monotonic() + 10
        while not any(r["raw_path"].startswith("/api/v1/slow") for r in backend.upstream.requests):
            assert time.monotonic() < end and not slow.done(), "the slow request did not reach the upstream"
            await asyncio.sleep(0.02)
        started = time.monotonic()
        stop = await podman.run("stop", "--time", "35", running.name, timeout=60)  # SIGTERM, SIGKILL after 35 s
        took = time.monotonic() - started
        assert stop.returncode == 0, stop.stderr
        assert await slow == (200, "slow done")
        assert 1 < took < 30, f"podman stop took {took:.1f} s"  # waited for the request, was no SIGKILL
        assert await running.inspect("{{.State.ExitCode}}") == "0"
        logs = await running.logs()

    records = json_records(logs, CLIENT_SECRET, API_KEY, *backend.tokens.issued)
    messages = [r["message"] for r in records]
    assert any(m.startswith("SIGTERM received: draining") for m in messages), messages
    assert messages[-1] == "stopped", messages
    assert any("/api/v1/slow" in m and " 200 " in m for m in messages), messages
