"""One frozen ``Config`` built from flags > environment > YAML file, with errors that name the key path.

Nothing else in the proxy reads the environment or the config file: the CLI hands over its flags as
``Overrides``, :func:`load_config` merges them and validates everything into dataclasses.
"""

from __future__ import annotations

import math
import os
import re
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml

from proxy.credentials import CLIENT_AUTH_CHOICES, CertificateSpec, Credentials, Material
from proxy.redact import Secret
from proxy.servicekey import ServiceKey, ServiceKeyError, load_service_key_file, parse_service_key_text

ENV_PREFIX = "ODATA_AUTH_PROXY_"
DEFAULT_LISTEN = "127.0.0.1:8080"
LogFormat = Literal["text", "json"]
CsrfMode = Literal["auto", "off"]


class ConfigError(ValueError):
    """A user-facing, one-line message: ``<where>: <what is wrong and how to fix it>``."""


@dataclass(frozen=True)
class Route:
    """One path prefix forwarded to one upstream with one set of credentials."""

    name: str
    prefix: str  # always starts and ends with "/"
    upstream: str  # scheme://host[:port]/base/ — always ends with "/"
    credentials: Credentials
    csrf: CsrfMode = "auto"
    rewrite_links: bool = True


@dataclass(frozen=True)
class Timeouts:
    connect: float = 10.0
    read: float = 300.0  # idle read timeout, not total: long downloads must live
    token: float = 15.0
    # client side (the listener): a coarse sweep enforces them, so they fire within about a second
    client_header: float = 30.0  # a complete request head must arrive within this
    client_body: float = 60.0  # no request body byte for this long mid-request: 408 and close
    client_write: float = 60.0  # a client that reads nothing of its answer for this long is cut
    client_idle: float = 75.0  # a kept-alive connection with no request for this long is closed


@dataclass(frozen=True)
class Limits:
    max_body_size: int | None = None  # None = unlimited uploads
    max_header_size: int = 16384
    max_headers: int = 100
    replay_buffer: int = 1024 * 1024  # bodies up to this size are kept to replay after a 401


@dataclass(frozen=True)
class Config:
    routes: tuple[Route, ...]
    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    admin_listen: tuple[str, int] | None = None
    ca_bundle: str | None = None
    outbound_proxy: str | None = field(default=None, repr=False)  # may carry user:password@
    allow_remote: bool = False
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    inbound_api_key: Secret | None = None
    inbound_api_key_header: str = "X-Proxy-Api-Key"
    log_format: LogFormat = "text"
    verbose: bool = False
    log_query: bool = True
    access_log: bool = True
    shutdown_timeout: float = 30.0
    workers: int = 1  # serving processes; > 1: a supervisor + token broker and this many workers
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)
    source: str | None = None  # the config file, when there was one
    watch: bool = True  # reload when a file the configuration came from changes (``proxy.watch``)
    ui: bool = True  # the live inspector page and its JSON under /-/ (``proxy.inspector``)
    files: tuple[str, ...] = field(default=(), compare=False)  # those files, besides the credentials' own


@dataclass
class Overrides:
    """Command-line values; ``None`` means "not given" so the environment / file value stays."""

    config: str | None = None
    service_key: str | None = None
    service_key_json: str | None = None
    upstream: str | None = None
    listen: str | None = None
    ca_bundle: str | None = None
    certificate: str | None = None
    key: str | None = None
    key_password: str | None = None
    admin_listen: str | None = None
    allow_remote: bool | None = None
    allowed_hosts: list[str] = field(default_factory=list)
    log_format: str | None = None
    verbose: bool | None = None
    shutdown_timeout: float | None = None
    client_auth: str | None = None
    workers: int | None = None
    watch: bool | None = None
    ui: bool | None = None


def overrides_from_env(env: Mapping[str, str]) -> Overrides:
    """The ``ODATA_AUTH_PROXY_*`` variables, in the same shape as the flags."""

    def get(name: str) -> str | None:
        value = env.get(ENV_PREFIX + name)
        return value if value else None

    allow_remote = get("ALLOW_REMOTE")
    watch = get("WATCH")
    ui = get("UI")
    timeout = get("SHUTDOWN_TIMEOUT")
    workers = get("WORKERS")
    return Overrides(
        config=get("CONFIG"),
        service_key=get("SERVICE_KEY"),
        service_key_json=get("SERVICE_KEY_JSON"),
        upstream=get("UPSTREAM"),
        listen=get("LISTEN"),
        ca_bundle=get("CA_BUNDLE"),
        certificate=get("CERTIFICATE"),
        key=get("KEY"),
        key_password=get("KEY_PASSWORD"),
        admin_listen=get("ADMIN_LISTEN"),
        allow_remote=_env_bool(allow_remote, ENV_PREFIX + "ALLOW_REMOTE") if allow_remote else None,
        watch=_env_bool(watch, ENV_PREFIX + "WATCH") if watch else None,
        ui=_env_bool(ui, ENV_PREFIX + "UI") if ui else None,
        allowed_hosts=[h.strip() for h in (get("ALLOWED_HOSTS") or "").split(",") if h.strip()],
        log_format=get("LOG_FORMAT"),
        shutdown_timeout=_env_float(timeout, ENV_PREFIX + "SHUTDOWN_TIMEOUT") if timeout else None,
        client_auth=get("CLIENT_AUTH"),
        workers=check_workers(_env_int(workers, ENV_PREFIX + "WORKERS"), ENV_PREFIX + "WORKERS") if workers else None,
    )


def merge_overrides(flags: Overrides, env: Overrides) -> Overrides:
    """Flags beat environment: take each flag that was given, else the environment's value."""
    merged = Overrides()
    for name in Overrides.__dataclass_fields__:
        flag_value = getattr(flags, name)
        env_value = getattr(env, name)
        if name == "allowed_hosts":
            setattr(merged, name, list(env_value) + list(flag_value))
        else:
            setattr(merged, name, flag_value if flag_value is not None else env_value)
    return merged


def _env_bool(value: str, name: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}: expected true or false, got {value!r}")


def _env_float(value: str, name: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{name}: expected a number of seconds, got {value!r}") from None
    if number < 0:
        raise ConfigError(f"{name}: must be at least 0, got {value!r}")
    return number


def _env_int(value: str, name: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise ConfigError(f"{name}: expected a whole number, got {value!r}") from None


def check_workers(value: int, where: str) -> int:
    if value < 1:
        raise ConfigError(f"{where}: must be at least 1 (one serving process), got {value}")
    return value


def workers_problem(value: int, where: str) -> str | None:
    """Why ``run`` cannot start ``value`` serving processes here (Windows), or None. Only ``run`` refuses:
    ``token``, ``check`` and ``config validate`` read the same file on any platform."""
    if value <= 1 or workers_supported():
        return None
    return (
        f"{where}: {value} serving processes need Unix sockets and inherited listening sockets, which this "
        f"platform ({sys.platform}) lacks; use 1 (one process serves every connection)"
    )


def workers_supported() -> bool:
    """``workers`` > 1 needs the token broker's Unix socket and listening sockets passed to the workers (POSIX);
    without ``SO_REUSEPORT`` balancing they share one socket (``proxy.workers.bind_listeners``)."""
    return os.name == "posix" and hasattr(socket, "AF_UNIX")


def _or_default(value: float | None, default: float) -> float:
    return default if value is None else value


# --------------------------------------------------------------------------- loading


def load_config(
    flags: Overrides | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Build the effective configuration: flags > ``ODATA_AUTH_PROXY_*`` environment > YAML file."""
    env = os.environ if env is None else env
    overrides = merge_overrides(flags or Overrides(), overrides_from_env(env))
    raw: dict[str, Any] = {}
    base_dir = Path.cwd()
    if overrides.config:
        raw = _read_yaml(overrides.config)
        raw = _interpolate(raw, env, "")
        # os.path, as in ``_resolve`` (ntpath on Windows)
        base_dir = Path(os.path.dirname(os.path.realpath(os.path.expanduser(overrides.config))))
    return _build(raw, overrides, env, base_dir, overrides.config)


def _read_yaml(path: str) -> dict[str, Any]:
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config {path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config {path}: cannot read it ({exc.__class__.__name__})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        backslash = _backslash_escape_problem(exc, text)
        if backslash:
            raise ConfigError(f"config {path}: {backslash}") from None
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"config {path}: not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: expected a mapping of settings at the top level")
    return data


def _backslash_escape_problem(exc: yaml.YAMLError, text: str) -> str | None:
    """The Windows path in double quotes (``"C:\\Users\\me\\key.json"``: ``\\U`` is a YAML escape), said so
    with the fix, or None for any other YAML error. The value itself is not shown (it may be a secret)."""
    context = getattr(exc, "context", None) or ""
    problem = getattr(exc, "problem", None) or ""
    mark = getattr(exc, "problem_mark", None)
    if "double-quoted" not in context or "escape" not in problem or mark is None:
        return None
    named = ""
    start = getattr(exc, "context_mark", None)  # the opening quote: ``key: "`` before it names the setting
    lines = text.splitlines()
    if start is not None and start.line < len(lines):
        before = lines[start.line][: start.column].rstrip()
        key = before[:-1].strip(" -") if before.endswith(":") else ""
        named = f" ({key})" if re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", key) else ""
    return (
        f"line {mark.line + 1}, column {mark.column + 1}{named}: a backslash inside a double-quoted YAML value "
        "starts an escape sequence (\\U, \\k and \\x fail, \\t and \\n turn into tab and newline); for a Windows "
        "path use single quotes 'C:\\Users\\…' or forward slashes C:/Users/…"
    )


_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(value: Any, env: Mapping[str, str], path: str) -> Any:
    """Expand ``${VAR}`` and ``${VAR:-default}`` in string values (``$$`` is a literal ``$``)."""
    if isinstance(value, dict):
        return {k: _interpolate(v, env, _join(path, str(k))) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env, f"{path}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str) or "$" not in value:
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        if name in env and env[name] != "":
            return env[name]
        if default is not None:
            return default
        raise ConfigError(f"{path}: environment variable {name} is not set (use ${{{name}:-default}} for a default)")

    return _VAR.sub(substitute, value)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# --------------------------------------------------------------------------- validation helpers


class _Section:
    """A mapping being validated: typed getters that name the key path and reject unknown keys."""

    def __init__(self, data: Any, path: str, known: set[str]) -> None:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path or 'config'}: expected a mapping")
        unknown = sorted(set(map(str, data)) - known)
        if unknown:
            hint = ", ".join(sorted(known))
            raise ConfigError(f"{_join(path, unknown[0])}: unknown setting (known here: {hint})")
        self.data = data
        self.path = path
        self.files: list[str] = []  # the ``*_file`` secrets read through this section (watched for changes)

    def where(self, key: str) -> str:
        return _join(self.path, key)

    def get_str(self, key: str) -> str | None:
        value = self.data.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ConfigError(f"{self.where(key)}: expected a string")
        text = str(value).strip()
        return text or None

    def get_bool(self, key: str) -> bool | None:
        value = self.data.get(key)
        if value is None:
            return None
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            return _env_bool_at(value, self.where(key))
        raise ConfigError(f"{self.where(key)}: expected true or false")

    def get_number(self, key: str, minimum: float = 0) -> float | None:
        value = self.data.get(key)
        if value is None:
            return None
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{self.where(key)}: expected a number") from None
        if not math.isfinite(number):
            raise ConfigError(f"{self.where(key)}: expected a finite number, got {value!r}")
        if number < minimum:
            raise ConfigError(f"{self.where(key)}: must be at least {minimum:g}")
        return number

    def get_list(self, key: str) -> list[str]:
        value = self.data.get(key)
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{self.where(key)}: expected a list of strings")
        return [v.strip() for v in value if v.strip()]

    def get_secret(self, key: str, base_dir: Path) -> Secret | None:
        """``key`` inline, or ``key_file`` holding it (trailing newline stripped)."""
        inline = self.get_str(key)
        file_path = self.get_str(key + "_file")
        if inline and file_path:
            raise ConfigError(f"{self.where(key)}: give either {key} or {key}_file, not both")
        if file_path:
            resolved = _resolve(file_path, base_dir)
            self.files.append(resolved)
            return Secret(_read_secret_file(resolved, self.where(key + "_file")))
        return Secret(inline) if inline else None


def _env_bool_at(value: str, where: str) -> bool:
    try:
        return _env_bool(value, where)
    except ConfigError:
        raise ConfigError(f"{where}: expected true or false, got {value!r}") from None


def _read_secret_file(path: str, where: str) -> str:
    try:
        value = Path(path).read_text(encoding="utf-8").strip("\r\n")
    except FileNotFoundError:
        raise ConfigError(f"{where}: file {path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: cannot read {path} ({exc.__class__.__name__})") from None
    if not value:
        raise ConfigError(f"{where}: file {path} is empty")
    return value


def _resolve(path: str, base_dir: Path | str) -> str:
    """A path from the config file made absolute against the file's folder, with ``os.path`` only: that is
    ``ntpath`` on Windows, where ``C:\\keys\\key.json``, ``C:/keys/key.json`` and ``\\\\server\\share\\key.json``
    are absolute and ``keys\\key.json`` is relative (``pathlib`` would do the same, but ``os.path`` can be swapped
    for ``ntpath`` in a test on Linux)."""
    expanded = os.path.expanduser(path)
    if os.path.isabs(expanded):
        return expanded
    return os.path.normpath(os.path.join(os.fspath(base_dir), expanded))  # ``./certs/ca.pem``: no ``/./``


def parse_host_port(value: str, where: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[v6]:PORT`` or ``:PORT`` / ``PORT`` (loopback)."""
    text = value.strip()
    if text.isdigit():
        host, port_text = "127.0.0.1", text
    elif text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ConfigError(f"{where}: expected [IPv6]:PORT, got {value!r}")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ConfigError(f"{where}: expected HOST:PORT (e.g. 127.0.0.1:8080), got {value!r}")
        host = host or "127.0.0.1"
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{where}: port must be a number from 0 to 65535, got {port_text!r}")
    return host, int(port_text)


def check_url(value: str, where: str, *, allow_userinfo: bool = False) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        shown = f": {value!r}" if "@" not in value else ""  # never echo a proxy password
        raise ConfigError(f"{where}: not an http(s) URL{shown}")
    if parts.query or parts.fragment:
        raise ConfigError(f"{where}: must not contain a query string or fragment")
    if (parts.username or parts.password) and not allow_userinfo:
        raise ConfigError(f"{where}: must not contain user:password@ (credentials go under credentials:)")
    return value


def normalize_upstream(value: str, where: str) -> str:
    check_url(value, where)
    return value.rstrip("/") + "/"


def normalize_prefix(value: str, where: str) -> str:
    if not value.startswith("/"):
        raise ConfigError(f"{where}: must start with '/', got {value!r}")
    if "?" in value or "#" in value or "/../" in value + "/" or "/./" in value + "/":
        raise ConfigError(f"{where}: must be a plain path like /api/v1/")
    normalized = value.rstrip("/") + "/"
    if normalized.startswith("/-/"):
        raise ConfigError(f"{where}: /-/ is reserved for the proxy's admin endpoints")
    return normalized


# --------------------------------------------------------------------------- building

_TOP_KEYS = {
    "watch",
    "ui",
    "listen",
    "admin_listen",
    "routes",
    "tls",
    "outbound_proxy",
    "allow_remote",
    "allowed_hosts",
    "allowed_origins",
    "inbound_api_key",
    "inbound_api_key_file",
    "inbound_api_key_header",
    "log_format",
    "log_query",
    "access_log",
    "verbose",
    "shutdown_timeout",
    "workers",
    "timeouts",
    "limits",
}
_ROUTE_KEYS = {"name", "prefix", "upstream", "credentials", "csrf", "rewrite_links"}
_CRED_KEYS = {
    "service_key",
    "service_key_json",
    "token_url",
    "client_id",
    "client_secret",
    "client_secret_file",
    "client_auth",
    "certificate",
    "key",
    "key_password",
    "key_password_file",
    "pkcs12",
    "pkcs12_password",
    "pkcs12_password_file",
    "scope",
    "resource",
    "audience",
    "token_params",
}


def _build(raw: dict[str, Any], ov: Overrides, env: Mapping[str, str], base_dir: Path, source: str | None) -> Config:
    top = _Section(raw, "", _TOP_KEYS)
    listen_value = ov.listen or top.get_str("listen") or DEFAULT_LISTEN
    listen_host, listen_port = parse_host_port(listen_value, "--listen" if ov.listen else top.where("listen"))
    admin_value = ov.admin_listen or top.get_str("admin_listen")
    admin_listen = parse_host_port(admin_value, "admin_listen") if admin_value else None

    tls = _Section(raw.get("tls"), "tls", {"ca_bundle"})
    ca_bundle = ov.ca_bundle or tls.get_str("ca_bundle")
    if ca_bundle:
        ca_bundle = _resolve(ca_bundle, base_dir if not ov.ca_bundle else Path.cwd())

    outbound_proxy = top.get_str("outbound_proxy")
    if outbound_proxy:
        check_url(outbound_proxy, "outbound_proxy", allow_userinfo=True)

    log_format = ov.log_format or top.get_str("log_format") or "text"
    if log_format not in ("text", "json"):
        raise ConfigError(f"log_format: expected text or json, got {log_format!r}")

    inbound_key = top.get_secret("inbound_api_key", base_dir)
    env_key = env.get(ENV_PREFIX + "INBOUND_API_KEY")
    if env_key:
        inbound_key = Secret(env_key)

    timeout_names = ("connect", "read", "token", "client_header", "client_body", "client_write", "client_idle")
    timeouts_section = _Section(raw.get("timeouts"), "timeouts", set(timeout_names))
    defaults = Timeouts()
    timeouts = Timeouts(
        **{name: timeouts_section.get_number(name, 0.1) or getattr(defaults, name) for name in timeout_names}
    )
    limits_section = _Section(
        raw.get("limits"), "limits", {"max_body_size", "max_header_size", "max_headers", "replay_buffer"}
    )
    max_body = limits_section.get_number("max_body_size", 0)
    limits = Limits(
        max_body_size=int(max_body) if max_body is not None else None,
        max_header_size=int(limits_section.get_number("max_header_size", 1024) or Limits.max_header_size),
        max_headers=int(limits_section.get_number("max_headers", 1) or Limits.max_headers),
        replay_buffer=int(_or_default(limits_section.get_number("replay_buffer", 0), Limits.replay_buffer)),
    )

    routes = _build_routes(raw, ov, env, base_dir, ca_bundle)

    shutdown = ov.shutdown_timeout
    if shutdown is None:
        shutdown = top.get_number("shutdown_timeout", 0)
    workers = _workers(top, ov)
    verbose = ov.verbose if ov.verbose else bool(top.get_bool("verbose"))
    allow_remote = ov.allow_remote if ov.allow_remote is not None else bool(top.get_bool("allow_remote"))
    return Config(
        routes=routes,
        listen_host=listen_host,
        listen_port=listen_port,
        admin_listen=admin_listen,
        ca_bundle=ca_bundle,
        outbound_proxy=outbound_proxy,
        allow_remote=allow_remote,
        allowed_hosts=tuple(top.get_list("allowed_hosts") + ov.allowed_hosts),
        allowed_origins=tuple(o.rstrip("/") for o in top.get_list("allowed_origins")),
        inbound_api_key=inbound_key,
        inbound_api_key_header=top.get_str("inbound_api_key_header") or "X-Proxy-Api-Key",
        log_format=log_format,  # type: ignore[arg-type]
        verbose=verbose,
        log_query=top.get_bool("log_query") is not False,
        access_log=top.get_bool("access_log") is not False,
        shutdown_timeout=30.0 if shutdown is None else shutdown,
        workers=workers,
        timeouts=timeouts,
        limits=limits,
        source=source,
        watch=ov.watch if ov.watch is not None else top.get_bool("watch") is not False,
        ui=ov.ui if ov.ui is not None else top.get_bool("ui") is not False,
        files=tuple(dict.fromkeys(f for f in (source, ca_bundle, *top.files) if f)),
    )


def _workers(top: _Section, ov: Overrides) -> int:
    """flag --workers > ODATA_AUTH_PROXY_WORKERS > workers: in the file; each error names where it came from."""
    if ov.workers is not None:
        return check_workers(ov.workers, "--workers")  # the environment's value was checked where it was read
    value = top.data.get("workers")
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(f"{top.where('workers')}: expected a whole number of processes")
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"{top.where('workers')}: expected a whole number of processes, got {value!r}") from None
    return check_workers(number, top.where("workers"))


def _build_routes(
    raw: dict[str, Any], ov: Overrides, env: Mapping[str, str], base_dir: Path, ca_bundle: str | None
) -> tuple[Route, ...]:
    raw_routes = raw.get("routes")
    if raw_routes is None:
        raw_routes = []
    if not isinstance(raw_routes, list):
        raise ConfigError("routes: expected a list of routes (each with prefix, upstream, credentials)")
    route_overrides = any((ov.service_key, ov.service_key_json, ov.upstream, ov.certificate, ov.key, ov.client_auth))
    if not raw_routes:
        if not (ov.service_key or ov.service_key_json):
            raise ConfigError(
                "nothing to proxy: give --service-key FILE (the SAP BTP service key JSON), "
                "set ODATA_AUTH_PROXY_SERVICE_KEY / ODATA_AUTH_PROXY_SERVICE_KEY_JSON, "
                "or --config FILE with routes:"
            )
        raw_routes = [{"name": "default", "prefix": "/", "credentials": {}}]
    elif route_overrides and len(raw_routes) > 1:
        raise ConfigError(
            "--service-key/--upstream/--certificate/--key (and their ODATA_AUTH_PROXY_* variables) apply to a "
            "single route, but the config has several: set them per route under routes[N].credentials"
        )

    routes: list[Route] = []
    for index, raw_route in enumerate(raw_routes):
        routes.append(_build_route(raw_route, index, ov if route_overrides else None, env, base_dir, ov.key_password))
    names = [r.name for r in routes]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"routes: the name {name!r} is used twice; route names must be unique")
    prefixes = [r.prefix for r in routes]
    for prefix in prefixes:
        if prefixes.count(prefix) > 1:
            raise ConfigError(f"routes: the prefix {prefix!r} is used twice; prefixes must be unique")
    del ca_bundle
    return tuple(routes)


def _build_route(
    raw_route: Any, index: int, ov: Overrides | None, env: Mapping[str, str], base_dir: Path, key_password: str | None
) -> Route:
    path = f"routes[{index}]"
    section = _Section(raw_route, path, _ROUTE_KEYS)
    name = section.get_str("name") or f"route{index}"
    prefix = normalize_prefix(section.get_str("prefix") or "/", section.where("prefix"))
    cred_path = section.where("credentials")
    creds, key_upstream = _build_credentials(
        section.data.get("credentials"), cred_path, ov, env, base_dir, key_password
    )

    upstream_value = (ov.upstream if ov else None) or section.get_str("upstream") or key_upstream
    if not upstream_value:
        raise ConfigError(
            f"{section.where('upstream')}: missing: this service key has no API URL (XSUAA keys hold only the "
            "token server); give --upstream URL or routes[N].upstream"
        )
    upstream = normalize_upstream(upstream_value, "--upstream" if ov and ov.upstream else section.where("upstream"))

    csrf = section.get_str("csrf") or "auto"
    if csrf not in ("auto", "off"):
        raise ConfigError(f"{section.where('csrf')}: expected auto or off, got {csrf!r}")
    rewrite = section.get_bool("rewrite_links")
    return Route(
        name=name,
        prefix=prefix,
        upstream=upstream,
        credentials=creds,
        csrf=csrf,  # type: ignore[arg-type]
        rewrite_links=rewrite is not False,
    )


def _build_credentials(
    raw: Any, path: str, ov: Overrides | None, env: Mapping[str, str], base_dir: Path, key_password: str | None
) -> tuple[Credentials, str | None]:
    section = _Section(raw, path, _CRED_KEYS)
    key: ServiceKey | None = None
    try:
        if ov and ov.service_key:
            key = _service_key(ov.service_key, None, section.files)
        elif ov and ov.service_key_json:
            key = parse_service_key_text(ov.service_key_json, f"service key from {ENV_PREFIX}SERVICE_KEY_JSON")
        elif section.get_str("service_key"):
            key = _service_key(section.get_str("service_key") or "", base_dir, section.files)
        elif section.get_str("service_key_json"):
            key = parse_service_key_text(section.get_str("service_key_json") or "", section.where("service_key_json"))
    except ServiceKeyError as exc:
        raise ConfigError(str(exc)) from None

    token_url = section.get_str("token_url") or (key.token_url if key else None)
    client_id = section.get_str("client_id") or (key.client_id if key else None)
    source = key.source if key else (path or "config")
    if not token_url:
        raise ConfigError(f"{section.where('token_url')}: missing (or give service_key)")
    check_url(token_url, section.where("token_url") if section.get_str("token_url") else source + ": token URL")
    if not client_id:
        raise ConfigError(f"{section.where('client_id')}: missing (or give service_key)")

    secret = section.get_secret("client_secret", base_dir) or (key.client_secret if key else None)
    client_auth = (ov.client_auth if ov else None) or section.get_str("client_auth") or "post"
    if client_auth not in CLIENT_AUTH_CHOICES:
        raise ConfigError(
            f"{section.where('client_auth')}: expected one of {', '.join(CLIENT_AUTH_CHOICES)}, got {client_auth!r}"
        )

    cert_spec = _certificate_spec(section, ov, base_dir, key, key_password)
    if cert_spec is None and secret is None:
        raise ConfigError(
            f"{section.where('client_secret')}: missing: give client_secret / client_secret_file, "
            "or a client certificate (certificate + key, or pkcs12)"
        )
    if cert_spec is not None:
        secret = None  # a certificate key authenticates by mTLS; the form carries client_id only

    token_params = section.data.get("token_params") or {}
    if not isinstance(token_params, dict) or not all(
        isinstance(v, str | int | float) and not isinstance(v, bool) for v in token_params.values()
    ):
        raise ConfigError(f"{section.where('token_params')}: expected a mapping of parameter names to strings")

    creds = Credentials(
        token_url=token_url,
        client_id=client_id,
        client_secret=secret,
        client_auth=client_auth,
        certificate=cert_spec,
        scope=section.get_str("scope"),
        resource=section.get_str("resource"),
        audience=section.get_str("audience"),
        token_params=tuple(sorted((str(k), str(v)) for k, v in token_params.items())),
        source=source,
        files=tuple(dict.fromkeys(section.files)),
    )
    return creds, key.upstream_url if key else None


def _service_key(value: str, base_dir: Path | None, files: list[str]) -> ServiceKey:
    """A service key file (watched for changes), or ``keyring:NAME`` from the OS keychain (no file to watch)."""
    if value.startswith("keyring:"):
        from proxy.keychain import KeychainError, keychain_name, load_service_key

        try:
            return load_service_key(keychain_name(value) or "")
        except KeychainError as exc:
            raise ConfigError(str(exc)) from None
    path = _resolve(value, base_dir) if base_dir is not None else value
    files.append(path)
    return load_service_key_file(path)


def _certificate_spec(
    section: _Section, ov: Overrides | None, base_dir: Path, key: ServiceKey | None, key_password_override: str | None
) -> CertificateSpec | None:
    """Combine certificate material from flags, the YAML and the service key (flags/YAML override the key)."""

    def file_material(value: str | None, what: str, from_flag: bool) -> Material | None:
        if not value:
            return None
        if "-----BEGIN" in value:
            return Material.inline(value, what)
        return Material.from_file(value if from_flag else _resolve(value, base_dir), what)

    cert = file_material(ov.certificate if ov else None, "certificate file", True) or file_material(
        section.get_str("certificate"), f"{section.where('certificate')}", False
    )
    pkey = file_material(ov.key if ov else None, "key file", True) or file_material(
        section.get_str("key"), f"{section.where('key')}", False
    )
    pkcs12_value = section.get_str("pkcs12")
    pkcs12 = Material.from_file(_resolve(pkcs12_value, base_dir), section.where("pkcs12")) if pkcs12_value else None
    if key is not None:
        cert = cert or key.certificate
        pkey = pkey or key.key
    if cert is None and pkey is None and pkcs12 is None:
        return None
    if pkcs12 is None and cert is None:
        raise ConfigError(f"{section.where('certificate')}: a private key is given but no client certificate")
    if pkcs12 is None and pkey is None:
        where = key.source if key is not None and key.kind == "external-certificate" else section.where("key")
        raise ConfigError(
            f"{where}: the client certificate has no private key (key type External Certificate keeps it with "
            "you): give it with --key FILE, ODATA_AUTH_PROXY_KEY or credentials.key"
        )
    # flag/env (merged into the overrides) beat the file
    key_password = (
        Secret(key_password_override) if key_password_override else section.get_secret("key_password", base_dir)
    )
    return CertificateSpec(
        certificate=cert,
        key=pkey,
        key_password=key_password,
        pkcs12=pkcs12,
        pkcs12_password=section.get_secret("pkcs12_password", base_dir),
    )


def with_routes(config: Config, routes: tuple[Route, ...]) -> Config:
    return replace(config, routes=routes)
