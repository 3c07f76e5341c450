"""The bench's helper servers, in one process on loopback (plain HTTP):

* a client-credentials **token server** (``POST /oauth/token``) that counts token requests and remembers
  every token it issued with its expiry;
* ``GET /validate`` for nginx ``auth_request`` on the "strict" upstream: 204 when the bearer token is one
  this server issued and has not expired (or is the static token), 401 otherwise, and counted;
* ``GET /stats`` (counts as JSON) and ``POST /admin?expires_in=N`` (token lifetime of later tokens);
* an **upload sink** on a second port: reads every byte of any request body, discards it and answers 204
  with ``X-Received-Bytes`` so the bench can check that the whole upload arrived.

    python backend.py --token-port P --sink-port Q --client-id ID --client-secret S --static-token T
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import secrets
import time

from aiohttp import web

STATS = web.AppKey("stats", dict)


def token_app(client_id: str, client_secret: str, static_token: str, lifetime: float) -> web.Application:
    app = web.Application()
    stats: dict = {
        "token_requests": 0,
        "token_refused": 0,
        "validated": 0,
        "rejected_expired": 0,
        "rejected_unknown": 0,
        "expires_in": lifetime,
    }
    app[STATS] = stats
    issued: dict[str, float] = {}  # token -> expiry (monotonic)
    serial = itertools.count(1)

    async def token(request: web.Request) -> web.Response:
        form = await request.post()
        if (
            form.get("grant_type") != "client_credentials"
            or form.get("client_id") != client_id
            or form.get("client_secret") != client_secret
        ):
            stats["token_refused"] += 1
            return web.json_response({"error": "invalid_client"}, status=401)
        stats["token_requests"] += 1
        value = f"bench-{next(serial)}-{secrets.token_hex(8)}"
        life = stats["expires_in"]
        issued[value] = time.monotonic() + life
        return web.json_response({"access_token": value, "token_type": "bearer", "expires_in": life})

    async def validate(request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        value = auth[7:] if auth.startswith("Bearer ") else ""
        if value == static_token:
            stats["validated"] += 1
            return web.Response(status=204)
        expiry = issued.get(value)
        if expiry is None:
            stats["rejected_unknown"] += 1
            return web.Response(status=401)
        if time.monotonic() >= expiry:
            stats["rejected_expired"] += 1
            return web.Response(status=401)
        stats["validated"] += 1
        return web.Response(status=204)

    async def get_stats(request: web.Request) -> web.Response:
        return web.json_response(stats)

    async def admin(request: web.Request) -> web.Response:
        if "expires_in" in request.query:
            stats["expires_in"] = float(request.query["expires_in"])
        return web.json_response(stats)

    app.router.add_post("/oauth/token", token)
    app.router.add_get("/validate", validate)
    app.router.add_get("/stats", get_stats)
    app.router.add_post("/admin", admin)
    return app


def sink_app() -> web.Application:
    app = web.Application(client_max_size=0)

    async def sink(request: web.Request) -> web.Response:
        received = 0
        while True:
            chunk = await request.content.readany()
            if not chunk:
                break
            received += len(chunk)
        return web.Response(status=204, headers={"X-Received-Bytes": str(received)})

    app.router.add_route("*", "/{tail:.*}", sink)
    return app


async def main(args: argparse.Namespace) -> None:
    runners = []
    for app, port in (
        (token_app(args.client_id, args.client_secret, args.static_token, args.expires_in), args.token_port),
        (sink_app(), args.sink_port),
    ):
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
        runners.append(runner)
    print("backend ready", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        for runner in runners:
            await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--token-port", type=int, required=True)
    parser.add_argument("--sink-port", type=int, required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--client-secret", required=True)
    parser.add_argument("--static-token", required=True)
    parser.add_argument("--expires-in", type=float, default=3600)
    ns = parser.parse_args()
    try:
        import uvloop

        runner_ctx = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner_ctx = asyncio.Runner()
    with runner_ctx as r:
        r.run(main(ns))
