"""The baseline: the token-injecting proxy a Python user writes in an afternoon.

Reads each request body whole, opens a new ClientSession (so a new TCP + TLS connection) per request,
reads the upstream body whole and returns it. Default asyncio loop, no tuning.

    python naive_proxy.py --port 8081 --upstream https://127.0.0.1:8443 --cafile ca.pem --token TOKEN
"""

import argparse
import ssl

import aiohttp
from aiohttp import web

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host", "content-length"}


def make_app(upstream: str, cafile: str, token: str) -> web.Application:
    ssl_context = ssl.create_default_context(cafile=cafile)

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["Authorization"] = f"Bearer {token}"
        async with aiohttp.ClientSession() as session:
            async with session.request(
                request.method, upstream + request.path_qs, headers=headers, data=body or None, ssl=ssl_context
            ) as resp:
                data = await resp.read()
                out = {k: v for k, v in resp.headers.items() if k.lower() not in HOP_BY_HOP | {"content-encoding"}}
                return web.Response(status=resp.status, body=data, headers=out)

    app = web.Application(client_max_size=4 * 1024**3)  # the default 1 MiB would refuse uploads
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--cafile", required=True)
    parser.add_argument("--token", required=True)
    args = parser.parse_args()
    web.run_app(make_app(args.upstream, args.cafile, args.token), host="127.0.0.1", port=args.port, access_log=None)
