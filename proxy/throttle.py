"""Say it once, then count: repeated identical log lines under a fault become one line and a summary.

An unreachable upstream under load fails hundreds of requests a second; one WARNING per request buries
everything else in the log and costs CPU when it matters least. The first occurrence of a (key) is logged
as it is; further ones within ``window`` seconds are only counted, and when the window ends one line says
``… 368 more in the last 10 s``. A different key (another route, another error code) is logged at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

DEFAULT_WINDOW = 10.0
_MAX_KEYS = 1024  # bounded: keys are (route, error code) pairs, but never let a bug grow this without end


@dataclass
class _Window:
    started: float
    level: int
    summary: str
    suppressed: int = 0
    timer: asyncio.TimerHandle | None = None


class LogThrottle:
    def __init__(
        self, logger: logging.Logger, window: float = DEFAULT_WINDOW, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.logger = logger
        self.window = window
        self._clock = clock
        self._windows: dict[Hashable, _Window] = {}

    def log(self, level: int, key: Hashable, message: str, *args: object) -> None:
        """Log ``message % args`` unless the same ``key`` was logged less than ``window`` seconds ago."""
        now = self._clock()
        current = self._windows.get(key)
        if current is not None and now - current.started < self.window:
            current.suppressed += 1
            if current.timer is None:
                current.timer = self._schedule(key, current)
            return
        if current is not None:
            self._summarise(key, current)
        if len(self._windows) >= _MAX_KEYS:
            self.flush()
        self.logger.log(level, message, *args)
        self._windows[key] = _Window(started=now, level=level, summary=message % args if args else message)

    def _schedule(self, key: Hashable, window: _Window) -> asyncio.TimerHandle | None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None
        delay = max(0.0, window.started + self.window - self._clock())
        return loop.call_later(delay, self._expire, key, window)

    def _expire(self, key: Hashable, window: _Window) -> None:
        if self._windows.get(key) is window:
            del self._windows[key]
            self._summarise(key, window)

    def _summarise(self, key: Hashable, window: _Window) -> None:
        if window.timer is not None:
            window.timer.cancel()
            window.timer = None
        if window.suppressed:
            self.logger.log(
                window.level, "%s … %d more in the last %g s", window.summary, window.suppressed, self.window
            )
            window.suppressed = 0

    def flush(self) -> None:
        """Write every pending summary now (at shutdown, or when too many keys pile up)."""
        windows, self._windows = self._windows, {}
        for key, window in windows.items():
            self._summarise(key, window)
