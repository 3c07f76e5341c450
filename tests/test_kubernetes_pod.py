"""The Kubernetes example's pod for real: ``podman play kube --network host`` runs a Deployment of
examples/kubernetes, derived from the committed files at test time, with the image ci/container-image.sh builds
and a stand-in app that calls the proxy on loopback and must get 200 from the test upstream (tests/conftest.py).

What a local run changes in the manifests, and nothing else:
- names made unique (the Deployment, the emptyDir volume podman creates under the volume's name): another CI run
  may play the same example on this machine at the same time;
- images: the proxy is localhost/odata-auth-proxy:ci, the app the image's stand-in base running a Python loop in
  place of curl (no registry here), both with ``imagePullPolicy: Never``;
- ports: ``--network host`` puts the pod in the host's network namespace, so the proxy listens on free loopback
  ports instead of 8080 and 9090 (the admin port on loopback too: the "pod IP" is the machine's), and the
  container's ``ports`` go (podman refuses port mappings with the host network); probes name the port by number;
- the Secret: its service key, pointed at the test's token server and upstream, is given as a hostPath directory
  laid out like the Secret's volume (files mode 0440, group 10001 for ``defaultMode: 288`` with
  ``fsGroup: 10001``): podman 4.3 writes a Secret's ``data`` undecoded into the volume and ignores
  ``stringData`` (containers/podman#16625, fixed in 4.4), and a secret volume without ``optional`` crashes it;
- the test CA: one more hostPath volume, named by ODATA_AUTH_PROXY_CA_BUNDLE;
- the native sidecar (an init container with ``restartPolicy: Always``): a regular container, first in the list,
  without its startup probe. podman 4.3 refuses init containers with probes, ignores ``restartPolicy`` on them
  and waits for every init container to exit before it starts the app, so a sidecar there blocks the pod.

podman 4.3 silently ignores the rest of what Kubernetes would do: readiness and startup probes, preStop,
terminationGracePeriodSeconds (10 s), fsGroup, ``medium: Memory`` (a volume on disk); the liveness probe becomes a
healthcheck that is never scheduled without systemd (and would fail: it runs curl, which the image does not
have). Resources and the security contexts are applied (checked below).

Teardown: ``podman pod stop`` (the proxy must drain and exit 0), ``podman play kube --down``, and always, in a
``finally``, ``podman pod rm -f`` and the emptyDir volumes removed; nothing of a run is left behind (checked).

Opt-in exactly like tests/test_container.py (its ``OPT_IN`` variable set to 1; its ``podman`` fixture builds the
image when needed).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

import tests.test_container as container_tests
from tests.conftest import CLIENT_SECRET, Backend, free_port
from tests.test_container import OPT_IN, Podman, json_records, status_ids

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "kubernetes"
PROXY_UID = 10001
APP_UID = 65534  # the example's app: runAsUser 65534
CA_IN_CONTAINER = container_tests.CA_IN_CONTAINER

podman = container_tests.podman  # the same session fixture: podman with this machine's settings, the image built

pytestmark = [
    pytest.mark.skipif(
        os.environ.get(OPT_IN) != "1",
        reason=f"container tests are opt-in: {OPT_IN}=1 builds the image with podman (ci/container-image.sh), runs it",
    ),
    pytest.mark.timeout(900),  # the first test builds the image when it is missing; every podman call has a bound
]

# The stand-in app: the example's curl loop in Python (the stand-in base has no curl), every 0.3 s instead of a
# minute. One JSON line per call: the status, the names of the headers the app itself sent, and what the
# upstream's echo saw (the scheme of its Authorization header, never the token). Exits on SIGTERM like an app
# that handles it (as PID 1 it would otherwise ignore it and wait for SIGKILL).
APP_SCRIPT = """\
import json, signal, sys, time, urllib.error, urllib.request
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
url = sys.argv[1]
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
while True:
    request = urllib.request.Request(url)
    line = {}
    try:
        with opener.open(request, timeout=5) as response:
            line["status"] = response.status
            echo = json.loads(response.read())
            seen = {name.lower(): value for name, value in echo["headers"]}
            line["upstream_path"] = echo["raw_path"]
            line["upstream_authorization"] = seen.get("authorization", "").partition(" ")[0]
    except urllib.error.HTTPError as error:
        line["status"] = error.code
        line["error"] = error.read()[:300].decode(errors="replace")
    except OSError as error:
        line["status"] = None
        line["error"] = repr(error)
    line["sent"] = sorted(name.lower() for name, _ in request.header_items())
    print(json.dumps(line), flush=True)
    time.sleep(0.3)
"""

_runs = itertools.count(1)


# --------------------------------------------------------------------------- the manifests, made local


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def env_value(container: dict[str, Any], name: str) -> str:
    values = [str(item["value"]) for item in container.get("env", []) if item["name"] == name]
    assert len(values) == 1, f"{container['name']}: {name}"
    return values[0]


def set_env(container: dict[str, Any], name: str, value: str) -> None:
    for item in container.setdefault("env", []):
        if item["name"] == name:
            item["value"] = value
            return
    container["env"].append({"name": name, "value": value})


@dataclass
class LocalPod:
    manifest: Path  # the Deployment as played
    pod: str  # podman names the pod of a Deployment <name>-pod-0, its containers <pod>-<container>
    proxy: str
    app: str
    volumes: list[str]  # named volumes podman creates for the pod's emptyDirs
    path: str  # what the app asks for: the example's path and query
    memory_limit: int  # the proxy's, in bytes


def local_pod(example: str, backend: Backend, proxy_image: str, app_image: str, work: Path) -> LocalPod:
    """The Deployment of examples/kubernetes/``example`` and its Secret, changed only where a local run with
    ``podman play kube --network host`` needs it (this module's docstring says what and why)."""
    (deployment,) = documents(EXAMPLE / example)
    (secret,) = documents(EXAMPLE / "secret.yaml")
    assert deployment["kind"] == "Deployment" and secret["kind"] == "Secret"
    name = f"{deployment['metadata']['name']}-{os.getpid()}-{next(_runs)}"
    deployment["metadata"]["name"] = name
    spec = deployment["spec"]["template"]["spec"]

    # the native sidecar: a regular container, first (podman 4.3 waits for init containers to exit)
    for init in spec.pop("initContainers", []):
        assert init.pop("restartPolicy") == "Always", "an init container that is no sidecar"
        init.pop("startupProbe", None)  # refused on init containers, and podman holds no container back for it
        spec["containers"].insert(0, init)
    (proxy,) = [c for c in spec["containers"] if "odata-auth-proxy" in c["image"]]
    (app,) = [c for c in spec["containers"] if c is not proxy]

    # the app: the example's URL (loopback, the proxy's port), called by the Python stand-in
    (example_url,) = re.findall(r"'(http://127\.0\.0\.1:\d+/[^']*)'", "\n".join(app["args"]))
    listen = env_value(proxy, "ODATA_AUTH_PROXY_LISTEN")
    assert example_url.startswith(f"http://{listen}/"), (example_url, listen)
    path = example_url.removeprefix(f"http://{listen}")
    port, admin_port = free_port(), free_port()
    app.update(
        image=app_image,
        imagePullPolicy="Never",
        command=["/usr/bin/python3", "-c"],
        args=[APP_SCRIPT, f"http://127.0.0.1:{port}{path}"],
    )

    # the proxy: the image, free loopback ports (the host's network), no port mappings, probes by number
    proxy.update(image=proxy_image, imagePullPolicy="Never")
    set_env(proxy, "ODATA_AUTH_PROXY_LISTEN", f"127.0.0.1:{port}")
    set_env(proxy, "ODATA_AUTH_PROXY_ADMIN_LISTEN", f"127.0.0.1:{admin_port}")
    proxy.pop("ports", None)
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        if probe in proxy:
            proxy[probe]["httpGet"]["port"] = admin_port

    # the Secret: its service key, pointed at the test servers, as the files of a secret volume
    secret_name = secret["metadata"]["name"]
    (key_file,) = secret["stringData"]
    key = json.loads(secret["stringData"][key_file])
    key["oauth"].update(
        clientid=backend.tokens.client_id,
        clientsecret=backend.tokens.client_secret,
        url=backend.upstream.url,
        tokenurl=backend.tokens.url + "/oauth/token",
    )
    fs_group = spec["securityContext"]["fsGroup"]
    volumes = []
    for volume in spec["volumes"]:
        if "secret" in volume:  # hostPath is no podman volume: the name can stay
            assert volume["secret"]["secretName"] == secret_name
            directory = work / volume["name"]
            directory.mkdir()
            (directory / key_file).write_text(json.dumps(key, indent=2))
            if os.geteuid() == 0:  # root and the fsGroup own them, with the Secret's mode, like the kubelet's
                for owned in (directory, directory / key_file):
                    os.chown(owned, 0, fs_group)
                os.chmod(directory / key_file, volume["secret"]["defaultMode"])
                os.chmod(directory, 0o750)
            else:  # rootless podman: no group to give them to, so readable by all
                os.chmod(directory / key_file, 0o444)
                os.chmod(directory, 0o755)
            volume.pop("secret")
            volume["hostPath"] = {"path": str(directory), "type": "Directory"}
        elif "emptyDir" in volume:  # podman creates a volume of this name: one per run
            old = volume["name"]
            volume["name"] = f"{name}-{old}"
            volumes.append(volume["name"])
            for mount in proxy.get("volumeMounts", []) + app.get("volumeMounts", []):
                if mount["name"] == old:
                    mount["name"] = volume["name"]

    # the test CA, for the HTTPS token server and upstream on 127.0.0.1
    spec["volumes"].append({"name": "test-ca", "hostPath": {"path": str(backend.tls.ca_path), "type": "File"}})
    proxy["volumeMounts"].append({"name": "test-ca", "mountPath": CA_IN_CONTAINER, "readOnly": True})
    set_env(proxy, "ODATA_AUTH_PROXY_CA_BUNDLE", CA_IN_CONTAINER)

    manifest = work / f"{name}.yaml"
    manifest.write_text(yaml.safe_dump(deployment, sort_keys=False))
    pod = f"{name}-pod-0"
    limit = str(proxy["resources"]["limits"]["memory"])
    assert limit.endswith("Mi"), limit
    memory = int(limit.removesuffix("Mi")) * 2**20
    return LocalPod(manifest, pod, f"{pod}-{proxy['name']}", f"{pod}-{app['name']}", volumes, path, memory)


# --------------------------------------------------------------------------- helpers


async def inspect(podman: Podman, container: str, template: str) -> str:
    return (await podman.check("inspect", "--format", template, container)).strip()


async def logs(podman: Podman, container: str) -> str:
    result = await podman.run("logs", container)
    return result.stdout + result.stderr


def app_lines(text: str) -> list[dict[str, Any]]:
    lines = []
    for line in text.splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


async def wait_for_answers(podman: Podman, local: LocalPod, count: int, timeout: float) -> list[dict[str, Any]]:
    """The app's lines once it has ``count`` answers with 200 (the proxy's first calls may find no listener)."""
    end = time.monotonic() + timeout
    while True:
        lines = app_lines(await logs(podman, local.app))
        if sum(1 for line in lines if line["status"] == 200) >= count:
            return lines
        if time.monotonic() > end:
            states = {
                c: await inspect(podman, c, "{{.State.Status}} exit {{.State.ExitCode}}")
                for c in (local.proxy, local.app)
            }
            raise AssertionError(
                f"no {count} answers with 200 within {timeout} s ({states}); the app said:\n"
                f"{json.dumps(lines[-10:], indent=1)}\nthe proxy said:\n{(await logs(podman, local.proxy))[-4000:]}"
            )
        await asyncio.sleep(0.2)


# --------------------------------------------------------------------------- the pod


@pytest.mark.parametrize("example", ["deployment.yaml", "deployment-native-sidecar.yaml"])
async def test_the_example_pod_calls_the_upstream_through_the_proxy(
    podman: Podman, backend: Backend, tmp_path: Path, example: str
) -> None:
    image = json.loads(await podman.check("image", "inspect", podman.image))[0]
    app_image = image["Config"]["Labels"]["odata-auth-proxy.base"]  # the stand-in python image the proxy is on
    local = local_pod(example, backend, podman.image, app_image, tmp_path)
    try:
        begin = time.monotonic()
        started = await podman.run("play", "kube", "--network", "host", str(local.manifest), timeout=60)
        assert started.returncode == 0, f"podman play kube: exit {started.returncode}\n{started.stderr}"
        played = time.monotonic() - begin
        lines = await wait_for_answers(podman, local, count=3, timeout=45)
        print(
            f"{example}: podman play kube {played:.1f} s, 3 answers with 200 after {time.monotonic() - begin:.1f} s;"
            f" the app's statuses: {[line['status'] for line in lines]}"
        )

        # every answer from the upstream came through the proxy, with the token; the app sent none itself
        answered = [line for line in lines if line["status"] == 200]
        assert all(line["upstream_path"] == local.path for line in answered), answered
        assert all(line["upstream_authorization"] == "Bearer" for line in answered), answered
        assert all("authorization" not in line["sent"] and "user-agent" in line["sent"] for line in lines), lines
        assert all(line["status"] in (200, None) for line in lines), lines  # None: the proxy not listening yet
        arrived = [r for r in backend.upstream.requests if r["raw_path"] == local.path]
        assert len(arrived) >= len(answered), (len(arrived), len(answered))
        for request in arrived:
            headers = {k.lower(): v for k, v in request["headers"]}
            assert headers["authorization"].removeprefix("Bearer ") in backend.tokens.issued, headers
            assert headers["user-agent"].startswith("Python-urllib/"), headers  # the stand-in app's call
        assert backend.tokens.forms and backend.tokens.forms[0]["client_id"] == backend.tokens.client_id

        # the proxy as the manifest says: uid and gid 10001, locked down; only it sees the service key
        pid = int(await inspect(podman, local.proxy, "{{.State.Pid}}"))
        uids, gids = status_ids(pid)
        assert set(uids) == {PROXY_UID} and set(gids) == {PROXY_UID}, (uids, gids)
        assert "odata-auth-proxy" in Path(f"/proc/{pid}/cmdline").read_bytes().decode()
        status = Path(f"/proc/{pid}/status").read_text()
        assert re.search(r"^CapEff:\s+0+$", status, re.MULTILINE) and re.search(
            r"^NoNewPrivs:\s+1$", status, re.MULTILINE
        )
        assert await inspect(podman, local.proxy, "{{.HostConfig.ReadonlyRootfs}}") == "true"
        assert await inspect(podman, local.proxy, "{{.HostConfig.Memory}}") == str(local.memory_limit)
        app_pid = int(await inspect(podman, local.app, "{{.State.Pid}}"))
        assert set(status_ids(app_pid)[0]) == {APP_UID}
        proxy_mounts = json.loads(await inspect(podman, local.proxy, "{{json .Mounts}}"))
        app_mounts = json.loads(await inspect(podman, local.app, "{{json .Mounts}}"))
        assert {m["Destination"]: m["RW"] for m in proxy_mounts}["/secrets"] is False, proxy_mounts
        assert not any(m["Destination"].startswith("/secrets") for m in app_mounts), app_mounts

        # SIGTERM for the whole pod (podman has no preStop and no stop order): the proxy drains and exits 0
        stopped = await podman.run("pod", "stop", "--time", "20", local.pod, timeout=60)
        assert stopped.returncode == 0, stopped.stderr
        assert await inspect(podman, local.proxy, "{{.State.ExitCode}}") == "0"
        proxy_logs = await logs(podman, local.proxy)
    finally:
        await podman.run("play", "kube", "--down", str(local.manifest), timeout=60)
        await podman.run("pod", "rm", "--force", "--time", "0", local.pod, timeout=60)
        for volume in local.volumes:
            await podman.run("volume", "rm", "--force", volume, timeout=60)
    assert (await podman.run("pod", "exists", local.pod)).returncode == 1, "the pod is still there"
    for volume in local.volumes:
        assert (await podman.run("volume", "exists", volume)).returncode == 1, f"the volume {volume} is still there"

    # the proxy's log: JSON lines, no secret, a 200 for each of the app's calls, the clean stop
    records = json_records(proxy_logs, CLIENT_SECRET, *backend.tokens.issued)
    start = next(r for r in records if r.get("event") == "start")
    assert start["listen"].startswith("http://127.0.0.1:"), start
    served = [r for r in records if r.get("logger") == "odata_auth_proxy.access" and r.get("status") == 200]
    assert len(served) >= 3 and all(r["path"] == local.path for r in served), served
    assert records[-1]["message"] == "stopped", records[-3:]
