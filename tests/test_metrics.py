"""Tests for proxy.metrics: everything is checked through the parsed exposition output."""

from __future__ import annotations

import math

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

import proxy
from proxy.metrics import ProxyMetrics, method_label, status_class

P = "odata_auth_proxy_"


def samples(metrics: ProxyMetrics) -> list[Sample]:
    body, _ = metrics.render()
    return [s for fam in text_string_to_metric_families(body.decode("utf-8")) for s in fam.samples]


def value(metrics: ProxyMetrics, name: str, **labels: str) -> float | None:
    """The value of the sample ``name`` with exactly ``labels``, or None if there is none."""
    found = [s.value for s in samples(metrics) if s.name == name and s.labels == labels]
    assert len(found) <= 1
    return found[0] if found else None


def test_content_type_is_prometheus_text() -> None:
    body, content_type = ProxyMetrics().render()
    assert isinstance(body, bytes)
    assert content_type == CONTENT_TYPE_LATEST
    assert content_type.startswith("text/plain; version=")


def test_build_info() -> None:
    m = ProxyMetrics()
    assert value(m, P + "build_info", version=proxy.__version__) == 1.0


def test_process_platform_gc_metrics_present() -> None:
    names = {s.name for s in samples(ProxyMetrics())}
    assert "process_cpu_seconds_total" in names  # Linux
    assert "process_resident_memory_bytes" in names
    assert "python_info" in names
    assert "python_gc_collections_total" in names


def test_in_flight_is_counted_when_scraped() -> None:
    """The listener names the route of each request in flight when asked; routes seen report 0 when idle."""
    m = ProxyMetrics()
    flying = ["cpi", "cpi", "other"]
    m.count_in_flight(lambda: flying)
    assert value(m, P + "requests_in_flight", route="cpi") == 2.0
    assert value(m, P + "requests_in_flight", route="other") == 1.0
    m.request_finished("cpi", "GET", 200, 0.01, 0, 10)
    flying[:] = ["cpi"]
    assert value(m, P + "requests_in_flight", route="cpi") == 1.0
    assert value(m, P + "requests_in_flight", route="other") is None
    flying.clear()
    assert value(m, P + "requests_in_flight", route="cpi") == 0.0


def test_request_finished_counters_and_histogram() -> None:
    m = ProxyMetrics()
    for seconds in (0.003, 0.2, 45.0):
        m.request_finished("cpi", "POST", 201, seconds, 100, 7)

    assert value(m, P + "requests_total", route="cpi", method="POST", status_class="2xx") == 3.0
    hist = P + "request_duration_seconds"
    assert value(m, hist + "_count", route="cpi", method="POST") == 3.0
    assert math.isclose(value(m, hist + "_sum", route="cpi", method="POST") or 0.0, 45.203)
    assert value(m, hist + "_bucket", route="cpi", method="POST", le="0.005") == 1.0
    assert value(m, hist + "_bucket", route="cpi", method="POST", le="0.25") == 2.0
    assert value(m, hist + "_bucket", route="cpi", method="POST", le="30.0") == 2.0
    assert value(m, hist + "_bucket", route="cpi", method="POST", le="60.0") == 3.0
    assert value(m, P + "request_bytes_total", route="cpi") == 300.0
    assert value(m, P + "response_bytes_total", route="cpi") == 21.0


def test_status_class_mapping() -> None:
    assert [status_class(s) for s in (100, 200, 299, 304, 404, 502, 599)] == [
        "1xx",
        "2xx",
        "2xx",
        "3xx",
        "4xx",
        "5xx",
        "5xx",
    ]
    assert status_class(0) == "other"
    assert status_class(600) == "other"

    m = ProxyMetrics()
    for status in (200, 204, 404, 503):
        m.request_finished("r", "GET", status, 0.0, 0, 0)
    assert value(m, P + "requests_total", route="r", method="GET", status_class="2xx") == 2.0
    assert value(m, P + "requests_total", route="r", method="GET", status_class="4xx") == 1.0
    assert value(m, P + "requests_total", route="r", method="GET", status_class="5xx") == 1.0


def test_method_cardinality_and_unmatched_route() -> None:
    for known in ("GET", "HEAD", "POST", "PUT", "PATCH", "MERGE", "DELETE", "OPTIONS"):
        assert method_label(known) == known
    assert method_label("PROPFIND") == "other"

    m = ProxyMetrics()
    m.request_finished("", "BREW", 418, 0.0, 0, 0)
    assert value(m, P + "requests_total", route="none", method="other", status_class="4xx") == 1.0
    assert value(m, P + "requests_in_flight", route="none") == 0.0
    assert not any(s.labels.get("method") == "BREW" for s in samples(m))


def test_token_fetch() -> None:
    m = ProxyMetrics()
    m.token_fetch("cpi", "ok", 0.08)
    m.token_fetch("cpi", "ok", 0.12)
    m.token_fetch("cpi", "timeout", 30.0)
    long_outcome = "x" * 100
    m.token_fetch("cpi", long_outcome, 0.0)
    assert value(m, P + "token_fetches_total", route="cpi", outcome="ok") == 2.0
    assert value(m, P + "token_fetches_total", route="cpi", outcome="timeout") == 1.0
    assert value(m, P + "token_fetches_total", route="cpi", outcome="x" * 40) == 1.0
    assert value(m, P + "token_fetch_duration_seconds_count", route="cpi") == 4.0


def test_upstream_replays_errors_certificate() -> None:
    m = ProxyMetrics()
    m.upstream_replay("cpi", "401")
    m.upstream_replay("cpi", "csrf")
    m.upstream_replay("cpi", "csrf")
    m.upstream_errors("cpi", "connect")
    m.set_certificate_expiry("cpi", 1_900_000_000.0)
    assert value(m, P + "upstream_replays_total", route="cpi", reason="401") == 1.0
    assert value(m, P + "upstream_replays_total", route="cpi", reason="csrf") == 2.0
    assert value(m, P + "upstream_errors_total", route="cpi", code="connect") == 1.0
    assert value(m, P + "client_certificate_expiry_timestamp_seconds", route="cpi") == 1_900_000_000.0


def test_token_expiry_read_at_scrape_time() -> None:
    m = ProxyMetrics()
    left: list[float | None] = [None]
    m.track_token_expiry("cpi", lambda: left[0])
    name = P + "token_expiry_seconds"

    assert value(m, name, route="cpi") is None  # None -> sample omitted
    left[0] = 3599.5
    assert value(m, name, route="cpi") == 3599.5
    left[0] = 120.0
    assert value(m, name, route="cpi") == 120.0
    left[0] = None
    assert value(m, name, route="cpi") is None

    m.untrack_token_expiry("cpi")
    left[0] = 5.0
    assert value(m, name, route="cpi") is None


def test_token_expiry_broken_callback_does_not_break_scrape() -> None:
    m = ProxyMetrics()

    def boom() -> float | None:
        raise RuntimeError("boom")

    m.track_token_expiry("bad", boom)
    m.track_token_expiry("good", lambda: 10.0)
    assert value(m, P + "token_expiry_seconds", route="good") == 10.0
    assert value(m, P + "token_expiry_seconds", route="bad") is None


def test_instances_are_independent() -> None:
    a = ProxyMetrics()
    b = ProxyMetrics()  # no "Duplicated timeseries" error
    assert a.registry is not b.registry
    a.request_finished("cpi", "GET", 200, 0.01, 1, 2)
    a.track_token_expiry("cpi", lambda: 42.0)
    assert value(a, P + "requests_total", route="cpi", method="GET", status_class="2xx") == 1.0
    assert value(b, P + "requests_total", route="cpi", method="GET", status_class="2xx") is None
    assert value(b, P + "token_expiry_seconds", route="cpi") is None
    # Process metrics are on each registry.
    assert any(s.name == "process_cpu_seconds_total" for s in samples(b))


async def test_served_over_http() -> None:
    metrics = ProxyMetrics()
    metrics.request_finished("cpi", "GET", 200, 0.02, 0, 5)

    async def handle(_request: web.Request) -> web.Response:
        body, content_type = metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/-/metrics", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/-/metrics") as resp,
        ):
            assert resp.status == 200
            assert resp.headers["Content-Type"] == CONTENT_TYPE_LATEST
            text = await resp.text()
    finally:
        await runner.cleanup()

    parsed = {s.name: s for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert parsed[P + "requests_total"].labels == {"route": "cpi", "method": "GET", "status_class": "2xx"}
    assert parsed[P + "requests_total"].value == 1.0
