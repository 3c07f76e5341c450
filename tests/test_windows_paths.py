"""Windows paths in config files: drive letters, backslashes, UNC shares, ``~``; and the YAML pitfall of a
Windows path in double quotes (``"C:\\Users\\…"``: ``\\U`` is an escape sequence there).

Path resolution uses ``os.path`` only, which is ``ntpath`` on Windows; here ``ntpath`` is put in its place for
the duration of one call, so these run on Linux with Windows' rules."""

from __future__ import annotations

import contextlib
import ntpath
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.config import ConfigError, Overrides, _resolve, load_config
from tests.conftest import run_cli
from tests.test_cli import assert_one_error_line
from tests.test_windows_mode import windows_env

HINT = "use single quotes 'C:\\Users\\…' or forward slashes C:/Users/…"


@contextlib.contextmanager
def windows_os_path(monkeypatch: pytest.MonkeyPatch, home: str = "C:\\Users\\me") -> Iterator[None]:
    """``os.path`` is ``ntpath`` (and ``~`` is ``home``) inside the block only."""
    with monkeypatch.context() as patch:
        patch.setenv("USERPROFILE", home)
        patch.setattr(os, "path", ntpath)
        yield


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("keys\\cpi-key.json", "C:\\Users\\me\\proxy\\keys\\cpi-key.json"),
        ("keys/cpi-key.json", "C:\\Users\\me\\proxy\\keys\\cpi-key.json"),
        (".\\cpi-key.json", "C:\\Users\\me\\proxy\\cpi-key.json"),
        ("..\\Downloads\\cpi-key.json", "C:\\Users\\me\\Downloads\\cpi-key.json"),
        ("C:\\Users\\me\\Downloads\\cpi-key.json", "C:\\Users\\me\\Downloads\\cpi-key.json"),
        ("D:/keys/cpi-key.json", "D:/keys/cpi-key.json"),
        ("\\\\fileserver\\keys\\cpi-key.json", "\\\\fileserver\\keys\\cpi-key.json"),
        ("~\\Downloads\\cpi-key.json", "C:\\Users\\me\\Downloads\\cpi-key.json"),
    ],
)
def test_config_relative_paths_resolve_by_windows_rules(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: str
) -> None:
    with windows_os_path(monkeypatch):
        resolved = _resolve(value, "C:\\Users\\me\\proxy")
    assert resolved == expected


def test_a_drive_letter_path_in_a_config_file_is_not_joined_onto_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole loader with Windows' rules: the single-quoted path arrives verbatim and counts as absolute."""
    config = tmp_path / "proxy.yaml"
    config.write_text(
        "routes:\n"
        "  - credentials:\n"
        "      service_key: 'C:\\Users\\me\\Downloads\\cpi-key.json'\n"
        "  - prefix: /b/\n"
        "    credentials:\n"
        "      service_key: C:/Users/me/Downloads/other-key.json\n"
    )
    with windows_os_path(monkeypatch), pytest.raises(ConfigError) as caught:
        load_config(Overrides(config=str(config)), env={})
    message = str(caught.value)
    assert "C:\\Users\\me\\Downloads\\cpi-key.json" in message, message
    assert str(tmp_path) not in message, message  # not taken as relative to the config's folder


async def test_a_double_quoted_windows_path_is_explained_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "proxy.yaml"
    config.write_text('routes:\n  - credentials:\n      service_key: "C:\\Users\\me\\Downloads\\cpi-key.json"\n')
    result = await run_cli("config", "validate", str(config), env=windows_env())
    assert result.returncode == 2
    line = assert_one_error_line(result, f"config {config}:", "line 3, column", "(service_key)", "double-quoted", HINT)
    assert "cpi-key" not in line  # the value itself is never echoed: it might be a secret

    result = await run_cli("run", "--config", str(config), env=windows_env())
    assert result.returncode == 2
    assert_one_error_line(result, "(service_key)", HINT)


def test_a_double_quoted_secret_with_a_backslash_is_not_echoed(tmp_path: Path) -> None:
    config = tmp_path / "proxy.yaml"
    config.write_text('routes:\n  - credentials:\n      client_secret: "s3cr3t\\Qrest-of-it"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(Overrides(config=str(config)), env={})
    message = str(caught.value)
    assert "(client_secret)" in message and HINT in message, message
    assert "s3cr3t" not in message and "rest-of-it" not in message


def test_other_yaml_errors_keep_their_own_message(tmp_path: Path) -> None:
    config = tmp_path / "proxy.yaml"
    config.write_text("routes: [\n")
    with pytest.raises(ConfigError) as caught:
        load_config(Overrides(config=str(config)), env={})
    assert "not valid YAML" in str(caught.value)
    assert "single quotes" not in str(caught.value)
