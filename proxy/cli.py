"""The ``odata-auth-proxy`` command: a thin face over ``Config`` (flags map one to one onto settings)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from proxy import BUILD, __version__
from proxy.config import Config, ConfigError, Overrides, load_config, workers_problem
from proxy.guard import listen_address_problem

log = logging.getLogger("odata_auth_proxy")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2

RUN_EXAMPLES = """examples:
  odata-auth-proxy run --service-key ~/Downloads/cpi-api-key.json
  curl 'http://127.0.0.1:8080/api/v1/IntegrationPackages?$format=json'

  odata-auth-proxy run --service-key cert-key.json                      # SAP-generated certificate key
  odata-auth-proxy run --service-key ext-key.json --key client.key      # External Certificate key
  odata-auth-proxy run --config proxy.yaml --listen 127.0.0.1:9090 -v
  odata-auth-proxy run --config proxy.yaml --workers 2                  # 2 processes, one shared token
"""


def _common_source_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML config file (env ODATA_AUTH_PROXY_CONFIG)")
    parser.add_argument(
        "--service-key",
        metavar="FILE",
        help="SAP BTP service key JSON, exactly as downloaded, or keyring:NAME for one stored with 'keyring add' "
        "(env ODATA_AUTH_PROXY_SERVICE_KEY; or the JSON itself in ODATA_AUTH_PROXY_SERVICE_KEY_JSON)",
    )
    parser.add_argument(
        "--upstream", metavar="URL", help="API base URL, when the key has none (env ODATA_AUTH_PROXY_UPSTREAM)"
    )
    parser.add_argument(
        "--ca-bundle",
        metavar="FILE",
        help="extra PEM CA certificates to trust for token server and upstream (env ODATA_AUTH_PROXY_CA_BUNDLE)",
    )
    parser.add_argument(
        "--certificate",
        metavar="FILE",
        help="client certificate (chain) PEM for mTLS; overrides the key's (env ODATA_AUTH_PROXY_CERTIFICATE)",
    )
    parser.add_argument(
        "--key",
        metavar="FILE",
        help="private key PEM for the client certificate, e.g. for an External Certificate key "
        "(env ODATA_AUTH_PROXY_KEY)",
    )
    parser.add_argument(
        "--client-auth",
        choices=("post", "basic", "basic-encoded"),
        help="how the client secret is sent: form body (default), HTTP Basic, or Basic with urlencoded values",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="odata-auth-proxy",
        description="Local reverse proxy that adds OAuth 2.0 client-credentials bearer tokens (client secret or "
        "client certificate) to requests for SAP Cloud Integration OData APIs and other protected APIs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="run 'odata-auth-proxy COMMAND --help' for a command's options and examples",
    )
    parser.add_argument(
        "--version", action="version", version=f"odata-auth-proxy {__version__} (request path: {BUILD.describe()})"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run the proxy",
        description="Run the proxy in the foreground until Ctrl+C (SIGINT), SIGTERM or, on Windows, Ctrl+Break. "
        "It re-reads its configuration on SIGHUP, on 'odata-auth-proxy reload' (POST /-/reload) and when a "
        "file it was read from changes.",
        epilog=RUN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common_source_flags(run)
    _server_flags(run)
    run.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="serving processes (default 1); N > 1 shares one token among them (env ODATA_AUTH_PROXY_WORKERS)",
    )

    demo = sub.add_parser(
        "demo",
        help="self-contained demo: built-in token server + sample OData API behind the proxy",
        description="Start a built-in OAuth token server (60 s tokens) and a sample OData API on loopback, "
        "and the real proxy in front of them. No SAP tenant needed.",
        epilog="example:\n  odata-auth-proxy demo\n  curl 'http://127.0.0.1:8080/api/v1/IntegrationPackages?$format=json'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument(
        "--token-lifetime", type=int, default=60, metavar="SECONDS", help="demo token lifetime (default 60)"
    )
    _server_flags(demo)

    token = sub.add_parser(
        "token",
        help="print a fresh access token (for scripts)",
        description="Fetch a fresh access token and print it on stdout, nothing else. Errors go to stderr.",
        epilog='example:\n  curl -H "Authorization: Bearer $(odata-auth-proxy token --service-key key.json)" \\\n'
        "       'https://<tenant>/api/v1/IntegrationPackages'\n"
        "  odata-auth-proxy token --service-key key.json --decode",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common_source_flags(token)
    token.add_argument("--route", metavar="NAME", help="which route's credentials (default: the first route)")
    fmt = token.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print the token response as JSON, plus expires_at")
    fmt.add_argument("--decode", action="store_true", help="print the JWT header and claims (signature NOT checked)")

    check = sub.add_parser(
        "check",
        help="diagnose config, key, certificate, token server and upstream",
        description="Validate everything for each route, fetch a token and probe the upstream; a checklist with "
        "one line per step. Exit code 0 only if every step passes.",
        epilog="examples:\n  odata-auth-proxy check --service-key key.json\n"
        "  odata-auth-proxy check --config proxy.yaml --probe /api/v1/IntegrationPackages?$top=1\n"
        "  odata-auth-proxy check --config proxy.yaml --offline",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common_source_flags(check)
    check.add_argument("--route", metavar="NAME", help="check only this route")
    check.add_argument("--probe", metavar="PATH", help="upstream path to probe with the token (default /api/v1/)")
    check.add_argument(
        "--offline", action="store_true", help="validate config, keys and certificates only (no network)"
    )
    check.add_argument("--no-color", action="store_true", help="plain ASCII output")

    config_cmd = sub.add_parser(
        "config",
        help="configuration tools",
        description="Configuration tools.",
        epilog="example:\n  odata-auth-proxy config validate proxy.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    config_sub = config_cmd.add_subparsers(dest="config_command", metavar="ACTION")
    validate = config_sub.add_parser(
        "validate",
        help="validate a config file without network",
        description="Load and validate a config file, its service keys and certificates, without network.",
        epilog="example:\n  odata-auth-proxy config validate proxy.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    validate.add_argument("file", metavar="FILE")

    reload_cmd = sub.add_parser(
        "reload",
        help="make the running proxy re-read its configuration (POST /-/reload; the way without SIGHUP)",
        description="Ask the running proxy to re-read its config file and keys (the same reload as SIGHUP, which "
        "Windows lacks) and print the outcome in one line. It goes to admin_listen when the config sets one, "
        "else to listen, and sends the inbound API key when one is configured. Exit code 0 only if reloaded.",
        epilog="examples:\n  odata-auth-proxy reload --config proxy.yaml\n"
        "  odata-auth-proxy reload --admin http://127.0.0.1:9090",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    reload_cmd.add_argument(
        "--config", metavar="FILE", help="the config file the proxy runs with (env ODATA_AUTH_PROXY_CONFIG)"
    )
    reload_cmd.add_argument(
        "--admin",
        metavar="URL",
        help="where the proxy serves /-/reload, e.g. http://127.0.0.1:8080 (default: from the config)",
    )

    from proxy.keychaincmd import add_parser as add_keyring_parser

    add_keyring_parser(sub)
    return parser


def _server_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--listen", metavar="HOST:PORT", help="where to listen (default 127.0.0.1:8080; env ODATA_AUTH_PROXY_LISTEN)"
    )
    parser.add_argument(
        "--admin-listen",
        metavar="HOST:PORT",
        help="serve the admin endpoints (/-/healthz, /-/readyz, /-/metrics, POST /-/reload) on a separate port",
    )
    parser.add_argument(
        "--allow-remote",
        action="store_true",
        default=None,
        help="allow a non-loopback --listen without an inbound API key (isolated pod networks only)",
    )
    parser.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="extra Host header name to accept, e.g. a sidecar's service name (repeatable)",
    )
    parser.add_argument("--log-format", choices=("text", "json"), help="log format (env ODATA_AUTH_PROXY_LOG_FORMAT)")
    parser.add_argument("--shutdown-timeout", type=float, metavar="SECONDS", help="drain time on SIGTERM (default 30)")
    parser.add_argument("-v", "--verbose", action="store_true", default=None, help="debug logging")
    parser.add_argument(
        "--no-ui",
        dest="ui",
        action="store_false",
        default=None,
        help="turn off the live inspector page /-/ and its JSON /-/api/* (env ODATA_AUTH_PROXY_UI=false)",
    )


def overrides_from_args(args: argparse.Namespace) -> Overrides:
    def get(name: str) -> Any:
        return getattr(args, name, None)

    return Overrides(
        config=get("config"),
        service_key=get("service_key"),
        upstream=get("upstream"),
        listen=get("listen"),
        ca_bundle=get("ca_bundle"),
        certificate=get("certificate"),
        key=get("key"),
        admin_listen=get("admin_listen"),
        allow_remote=get("allow_remote"),
        allowed_hosts=list(get("allowed_host") or []),
        log_format=get("log_format"),
        verbose=get("verbose"),
        shutdown_timeout=get("shutdown_timeout"),
        client_auth=get("client_auth"),
        workers=get("workers"),
        ui=get("ui"),
    )


def error(message: str) -> None:
    print(f"odata-auth-proxy: error: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "demo":
            return cmd_demo(args)
        if args.command == "token":
            from proxy.tokencmd import cmd_token

            return cmd_token(args, overrides_from_args(args))
        if args.command == "check":
            from proxy.doctor import cmd_check

            return cmd_check(args, overrides_from_args(args))
        if args.command == "config" and args.config_command == "validate":
            return cmd_config_validate(args.file)
        if args.command == "reload":
            from proxy.reloadcmd import cmd_reload

            return cmd_reload(args)
        if args.command == "keyring":
            from proxy.keychaincmd import cmd_keyring

            return cmd_keyring(args)
    except ConfigError as exc:
        error(str(exc))
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
    parser.print_help(sys.stderr)
    return EXIT_CONFIG


def run_async(coro: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop (a default dependency except on Windows), else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def event_loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def _checked_config(overrides: Overrides) -> Config:
    config = load_config(overrides)
    problem = listen_address_problem(
        config.listen_host, allow_remote=config.allow_remote, has_api_key=config.inbound_api_key is not None
    )
    if problem:
        raise ConfigError(problem)
    return config


def cmd_run(args: argparse.Namespace) -> int:
    from proxy.app import prepare
    from proxy.logs import setup_logging

    overrides = overrides_from_args(args)
    config = _checked_config(overrides)
    problem = workers_problem(config.workers, _workers_source(overrides))
    if problem:
        raise ConfigError(problem)
    setup_logging(config.log_format, config.verbose)
    prepared = prepare(config)

    def reload() -> Any:
        return prepare(_checked_config(overrides))

    if config.workers > 1:
        from proxy.workers import run_workers

        return run_workers(prepared, overrides, reload)
    return run_async(_serve(prepared, reload))


def _workers_source(overrides: Overrides) -> str:
    """Where the ``workers`` value came from, for the refusal line (flag > environment > file)."""
    if overrides.workers is not None:
        return "--workers"
    if os.environ.get("ODATA_AUTH_PROXY_WORKERS"):
        return "ODATA_AUTH_PROXY_WORKERS"
    return "workers"


async def _serve(prepared: Any, reload: Any, banner_extra: list[str] | None = None) -> int:
    from proxy.banner import log_banner
    from proxy.server import ProxyServer, StartupError

    server = ProxyServer(prepared, reload=reload)
    try:
        await server.start()
    except StartupError as exc:
        error(str(exc))
        return EXIT_FAILURE
    server.install_signal_handlers()
    log_banner(prepared, server.addresses, server.admin_addresses, event_loop_name(), banner_extra or [])
    await server.wait()
    await server.stop()
    log.info("stopped")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from proxy.logs import setup_logging

    overrides = overrides_from_args(args)
    log_format = overrides.log_format or os.environ.get("ODATA_AUTH_PROXY_LOG_FORMAT") or "text"
    if log_format not in ("text", "json"):
        raise ConfigError(f"--log-format: expected text or json, got {log_format!r}")
    setup_logging(log_format, bool(overrides.verbose))
    return run_async(_demo(args, overrides))


async def _demo(args: argparse.Namespace, overrides: Overrides) -> int:
    from proxy.app import prepare
    from proxy.demo import start_demo_backend

    lifetime = max(5, int(args.token_lifetime))
    async with start_demo_backend(lifetime=lifetime) as backend:
        env = {
            k: v
            for k, v in os.environ.items()
            if k
            in (
                "ODATA_AUTH_PROXY_LISTEN",
                "ODATA_AUTH_PROXY_LOG_FORMAT",
                "ODATA_AUTH_PROXY_INBOUND_API_KEY",
                "ODATA_AUTH_PROXY_UI",
            )
        }
        env["DEMO_CLIENT_SECRET"] = backend.client_secret
        config = load_config(overrides, env={**env, **_demo_env(backend)})
        problem = listen_address_problem(
            config.listen_host, allow_remote=config.allow_remote, has_api_key=config.inbound_api_key is not None
        )
        if problem:
            error(problem)
            return EXIT_CONFIG
        extra = [
            f"demo token server: {backend.token_url} (tokens live {lifetime} s, so refreshes are visible)",
            f"demo OData API:    {backend.upstream_url}/api/v1/",
        ]
        return await _serve(prepare(config), None, extra)


def _demo_env(backend: Any) -> dict[str, str]:
    """The demo backend described as a service key, through the same path a user's key takes."""
    import json

    key = {
        "oauth": {
            "clientid": backend.client_id,
            "clientsecret": backend.client_secret,
            "url": backend.upstream_url,
            "tokenurl": backend.token_url,
        }
    }
    return {"ODATA_AUTH_PROXY_SERVICE_KEY_JSON": json.dumps(key)}


def cmd_config_validate(path: str) -> int:
    from proxy.app import prepare

    config = load_config(
        Overrides(config=path), env={k: v for k, v in os.environ.items() if not k.startswith("ODATA_AUTH_PROXY_")}
    )
    prepared = prepare(config)
    print(f"{path}: OK, {len(config.routes)} route(s)")
    for route in config.routes:
        creds = route.credentials
        print(f"  {route.name}: {route.prefix} -> {route.upstream} ({creds.kind}, client id {creds.client_id})")
    warnings = list(prepared.warnings)
    problem = workers_problem(config.workers, "workers")
    if problem:
        warnings.append(f"{problem} ('run' refuses this here)")
    for warning in warnings:
        print(f"  warning: {warning}")
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
