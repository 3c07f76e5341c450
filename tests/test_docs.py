"""The documented examples must stay true: config.example.yaml validates and names every setting."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from proxy.cli import main
from proxy.config import _CRED_KEYS, _ROUTE_KEYS, _TOP_KEYS

ROOT = Path(__file__).resolve().parent.parent


def test_config_example_validates(tmp_path: Path, capsys: object) -> None:
    shutil.copy(ROOT / "config.example.yaml", tmp_path / "config.yaml")
    shutil.copy(ROOT / "tests/fixtures/service-keys/api-plan-secret.json", tmp_path / "service-key.json")
    assert main(["config", "validate", str(tmp_path / "config.yaml")]) == 0


def test_config_example_documents_every_setting() -> None:
    text = (ROOT / "config.example.yaml").read_text()
    documented = set(re.findall(r"^[\s#-]*([a-z_0-9]+):", text, flags=re.MULTILINE))
    missing = (_TOP_KEYS | _ROUTE_KEYS | _CRED_KEYS | {"ca_bundle", "connect", "read", "token"}) - documented
    assert not missing, f"config.example.yaml does not document: {sorted(missing)}"


def test_readme_commands_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "python3 -m venv .venv && .venv/bin/pip install -q -e . && .venv/bin/odata-auth-proxy demo" in readme
    ci = (ROOT / ".ci/run").read_text()
    test_command = "python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]' && .venv/bin/pytest -q"
    assert test_command in readme and test_command in ci
