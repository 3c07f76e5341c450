"""The start-up banner: where the proxy listens, what it forwards where, and a curl line to try."""

from __future__ import annotations

import logging

from proxy import BUILD, __version__
from proxy.app import Prepared
from proxy.logs import log_event

log = logging.getLogger("odata_auth_proxy")


def _url(host: str, port: int) -> str:
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def log_banner(
    prepared: Prepared,
    addresses: list[tuple[str, int]],
    admin_addresses: list[tuple[str, int]],
    loop_name: str,
    extra: list[str],
) -> None:
    config = prepared.config
    host, port = addresses[0] if addresses else (config.listen_host, config.listen_port)
    base = _url(host, port)
    log_event(
        log,
        logging.INFO,
        f"odata-auth-proxy {__version__} listening on {base} (event loop: {loop_name}; request path: "
        f"{BUILD.describe()})",
        event="start",
        listen=base,
        version=__version__,
        event_loop=loop_name,
        request_path="compiled" if BUILD.compiled else "pure",
    )
    for line in extra:
        log_event(log, logging.INFO, line, event="start")
    for route in config.routes:
        creds = route.credentials
        auth = "client certificate (mTLS)" if creds.kind == "certificate" else f"client secret ({creds.client_auth})"
        log_event(
            log,
            logging.INFO,
            f"route {route.name}: {base}{route.prefix} -> {route.upstream}  token: {creds.token_url}  "
            f"client id: {creds.client_id}  auth: {auth}",
            event="route",
            route=route.name,
            prefix=route.prefix,
            upstream=route.upstream,
            token_url=creds.token_url,
            client_id=creds.client_id,
            auth=creds.kind,
        )
    admin = _url(*admin_addresses[0]) if admin_addresses else base
    log_event(
        log,
        logging.INFO,
        f"admin: {admin}/-/healthz {admin}/-/readyz {admin}/-/metrics",
        event="admin",
        admin=admin,
    )
    if config.ui:
        # a browser sends no API key by itself: say so next to the URL, or the page only shows a 401
        needs_key = f" (send the {config.inbound_api_key_header} header with it)" if config.inbound_api_key else ""
        log_event(
            log,
            logging.INFO,
            f"inspector: {admin}/-/{needs_key}",
            event="inspector",
            inspector=f"{admin}/-/",
        )
    example = _example_path(config.routes[0].prefix, config.routes[0].upstream)
    # with an inbound API key the bare curl line would only earn a 401: name the header (never the key)
    key_header = f"-H '{config.inbound_api_key_header}: <inbound API key>' " if config.inbound_api_key else ""
    log_event(
        log,
        logging.INFO,
        f"try: curl {key_header}'{base}{example}'",
        event="example",
        example=f"{base}{example}",
        **({"api_key_header": config.inbound_api_key_header} if config.inbound_api_key else {}),
    )
    if config.allow_remote and config.inbound_api_key is None:
        log_event(
            log,
            logging.WARNING,
            f"--allow-remote: listening on {host} without an inbound API key; anyone who can reach this port "
            "acts with the service key's rights",
            event="warning",
        )
    for warning in prepared.warnings:
        log_event(log, logging.WARNING, warning, event="warning")


def _example_path(prefix: str, upstream: str) -> str:
    if prefix == "/" and upstream.rstrip("/").count("/") <= 2:
        return "/api/v1/IntegrationPackages?$format=json"
    return prefix
