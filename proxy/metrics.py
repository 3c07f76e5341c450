"""Prometheus metrics for the proxy (served on ``GET /-/metrics``).

Every :class:`ProxyMetrics` owns its own :class:`~prometheus_client.CollectorRegistry` instead of
using the library's global default ``REGISTRY``. Metric objects register themselves by name, so with
one process-wide registry a second application built in the same process (which the test suite does
all the time, and which embedding several proxies in one program would do too) fails with
"Duplicated timeseries", and values of independent apps would silently be mixed. A per-instance
registry keeps the metrics module free of global mutable state: an app's metrics live and die with
the app. Because the default process, platform and GC collectors only auto-register on the global
registry, they are registered explicitly on ours.

Label values are kept low-cardinality on purpose: HTTP methods outside a fixed set become
``other``, status codes are reduced to their class (``2xx`` ...), free-form outcome/reason/code
strings are truncated, and the unmatched route ``""`` is reported as ``none``.

The exposition format is produced by :func:`prometheus_client.generate_latest`; token expiry is
computed at scrape time by a custom collector that calls the registered callbacks, so no polling
task is needed.
"""

from __future__ import annotations

import bisect
import logging
import math
import threading
from collections.abc import Callable, Iterable
from typing import Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

import proxy

log = logging.getLogger("odata_auth_proxy.metrics")

PREFIX: Final = "odata_auth_proxy"

#: Request duration buckets (seconds): a local proxy adds little, upstream OData calls can be slow.
REQUEST_BUCKETS: Final[tuple[float, ...]] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)

#: Token endpoint round trips: tens of milliseconds to the request timeout.
TOKEN_BUCKETS: Final[tuple[float, ...]] = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

KNOWN_METHODS: Final[frozenset[str]] = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "MERGE", "DELETE", "OPTIONS"})

#: Longest free-form label value (outcome, reason, code) we keep.
MAX_LABEL_LEN: Final = 40

NO_ROUTE: Final = "none"


def route_label(route: str) -> str:
    """The ``route`` label value: the route name, or ``none`` for requests that matched no route."""
    return route if route else NO_ROUTE


def method_label(method: str) -> str:
    """Known HTTP methods as-is (upper case), anything else ``other`` to bound cardinality."""
    upper = method.upper()
    return upper if upper in KNOWN_METHODS else "other"


def status_class(status: int) -> str:
    """``200`` -> ``"2xx"``; status codes outside 100..599 become ``"other"``."""
    if 100 <= status <= 599:
        return f"{status // 100}xx"
    return "other"


def short_label(value: str, default: str = "unknown") -> str:
    """Free-form label values truncated to :data:`MAX_LABEL_LEN` characters (empty -> ``default``)."""
    return value[:MAX_LABEL_LEN] if value else default


class _TokenExpiryCollector:
    """Yields ``token_expiry_seconds{route}`` by calling each route's callback at scrape time."""

    def __init__(self, name: str, documentation: str) -> None:
        self._name = name
        self._documentation = documentation
        self._lock = threading.Lock()
        self._callbacks: dict[str, Callable[[], float | None]] = {}

    def track(self, route: str, seconds_left: Callable[[], float | None]) -> None:
        with self._lock:
            self._callbacks[route] = seconds_left

    def untrack(self, route: str) -> None:
        with self._lock:
            self._callbacks.pop(route, None)

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(self._name, self._documentation, labels=["route"])

    def describe(self) -> Iterable[Metric]:
        # Lets the registry know the name (duplicate detection) without calling the callbacks.
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            callbacks = sorted(self._callbacks.items())
        family = self._family()
        for route, callback in callbacks:
            try:
                value = callback()
            except Exception:
                # A broken callback must not break the whole scrape; drop just this sample.
                log.warning("token expiry callback for route %r failed", route, exc_info=True)
                continue
            if value is None or math.isnan(value):
                continue
            family.add_metric([route], float(value))
        return [family]


class _RequestCollector:
    """``requests_in_flight``, ``requests_total``, ``request_duration_seconds``, ``request_bytes_total`` and
    ``response_bytes_total``, kept as plain numbers (the proxy's event loop is the only writer) and exposed
    as metric families when scraped."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self._buckets = buckets
        #: the route names of the requests in flight, asked for when scraped (the listener knows them: no
        #: counting per request)
        self.in_flight: Callable[[], Iterable[str]] = tuple
        # one cell per (route, method, status class) label set: [count, bytes in, bytes out, duration sum,
        # then per-bucket counts (not cumulative; the last one is +Inf)]; looked up by the raw values first
        self._cells: dict[tuple[str, str, str], list[float]] = {}
        self._by_raw: dict[tuple[str, str, int], list[float]] = {}

    def finished(self, route: str, method: str, status: int, seconds: float, bytes_in: int, bytes_out: int) -> None:
        key = (route, method, status)
        cell = self._by_raw.get(key)
        if cell is None:
            cell = self._cell(key)
        cell[0] += 1
        if bytes_in > 0:
            cell[1] += bytes_in
        if bytes_out > 0:
            cell[2] += bytes_out
        if seconds > 0.0:
            cell[3] += seconds
            cell[4 + bisect.bisect_left(self._buckets, seconds)] += 1
        else:
            cell[4] += 1

    def _cell(self, key: tuple[str, str, int]) -> list[float]:
        """The cell for a label set not seen in this raw spelling yet (bounded: any method or status a client
        sends falls into a handful of labels)."""
        route, method, status = key
        labels = (route_label(route), method_label(method), status_class(status))
        cell = self._cells.get(labels)
        if cell is None:
            cell = self._cells[labels] = [0, 0, 0, 0.0] + [0] * (len(self._buckets) + 1)
        if len(self._by_raw) < 4096:
            self._by_raw[key] = cell
        return cell

    def describe(self) -> Iterable[Metric]:
        return list(self._families(empty=True))

    def collect(self) -> Iterable[Metric]:
        return list(self._families(empty=False))

    def _families(self, *, empty: bool) -> Iterable[Metric]:
        in_flight = GaugeMetricFamily(
            f"{PREFIX}_requests_in_flight", "Client requests currently being proxied.", labels=["route"]
        )
        totals = CounterMetricFamily(
            f"{PREFIX}_requests",
            "Client requests completed, by route, method and status class.",
            labels=["route", "method", "status_class"],
        )
        durations = HistogramMetricFamily(
            f"{PREFIX}_request_duration_seconds",
            "Time from receiving a client request until its response was finished.",
            labels=["route", "method"],
        )
        bytes_in = CounterMetricFamily(
            f"{PREFIX}_request_bytes", "Request body bytes received from clients.", labels=["route"]
        )
        bytes_out = CounterMetricFamily(
            f"{PREFIX}_response_bytes", "Response body bytes sent to clients.", labels=["route"]
        )
        if not empty:
            flying = dict.fromkeys((labels[0] for labels in self._cells), 0)  # routes seen: 0 when idle
            for route in self.in_flight():
                label = route_label(route)
                flying[label] = flying.get(label, 0) + 1
            for route, count in sorted(flying.items()):
                in_flight.add_metric([route], count)
            per_method: dict[tuple[str, str], list[float]] = {}
            per_route_in: dict[str, float] = {}
            per_route_out: dict[str, float] = {}
            for (route, method, status_cls), cell in sorted(self._cells.items()):
                totals.add_metric([route, method, status_cls], cell[0])
                per_route_in[route] = per_route_in.get(route, 0) + cell[1]
                per_route_out[route] = per_route_out.get(route, 0) + cell[2]
                summed = per_method.setdefault((route, method), [0.0] * (len(self._buckets) + 2))
                for index, in_bucket in enumerate(cell[4:]):
                    summed[index] += in_bucket
                summed[-1] += cell[3]
            for (route, method), counts in sorted(per_method.items()):
                cumulative = 0.0
                buckets: list[tuple[str, float]] = []
                for bound, in_bucket in zip((*self._buckets, math.inf), counts[:-1], strict=True):
                    cumulative += in_bucket
                    buckets.append(("+Inf" if math.isinf(bound) else repr(bound), cumulative))
                durations.add_metric([route, method], buckets, counts[-1])
            for route, value in sorted(per_route_in.items()):
                bytes_in.add_metric([route], value)
            for route, value in sorted(per_route_out.items()):
                bytes_out.add_metric([route], value)
        return [in_flight, totals, durations, bytes_in, bytes_out]


class ProxyMetrics:
    """All metrics of one proxy application, on a registry of their own."""

    registry: CollectorRegistry

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry

        # Standard process/platform/GC metrics, explicitly on our registry (not the global one).
        ProcessCollector(registry=reg)
        PlatformCollector(registry=reg)
        GCCollector(registry=reg)

        self.build_info = Gauge(
            "build_info",
            "Build information; the value is always 1.",
            ["version"],
            namespace=PREFIX,
            registry=reg,
        )
        self.build_info.labels(version=proxy.__version__).set(1)

        # the request metrics are counted in plain Python and turned into families at scrape time: the
        # prometheus-client objects take a lock and validate per call, several microseconds per request
        self._requests = _RequestCollector(REQUEST_BUCKETS)
        reg.register(self._requests)
        #: (route, method, status, seconds, bytes in, bytes out): the collector's own method, one call per request
        self.request_finished: Callable[[str, str, int, float, int, int], None] = self._requests.finished
        self.token_fetches_total = Counter(
            "token_fetches_total",
            "Token endpoint requests, by outcome (ok, invalid_client, network, timeout, tls, bad_response, ...).",
            ["route", "outcome"],
            namespace=PREFIX,
            registry=reg,
        )
        self.token_fetch_duration_seconds = Histogram(
            "token_fetch_duration_seconds",
            "Duration of token endpoint requests.",
            ["route"],
            namespace=PREFIX,
            registry=reg,
            buckets=TOKEN_BUCKETS,
        )
        self.upstream_replays_total = Counter(
            "upstream_replays_total",
            "Upstream requests sent a second time (fresh token after 401, or CSRF token refetch).",
            ["route", "reason"],
            namespace=PREFIX,
            registry=reg,
        )
        self.upstream_errors_total = Counter(
            "upstream_errors_total",
            "Upstream requests that failed without an HTTP response, by error code.",
            ["route", "code"],
            namespace=PREFIX,
            registry=reg,
        )
        self.client_certificate_expiry_timestamp_seconds = Gauge(
            "client_certificate_expiry_timestamp_seconds",
            "notAfter of the route's mTLS client certificate as a Unix timestamp.",
            ["route"],
            namespace=PREFIX,
            registry=reg,
        )
        self._token_expiry = _TokenExpiryCollector(
            f"{PREFIX}_token_expiry_seconds",
            "Seconds until the route's current access token expires (absent while there is no token).",
        )
        reg.register(self._token_expiry)

    # -- exposition -------------------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """``(body, content_type)`` for ``GET /-/metrics``.

        The content type includes ``charset``, so with aiohttp pass it as a header
        (``web.Response(body=body, headers={"Content-Type": content_type})``), not as ``content_type=``.
        """
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    # -- client requests --------------------------------------------------------------------------

    def count_in_flight(self, routes: Callable[[], Iterable[str]]) -> None:
        """``requests_in_flight{route}`` from ``routes()`` (one route name per request being answered), called
        when scraped."""
        self._requests.in_flight = routes

    # -- tokens -----------------------------------------------------------------------------------

    def token_fetch(self, route: str, outcome: str, seconds: float) -> None:
        r = route_label(route)
        self.token_fetches_total.labels(route=r, outcome=short_label(outcome)).inc()
        self.token_fetch_duration_seconds.labels(route=r).observe(max(0.0, seconds))

    def track_token_expiry(self, route: str, seconds_left: Callable[[], float | None]) -> None:
        """Report ``seconds_left()`` as ``token_expiry_seconds{route}`` at every scrape.

        The callback is called on the scraping thread/loop and must be cheap and non-blocking; ``None``
        (no token yet) omits the sample. Tracking the same route again replaces its callback.
        """
        self._token_expiry.track(route_label(route), seconds_left)

    def untrack_token_expiry(self, route: str) -> None:
        """Stop reporting the route's token expiry (no-op if it is not tracked)."""
        self._token_expiry.untrack(route_label(route))

    # -- upstream ---------------------------------------------------------------------------------

    def upstream_replay(self, route: str, reason: str) -> None:
        self.upstream_replays_total.labels(route=route_label(route), reason=short_label(reason)).inc()

    def upstream_errors(self, route: str, code: str) -> None:
        self.upstream_errors_total.labels(route=route_label(route), code=short_label(code)).inc()

    # -- certificates -----------------------------------------------------------------------------

    def set_certificate_expiry(self, route: str, not_after_timestamp: float) -> None:
        self.client_certificate_expiry_timestamp_seconds.labels(route=route_label(route)).set(not_after_timestamp)
