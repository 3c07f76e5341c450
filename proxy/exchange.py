"""One request's journey through the filter chain: what the filters decided and what happened.

The filters write into it (route, token, CSRF key, headers to add or drop), the forwarding core reads it to
build the upstream request, and the observing filter turns it into the access log line and metrics.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Final

from proxy.guard import ADMIN_PREFIX

if TYPE_CHECKING:
    from proxy.config import Route
    from proxy.http.heads import RequestHead
    from proxy.http.listener import ClientConnection, RequestBody
    from proxy.http.upstream import Origin, UpstreamConnection
    from proxy.tokens import Token

_NOTHING: Final[frozenset[bytes]] = frozenset()
CLIENT_DISCONNECTED: Final = "client_disconnected"
DRAIN_TIMEOUT: Final = "drain_timeout"


class Exchange:
    """Per-request state shared by the filters and the forwarding core."""

    __slots__ = (
        "admin",
        "body",
        "body_data",
        "bytes_in",
        "conn",
        "cors_origin",
        "csrf_key",
        "drop",
        "duration",
        "ended",
        "error",
        "extra",
        "head",
        "origin",
        "replayed",
        "request_id",
        "request_id_line",
        "route",
        "started",
        "status",
        "streaming",
        "token",
        "upstream",
        "upstream_status",
        "upstream_target",
    )

    def __init__(self, conn: ClientConnection, head: RequestHead, body: RequestBody) -> None:
        self.conn = conn
        self.head = head
        self.body = body
        self.started = time.perf_counter()
        #: for the proxy's own endpoints (``/-/…``): worked out once, where four filters ask
        self.admin = head.target.startswith(ADMIN_PREFIX)
        self.ended = 0.0  # set by the forwarding core when the exchange is over, before the filters observe it
        self.duration = 0.0  # ended - started (seconds)
        self.request_id = "-"
        self.request_id_line = b""  # the X-Request-Id header line, sent upstream and back to the client
        self.route: Route | None = None
        self.origin: Origin | None = None
        self.upstream_target = ""  # path and query on the upstream, byte-exact
        self.drop: frozenset[bytes] | set[bytes] = _NOTHING  # client headers (lower-case) not to forward
        self.extra: tuple[bytes, ...] = ()  # header lines added to every upstream attempt
        self.token: Token | None = None
        self.csrf_key: str | None = None
        self.cors_origin: str | None = None
        self.body_data: bytes | None = None  # the buffered (replayable) body
        self.streaming = False  # the body streams on: it cannot be sent twice
        self.upstream: UpstreamConnection | None = None  # the connection carrying the current attempt
        self.upstream_status: int | None = None
        self.status = 0
        self.bytes_in = 0
        self.replayed: str | None = None  # "401" or "csrf" when the request was sent a second time
        self.error: str | None = None  # our error code, when the proxy answered itself or was cut

    def dont_forward(self, *names: bytes) -> None:
        """Drop these client headers (lower-case names) from the upstream request: a filter replaces them.
        (The set is made on first use: most requests have nothing dropped beyond what filters declare in
        ``Filter.replaces``.)"""
        drop = self.drop
        if isinstance(drop, set):
            drop.update(names)
        else:
            self.drop = set(names)

    @property
    def replayable(self) -> bool:
        return not self.streaming

    @property
    def token_fp(self) -> str | None:
        return self.token.fingerprint if self.token is not None else None

    @property
    def bytes_out(self) -> int:
        return self.conn.bytes_out

    def cut(self, why: str) -> None:
        """The listener cut the connection (drain budget spent, stalled reader): record why, for the access log."""
        from proxy.http.listener import ClientGone

        self.error = DRAIN_TIMEOUT if why == "drain_timeout" else why
        if self.status in (0, 499):
            self.status = 503 if why == "drain_timeout" else 408
        self.body.fail(ClientGone())

    def proxy_base(self) -> str:
        """``http://host[:port]`` as the client addressed the proxy (the guard has vetted the Host header);
        without a Host header (HTTP/1.0), the address the client connected to."""
        host = self.head.header(b"host")
        if host:
            return "http://" + host.decode("latin-1")
        address, port = self.conn.sockname[0], self.conn.sockname[1]
        return f"http://[{address}]:{port}" if ":" in str(address) else f"http://{address}:{port}"
