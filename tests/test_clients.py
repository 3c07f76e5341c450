"""Real OData clients against ``odata-auth-proxy demo`` run as a subprocess: SAP's pyodata
(``examples/pyodata_client.py``) and the Postman collection run by newman (``examples/postman/``).

Neither client is told anything about OAuth or CSRF tokens; both follow the ``__next`` links the proxy
rewrote. Everything listens on 127.0.0.1 only. newman comes from ``(cd examples/postman && npm ci)``: without
it the newman test is skipped, except under ``CI=true``, where it fails (CI must run it); pyodata likewise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
POSTMAN = EXAMPLES / "postman"
NEWMAN = POSTMAN / "node_modules" / ".bin" / ("newman.cmd" if os.name == "nt" else "newman")
PYODATA_CLIENT = EXAMPLES / "pyodata_client.py"
READY_DEADLINE = 15.0
CLIENT_TIMEOUT = 30.0
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")

pytestmark = pytest.mark.timeout(60)


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def _missing(what: str) -> None:
    """Skip on a developer machine, fail in CI (where the test must run)."""
    if _in_ci():
        pytest.fail(f"{what} (CI=true: this test must run in CI)")
    pytest.skip(what)


def _child_env() -> dict[str, str]:
    """The caller's environment without proxy settings (ours and HTTP(S)_PROXY): loopback only, no detours."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("ODATA_AUTH_PROXY_") and k.lower() not in _PROXY_VARS and k != "ODATA_PROXY_URL"
    }
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env["PYTHONUNBUFFERED"] = "1"
    return env


_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with _NO_PROXY_OPENER.open(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _wait_ready(process: subprocess.Popen[bytes], base: str, log: Path) -> None:
    deadline = time.monotonic() + READY_DEADLINE
    last = "no answer yet"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"demo exited with {process.returncode} before it was ready:\n{log.read_text()}")
        try:
            status, body = _get(f"{base}/-/readyz", timeout=1.0)
        except OSError as exc:
            last = repr(exc)
        else:
            if status == 200:
                return
            last = f"{status} {body[:200]!r}"
        time.sleep(0.1)
    pytest.fail(f"demo not ready within {READY_DEADLINE} s ({last}):\n{log.read_text()}")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``python -m proxy demo`` on a free loopback port; yields ``http://127.0.0.1:PORT``."""
    log = tmp_path_factory.mktemp("demo") / "demo.log"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "demo", "--listen", f"127.0.0.1:{port}"],
            cwd=ROOT,
            env=_child_env(),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            _wait_ready(process, base, log)
            yield base
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


def _run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        cwd=ROOT,
        env=env or _child_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT,
        check=False,
    )


# --------------------------------------------------------------------------- pyodata


def _require_pyodata() -> None:
    try:
        import pyodata  # noqa: F401
        import requests  # noqa: F401
    except ImportError as exc:
        _missing(f"pyodata/requests not installed ({exc.name}): pip install -e '.[test]'")


@pytest.mark.parametrize("via", ["argv", "env"])
def test_pyodata_example_runs_through_the_proxy(demo: str, via: str) -> None:
    _require_pyodata()
    url = f"{demo}/api/v1/"
    env = _child_env()
    args = [sys.executable, str(PYODATA_CLIENT)]
    if via == "argv":
        args.append(url)
    else:
        env["ODATA_PROXY_URL"] = url
    result = _run(args, env)
    output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, output
    out = result.stdout
    assert f"service: {url} entity sets: IntegrationPackages" in out, output
    assert "filter Vendor eq 'SAP': " in out, output
    assert "top 3 skip 0: OrderToCash, ProcureToPay, HireToRetire" in out, output
    # server-side paging: 5 rows a page, __next rewritten to the proxy (pyodata rejects a foreign host)
    assert f"server page 1: 5 package(s), next: {url}IntegrationPackages?$skiptoken=5" in out, output
    assert "server page 3: " in out and "next: -" in out, output
    assert "created: PyODataDemo" in out, output
    assert "description='updated by pyodata'" in out, output
    assert "read after delete: 404 as expected" in out, output
    assert out.rstrip().endswith("OK"), output


def test_pyodata_named_key_lookup(demo: str) -> None:
    _require_pyodata()
    import pyodata
    import requests

    with requests.Session() as session:
        session.trust_env = False  # loopback only, never an HTTP(S)_PROXY
        client = pyodata.Client(f"{demo}/api/v1/", session)
        package = client.entity_sets.IntegrationPackages.get_entity(Id="OrderToCash").execute()
    assert package.Name == "Order to Cash"


# --------------------------------------------------------------------------- Postman collection via newman


def test_postman_collection_with_newman(demo: str, tmp_path: Path) -> None:
    if not NEWMAN.exists():
        _missing(f"{NEWMAN.relative_to(ROOT)} missing: run (cd examples/postman && npm ci --no-audit --no-fund)")
    report = tmp_path / "newman.json"
    result = _run(
        [
            str(NEWMAN),
            "run",
            str(POSTMAN / "odata-auth-proxy.postman_collection.json"),
            "-e",
            str(POSTMAN / "odata-auth-proxy.postman_environment.json"),
            "--env-var",
            f"baseUrl={demo}",
            "--reporters",
            "cli,json",
            "--reporter-json-export",
            str(report),
            "--color",
            "off",
            "--disable-unicode",
            "--timeout-request",
            "10000",
        ]
    )
    output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, output
    run = json.loads(report.read_text())["run"]
    stats = run["stats"]
    assert run["failures"] == [], output
    assert stats["requests"] == {"total": 14, "pending": 0, "failed": 0}, output
    assert stats["assertions"]["failed"] == 0 and stats["assertions"]["total"] >= 30, output
    codes = {e["item"]["name"]: e["response"]["code"] for e in run["executions"]}
    assert codes["Create package (POST)"] == 201
    assert codes["Update package (PATCH)"] == codes["Update package (MERGE, SAP style)"] == 204
    assert codes["Delete package"] == 204
    assert codes["Read deleted package (404)"] == 404
    followed = next(e for e in run["executions"] if e["item"]["name"] == "Next page (follow d.__next)")
    url = followed["request"]["url"]
    host = url["host"] if isinstance(url["host"], str) else ".".join(url["host"])
    assert f"{host}:{url['port']}" == demo.removeprefix("http://")  # the rewritten __next led back to the proxy
