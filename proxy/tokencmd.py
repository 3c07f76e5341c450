"""``odata-auth-proxy token``: one fresh access token on stdout, for ``curl -H "Authorization: Bearer $(…)"``."""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from typing import Any

import aiohttp

from proxy.app import prepare
from proxy.config import Config, ConfigError, Overrides, Route, load_config
from proxy.outbound import OutboundProxies
from proxy.tokens import ClientCredentialsSource, TokenError, TokenResponse


def select_route(config: Config, name: str | None) -> Route:
    if name is None:
        return config.routes[0]
    for route in config.routes:
        if route.name == name:
            return route
    names = ", ".join(r.name for r in config.routes)
    raise ConfigError(f"--route {name}: no such route (configured: {names})")


async def fetch_token(config: Config, route: Route) -> TokenResponse:
    prepared = prepare(config)
    cred = prepared.credentials[route.credentials]
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        source = ClientCredentialsSource(
            route.credentials,
            session,
            cred.ssl_context,
            timeout=config.timeouts.token,
            connect_timeout=config.timeouts.connect,
            proxy=OutboundProxies(config.outbound_proxy).for_url(route.credentials.token_url),
        )
        return await source.fetch()


def decode_jwt(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and claims of a JWT, without checking its signature (we are the client, not the API)."""
    parts = token.split(".")
    if len(parts) != 3:
        raise ValueError("the access token is not a JWT (opaque token): nothing to decode")
    decoded: list[dict[str, Any]] = []
    for part in parts[:2]:
        padded = part + "=" * (-len(part) % 4)
        try:
            value = json.loads(base64.urlsafe_b64decode(padded))
        except (ValueError, UnicodeDecodeError):
            raise ValueError("the access token is not a decodable JWT") from None
        if not isinstance(value, dict):
            raise ValueError("the access token is not a decodable JWT")
        decoded.append(value)
    return decoded[0], decoded[1]


def cmd_token(args: argparse.Namespace, overrides: Overrides) -> int:
    from proxy.cli import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, error, run_async

    config = load_config(overrides)
    route = select_route(config, args.route)

    async def go() -> int:
        try:
            response = await fetch_token(config, route)
        except TokenError as exc:
            error(f"route {route.name}: {exc.detail} [token URL {exc.token_url}]")
            return EXIT_FAILURE
        token = response.access_token.reveal()
        if args.json:
            body = dict(response.raw)
            body["expires_at"] = int(time.time() + response.expires_in)
            print(json.dumps(body, indent=2))
        elif args.decode:
            try:
                header, claims = decode_jwt(token)
            except ValueError as exc:
                error(str(exc))
                return EXIT_CONFIG
            print("# JWT decoded WITHOUT signature verification", file=sys.stderr)
            print(json.dumps({"header": header, "claims": claims}, indent=2))
        else:
            print(token)
        return EXIT_OK

    return run_async(go())
