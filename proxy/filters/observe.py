"""Request ids, the access log line and the request metrics: the one filter that sees every exchange end."""

from __future__ import annotations

import logging
import re
import secrets
from typing import Final

from proxy.exchange import Exchange
from proxy.filters.base import Filter
from proxy.http.heads import ResponseHead
from proxy.logs import AccessLog
from proxy.metrics import ProxyMetrics
from proxy.redact import Secret

_REQUEST_ID: Final = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")


class ObserveFilter(Filter):
    """First in the chain (its ``finished`` runs last): names the request, then logs and counts it.

    Request ids come from a random per-process prefix and a counter (unique, and ten times cheaper than
    ``uuid4``); a client's own well-formed ``X-Request-Id`` is kept and passed on. Requests in flight are
    counted when the metrics are scraped (``Listener.routes_in_flight``), not per request.
    """

    name = "observe"
    replaces = frozenset({b"x-request-id"})  # ours (or the client's own, vetted) goes up instead

    def __init__(
        self,
        metrics: ProxyMetrics,
        access_log: AccessLog | None,
        *,
        log_query: bool,
        api_key: Secret | None,
        worker: int | None = None,
    ) -> None:
        self.metrics = metrics
        self.access_log = access_log
        self.log_query = log_query
        self._api_key = api_key.reveal() if api_key is not None else None
        self.worker = worker
        self._number = 0
        self._id_prefix = secrets.token_hex(6) + "-"  # per process: ids stay apart across workers and restarts
        self._line_prefix = b"X-Request-Id: " + self._id_prefix.encode()

    def request(self, ex: Exchange) -> None:
        incoming = ex.head.header(b"x-request-id")
        if incoming:
            text = incoming.decode("latin-1")
            if _REQUEST_ID.match(text):
                ex.request_id = text
                ex.request_id_line = b"X-Request-Id: " + incoming + b"\r\n"
                return None
        self._number = number = self._number + 1
        hexed = hex(number)[2:]  # compiled, a builtin call and a slice: cheaper than a format spec or ``%``
        ex.request_id = self._id_prefix + hexed
        ex.request_id_line = self._line_prefix + hexed.encode() + b"\r\n"
        return None

    def upstream_headers(self, ex: Exchange, out: list[bytes]) -> None:
        out.append(ex.request_id_line)

    def response_headers(self, ex: Exchange, out: list[bytes], answer: ResponseHead | None = None) -> None:
        out.append(ex.request_id_line)

    def finished(self, ex: Exchange) -> None:
        duration = ex.duration
        head = ex.head
        route = ex.route.name if ex.route is not None else None
        if route is not None:
            count = self.metrics.request_finished  # an instance attribute: called through a local (3.11 lookups)
            count(route, head.method, ex.status, duration, ex.bytes_in, ex.conn.bytes_out)
        access_log = self.access_log
        if access_log is None:
            return
        target = head.target
        if not self.log_query:
            target = target.partition("?")[0]
        if self._api_key and self._api_key in target:
            target = target.replace(self._api_key, "[redacted]")  # a client put the key in the URL
        token = ex.token
        access_log.request(
            logging.DEBUG if ex.admin else logging.INFO,
            ex.conn.peer,
            head.method,
            target,
            ex.status,
            ex.conn.bytes_out,
            duration,
            route,
            ex.upstream_status,
            token.fingerprint if token is not None else None,
            ex.request_id,
            ex.error,
            self.worker,
        )
