"""Windows' constraints, imposed on any Python that has this directory on ``PYTHONPATH`` (tests/test_windows_mode.py).

CPython on Windows has no ``os.memfd_create``, no ``signal.SIGHUP``, no ``socket.SO_REUSEPORT`` and no
``socket.AF_UNIX``; its default (Proactor) loop raises NotImplementedError from ``add_signal_handler``; and
uvloop does not exist there. This module takes all of that away here, at interpreter start, so the real proxy
can be run as a subprocess under the same constraints on Linux.

``socket.socketpair`` keeps working (Windows has one too, emulated over loopback TCP): the selector loop's
self-pipe needs it, and its default family would otherwise be looked up as the deleted ``AF_UNIX``.
"""

from __future__ import annotations

import asyncio
import asyncio.unix_events
import os
import signal
import socket
import sys
from typing import Any

_AF_UNIX = socket.AF_UNIX
_socketpair = socket.socketpair


def _socketpair_without_af_unix(family: Any = None, type: Any = socket.SOCK_STREAM, proto: int = 0) -> Any:
    return _socketpair(_AF_UNIX if family is None else family, type, proto)


def _no_add_signal_handler(self: Any, sig: int, callback: Any, *args: Any) -> None:
    raise NotImplementedError


for _module, _name in ((os, "memfd_create"), (signal, "SIGHUP"), (socket, "SO_REUSEPORT"), (socket, "AF_UNIX")):
    if hasattr(_module, _name):
        delattr(_module, _name)
socket.socketpair = _socketpair_without_af_unix
asyncio.unix_events._UnixSelectorEventLoop.add_signal_handler = _no_add_signal_handler  # type: ignore[method-assign]
sys.modules["uvloop"] = None  # type: ignore[assignment]  # ``import uvloop`` raises ImportError, as on Windows
