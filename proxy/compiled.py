"""Which modules are compiled with mypyc, and whether this process runs them compiled or from their sources.

Why compiled: the request path is plain, fully annotated Python; mypyc turns it into C that reads attributes at
fixed offsets and calls functions directly, which halves the Python part of a request's CPU (``bench/micro.py``:
21 µs → 10 µs). ``setup.py`` compiles these modules when a C compiler is at hand; elsewhere the package installs
as pure Python and behaves the same, only slower.

The compiled modules are one unit (one shared library whose modules call each other directly, by C types), so
either all of them load compiled or all load from their ``.py`` sources, never a mix. Sources load when
``ODATA_AUTH_PROXY_PURE=1`` is set, when a compiled file is missing, or when a source is newer than its compiled
file in a source checkout: an editable install edited after ``pip install -e .`` must run the edit, not the stale
build (an installed wheel's time stamps mean nothing of the kind, so there only presence counts).

This module imports nothing of the project: ``setup.py`` reads ``MODULES`` from it before anything is installed.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import site
import sys
import sysconfig
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

#: the request path and what it calls per request, in dependency order
MODULES = (
    "proxy.http.flow",
    "proxy.http.heads",
    "proxy.exchange",
    "proxy.router",
    "proxy.guard",
    "proxy.odata",
    "proxy.logs",
    "proxy.metrics",
    "proxy.inspector.recorder",
    "proxy.filters.base",
    "proxy.filters.admin",
    "proxy.filters.credentials",
    "proxy.filters.csrf",
    "proxy.filters.guard",
    "proxy.filters.inspect",
    "proxy.filters.links",
    "proxy.filters.observe",
    "proxy.filters.route",
    "proxy.http.upstream",
    "proxy.http.listener",
    "proxy.pipeline",
)

PURE_ENV = "ODATA_AUTH_PROXY_PURE"  # at run time: load the sources
COMPILE_ENV = "ODATA_AUTH_PROXY_COMPILE"  # at install time (setup.py): 0 installs pure Python
_ROOT = Path(__file__).resolve().parent.parent


def env_flag(environ: Mapping[str, str], name: str, *, default: bool) -> bool:
    """A yes/no variable (1/true/yes/on, 0/false/no/off); unset or anything else: ``default``. (config.py has its
    own: this module imports nothing of the project, and ``setup.py`` uses this one.)"""
    value = environ.get(name, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return default


@dataclass(frozen=True)
class Build:
    """How this process runs the request path: ``compiled`` or not, and why not (for the banner and doctor)."""

    compiled: bool
    reason: str

    def describe(self) -> str:
        return "compiled (mypyc)" if self.compiled else f"pure Python ({self.reason})"


def source_of(module: str, root: Path = _ROOT) -> Path:
    return root.joinpath(*module.split(".")).with_suffix(".py")


def _compiled_file(source: Path) -> Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = source.with_name(source.stem + suffix)
        if candidate.exists():
            return candidate
    return None


def installed_copy(root: Path) -> bool:
    """Installed from a wheel into a site-packages directory (not a source checkout): nobody edits it in place,
    and pip gives its files the wheel's time stamps, so a source may look as new as its compiled file or newer."""
    places = {sysconfig.get_paths()[name] for name in ("purelib", "platlib")} | {site.getusersitepackages()}
    return any(root == Path(place).resolve() for place in places)


def inspect_build(
    modules: Sequence[str] = MODULES,
    environ: Mapping[str, str] = os.environ,
    root: Path = _ROOT,
    check_age: bool | None = None,
) -> Build:
    """Decide, from the files next to the sources, whether the compiled modules can be used. ``check_age``: whether
    a source newer than its compiled file means an edit (default: in a source checkout, not an installed copy)."""
    if env_flag(environ, PURE_ENV, default=False):
        return Build(False, f"{PURE_ENV} is set")
    if check_age is None:
        check_age = not installed_copy(root)
    for module in modules:
        source = source_of(module, root)
        compiled = _compiled_file(source)
        if compiled is None:
            return Build(False, f"not compiled at install: no C compiler, or {COMPILE_ENV}=0")
        if check_age and source.exists() and source.stat().st_mtime > compiled.stat().st_mtime:
            return Build(
                False,
                f"{source.name} is newer than its compiled file: run `pip install -e .` again to compile the edit",
            )
    return Build(True, "")


class _SourcesFirst:
    """A meta-path finder that loads the compiled modules from their ``.py`` files (``sys.meta_path``)."""

    def __init__(self, modules: Sequence[str]) -> None:
        self.modules = frozenset(modules)

    def find_spec(
        self, name: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name not in self.modules:
            return None
        return importlib.util.spec_from_file_location(name, source_of(name))


def choose(modules: Sequence[str] = MODULES) -> Build:
    """Called once by ``proxy/__init__``: make the sources load instead of the compiled files when needed."""
    build = inspect_build(modules)
    if not build.compiled and not any(isinstance(finder, _SourcesFirst) for finder in sys.meta_path):
        sys.meta_path.insert(0, _SourcesFirst(modules))  # some compiled files may exist: never mix them in
    return build
