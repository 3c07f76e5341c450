"""What happened to one request, filled in by the forwarder and read by the access log and metrics."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web


@dataclass
class Exchange:
    request_id: str
    route: str | None = None
    token_fp: str | None = None
    upstream_status: int | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    replayed: str | None = None  # "401" or "csrf" when the request was sent a second time
    error: str | None = None  # our error code, when the proxy answered itself


EXCHANGE = web.RequestKey("exchange", Exchange)


def exchange_of(request: web.Request) -> Exchange:
    """The request's record; created on first use so handlers also work without the observing middleware."""
    record = request.get(EXCHANGE)
    if record is None:
        record = Exchange(request_id="-")
        request[EXCHANGE] = record
    return record
