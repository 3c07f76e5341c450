"""``odata-auth-proxy reload``: ``POST /-/reload`` to the running proxy, the reload where there is no SIGHUP.

It reads only where the running proxy serves its admin endpoints and its inbound API key (flags > environment
> config file, as the proxy does), never the credentials: the routes and keys are the running proxy's to
re-read, and a config whose service key is readable only by the proxy's account can still be reloaded. A
config file that is not valid YAML cannot tell the address: that is said in one line (pass ``--admin URL``).

Standard library HTTP on purpose: one request, no event loop, no environment proxy (the proxy is local).
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.config import (
    _TOP_KEYS,
    DEFAULT_LISTEN,
    ENV_PREFIX,
    ConfigError,
    _interpolate,
    _read_yaml,
    _Section,
    parse_host_port,
)
from proxy.guard import DEFAULT_API_KEY_HEADER
from proxy.redact import Secret

RELOAD_PATH = "/-/reload"
# the reload may wait for one token per new credential: the token timeout (15 s) plus connecting (10 s)
REQUEST_TIMEOUT = 60.0
EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2


@dataclass(frozen=True)
class ReloadTarget:
    """Where ``POST /-/reload`` goes, and the API key to send (None: none configured)."""

    url: str
    api_key: Secret | None = None
    api_key_header: str = DEFAULT_API_KEY_HEADER


def _connectable(host: str) -> str:
    """A listen address as a URL host: the unspecified addresses are reached on loopback."""
    if host in ("", "0.0.0.0", "*"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _admin_base(value: str) -> str:
    """``--admin``: a URL (``http://127.0.0.1:9090``) or ``HOST:PORT``."""
    text = value.strip().rstrip("/")
    if "://" in text:
        return text
    host, port = parse_host_port(text, "--admin")
    return f"http://{_connectable(host)}:{port}"


def reload_target(config: str | None, admin: str | None, env: Mapping[str, str]) -> ReloadTarget:
    """Flags > ``ODATA_AUTH_PROXY_*`` > the config file, for the admin address and the API key only."""
    config = config or env.get(ENV_PREFIX + "CONFIG") or None
    top = _Section({}, "", _TOP_KEYS)
    base_dir = Path.cwd()
    if config:
        raw = _interpolate(_read_yaml(config), env, "")
        top = _Section(raw, "", _TOP_KEYS)
        base_dir = Path(config).expanduser().resolve().parent
    key = top.get_secret("inbound_api_key", base_dir)
    if env.get(ENV_PREFIX + "INBOUND_API_KEY"):
        key = Secret(env[ENV_PREFIX + "INBOUND_API_KEY"])
    header = top.get_str("inbound_api_key_header") or DEFAULT_API_KEY_HEADER
    if admin:
        base = _admin_base(admin)
    else:
        admin_value = env.get(ENV_PREFIX + "ADMIN_LISTEN") or top.get_str("admin_listen")
        listen_value = admin_value or env.get(ENV_PREFIX + "LISTEN") or top.get_str("listen") or DEFAULT_LISTEN
        host, port = parse_host_port(listen_value, "admin_listen" if admin_value else "listen")
        base = f"http://{_connectable(host)}:{port}"
    return ReloadTarget(base + RELOAD_PATH, key, header)


def post_reload(target: ReloadTarget, timeout: float = REQUEST_TIMEOUT) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON body) of ``POST /-/reload``; OSError when the proxy cannot be reached."""
    request = urllib.request.Request(target.url, data=b"", method="POST")
    if target.api_key is not None:
        request.add_header(target.api_key_header, target.api_key.reveal())
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through an outbound proxy
    try:
        with opener.open(request, timeout=timeout) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    data: Any = None
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    return status, data if isinstance(data, dict) else {}


def outcome_line(url: str, status: int, data: dict[str, Any]) -> str:
    """The one line the command prints for an answer (without the ``error:`` prefix)."""
    detail = str(data.get("detail") or "")
    if status == 200:
        return detail or "reloaded"
    error = str(data.get("error") or "")
    if status in (409, 500, 501) and detail:
        return f"not reloaded: {detail}"
    what = f"{status} {error}".strip()
    if status == 401:
        detail += " (odata-auth-proxy reload sends the key from inbound_api_key(_file) or "
        detail += "ODATA_AUTH_PROXY_INBOUND_API_KEY: give it the same --config / environment as the proxy)"
    if status == 404:
        detail = "this port does not serve POST /-/reload: with --admin-listen it is on the admin port (--admin URL)"
    return f"{url} answered {what}: {detail}" if detail else f"{url} answered {what}"


def cmd_reload(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> int:
    from proxy.cli import error

    env = os.environ if env is None else env
    try:
        target = reload_target(getattr(args, "config", None), getattr(args, "admin", None), env)
    except ConfigError as exc:
        error(f"{exc} (cannot tell where the running proxy listens; pass --admin URL)")
        return EXIT_CONFIG
    try:
        status, data = post_reload(target)
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        reason = getattr(reason, "strerror", None) or (reason if isinstance(reason, str) else type(reason).__name__)
        error(
            f"cannot reach the proxy at {target.url} ({reason}): is it running there? "
            "(--config as given to run, or --admin URL)"
        )
        return EXIT_FAILURE
    line = outcome_line(target.url, status, data)
    if status == 200:
        print(line)
        return EXIT_OK
    error(line)
    return EXIT_FAILURE
