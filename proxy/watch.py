"""Reload when a file the configuration came from changes: nobody sends SIGHUP to a sidecar.

Kubernetes updates a mounted Secret by swapping a ``..data`` symlink; editors replace files; an operator
copies a new service key over the old one. The watcher reads every file the running configuration was read
from (config file, service keys, ``*_file`` secrets, certificate, key, PKCS#12 bundle, CA bundle) every
``interval`` seconds and compares their contents (SHA-256), so a new inode, a swapped link or a touched but
unchanged file all come out right. A change triggers the same reload as SIGHUP, with its safety: a broken
or refused new version keeps the old one serving. Each distinct content is tried once: a refused file is not
retried until it changes again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

from proxy.config import Config

log = logging.getLogger("odata_auth_proxy")

WATCH_INTERVAL = 2.0  # a corrected key in a swapped mount is in use within a few seconds
SETTLE = 0.5  # after a change, wait this long and look again: a file being written is not read half-way


def watched_files(config: Config) -> list[str]:
    """The files the configuration was read from, in a stable order."""
    files = list(config.files)
    for route in config.routes:
        files.extend(route.credentials.watched_files())
    return list(dict.fromkeys(files))


def _digest(path: str) -> str | None:
    try:
        return hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()
    except OSError:
        return None  # missing or unreadable for now: a change like any other once it is back


def snapshot(paths: Iterable[str]) -> dict[str, str | None]:
    return {path: _digest(path) for path in paths}


class FileWatcher:
    """Calls ``on_change(changed_paths)`` when the contents of ``files()`` change; one check at a time."""

    def __init__(
        self,
        files: Callable[[], list[str]],
        on_change: Callable[[list[str]], Awaitable[object]],
        interval: float = WATCH_INTERVAL,
    ) -> None:
        self._files = files
        self._on_change = on_change
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None and self._files():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="config-watch")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        known = await asyncio.to_thread(snapshot, self._files())
        while True:
            await asyncio.sleep(self.interval)
            current = await asyncio.to_thread(snapshot, known)
            if current == known:
                continue
            await asyncio.sleep(SETTLE)
            current = await asyncio.to_thread(snapshot, known)
            changed = [path for path in known if current.get(path) != known[path]]
            if not changed:
                continue
            log.info("watch: %s changed: reloading", ", ".join(changed))
            try:
                await self._on_change(changed)
            except Exception as exc:  # the reload logs its own failures; a bug must not end the watching
                log.error("watch: reload failed (internal error: %s)", exc.__class__.__name__)
            # what the (possibly new) configuration reads now: contents seen are not tried again
            known = await asyncio.to_thread(snapshot, self._files())
