"""What the inspector remembers: the last 500 exchanges and 5 minutes of request rate and latency, in memory.

Recording runs on the request path of every request, so ``record`` builds one flat tuple of numbers, strings
and references and puts it into a preallocated list (:class:`Ring`); dictionaries and JSON are built when
somebody asks (``proxy.inspector.api``). The header lists are the parsers' own, kept by reference (no copy:
packing them into bytes cost 2–3 µs a request), and for a successful exchange only while somebody looks at
the inspector (``watched``), so that the common case records no more than numbers and strings: keeping every
request's heads alive for 500 requests made freeing them, 500 requests later and long out of the CPU caches,
3 % of the proxy's profile at 64 connections (``tupledealloc``), where the instruction count saw nothing. The
5-second buckets of the charts cost nothing per request: when a bucket closes, its count comes from the
sequence numbers and its p50/p99 from its exchanges still in the ring (all of them up to 100 requests a
second, the newest 500 above). Nothing is written to disk, and request or response bodies are never
referenced.

One recorder lives as long as the process serves with the inspector on: a reload hands it to the next runtime
(``proxy.app.Runtime``), so the list survives a configuration change.
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Final

from proxy.http.heads import Header

if TYPE_CHECKING:
    from proxy.exchange import Exchange
    from proxy.tokens import Token

RING_SIZE: Final = 500
WINDOW_S: Final = 300
BUCKET_S: Final = 5
MAX_STREAMS: Final = 16  # concurrent event-stream clients

# one recorded exchange: a flat tuple, cheap to build on the request path
Entry = tuple[
    int,  # SEQ
    float,  # TIME: epoch seconds when the request arrived
    float,  # DURATION: seconds
    str,  # METHOD
    str,  # TARGET: path and query as received
    Sequence[Header],  # HEADERS: the client's request headers as parsed (the parser's own list; () when not kept)
    Sequence[Header] | None,  # ANSWER: the upstream's answer headers as parsed (None: the client did not get them)
    int,  # STATUS
    int | None,  # UPSTREAM_STATUS
    int,  # BYTES_IN
    int,  # BYTES_OUT
    str | None,  # ROUTE
    str | None,  # REPLAYED
    str | None,  # ERROR
    str,  # REQUEST_ID
    tuple[bytes, ...],  # EXTRA: header lines a filter added to every attempt (``Exchange.extra``)
    int,  # FLAGS: SENT_UPSTREAM | CSRF_ADDED | COOKIE_ADDED
    str | None,  # TOKEN_FP
]
# as the ring stores it: the token itself where Entry has its fingerprint
Stored = tuple[
    int,
    float,
    float,
    str,
    str,
    Sequence[Header],
    Sequence[Header] | None,
    int,
    int | None,
    int,
    int,
    str | None,
    str | None,
    str | None,
    str,
    tuple[bytes, ...],
    int,
    "Token | None",
]
# the fields' positions (``Final``: a type checker knows each field's type)
SEQ: Final = 0
TIME: Final = 1
DURATION: Final = 2
METHOD: Final = 3
TARGET: Final = 4
HEADERS: Final = 5
ANSWER: Final = 6
STATUS: Final = 7
UPSTREAM_STATUS: Final = 8
BYTES_IN: Final = 9
BYTES_OUT: Final = 10
ROUTE: Final = 11
REPLAYED: Final = 12
ERROR: Final = 13
REQUEST_ID: Final = 14
EXTRA: Final = 15
FLAGS: Final = 16
TOKEN_FP: Final = 17

SENT_UPSTREAM: Final = 1  # the request went upstream: X-Request-Id (and Authorization with a token) were added
CSRF_ADDED: Final = 2  # the CSRF filter added its cached X-CSRF-Token (``Exchange.drop`` names the client's)
COOKIE_ADDED: Final = 4  # … and the CSRF session's cookies, merged into Cookie
#: a successful exchange while nobody was looking: its headers were not kept (``Recorder.watched``)
NO_HEADERS: Final = 8

WATCH_S: Final = 600  # after the last look at the inspector (page, JSON or event stream), headers are kept this long

# a closed bucket: (start epoch, requests, p50 seconds or None, p99 seconds or None)
Bucket = tuple[int, int, float | None, float | None]


class Ring:
    """The last ``size`` exchanges, oldest first, in a preallocated list overwritten in place: one flat tuple per
    exchange, of numbers and strings (plus the parsers' header lists while somebody looks, see ``record``). The
    token is kept as the object, its fingerprint worked out when somebody reads the entry. Read like a deque of
    :data:`Entry`."""

    def __init__(self, size: int) -> None:
        self.maxlen = size
        self.last = 0  # the seq of the newest exchange (0: none yet)
        self.slots: list[Stored | None] = [None] * size

    def put(self, entry: Stored) -> None:
        """Store an exchange whose seq is one more than the last, overwriting the oldest when full."""
        seq = entry[SEQ]
        self.slots[(seq - 1) % self.maxlen] = entry
        self.last = seq

    def __len__(self) -> int:
        return min(self.last, self.maxlen)

    def __getitem__(self, index: int) -> Entry:
        size = len(self)
        if index < 0:
            index += size
        if not 0 <= index < size:
            raise IndexError(index)
        stored = self.slots[(self.last - size + index) % self.maxlen]
        assert stored is not None
        token = stored[TOKEN_FP]
        return (*stored[:TOKEN_FP], token.fingerprint if token is not None else None)

    def __iter__(self) -> Iterator[Entry]:
        return (self[i] for i in range(len(self)))

    def __reversed__(self) -> Iterator[Entry]:
        return (self[i] for i in range(len(self) - 1, -1, -1))


def percentile(ordered: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending, non-empty list."""
    rank = max(0, min(len(ordered) - 1, int(fraction * len(ordered) + 0.999999) - 1))
    return ordered[rank]


class Recorder:
    """The ring of recent exchanges, the latency buckets, and how many event streams are open."""

    def __init__(self) -> None:
        self.ring = Ring(RING_SIZE)
        self.seq = 0
        self.streams = 0  # event-stream clients connected now (both ports)
        self.instance = secrets.token_hex(4)  # tells a page that the proxy restarted (``seq`` starts again)
        # perf_counter -> epoch; refreshed whenever a bucket closes, so wall-clock steps are followed
        self._offset = time.time() - time.perf_counter()
        self._closed: deque[Bucket] = deque(maxlen=WINDOW_S // BUCKET_S)
        self._bucket_start = 0  # epoch second the current bucket began (a multiple of BUCKET_S)
        self._bucket_end = 0.0  # on the perf_counter clock
        self._bucket_first = 1
        self._watched_until = 0.0  # perf_counter until which every exchange's headers are kept
        self._open_bucket(time.perf_counter())

    # ---------------------------------------------------------------- the request path

    def watched(self) -> None:
        """Somebody is looking (the page, the JSON, the event stream): keep every exchange's headers for the
        next ``WATCH_S`` seconds. While nobody looks, only failed exchanges (status outside 200–399, or a proxy
        error) keep theirs: keeping the headers of every request is most of what recording costs."""
        self._watched_until = time.perf_counter() + WATCH_S

    def record(self, ex: Exchange) -> None:
        """Remember one finished exchange, unless it was the inspector's (or another admin endpoint's)."""
        if ex.admin:
            return
        head = ex.head
        target = head.target
        now = ex.ended
        if now >= self._bucket_end:  # the 5-s bucket is over: its figures come from the ring (below)
            self._close_bucket(now)
        started = ex.started
        duration = ex.duration
        seq = self.seq = self.seq + 1
        route = ex.route
        up = ex.upstream
        status = ex.status
        flags = 0
        headers: Sequence[Header] = ()
        answer = None
        if now < self._watched_until or not 200 <= status < 400 or ex.error is not None:
            headers = head.headers  # the parser's lists, kept as they are: no copy (a new one per message)
            if up is not None and ex.upstream_status is not None and up.head is not None:
                answer = up.head.headers  # the client got this answer
        else:
            flags = NO_HEADERS
        if up is not None:
            flags |= SENT_UPSTREAM
            if ex.csrf_key is not None:
                drop = ex.drop
                if b"x-csrf-token" in drop:
                    flags |= CSRF_ADDED
                if b"cookie" in drop:
                    flags |= COOKIE_ADDED
        self.ring.put(
            (
                seq,
                started + self._offset,
                duration,
                head.method,
                target,
                headers,
                answer,
                status,
                ex.upstream_status,
                ex.bytes_in,
                ex.conn.bytes_out,
                route.name if route is not None else None,
                ex.replayed,
                ex.error,
                ex.request_id,
                ex.extra,
                flags,
                ex.token,
            )
        )

    # ---------------------------------------------------------------- buckets

    def _open_bucket(self, now: float) -> None:
        epoch = now + self._offset
        start = int(epoch // BUCKET_S) * BUCKET_S
        self._bucket_start = start
        self._bucket_end = now + (start + BUCKET_S - epoch)
        self._bucket_first = self.seq + 1  # the first exchange recorded in this bucket

    def _close_bucket(self, now: float) -> None:
        """The current bucket is over: keep its count (exact, from the sequence numbers) and its percentiles (from
        its exchanges still in the ring: all of them up to 500 in 5 s, else the newest 500), start the one
        ``now`` falls in. Nothing is counted per request for it."""
        count = self.seq - self._bucket_first + 1
        if count > 0:
            ordered = sorted(
                stored[DURATION]
                for stored in self.ring.slots
                if stored is not None and stored[SEQ] >= self._bucket_first
            )
            if ordered:
                self._closed.append((self._bucket_start, count, percentile(ordered, 0.5), percentile(ordered, 0.99)))
        self._offset = time.time() - time.perf_counter()
        self._open_bucket(now)

    def series(self) -> tuple[int, list[Bucket]]:
        """(start of the current, unfinished bucket; the closed buckets of the last ``WINDOW_S`` seconds, oldest
        first, empty ones included as (t, 0, None, None))."""
        now = time.perf_counter()
        if now >= self._bucket_end:
            self._close_bucket(now)
        current = self._bucket_start
        first = current - WINDOW_S
        known = {bucket[0]: bucket for bucket in self._closed if bucket[0] >= first}
        return current, [known.get(t, (t, 0, None, None)) for t in range(first, current, BUCKET_S)]

    # ---------------------------------------------------------------- reading the ring

    def entry(self, seq: int) -> Entry | None:
        """The exchange numbered ``seq``, or None once it has left the ring."""
        ring = self.ring
        if not ring:
            return None
        index = seq - ring[0][SEQ]
        if 0 <= index < len(ring):
            found = ring[index]
            return found if found[SEQ] == seq else None
        return None

    def newer_than(self, seq: int) -> list[Entry]:
        """The exchanges after ``seq``, oldest first (all that are still in the ring)."""
        ring = self.ring
        if not ring or ring[-1][SEQ] <= seq:
            return []
        start = max(0, seq + 1 - ring[0][SEQ])
        return [ring[i] for i in range(start, len(ring))]
