#!/usr/bin/env python3
"""The proxy's own CPU per request, without sockets, TLS or a second process in the way.

The real listener, pipeline, filters and upstream pool run on uvloop; only the transports are fakes: the
client's swallows the answer, the upstream's answers every request at once with a fixed nginx-like 1 KB
JSON answer. What remains is the Python a request costs, measured with ``time.process_time`` over many
requests: the figure to watch when changing the request path (``bench/run`` gives the end-to-end ratios).

    bench/.venv/bin/python bench/micro.py                 # the default chain
    bench/.venv/bin/python bench/micro.py --without links # drop filters by name (guard, observe, links, ...)
    bench/.venv/bin/python bench/micro.py --floor         # listener and task only: the floor
    bench/.venv/bin/python bench/micro.py --no-ui         # without the inspector (ui: false), to compare
    bench/.venv/bin/python bench/micro.py --access-log    # with the access log (text, to /dev/null)
    bench/.venv/bin/python bench/micro.py --page-open     # as if an inspector page were open (see --help)
    bench/.venv/bin/python bench/micro.py --profile       # cProfile, top functions

The machine is shared and noisy: each run repeats ``--rounds`` times and reports the best.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import logging
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.app import prepare
from proxy.config import Overrides, load_config
from proxy.filters.base import Chain
from proxy.http.heads import RequestHead
from proxy.http.listener import ClientConnection, RequestBody
from proxy.http.upstream import UpstreamConnection
from proxy.inspector.events import request_event
from proxy.logs import ACCESS_LOGGER, setup_logging
from proxy.redact import Secret
from proxy.server import ProxyServer
from proxy.tokens import Token

ANSWER = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Wed, 02 Dec 2026 04:00:00 GMT\r\n"
    b"Content-Type: application/json\r\nContent-Length: 1000\r\nConnection: keep-alive\r\n"
    b'ETag: "abc"\r\nAccept-Ranges: bytes\r\n\r\n' + b"x" * 1000
)
REQUEST = b"GET /api/v1/IntegrationPackages?$format=json HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
CONFIG = """\
access_log: false
listen: 127.0.0.1:0
routes:
  - name: bench
    prefix: /
    upstream: https://127.0.0.1:9
    credentials: {token_url: "http://127.0.0.1:9/oauth/token", client_id: a, client_secret: b}
"""


class FakeTransport:
    """Enough of an asyncio transport for both sides."""

    def __init__(self, answer_to: UpstreamConnection | None = None) -> None:
        self.protocol = answer_to
        self.writes = 0
        self.closing = False

    def write(self, data: bytes) -> None:
        self.writes += 1
        if self.protocol is not None:
            asyncio.get_running_loop().call_soon(self._answer)

    def _answer(self) -> None:
        protocol = self.protocol
        assert protocol is not None
        buffer = protocol.get_buffer(-1)
        buffer[: len(ANSWER)] = ANSWER
        protocol.buffer_updated(len(ANSWER))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 5555) if name in ("peername", "sockname") else default

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    abort = close

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None: ...


async def measure(args: argparse.Namespace) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "micro.yaml"
        text = CONFIG + ("ui: false\n" if args.no_ui else "")
        if args.access_log:
            text = text.replace("access_log: false", "access_log: true")
        path.write_text(text)
        config = load_config(Overrides(config=str(path)), env={})
    server = ProxyServer(prepare(config))
    await server.start()
    assert server.state is not None and server.listener is not None
    runtime = server.state.runtime
    manager = runtime.managers["bench"]
    manager._current = Token(value=Secret("micro-token"), obtained_at=time.monotonic(), lifetime=3600)
    if args.without:
        kept = [f for f in runtime.chain.filters if f.name not in set(args.without)]
        runtime.chain = Chain(kept)
        runtime.pipeline.use_chain(runtime.chain)

    # one pooled upstream connection on a fake transport, put where the pool keeps its idle ones (the pool's
    # methods cannot be replaced: with the request path compiled, its classes are C types)
    origin = runtime.router.match(REQUEST.split(b" ")[1].decode())[1]  # type: ignore[index]
    pooled = UpstreamConnection(runtime.pool, origin)
    pooled.connection_made(FakeTransport(answer_to=pooled))  # type: ignore[arg-type]
    pooled.idle_since = time.monotonic()
    runtime.pool._idle[origin.key] = [pooled]
    if args.floor:

        def trivial(conn: ClientConnection, head: RequestHead, body: RequestBody) -> None:
            conn.start_response(head, b"HTTP/1.1 200 OK\r\n", 2, body=b"ok")
            conn.request_done(head)

        server.listener.handler = trivial
    conn = server.listener.protocol()
    conn.connection_made(FakeTransport())  # type: ignore[arg-type]
    inspector = runtime.inspector
    page_open = args.page_open and inspector is not None
    if page_open:
        assert inspector is not None
        inspector.recorder.watched()  # every request keeps its headers, as while a page looks

    async def run(count: int) -> None:
        for number in range(count):
            conn.data_received(REQUEST)
            while conn.busy:
                await asyncio.sleep(0)
            if page_open and number % PAGE_EVENT_EVERY == 0:
                assert inspector is not None
                request_event(inspector, inspector.recorder.ring[-1])

    await run(2000)  # warm up: pooled connection, caches
    profile = cProfile.Profile() if args.profile else None
    if profile is not None:
        profile.enable()
    started = time.process_time()
    await run(args.requests)
    per_request = (time.process_time() - started) / args.requests * 1e6
    if profile is not None:
        profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)
        profile.dump_stats("/tmp/micro.prof")
    await server.stop()
    return per_request


#: with --page-open, one request event is built per this many requests: the event stream sends at most 400 a
#: second (100 per 0.25-s tick), about one per 40 requests at 16,000 requests a second
PAGE_EVENT_EVERY = 40


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--without", action="append", default=[], metavar="FILTER")
    parser.add_argument("--floor", action="store_true")
    parser.add_argument("--no-ui", action="store_true", help="ui: false (no inspector recording)")
    parser.add_argument("--access-log", action="store_true", help="access log on (text format, to /dev/null)")
    parser.add_argument(
        "--page-open",
        action="store_true",
        help="as if an inspector page were open: headers kept for every request, a request event built for one "
        f"request in {PAGE_EVENT_EVERY}",
    )
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    if args.access_log:  # the proxy's own handler, as `run` sets it up; only the access logger speaks
        setup_logging("text", verbose=False, stream=open(os.devnull, "w"))  # noqa: SIM115
        logging.getLogger("odata_auth_proxy").setLevel(logging.CRITICAL)
        logging.getLogger(ACCESS_LOGGER).setLevel(logging.INFO)
    else:
        logging.disable(logging.WARNING)  # the fake token URL's background refresh fails: not part of this
    rounds = 1 if args.profile else args.rounds
    results = sorted(uvloop.run(measure(args)) for _ in range(rounds))
    shown = ", ".join(f"{r:.1f}" for r in results)
    print(f"{results[0]:.1f} µs of CPU per request (best of {rounds}: {shown})")


if __name__ == "__main__":
    main()
