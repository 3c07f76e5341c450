"""The request path compiled with mypyc, or from its sources: all or nothing, never stale, and the same behaviour.

``setup.py`` compiles the modules ``proxy.compiled.MODULES`` names when a C compiler is at hand; ``proxy/__init__``
then decides per process whether to load them compiled. These tests pin that decision (pure on request, when a
compiled file is missing, when a source is newer) and run a real request through a proxy on the sources.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import proxy
from proxy.compiled import MODULES, PURE_ENV, inspect_build, installed_copy, source_of
from tests.conftest import Backend, child_env, free_port
from tests.test_cli import config_file, curl, proxy_process

SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]
FAKE_MODULES = ("pkg.a", "pkg.sub.b")


def fake_tree(root: Path, *, compiled: bool) -> None:
    for module in FAKE_MODULES:
        source = source_of(module, root)
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_text("X = 1\n")
        if compiled:
            source.with_name(source.stem + SUFFIX).write_bytes(b"")
            os.utime(source, (1_000_000, 1_000_000))  # the source older than its compiled file


def test_all_compiled_files_present_and_newer_means_compiled(tmp_path: Path) -> None:
    fake_tree(tmp_path, compiled=True)
    assert inspect_build(FAKE_MODULES, {}, tmp_path).compiled


def test_the_environment_variable_asks_for_the_sources(tmp_path: Path) -> None:
    fake_tree(tmp_path, compiled=True)
    build = inspect_build(FAKE_MODULES, {PURE_ENV: "1"}, tmp_path)
    assert not build.compiled and PURE_ENV in build.reason
    assert build.describe() == f"pure Python ({PURE_ENV} is set)"
    assert inspect_build(FAKE_MODULES, {PURE_ENV: "0"}, tmp_path).compiled
    assert inspect_build(FAKE_MODULES, {PURE_ENV: "maybe"}, tmp_path).compiled  # not a yes: the default


def test_one_missing_compiled_file_means_none_is_used(tmp_path: Path) -> None:
    fake_tree(tmp_path, compiled=True)
    b = source_of("pkg.sub.b", tmp_path)
    b.with_name(b.stem + SUFFIX).unlink()
    build = inspect_build(FAKE_MODULES, {}, tmp_path)
    assert not build.compiled and "not compiled at install" in build.reason


def test_an_edited_source_is_run_instead_of_its_stale_compiled_file(tmp_path: Path) -> None:
    """An editable install edited after it was built: the edit runs (all modules from sources), and the banner
    says how to compile it again."""
    fake_tree(tmp_path, compiled=True)
    source_of("pkg.a", tmp_path).write_text("X = 2\n")  # now newer than pkg/a.<suffix>
    build = inspect_build(FAKE_MODULES, {}, tmp_path)
    assert not build.compiled
    assert "a.py is newer than its compiled file" in build.reason and "pip install -e ." in build.reason


def test_an_installed_copy_is_not_judged_by_its_time_stamps(tmp_path: Path) -> None:
    """pip gives a wheel's files the wheel's time stamps (to two seconds): in site-packages a source can look
    newer than its compiled file without any edit, so there only presence counts."""
    fake_tree(tmp_path, compiled=True)
    source_of("pkg.a", tmp_path).write_text("X = 2\n")
    assert inspect_build(FAKE_MODULES, {}, tmp_path, check_age=False).compiled
    assert installed_copy(Path(sysconfig.get_paths()["purelib"]).resolve())
    assert not installed_copy(tmp_path)


def test_no_compiled_files_at_all(tmp_path: Path) -> None:
    fake_tree(tmp_path, compiled=False)
    assert not inspect_build(FAKE_MODULES, {}, tmp_path).compiled


def test_this_process_loaded_what_it_says() -> None:
    """Either every module of the request path is a compiled extension, or every one is a ``.py`` file."""
    __import__("proxy.pipeline")  # imports the rest of the request path
    files = {name: sys.modules[name].__file__ or "" for name in MODULES}
    if proxy.BUILD.compiled:
        assert all(f.endswith(SUFFIX) for f in files.values()), files
    else:
        assert all(f.endswith(".py") for f in files.values()), files


@pytest.mark.skipif(
    os.environ.get("CI") != "true" or PURE_ENV in os.environ,
    reason="CI only (elsewhere a machine may lack a C compiler), and not in its pure-Python pass",
)
def test_ci_runs_the_request_path_compiled() -> None:
    """``.ci/run`` installs the project like a user does: the compile step must have worked, not fallen back."""
    assert proxy.BUILD.compiled, proxy.BUILD.reason


def test_the_sources_load_when_asked_even_beside_compiled_files() -> None:
    code = (
        "import json, sys, proxy, proxy.pipeline; "
        "print(json.dumps([proxy.BUILD.compiled, sys.modules['proxy.http.listener'].__file__]))"
    )
    env = child_env(**{PURE_ENV: "1"})
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=60)
    compiled, listener_file = json.loads(out.stdout)
    assert compiled is False and listener_file.endswith("listener.py")


async def test_a_proxy_on_the_sources_serves_like_the_compiled_one(tmp_path: Path, backend: Backend) -> None:
    """The rest of the suite runs on whatever this install has (compiled in CI); this request runs on the
    sources, with the banner saying so."""
    port = free_port()
    config = config_file(tmp_path, backend, port)
    env = child_env(**{PURE_ENV: "1"})
    async with proxy_process(tmp_path, "run", "--config", str(config), port=port, env=env) as running:
        status, body = await curl(f"http://127.0.0.1:{port}/api/v1/echo/pure?$top=1")
        assert status == 200, body
        assert json.loads(body)["raw_path"] == "/api/v1/echo/pure?$top=1"
        code, _ = await running.stop()
        assert code == 0
    assert f"request path: pure Python ({PURE_ENV} is set)" in running.stderr
