"""Build hook: the request path compiled to C with mypyc (``proxy/compiled.py`` says which modules and why).

Everything else about the package is in ``pyproject.toml``. Compiling is optional: where no C compiler works
(Windows without Visual C++, a slim container without gcc) or ``ODATA_AUTH_PROXY_COMPILE=0`` is set, the build
says so and installs pure Python, which behaves the same, only slower. All modules are compiled or none: a
partial build is removed, since the compiled modules call each other directly.
"""

from __future__ import annotations

import os
import sys
from importlib.util import module_from_spec, spec_from_file_location
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent


def compiled_settings() -> Any:
    """``proxy/compiled.py``, read from its file: nothing of the project is installed yet."""
    spec = spec_from_file_location("_proxy_compiled", HERE / "proxy" / "compiled.py")
    assert spec is not None and spec.loader is not None
    module = module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def say(message: str) -> None:
    print(f"odata-auth-proxy build: {message}", file=sys.stderr)


class OptionalBuildExt(build_ext):
    """Build the compiled modules, or none of them: a failure falls back to pure Python with a warning."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # a missing compiler shows up as one of several distutils errors
            for ext in self.extensions:
                Path(self.get_ext_fullpath(ext.name)).unlink(missing_ok=True)
            reason = f"{type(exc).__name__}: {exc}"
            reason = reason if len(reason) <= 200 else reason[:200] + " …"
            say(f"compiling the request path failed ({reason}); installing pure Python (same behaviour, slower)")


#: the setup.py commands that build code; pip also runs setup.py for metadata only (egg_info, dist_info), where
#: translating the modules would only cost time (about 20 s each)
BUILDING = frozenset({"bdist_wheel", "editable_wheel", "build", "build_ext", "develop", "install"})


def extensions() -> list[Any]:
    if not BUILDING.intersection(sys.argv[1:]):
        return []
    settings = compiled_settings()
    if not settings.env_flag(os.environ, settings.COMPILE_ENV, default=True):
        say(f"{settings.COMPILE_ENV}=0: installing pure Python")
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:  # built without the build requirements (--no-build-isolation without mypy)
        say("mypy (mypyc) is not installed in the build environment; installing pure Python")
        return []
    paths = [str(Path(*module.split(".")).with_suffix(".py")) for module in settings.MODULES]
    # Types of the modules the compiled ones import, without judging them: the build environment need not hold
    # every dependency (`mypy proxy`, strict, is the type check; this is code generation).
    options = ["--ignore-missing-imports", "--follow-imports=silent", "--no-warn-unused-ignores"]
    try:
        return list(mypycify(options + paths, opt_level="1", group_name="odata_auth_proxy"))
    except (Exception, SystemExit) as exc:  # mypyc reports type errors with SystemExit
        say(f"mypyc could not translate the request path ({exc!r}); installing pure Python")
        return []


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
