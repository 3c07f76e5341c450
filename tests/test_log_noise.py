"""Log noise under faults: a client's malformed request is its problem (INFO), and the same upstream failure
repeated under load is one WARNING plus a count, not one line per request."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import aiohttp
import pytest

from proxy.throttle import LogThrottle
from tests.conftest import Backend, free_port, make_config, running_proxy, secret_route


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def messages(caplog: pytest.LogCaptureFixture, name: str) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == name]


def test_throttle_logs_once_then_summarises(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="t")
    clock = FakeClock()
    throttle = LogThrottle(logging.getLogger("t"), window=10.0, clock=clock)
    for _ in range(6):
        throttle.log(logging.WARNING, ("api", "upstream_unreachable"), "route %s: %s", "api", "down")
    throttle.log(logging.WARNING, ("other", "upstream_unreachable"), "route %s: %s", "other", "down")
    assert messages(caplog, "t") == [(logging.WARNING, "route api: down"), (logging.WARNING, "route other: down")]
    clock.now += 10.5
    throttle.log(logging.WARNING, ("api", "upstream_unreachable"), "route %s: %s", "api", "down")
    assert messages(caplog, "t")[2:] == [
        (logging.WARNING, "route api: down … 5 more in the last 10 s"),
        (logging.WARNING, "route api: down"),
    ]
    throttle.flush()  # nothing suppressed since: no further summary
    assert len(messages(caplog, "t")) == 4


async def test_summary_arrives_when_the_errors_stop(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="t2")
    throttle = LogThrottle(logging.getLogger("t2"), window=0.2)
    for _ in range(4):
        throttle.log(logging.WARNING, "k", "upstream down")
    await asyncio.sleep(0.4)
    assert messages(caplog, "t2") == [
        (logging.WARNING, "upstream down"),
        (logging.WARNING, "upstream down … 3 more in the last 0.2 s"),
    ]


async def test_unreachable_upstream_under_load_logs_one_warning(
    tmp_path: Path, backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="odata_auth_proxy")
    dead = f"https://127.0.0.1:{free_port()}"
    config = make_config(tmp_path, backend, [secret_route(backend, upstream=dead)])
    async with running_proxy(config) as proxy, aiohttp.ClientSession() as client:

        async def one() -> int:
            async with client.get(proxy.url + "/api/v1/echo/x") as resp:
                await resp.read()
                return resp.status

        statuses = await asyncio.gather(*(one() for _ in range(40)))
    assert statuses == [502] * 40
    warnings = [m for level, m in messages(caplog, "odata_auth_proxy.forward") if level >= logging.WARNING]
    assert len([m for m in warnings if "upstream_unreachable" in m and "more in the last" not in m]) == 1, warnings


async def test_malformed_request_is_info_not_error(
    tmp_path: Path, backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with running_proxy(make_config(tmp_path, backend)) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"malformed HTTP request" in answer
    mentions = [r for r in caplog.records if "malformed request" in r.getMessage()]
    assert mentions and all(r.levelno == logging.INFO for r in mentions)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
