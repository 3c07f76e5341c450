"""docker-compose.example.yml for real, with podman-compose (PyPI) on the image ci/container-image.sh builds.

Every packet of this test stays on loopback (127.0.0.0/8): the test servers listen on 127.0.0.1, both services run
with the host's network (``network_mode: host``) and the example's service name resolves to 127.0.0.1. A local
variant of the example is derived at test time, everything else kept as the example has it (the compose secret with
the service key, the API key from ``.env``, the allowed host, read-only root, no capabilities, no-new-privileges, the
restart policy, stop_grace_period, the depends_on, the example's URL with its ``$$`` escapes, legacy-app calling the
proxy by its service name):

- images: the project image built by ci/container-image.sh instead of ``build: .``; for ``legacy-app`` (the
  example's curlimages/curl cannot be pulled here) the local stand-in base image with a small Python script that
  calls the proxy by its service name, like the example's curl loop, and prints the statuses it got;
- the service key points at the test's token server and upstream on 127.0.0.1 (conftest's ``backend``), whose
  throwaway CA is mounted and named by ODATA_AUTH_PROXY_CA_BUNDLE;
- the network: ``network_mode: host`` for both services instead of the compose network (a container on a bridge
  network gets a private 10.x/172.x address, and it could only reach the host's 127.0.0.1 through something on the
  bridge's gateway address). With the host's network the proxy reaches the test servers on 127.0.0.1 directly, and
  legacy-app finds ``odata-proxy`` through ``extra_hosts: ["odata-proxy:127.0.0.1"]`` (an entry in its
  /etc/hosts) instead of the compose network's DNS. The Host header stays ``odata-proxy:<port>``, so the example's
  ODATA_AUTH_PROXY_ALLOWED_HOSTS is still what lets the request in;
- the port: the proxy listens on the image's 0.0.0.0 (still only allowed with the example's inbound API key) but on a
  free port instead of 8080, which on the host's network would be shared with everything else on this machine;
  the example's URL gets the same port.

The token server and the upstream record the peer address of every request they get, and the proxy's access log
names the client of every request: all of them must be on 127.0.0.0/8.

Opt-in exactly like tests/test_container.py (its ``OPT_IN`` variable set to 1; its ``podman`` fixture builds the
image once per session). Skipped with the reason where podman or podman-compose cannot run.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from tests import test_container
from tests.conftest import BIN, CLIENT_SECRET, Backend, child_env, free_port, service_key
from tests.test_container import CA_IN_CONTAINER, OPT_IN, Podman, json_records

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "docker-compose.example.yml"
API_KEY = "compose-inbound-key-0123456789abcdef"
PROXY_ADDRESS = "127.0.0.1"  # what the service name odata-proxy resolves to in legacy-app (extra_hosts)
FOREIGN_HOST = "rebinding.example"  # a Host name that is not in ODATA_AUTH_PROXY_ALLOWED_HOSTS (and not loopback)
PROXY_VARIABLES = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}

pytestmark = [
    pytest.mark.skipif(
        os.environ.get(OPT_IN) != "1",
        reason=f"container tests are opt-in: {OPT_IN}=1 builds the image with podman (ci/container-image.sh), runs "
        "docker-compose.example.yml with podman-compose",
    ),
    # the image may have to be built first (tests/test_container.py's fixture); every podman call has its own bound
    pytest.mark.timeout(900),
]

podman = test_container.podman  # the session fixture: podman with this machine's settings, and the image

# legacy-app's stand-in: the example's request (its URL and API key header, by the service name) until the proxy
# answers it, then what the guard settings must refuse; one JSON line per request. No dollar sign in here: compose would
# interpolate it (the URL comes in through APP_URL, escaped exactly like in the example).
APP_SCRIPT = """\
import json, os, socket, time, urllib.error, urllib.parse, urllib.request

url = os.environ["APP_URL"]
key = os.environ["PROXY_API_KEY"]
foreign = os.environ["FOREIGN_HOST"]


def call(target, headers):
    request = urllib.request.Request(target, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read(400).decode("utf-8", "replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read(400).decode("utf-8", "replace")
    except OSError as error:
        return 0, repr(error)


def report(check, answer, **extra):
    print(json.dumps({"check": check, "status": answer[0], "body": answer[1], **extra}), flush=True)


deadline = time.monotonic() + 45
attempts = 0
while True:
    attempts += 1
    answer = call(url, {"X-Proxy-Api-Key": key})
    # not up yet (no depends_on condition with podman-compose on podman < 4.6), or no token yet: try again
    if answer[0] not in (0, 502, 503) or time.monotonic() > deadline:
        break
    time.sleep(0.3)
report("service-name-with-key", answer, url=url, attempts=attempts)
report("without-key", call(url, {}))
report("wrong-key", call(url, {"X-Proxy-Api-Key": "not-" + key}))
# the same address, under a name that is not allowed (what a DNS-rebinding page would send)
port = urllib.parse.urlsplit(url).port
report("foreign-host-with-key", call(url, {"X-Proxy-Api-Key": key, "Host": foreign + ":" + str(port)}))
report("healthz-without-key", call(url.split("/api/", 1)[0] + "/-/healthz", {}))
print(json.dumps({"done": socket.gethostbyname("odata-proxy")}), flush=True)
"""


# --------------------------------------------------------------------------- podman-compose


@dataclass(frozen=True)
class Compose:
    command: list[str]
    version: str


@pytest.fixture(scope="session")
def compose_tool() -> Compose:
    """podman-compose from this venv (pip install podman-compose) or PATH, and its version."""
    found = shutil.which("podman-compose", path=str(BIN)) or shutil.which("podman-compose")
    if found is None:
        pytest.skip("podman-compose is not installed: pip install podman-compose")
    result = subprocess.run(
        [found, "--version"], env=child_env(), capture_output=True, text=True, timeout=30, check=False
    )
    match = re.search(r"podman-compose version (\S+)", result.stdout + result.stderr)
    if result.returncode != 0 or match is None:
        pytest.skip(f"podman-compose cannot run here: {(result.stdout + result.stderr).strip()[-300:]}")
    return Compose([found], match[1])


@dataclass
class Project:
    """One run of the derived compose file: a unique project name (podman may be in use by others meanwhile)."""

    podman: Podman
    tool: Compose
    name: str
    directory: Path

    @property
    def network(self) -> str:
        return f"{self.name}_default"  # the network podman-compose would create (must not, with the host's network)

    async def compose(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        command = [*self.tool.command, "-p", self.name, "-f", str(self.directory / "docker-compose.yml"), *args]

        def run() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                command,
                cwd=self.directory,
                env=self.podman.env,  # no *_PROXY variables: podman would hand them to the containers
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )

        return await asyncio.to_thread(run)

    async def container(self, service: str) -> str:
        names = await self.podman.check(
            "ps", "-a", "--format", "{{.Names}}",
            "--filter", f"label=io.podman.compose.project={self.name}",
            "--filter", f"label=io.podman.compose.service={service}",
        )  # fmt: skip
        assert len(names.split()) == 1, f"containers of {service}: {names!r}"
        return names.strip()

    async def remove_leftovers(self) -> None:
        """After ``down``: whatever of this project is still there (a failed start, a down that timed out)."""
        leftover = await self.podman.run(
            "ps", "-a", "-q", "--filter", f"label=io.podman.compose.project={self.name}", timeout=30
        )
        for container_id in leftover.stdout.split():
            await self.podman.run("rm", "--force", "--time", "0", container_id, timeout=30)
        await self.podman.run("pod", "rm", "--force", f"pod_{self.name}", timeout=30)
        if (await self.podman.run("network", "exists", self.network, timeout=30)).returncode == 0:
            await self.podman.run("network", "rm", "--force", self.network, timeout=30)


_projects = itertools.count(1)


# --------------------------------------------------------------------------- loopback only


def is_loopback(address: str) -> bool:
    with contextlib.suppress(ValueError):
        ip = ipaddress.ip_address(address)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return ip.version == 4 and ip.is_loopback  # 127.0.0.0/8
    return False


def record_peers(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """The peer address of every request the token server and the upstream get (both listen on 127.0.0.1)."""
    peers: dict[str, list[str]] = {"token server": [], "upstream": []}

    def peer(request: web.Request) -> str:
        name = request.transport.get_extra_info("peername") if request.transport is not None else None
        return str(name[0]) if name else "unknown"

    authenticated, authorized = backend.tokens._authenticated, backend.upstream._authorized

    def token_request(request: web.Request, form: dict[str, str]) -> bool:
        peers["token server"].append(peer(request))
        return authenticated(request, form)

    def upstream_request(request: web.Request) -> bool:
        peers["upstream"].append(peer(request))
        return authorized(request)

    monkeypatch.setattr(backend.tokens, "_authenticated", token_request)  # called for every token request
    monkeypatch.setattr(backend.upstream, "_authorized", upstream_request)  # and for every upstream request
    return peers


# --------------------------------------------------------------------------- the derived compose file


def derive(example: dict[str, Any], *, proxy_image: str, app_image: str, port: int) -> dict[str, Any]:
    """The example with the changes this machine needs (see the module's docstring), nothing else."""
    services = example["services"]
    assert set(services) == {"odata-proxy", "legacy-app"}, sorted(services)
    assert "networks" not in example  # the example uses the default network, replaced by the host's below
    proxy, app = services["odata-proxy"], services["legacy-app"]
    for service in (proxy, app):
        assert not {"networks", "network_mode", "ports", "extra_hosts"} & set(service), service
        service["network_mode"] = "host"  # every connection on 127.0.0.1, no bridge, no private addresses

    assert proxy.pop("build") == "."  # the image is built by ci/container-image.sh from the same Dockerfile
    proxy["image"] = proxy_image
    assert "volumes" not in proxy and "ODATA_AUTH_PROXY_CA_BUNDLE" not in proxy["environment"]
    proxy["volumes"] = [f"./ca.pem:{CA_IN_CONTAINER}:ro"]
    proxy["environment"]["ODATA_AUTH_PROXY_CA_BUNDLE"] = CA_IN_CONTAINER
    assert "ODATA_AUTH_PROXY_LISTEN" not in proxy["environment"]  # the image's 0.0.0.0:8080 ...
    proxy["environment"]["ODATA_AUTH_PROXY_LISTEN"] = f"0.0.0.0:{port}"  # ... on a port of its own here
    assert not PROXY_VARIABLES & {name.lower() for name in proxy["environment"]}  # only in the comments

    # the example's URL, still escaped for compose ($$): compose turns it into the URL the app calls
    (url,) = re.findall(r"'(http://odata-proxy:8080/[^']*)'", " ".join(app["command"]))
    assert "X-Proxy-Api-Key: $$PROXY_API_KEY" in " ".join(app["command"])
    app["image"] = app_image
    app["entrypoint"] = ["python3", "-c"]
    assert "$" not in APP_SCRIPT
    app["command"] = [APP_SCRIPT]
    assert not {"APP_URL", "FOREIGN_HOST"} & set(app["environment"])
    app["environment"]["APP_URL"] = url.replace("http://odata-proxy:8080/", f"http://odata-proxy:{port}/", 1)
    app["environment"]["FOREIGN_HOST"] = FOREIGN_HOST
    app["extra_hosts"] = [f"odata-proxy:{PROXY_ADDRESS}"]  # the service name, found in /etc/hosts instead of DNS
    return example


def app_reports(logs: str) -> tuple[dict[str, dict[str, Any]], str | None]:
    reports: dict[str, dict[str, Any]] = {}
    done = None
    for line in logs.splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and "check" in record:
                reports[record["check"]] = record
            elif isinstance(record, dict) and "done" in record:
                done = record["done"]
    return reports, done


async def wait_for(what: str, probe: Callable[[], Any], timeout: float) -> Any:
    end = time.monotonic() + timeout
    while True:
        result = await probe()
        if result:
            return result
        assert time.monotonic() < end, f"{what}: not within {timeout} s"
        await asyncio.sleep(0.25)


# --------------------------------------------------------------------------- the test


async def test_compose_example_runs_with_podman_compose(
    podman: Podman, compose_tool: Compose, backend: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base_image = (
        await podman.check(
            "image", "inspect", "--format", '{{index .Config.Labels "odata-auth-proxy.base"}}', podman.image
        )
    ).strip()
    assert base_image, "the image has no odata-auth-proxy.base label (ci/container-image.sh sets it)"
    project = Project(podman, compose_tool, f"oapc-{os.getpid()}-{next(_projects)}", tmp_path)
    print(f"podman-compose {compose_tool.version}, project {project.name}")
    peers = record_peers(backend, monkeypatch)
    port = free_port()
    started_at = time.monotonic()
    try:
        # the files the example's header comment asks for, next to the compose file
        (tmp_path / "service-key.json").write_text(json.dumps(service_key(backend)))
        (tmp_path / "service-key.json").chmod(0o644)  # readable by uid 10001
        shutil.copy(backend.tls.ca_path, tmp_path / "ca.pem")
        (tmp_path / "ca.pem").chmod(0o644)
        (tmp_path / ".env").write_text(f"PROXY_API_KEY={API_KEY}\n")
        derived = derive(yaml.safe_load(EXAMPLE.read_text()), proxy_image=podman.image, app_image=base_image, port=port)
        (tmp_path / "docker-compose.yml").write_text(yaml.safe_dump(derived, sort_keys=False))

        up = await project.compose("up", "-d", timeout=120)
        assert up.returncode == 0, f"podman-compose up: exit {up.returncode}\n{up.stdout}\n{up.stderr}"
        proxy_name = await project.container("odata-proxy")
        app_name = await project.container("legacy-app")

        # bounded: legacy-app tries for at most 45 s, then reports; a container that ended without a report fails
        async def app_finished() -> tuple[dict[str, dict[str, Any]], str] | None:
            state = (await podman.check("inspect", "--format", "{{.State.Status}}", app_name)).strip()
            logs = await podman.run("logs", app_name)  # after the state: all it wrote if it has ended
            reports, done = app_reports(logs.stdout)
            if done is not None:
                return reports, done
            proxy_logs = await podman.run("logs", proxy_name)
            assert state in ("created", "running"), (
                f"legacy-app is {state} without a report:\n{logs.stdout}{logs.stderr}\n"
                f"odata-proxy:\n{proxy_logs.stdout}{proxy_logs.stderr}"
            )
            return None

        reports, proxy_address = await wait_for("legacy-app's report", app_finished, timeout=60)
        up_took = time.monotonic() - started_at
        proxy_logs = await podman.run("logs", proxy_name)
        app_said = json.dumps(reports, indent=1)
        context = f"\nlegacy-app: {app_said}\nodata-proxy:\n{proxy_logs.stdout}{proxy_logs.stderr}"

        # 1. legacy-app got 200 from the upstream, through the proxy, by the service name
        first = reports["service-name-with-key"]
        assert first["status"] == 200, context
        assert first["url"] == f"http://odata-proxy:{port}/api/v1/IntegrationPackages?$format=json&$top=5"
        assert proxy_address == PROXY_ADDRESS  # the service name, from legacy-app's /etc/hosts
        arrived = [r for r in backend.upstream.requests if r["raw_path"].startswith("/api/v1/IntegrationPackages")]
        assert arrived, f"nothing reached the upstream{context}"
        assert arrived[-1]["raw_path"] == "/api/v1/IntegrationPackages?$format=json&$top=5"  # $$ -> $ by compose
        headers = {k.lower(): v for k, v in arrived[-1]["headers"]}
        assert headers["authorization"].removeprefix("Bearer ") in backend.tokens.issued
        assert "x-proxy-api-key" not in headers  # the inbound key stays with the proxy
        assert backend.tokens.forms and backend.tokens.forms[0]["client_id"] == backend.tokens.client_id

        # 2. the guard settings the example relies on: the API key on 0.0.0.0, the service name as allowed host
        for check in ("without-key", "wrong-key"):
            assert reports[check]["status"] == 401, context
            assert json.loads(reports[check]["body"])["error"] == "proxy_auth_required", context
        foreign = reports["foreign-host-with-key"]  # a name that is not in ODATA_AUTH_PROXY_ALLOWED_HOSTS
        assert foreign["status"] == 421, context
        assert json.loads(foreign["body"])["error"] == "host_not_allowed", context
        assert reports["healthz-without-key"]["status"] == 200, context
        assert len(arrived) == 1, "a refused request reached the upstream"

        # 3. what else the example sets took effect: read-only root, no capabilities, no-new-privileges, the
        #    secret, the restart policy, no published port; the host's network with the service name in legacy-app's
        #    /etc/hosts, no compose network, no proxy variables; and the image's health check passes
        inspected = json.loads(await podman.check("inspect", proxy_name, app_name))
        by_name = {c["Name"]: c for c in inspected}
        proxy_info, app_info = by_name[proxy_name], by_name[app_name]
        for info in (proxy_info, app_info):
            assert info["HostConfig"]["NetworkMode"] == "host", info["HostConfig"]["NetworkMode"]
            names = {item.partition("=")[0].lower() for item in info["Config"]["Env"]}
            assert not PROXY_VARIABLES & names, sorted(names)  # nothing could detour through a proxy
        assert f"odata-proxy:{PROXY_ADDRESS}" in app_info["HostConfig"]["ExtraHosts"], app_info["HostConfig"]
        assert (await podman.run("network", "exists", project.network)).returncode != 0, "a compose network"
        bindings = proxy_info["HostConfig"]["PortBindings"] or {}  # 8080/tcp: EXPOSEd, bound to no host port
        assert not any(bindings.values()), bindings
        assert proxy_info["HostConfig"]["ReadonlyRootfs"] is True
        assert not proxy_info["EffectiveCaps"], proxy_info["EffectiveCaps"]
        assert "no-new-privileges" in " ".join(proxy_info["HostConfig"]["SecurityOpt"])
        assert proxy_info["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
        assert any(m["Destination"] == "/run/secrets/service-key.json" for m in proxy_info["Mounts"])
        health = await podman.run("healthcheck", "run", proxy_name, timeout=30)
        assert health.returncode == 0, health.stdout + health.stderr

        # 4. stopped the compose way (SIGTERM, stop_grace_period), the proxy drains and exits 0
        stopping = time.monotonic()
        stop = await project.compose("stop", timeout=60)
        stop_took = time.monotonic() - stopping
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert (await podman.check("inspect", "--format", "{{.State.ExitCode}}", proxy_name)).strip() == "0"
        assert stop_took < 20, f"podman-compose stop took {stop_took:.1f} s"
        stopped = await podman.run("logs", proxy_name)
        logs = stopped.stdout + stopped.stderr

        records = json_records(logs, CLIENT_SECRET, API_KEY, *backend.tokens.issued)
        messages = [r["message"] for r in records]
        assert messages[-1] == "stopped", messages
        assert any("IntegrationPackages" in m and " 200 " in m for m in messages), messages

        # 5. loopback only: every request the proxy got (its access log), and sent (the test servers' peers)
        access = [r for r in records if r.get("logger") == "odata_auth_proxy.access"]
        assert {r["status"] for r in access} >= {200, 401, 421}, access  # legacy-app's requests, refused ones too
        clients = [str(r["client"]) for r in access]
        assert all(is_loopback(c) for c in clients), clients
        assert peers["token server"] and peers["upstream"], peers
        assert all(is_loopback(p) for p in peers["token server"] + peers["upstream"]), peers
        print(
            f"up until legacy-app's report: {up_took:.1f} s ({first['attempts']} attempts); stop: {stop_took:.1f} s;"
            f" peers {sorted(set(peers['token server'] + peers['upstream'] + clients))};"
            f" podman-compose up said: {(up.stderr.strip().splitlines() or [''])[-1]}"
        )
    finally:
        if (tmp_path / "docker-compose.yml").exists():
            with contextlib.suppress(subprocess.TimeoutExpired):
                await project.compose("down", timeout=60)
        await project.remove_leftovers()
