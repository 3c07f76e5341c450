"""``GET /-/api/events``: the inspector's server-sent events, for whatever carries them (main port, admin port).

The stream polls the recorder every ``TICK`` seconds instead of being woken per request: with a page open the
request path pays nothing extra, and a request still shows within a quarter of a second. Each tick sends what
is new in one write: ``request`` events (``id:`` is the request's ``seq``, so a reconnecting ``EventSource``
resumes with ``Last-Event-ID``), ``routes`` every second, ``stats`` every 5 s, a comment every 15 s.

Memory stays flat whatever the client does: nothing is queued per client. A client whose connection cannot
take more (``Sink.backlogged``) misses events meanwhile (told afterwards by a ``dropped`` event with their
count) and is cut after ``stall_limit`` seconds. A tick with more new requests than ``MAX_BATCH`` sends the
newest ones and a ``dropped`` event for the rest (a page cannot show thousands of rows a second anyway).

The stream ends by itself when ``ended()`` says so: the proxy drains (SIGTERM) or reloads (the page's
``EventSource`` reconnects to the new configuration), so neither waits for it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, Protocol

from proxy.inspector.api import InspectorApi
from proxy.inspector.recorder import SEQ, Entry

TICK = 0.25
ROUTES_EVERY = 1.0
STATS_EVERY = 5.0
HEARTBEAT_EVERY = 15.0
MAX_BATCH = 100  # request events per tick
RETRY_MS = 1000  # how soon an EventSource reconnects after the stream ended (reload, drain)

STREAM_HEADERS = (
    ("Content-Type", "text/event-stream; charset=utf-8"),
    ("X-Accel-Buffering", "no"),
)


class Sink(Protocol):
    """Where the events go: a client connection of either port."""

    @property
    def closed(self) -> bool: ...

    @property
    def backlogged(self) -> bool:
        """The client's connection holds unsent data beyond its limit: do not add to it now."""
        ...

    async def write(self, data: bytes) -> None: ...


def _event(name: str, data: dict[str, Any], event_id: int | None = None) -> bytes:
    head = f"event: {name}\nid: {event_id}\n" if event_id is not None else f"event: {name}\n"
    return (head + "data: " + json.dumps(data, separators=(",", ":")) + "\n\n").encode()


def request_event(api: InspectorApi, entry: Entry) -> bytes:
    """One ``request`` event: the entry's summary, with its ``seq`` as the event id."""
    return _event("request", api.summary(entry), entry[SEQ])


def resume_point(last_event_id: str | None, since: str | None, newest: int) -> int:
    """The ``seq`` after which to send requests: ``Last-Event-ID`` (a reconnect) or ``?since=``, else now.
    A number beyond the newest (the proxy restarted since) sends all that is kept."""
    for value in (last_event_id, since):
        if value is not None and value.strip().isdigit():
            seq = int(value.strip())
            return seq if seq <= newest else 0
    return newest


async def stream_events(
    api: InspectorApi,
    sink: Sink,
    ended: Callable[[], bool],
    *,
    after: int,
    stall_limit: float,
) -> None:
    """Send events to ``sink`` until it closes, stalls for ``stall_limit`` seconds, or ``ended()``."""
    loop = asyncio.get_running_loop()
    recorder = api.recorder
    last = after
    dropped = 0
    now = loop.time()
    next_routes = next_stats = now
    next_beat = now + HEARTBEAT_EVERY
    stalled_since: float | None = None
    await sink.write(f"retry: {RETRY_MS}\n\n".encode())
    while not ended() and not sink.closed:
        now = loop.time()
        if sink.backlogged:
            dropped += max(0, recorder.seq - last)
            last = recorder.seq
            if stalled_since is None:
                stalled_since = now
            elif now - stalled_since > stall_limit:
                return
        else:
            stalled_since = None
            recorder.watched()  # a page is looking: keep every request's headers
            parts: list[bytes] = []
            fresh = recorder.newer_than(last) if recorder.seq > last else []
            if fresh:
                skipped = max(0, fresh[0][SEQ] - last - 1)  # left the ring before we came to them
                if len(fresh) > MAX_BATCH:
                    skipped += len(fresh) - MAX_BATCH
                    fresh = fresh[-MAX_BATCH:]
                dropped += skipped
                last = fresh[-1][SEQ]
            if dropped:
                parts.append(_event("dropped", {"count": dropped}))
                dropped = 0
            parts.extend(request_event(api, entry) for entry in fresh)
            if now >= next_routes:
                parts.append(_event("routes", api.routes()))
                next_routes = now + ROUTES_EVERY
            if now >= next_stats:
                parts.append(_event("stats", api.stats()))
                next_stats = now + STATS_EVERY
            if now >= next_beat:
                parts.append(b": heartbeat\n\n")
                next_beat = now + HEARTBEAT_EVERY
            if parts:
                await sink.write(b"".join(parts))
        await asyncio.sleep(TICK)
