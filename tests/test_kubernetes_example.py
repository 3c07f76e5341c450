"""examples/kubernetes must stay valid Kubernetes and keep what issue 13 asks of it.

1. ``kubernetes-validate --strict`` (schemas shipped with the PyPI package, no cluster, no network) accepts
   every manifest, for the oldest Kubernetes the example supports and for the newest the package knows.
2. Structure (PyYAML): the proxy listens on loopback, probes hit /-/healthz and /-/readyz on the admin port,
   the grace period outlasts preStop + drain, the security context is locked down, resources are set from
   the bench's RSS, the service key is a file from a Secret, and the native-sidecar form is one.
3. The proxy's own configuration code accepts the manifests' environment with the Secret's (fake) key.
"""

from __future__ import annotations

import inspect
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.compiled import COMPILE_ENV, PURE_ENV
from proxy.config import ENV_PREFIX as ENV
from proxy.config import Overrides, load_config, overrides_from_env
from proxy.guard import is_loopback, listen_address_problem
from proxy.watch import watched_files

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "kubernetes"
MANIFESTS = sorted(EXAMPLE.glob("*.yaml"))
SIDECAR = "deployment.yaml"  # the proxy as a second container
NATIVE = "deployment-native-sidecar.yaml"  # the proxy as an init container with restartPolicy: Always
DEPLOYMENTS = (SIDECAR, NATIVE)

# 1.30: the oldest version the example supports (native sidecars are on by default since 1.29, the preStop
# `sleep` action since 1.30). None: kubernetes-validate's default, the newest version it ships.
K8S_VERSIONS = ("1.30", None)

PROXY_IMAGE = "odata-auth-proxy"
IMAGE_UID = 10001  # Dockerfile: USER 10001:10001
DEFAULT_SHUTDOWN_TIMEOUT = 30.0  # --shutdown-timeout's default
LOADED_RSS_MIB = 82  # bench/RESULTS.md: ~80-82 MiB under load (64 connections, 1 GiB transfers, 1,000 idle conns)


# --------------------------------------------------------------------------- helpers


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def all_documents() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in MANIFESTS for doc in documents(path)]


def the_secret() -> dict[str, Any]:
    secrets = [doc for _, doc in all_documents() if doc["kind"] == "Secret"]
    assert len(secrets) == 1, "examples/kubernetes should hold exactly one Secret (the service key)"
    return secrets[0]


def pod_spec(name: str) -> dict[str, Any]:
    (deployment,) = documents(EXAMPLE / name)
    assert deployment["kind"] == "Deployment"
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


def proxy_container(spec: dict[str, Any]) -> dict[str, Any]:
    found: list[dict[str, Any]] = [
        c for c in spec.get("containers", []) + spec.get("initContainers", []) if PROXY_IMAGE in c["image"]
    ]
    assert len(found) == 1, f"expected one {PROXY_IMAGE} container, found {len(found)}"
    return found[0]


def env_of(container: dict[str, Any]) -> dict[str, str]:
    result = {}
    for item in container.get("env", []):
        assert "valueFrom" not in item or not item["name"].startswith(ENV), (
            f"{item['name']}: give the proxy's settings as values (the service key as a file), not valueFrom"
        )
        result[item["name"]] = str(item.get("value", ""))
    return result


def host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host, int(port)


def probe_port(container: dict[str, Any], probe: dict[str, Any]) -> int:
    port = probe["httpGet"]["port"]
    if isinstance(port, int):
        return port
    named = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    assert named, f"probe port {port!r} is not a named port of the container"
    return int(named[0])


def mebibytes(quantity: str | int) -> float:
    text = str(quantity)
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 10**3, "M": 10**6, "G": 10**9}
    for unit, factor in units.items():
        if text.endswith(unit):
            return float(text[: -len(unit)]) * factor / 2**20
    return float(text) / 2**20


def cores(quantity: str | int | float) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def security(spec: dict[str, Any], container: dict[str, Any]) -> dict[str, Any]:
    """The effective settings: the container's securityContext over the pod's."""
    pod = {k: v for k, v in spec.get("securityContext", {}).items() if k in ("runAsNonRoot", "runAsUser", "runAsGroup")}
    return {**pod, **container.get("securityContext", {})}


def pre_stop_sleep(container: dict[str, Any]) -> int:
    pre_stop = container.get("lifecycle", {}).get("preStop")
    if pre_stop is None:
        return 0
    assert set(pre_stop) == {"sleep"}, "a preStop other than `sleep` makes the grace-period budget unknowable here"
    return int(pre_stop["sleep"]["seconds"])


def image_env() -> dict[str, str]:
    """The ENV of the Dockerfile's final stage: what the container starts with before the manifest's env."""
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    final = lines[max(i for i, line in enumerate(lines) if line.upper().startswith("FROM ")) :]
    env: dict[str, str] = {}
    for line in final:
        if line.upper().startswith("ENV "):
            env.update(item.partition("=")[::2] for item in shlex.split(line[4:]))
    assert env.get(ENV + "LISTEN"), "the image sets ODATA_AUTH_PROXY_LISTEN (Dockerfile)"
    return env


def known_env_names() -> set[str]:
    names = {ENV + n for n in re.findall(r'get\("([A-Z_]+)"\)', inspect.getsource(overrides_from_env))}
    assert len(names) >= 10, names
    return names | {ENV + "INBOUND_API_KEY", ENV + "KEY_PASSWORD", COMPILE_ENV, PURE_ENV}


def service_key_file(tmp_path: Path) -> Path:
    secret = the_secret()
    data = secret.get("stringData", {})
    assert len(data) == 1, "the example Secret holds the service key and nothing else"
    (text,) = data.values()
    path = tmp_path / "service-key.json"
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- 1. kubernetes-validate --strict


@pytest.mark.parametrize("version", K8S_VERSIONS, ids=lambda v: v or "newest")
def test_manifests_validate_strict(version: str | None) -> None:
    assert MANIFESTS, "no manifests in examples/kubernetes"
    command = [sys.executable, "-m", "kubernetes_validate", "--strict"]
    if version:
        command += ["-k", version]
    result = subprocess.run(
        [*command, *map(str, MANIFESTS)], capture_output=True, text=True, timeout=60, cwd=ROOT, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # An unknown kind or apiVersion is only a WARN with exit code 0: demand a "passed" line for every resource.
    lines = output.splitlines()
    assert all(line.startswith("INFO ") and " passed " in line for line in lines), output
    passed = {
        (Path(m[1]).name, m[2])
        for m in (re.match(r"INFO (\S+) passed for resource (\S+) against", x) for x in lines)
        if m
    }
    expected = {(path.name, f"{doc['kind'].lower()}/{doc['metadata']['name']}") for path, doc in all_documents()}
    assert passed == expected, output
    if version:
        assert all(line.endswith(f"against version {version}") for line in lines), output


# --------------------------------------------------------------------------- 2. structure


def test_example_files() -> None:
    names = {path.name for path in MANIFESTS}
    assert {SIDECAR, NATIVE} <= names
    kinds = sorted(doc["kind"] for _, doc in all_documents())
    assert kinds == ["Deployment", "Deployment", "Secret"]
    readme = (EXAMPLE / "README.md").read_text(encoding="utf-8")
    for name in names:
        assert name in readme, f"examples/kubernetes/README.md does not mention {name}"


def test_sidecar_forms() -> None:
    plain = pod_spec(SIDECAR)
    proxy = proxy_container(plain)
    assert proxy in plain["containers"] and "restartPolicy" not in proxy

    native = pod_spec(NATIVE)
    proxy = proxy_container(native)
    assert proxy in native.get("initContainers", []), "the native sidecar is an init container"
    assert proxy.get("restartPolicy") == "Always", "an init container is a sidecar only with restartPolicy: Always"
    assert proxy["startupProbe"]["httpGet"]["path"] == "/-/healthz", "the app should start once the proxy listens"
    assert all(PROXY_IMAGE not in c["image"] for c in native["containers"])


def test_both_forms_configure_the_proxy_alike() -> None:
    """The two files differ only in how the proxy is attached, not in how it is configured."""
    plain, native = pod_spec(SIDECAR), pod_spec(NATIVE)
    form_only = ("restartPolicy", "startupProbe", "lifecycle")

    def configuration(spec: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in proxy_container(spec).items() if k not in form_only}

    assert configuration(plain) == configuration(native)
    for key in ("securityContext", "volumes", "automountServiceAccountToken"):
        assert plain.get(key) == native.get(key), key


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_probes_on_admin_port(name: str) -> None:
    spec = pod_spec(name)
    proxy = proxy_container(spec)
    env = env_of(proxy)
    admin_host, admin_port = host_port(env[ENV + "ADMIN_LISTEN"])
    # the kubelet probes the pod IP, so the admin listener must not be on loopback only
    assert not is_loopback(admin_host), "probes come from the pod IP: ODATA_AUTH_PROXY_ADMIN_LISTEN=0.0.0.0:PORT"
    for kind, path in (("livenessProbe", "/-/healthz"), ("readinessProbe", "/-/readyz")):
        probe = proxy[kind]
        assert probe["httpGet"]["path"] == path, kind
        assert probe["httpGet"].get("scheme", "HTTP") == "HTTP", kind
        assert "host" not in probe["httpGet"], kind
        assert probe_port(proxy, probe) == admin_port, f"{kind} must use the admin port {admin_port}"
    if "startupProbe" in proxy:
        assert probe_port(proxy, proxy["startupProbe"]) == admin_port


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_listens_on_loopback(name: str) -> None:
    """The image defaults to 0.0.0.0:8080, which needs an API key; in a pod the app reaches loopback."""
    proxy = proxy_container(pod_spec(name))
    env = env_of(proxy)
    host, port = host_port(env[ENV + "LISTEN"])
    assert is_loopback(host) and port == 8080
    assert ENV + "ALLOW_REMOTE" not in env and ENV + "INBOUND_API_KEY" not in env
    assert all(p["containerPort"] != port for p in proxy.get("ports", [])), "8080 is for the app only"


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_termination_grace_outlasts_drain(name: str) -> None:
    spec = pod_spec(name)
    proxy = proxy_container(spec)
    timeout = float(env_of(proxy).get(ENV + "SHUTDOWN_TIMEOUT", DEFAULT_SHUTDOWN_TIMEOUT))
    grace = spec["terminationGracePeriodSeconds"]
    assert grace > pre_stop_sleep(proxy) + timeout, (
        f"terminationGracePeriodSeconds {grace} must exceed preStop sleep + shutdown timeout {timeout}"
    )


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_security_context(name: str) -> None:
    spec = pod_spec(name)
    assert spec.get("automountServiceAccountToken") is False
    containers = spec["containers"] + spec.get("initContainers", [])
    for container in containers:
        effective = security(spec, container)
        who = container["name"]
        assert effective.get("runAsNonRoot") is True, who
        assert effective.get("readOnlyRootFilesystem") is True, who
        assert effective.get("allowPrivilegeEscalation") is False, who
        assert effective.get("capabilities", {}).get("drop") == ["ALL"], who
        assert not effective.get("capabilities", {}).get("add"), who
        assert "privileged" not in effective or effective["privileged"] is False, who
        assert effective.get("runAsUser", 0) != 0, f"{who}: runAsNonRoot needs a numeric uid"
    proxy = security(spec, proxy_container(spec))
    assert proxy["runAsUser"] == IMAGE_UID and proxy["runAsGroup"] == IMAGE_UID
    user = re.search(r"^USER\s+(\d+)", (ROOT / "Dockerfile").read_text(encoding="utf-8"), flags=re.MULTILINE)
    assert user is not None and int(user[1]) == IMAGE_UID, "the Dockerfile's USER changed: update the example"


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_writable_tmp_on_read_only_root(name: str) -> None:
    """Certificate keys go through memfd, else a private temp dir; --workers N puts its socket in /tmp."""
    spec = pod_spec(name)
    proxy = proxy_container(spec)
    (mount,) = [m for m in proxy["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert not mount.get("readOnly")
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert "emptyDir" in volume


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_resources_from_the_bench(name: str) -> None:
    resources = proxy_container(pod_spec(name))["resources"]
    requests, limits = resources["requests"], resources["limits"]
    assert mebibytes(requests["memory"]) >= LOADED_RSS_MIB, "below the RSS measured under load"
    assert mebibytes(limits["memory"]) > mebibytes(requests["memory"])
    assert 0 < cores(requests["cpu"]) <= cores(limits["cpu"])
    # one process runs one event loop: a CPU limit below one core throttles it in bursts
    assert cores(limits["cpu"]) >= 1


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_service_key_is_a_file_from_the_secret(name: str) -> None:
    spec = pod_spec(name)
    proxy = proxy_container(spec)
    env = env_of(proxy)
    assert ENV + "SERVICE_KEY_JSON" not in env, "the key comes as a file, not as an environment variable"
    key_path = Path(env[ENV + "SERVICE_KEY"])
    mounts = [m for m in proxy["volumeMounts"] if key_path.parent == Path(m["mountPath"])]
    assert len(mounts) == 1, f"{key_path}: no volume mounted at {key_path.parent}"
    mount = mounts[0]
    assert mount.get("readOnly") is True
    assert "subPath" not in mount, "a subPath mount never sees Secret updates (no key rotation)"
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    secret = the_secret()
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    items = volume["secret"].get("items")
    secret_key = next(i["key"] for i in items if i["path"] == key_path.name) if items else key_path.name
    assert secret_key in secret.get("stringData", {}) | secret.get("data", {})
    # readable by the proxy (group fsGroup = its gid), not by others
    mode = volume["secret"].get("defaultMode", 0o644)
    assert mode & 0o007 == 0, f"defaultMode {mode:04o} lets everyone read the key"
    assert mode & 0o040 and spec["securityContext"].get("fsGroup") == IMAGE_UID
    # only the proxy sees the key
    for container in spec["containers"] + spec.get("initContainers", []):
        if container is not proxy:
            assert all(m["name"] != mount["name"] for m in container.get("volumeMounts", [])), container["name"]


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_only_variables_the_proxy_reads(name: str) -> None:
    """A misspelt ODATA_AUTH_PROXY_SHUTDOWN_TIMEOUT would silently leave the default in force."""
    used = set(re.findall(r"\bODATA_AUTH_PROXY_[A-Z_]+", (EXAMPLE / name).read_text(encoding="utf-8")))
    unknown = used - known_env_names()
    assert not unknown, f"variables the proxy does not read: {sorted(unknown)}"


def test_secret_holds_an_obviously_fake_service_key() -> None:
    (text,) = the_secret()["stringData"].values()
    oauth = json.loads(text)["oauth"]
    assert "FAKE" in oauth["clientid"] and "FAKE" in oauth["clientsecret"]
    assert "replace-me" in oauth["url"] and "replace-me" in oauth["tokenurl"]


# --------------------------------------------------------------------------- 3. the proxy accepts it


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_proxy_accepts_the_manifest_environment(name: str, tmp_path: Path) -> None:
    """load_config with the image's env + the container's env (key path pointed at the Secret's content), as
    `odata-auth-proxy run` in the pod would see it."""
    spec = pod_spec(name)
    proxy = proxy_container(spec)
    env = {**image_env(), **env_of(proxy)}
    mounted = env[ENV + "SERVICE_KEY"]
    key_file = service_key_file(tmp_path)
    env[ENV + "SERVICE_KEY"] = str(key_file)
    config = load_config(Overrides(), env)
    problem = listen_address_problem(
        config.listen_host, allow_remote=config.allow_remote, has_api_key=config.inbound_api_key is not None
    )
    assert problem is None, f"{mounted}: {problem}"
    assert config.log_format == "json"  # the image's default, kept
    assert config.admin_listen is not None
    assert config.admin_listen[1] == probe_port(proxy, proxy["readinessProbe"])
    assert spec["terminationGracePeriodSeconds"] > pre_stop_sleep(proxy) + config.shutdown_timeout
    assert [route.credentials.kind for route in config.routes] == ["secret"]
    # a Secret update (kubelet swaps the mounted file) is picked up by the file watcher
    assert config.watch and str(key_file) in watched_files(config)
