"""``odata-auth-proxy check``: the doctor. One checklist line per step and route, exit code 0 only if all pass.

For every route, in order (a route whose step fails gets its later network steps marked ``skipped``):

``config``       the route's settings and key as loaded: token URL, upstream (plus warnings, e.g. a certificate
                 key that does not use the ``authentication.cert.`` host);
``certificate``  certificate routes only: chain and key loaded and matched, subject, issuer, notAfter and days
                 left, one line per chain certificate; warnings for an incomplete chain, near expiry, and a key
                 file readable by others;
``dns``          the token host (or the outbound proxy) resolved, in a daemon thread so a stuck resolver
                 cannot hold the process;
``tls``          TCP connect (through ``CONNECT`` when an http:// outbound proxy applies) and the TLS handshake
                 with the route's own context (CA bundle, client certificate): protocol and server certificate,
                 or the reason it failed with a hint (``--ca-bundle`` for an untrusted certificate). Certificate
                 routes also send one ``HEAD`` so that a client certificate refused after a TLS 1.3 handshake
                 shows here. ``tcp`` instead for an http:// token URL;
``token``        a real client-credentials request: token fingerprint (never the token), lifetime, scopes (from
                 the response's ``scope`` or the JWT's ``scope`` claim), or the server's own error and a hint;
``upstream``     ``GET <upstream>/api/v1/`` for a bare-host upstream, else ``GET <upstream>``, or
                 ``GET <upstream>/<--probe PATH>``, with the token: status and latency; 2xx/3xx pass.

Every network step is bounded by ``timeouts.connect`` / ``timeouts.token``. ``--offline`` runs only
``config`` and ``certificate``. Exit codes: 0 all passed (warnings allowed), 1 a check failed, 2 the
configuration itself is broken: ``load_config`` errors propagate at once, and a certificate that cannot be
used (mismatched key, expired, unreadable) is shown in the checklist and then raised as ``ConfigError``
after all routes were checked, as ``run`` and ``config validate`` would refuse it too.

Real output (``--no-color``, or stdout not a TTY) from ``tests/test_doctor.py``; the tls line is wrapped here::

    route api  (routes[0].credentials, client id sb-0a1b2c3d!b12345|it!b67890, client secret)
      [ok]   config      token https://127.0.0.1:39219/oauth/token, upstream https://127.0.0.1:36041/
      [ok]   dns         127.0.0.1 -> 127.0.0.1
      [ok]   tls         TLSv1.3 with 127.0.0.1:39219, server certificate OU=Testing cert #Sk1y6O0KDDUtZ3Uq,O=trustme
                         v1.2.1, issued by OU=Testing CA #ymi-LAAWT5M0hiFg,O=trustme v1.2.1
      [ok]   token       fp 3752988a, expires in 3600 s, scopes: WorkspacePackagesRead
      [ok]   upstream    GET https://127.0.0.1:36041/api/v1/ -> 200 in 3 ms
    all checks passed

and a failure (exit code 1)::

    route api  (routes[0].credentials, client id sb-0a1b2c3d!b12345|it!b67890, client secret)
      [ok]   config      token https://127.0.0.1:41507/oauth/token, upstream https://127.0.0.1:39455/
      [ok]   dns         127.0.0.1 -> 127.0.0.1
      [FAIL] tls         cannot connect to 127.0.0.1:41507: connection refused (nothing listens on that port)
      [skip] token       skipped (no connection to the token server)
      [skip] upstream    skipped (no connection to the token server)
    1 check failed: api tls (the token server could not be reached)

On a colour terminal the marks are ✓ ✗ ! – and the arrows →; server certificates show their CN when they have one.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ipaddress
import os
import socket
import ssl
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, TextIO
from urllib.parse import unquote, urlsplit

import aiohttp
from cryptography import x509

from proxy.certificates import CertificateError, key_file_permission_warning, load_client_identity
from proxy.config import Config, ConfigError, Overrides, Route, load_config
from proxy.outbound import OutboundProxies
from proxy.tls import TlsConfigError, client_ssl_context
from proxy.tokencmd import decode_jwt, select_route
from proxy.tokens import ClientCredentialsSource, TokenError, TokenResponse

Status = Literal["ok", "fail", "warn", "skip"]

STEP_WIDTH = 12
CA_BUNDLE_HINT = (
    "hint: a private CA, or a corporate proxy that inspects TLS: add its CA certificate(s) with --ca-bundle FILE "
    "(tls.ca_bundle in the config, env ODATA_AUTH_PROXY_CA_BUNDLE)"
)
ROLES_HINT = "hint: the token was rejected: check the role collection / roles assigned to the service instance"
_HEAD_WAIT = 5.0  # at most this long for the token server's answer to the mTLS HEAD
_REDACTED = "<redacted>"


# --------------------------------------------------------------------------- output


_COLOR_MARKS: dict[Status, tuple[str, str]] = {
    "ok": ("✓", "32"),
    "fail": ("✗", "31"),
    "warn": ("!", "33"),
    "skip": ("–", "2"),
}
#: what the closing summary says of a failed token check: refused credentials and an unreachable server
#: need different fixes (a new key versus the network, proxy or URL)
REFUSED = "the token server answered and refused the credentials"
UNREACHABLE = "the token server could not be reached"

_PLAIN_MARKS: dict[Status, str] = {"ok": "[ok]  ", "fail": "[FAIL]", "warn": "[warn]", "skip": "[skip]"}


@dataclass(frozen=True)
class _Style:
    color: bool

    def mark(self, status: Status) -> str:
        if self.color:
            symbol, code = _COLOR_MARKS[status]
            return f"\x1b[{code}m{symbol}\x1b[0m"
        return _PLAIN_MARKS[status]

    @property
    def mark_width(self) -> int:
        return 1 if self.color else 6

    @property
    def arrow(self) -> str:
        return "→" if self.color else "->"

    def bold(self, text: str) -> str:
        return f"\x1b[1m{text}\x1b[0m" if self.color else text


@dataclass
class _Checklist:
    """Writes the lines as they happen (a slow step shows where it is) and counts the outcome."""

    out: TextIO
    style: _Style
    failed: list[str] = field(default_factory=list)
    config_errors: list[str] = field(default_factory=list)
    warnings: int = 0
    secrets: set[str] = field(default_factory=set)  # never printed, whatever a server echoes back
    route_name: str = ""

    def write(self, text: str) -> None:
        for value in self.secrets:
            text = text.replace(value, _REDACTED)
        try:
            self.out.write(text + "\n")
        except UnicodeEncodeError:  # a non-ASCII certificate name on an ASCII-only stream
            self.out.write(text.encode("ascii", "backslashreplace").decode("ascii") + "\n")
        self.out.flush()

    def hide(self, value: str | None) -> None:
        if value and len(value) >= 8:
            self.secrets.add(value)

    def route(self, route: Route) -> None:
        creds = route.credentials
        auth = "client certificate" if creds.kind == "certificate" else "client secret"
        self.route_name = route.name
        self.write(f"{self.style.bold('route ' + route.name)}  ({creds.source}, client id {creds.client_id}, {auth})")

    def step(self, status: Status, name: str, detail: str, more: Sequence[str] = (), why: str = "") -> None:
        """One checklist line; a failure's ``why`` (a few words) also goes into the closing summary."""
        self.write(f"  {self.style.mark(status)} {name:<{STEP_WIDTH}}{detail}")
        indent = " " * (2 + self.style.mark_width + 1 + STEP_WIDTH)
        for line in more:
            self.write(indent + line)
        if status == "fail":
            self.failed.append(f"{self.route_name} {name}" + (f" ({why})" if why else ""))
        elif status == "warn":
            self.warnings += 1

    def skip(self, names: Sequence[str], why: str) -> None:
        for name in names:
            self.step("skip", name, f"skipped ({why})")


class _StepFailed(Exception):
    def __init__(self, detail: str, hints: Sequence[str] = (), why: str = "") -> None:
        super().__init__(detail)
        self.why = why
        self.detail = detail
        self.hints = list(hints)


# --------------------------------------------------------------------------- helpers


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _endpoint(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    host = parts.hostname or ""
    return host, parts.port or (443 if parts.scheme == "https" else 80)


def _is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _os_reason(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (nothing listens on that port)"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[0].lower() + exc.strerror[1:]
    return str(exc) or exc.__class__.__name__


def _ssl_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc.strerror or exc).replace("_", " ").lower()
    return _os_reason(exc)


def _tls_hints(exc: BaseException, host: str, with_cert: bool) -> list[str]:
    if isinstance(exc, ssl.SSLCertVerificationError):
        message = str(exc.verify_message or "").lower()
        if "mismatch" in message:
            return [f"hint: the server's certificate is not issued for {host}: check the host in the URL"]
        if "expired" in message:
            return ["hint: the server's certificate has expired (or this computer's clock is wrong)"]
        return [CA_BUNDLE_HINT]
    reason = _ssl_reason(exc)
    if "wrong version number" in reason or "record layer failure" in reason:
        return ["hint: the server does not speak TLS on this port: should the URL be http:// ?"]
    if with_cert and any(w in reason for w in ("alert", "certificate required", "bad certificate", "unknown ca")):
        return [
            "hint: the token server refused the client certificate: check that it belongs to this service key, "
            "that its chain reaches a root the server trusts, and that a certificate key uses the "
            "authentication.cert. host"
        ]
    return []


def _proxy_for(config: Config, url: str) -> str | None:
    """The outbound proxy a request to ``url`` goes through, as the token and upstream sessions decide it."""
    return OutboundProxies(config.outbound_proxy).for_url(url)


def _proxy_display(proxy: str) -> str:
    """The proxy URL without user:password."""
    parts = urlsplit(proxy)
    host, port = _endpoint(proxy)
    return f"{parts.scheme}://{_hostport(host, port)}"


def probe_url(route: Route, probe: str | None) -> str:
    """What ``check`` GETs on the upstream: ``--probe PATH`` below the upstream, else the API root."""
    if probe:
        return route.upstream + probe.lstrip("/")
    if urlsplit(route.upstream).path in ("", "/"):
        return route.upstream + "api/v1/"
    return route.upstream


def check_probe(probe: str | None) -> None:
    if probe is not None and ("://" in probe or probe.startswith("//") or not probe.strip()):
        raise ConfigError(
            f"--probe {probe}: give a path below the upstream, e.g. /api/v1/IntegrationPackages?$top=1 "
            "(the token goes only to the route's upstream)"
        )


async def _getaddrinfo(host: str, port: int, timeout: float) -> list[str]:
    """Addresses of ``host``, in a daemon thread: a hung resolver is abandoned, never waited for at exit."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[list[str]] = loop.create_future()

    def deliver(result: list[str] | BaseException) -> None:
        if future.done():
            return
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)

    def work() -> None:
        result: list[str] | BaseException
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            result = list(dict.fromkeys(str(info[4][0]) for info in infos))
        except Exception as exc:  # gaierror, UnicodeError for an impossible name
            result = exc
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            loop.call_soon_threadsafe(deliver, result)

    threading.Thread(target=work, name=f"check-dns-{host}", daemon=True).start()
    async with asyncio.timeout(timeout):
        return await future


# --------------------------------------------------------------------------- the steps


def _config_step(checklist: _Checklist, route: Route) -> None:
    creds = route.credentials
    checklist.hide(creds.client_secret.reveal() if creds.client_secret else None)
    checklist.step("ok", "config", f"token {creds.token_url}, upstream {route.upstream}")
    token_host, _ = _endpoint(creds.token_url)
    sap_host = f".{token_host}"
    if creds.kind == "certificate" and ".authentication." in sap_host and ".authentication.cert." not in sap_host:
        checklist.step(
            "warn",
            "config",
            f"a certificate key must use the authentication.cert. host, but the token URL's host is {token_host}",
        )
    if creds.kind == "secret" and creds.token_url.startswith("http://") and not _is_loopback(token_host):
        checklist.step("warn", "config", "the token URL is plain http://: the client secret would travel unencrypted")
    upstream_host, _ = _endpoint(route.upstream)
    if route.upstream.startswith("http://") and not _is_loopback(upstream_host):
        checklist.step("warn", "config", "the upstream is plain http://: the bearer token would travel unencrypted")


def _certificate_step(checklist: _Checklist, config: Config, route: Route) -> ssl.SSLContext | None:
    """The route's token-server TLS context (CA bundle + client certificate), or None when unusable."""
    ctx = client_ssl_context(config.ca_bundle)
    spec = route.credentials.certificate
    if spec is None:
        return ctx
    try:
        identity = load_client_identity(spec)
        identity.apply_to(ctx)
    except CertificateError as exc:
        checklist.step("fail", "certificate", str(exc))
        checklist.config_errors.append(f"route {route.name}: {exc}")
        return None
    days = (identity.not_after - datetime.now(UTC)).days
    detail = (
        f"{identity.subject}, issued by {identity.issuer}, "
        f"notAfter {identity.not_after:%Y-%m-%d %H:%M} UTC ({days} days left)"
    )
    more = [f"chain {i}: {line}" for i, line in enumerate(identity.chain_summary(), 1)]
    more.append(f"SHA-256 fingerprint {identity.fingerprint_sha256}")
    checklist.step("ok", "certificate", detail, more)
    for warning in (
        identity.chain_warning(),
        identity.expiry_warning(),
        key_file_permission_warning(spec.key),
        key_file_permission_warning(spec.pkcs12),
    ):
        if warning:
            checklist.step("warn", "certificate", warning)
    return ctx


async def _dns_step(checklist: _Checklist, config: Config, route: Route, proxy: str | None) -> list[str] | None:
    token_host, token_port = _endpoint(route.credentials.token_url)
    host, port = _endpoint(proxy) if proxy else (token_host, token_port)
    timeout = config.timeouts.connect
    via = f" (outbound proxy {_proxy_display(proxy)}, which resolves {token_host})" if proxy else ""
    what = "the outbound proxy" if proxy else "the token host"
    try:
        addresses = await _getaddrinfo(host, port, timeout)
    except TimeoutError:
        checklist.step("fail", "dns", f"cannot resolve {what} {host}: no answer within {timeout:g} s")
        return None
    except Exception as exc:
        reason = _os_reason(exc) if isinstance(exc, OSError) else exc.__class__.__name__
        checklist.step(
            "fail",
            "dns",
            f"cannot resolve {what} {host}: {reason}",
            ["hint: check the host name in the URL, and the network / VPN / DNS settings"],
        )
        return None
    shown = ", ".join(addresses[:4]) + (f" (+{len(addresses) - 4} more)" if len(addresses) > 4 else "")
    checklist.step("ok", "dns", f"{host} {checklist.style.arrow} {shown}{via}")
    return addresses


async def _open_tcp(
    addresses: Sequence[str], port: int, timeout: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
    """Connect to the first address that answers; ``timeout`` bounds all attempts together."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    address, error = addresses[0], None
    for address in addresses[:4]:
        try:
            async with asyncio.timeout_at(deadline):
                reader, writer = await asyncio.open_connection(address, port)
        except TimeoutError:
            raise _StepFailed(
                f"cannot connect to {_hostport(address, port)}: no answer within {timeout:g} s", why=UNREACHABLE
            ) from None
        except OSError as exc:
            error = exc
            continue
        return reader, writer, address
    reason = _os_reason(error) if error is not None else "no address"
    raise _StepFailed(f"cannot connect to {_hostport(address, port)}: {reason}", why=UNREACHABLE)


async def _proxy_connect(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, proxy: str, host: str, port: int, timeout: float
) -> None:
    authority = _hostport(host, port)
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    parts = urlsplit(proxy)
    if parts.username:
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        lines.append("Proxy-Authorization: Basic " + base64.b64encode(pair).decode("ascii"))
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    try:
        async with asyncio.timeout(timeout):
            head = await reader.readuntil(b"\r\n\r\n")
    except TimeoutError:
        raise _StepFailed(
            f"the outbound proxy {_proxy_display(proxy)} did not answer CONNECT within {timeout:g} s"
        ) from None
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
        raise _StepFailed(f"the outbound proxy {_proxy_display(proxy)} closed the connection on CONNECT") from None
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1").strip()
    fields = status_line.split(" ", 2)
    if len(fields) < 2 or fields[1] != "200":
        hints = (
            ["hint: the proxy wants credentials: put user:password@ in HTTPS_PROXY"] if " 407" in status_line else []
        )
        raise _StepFailed(
            f"the outbound proxy {_proxy_display(proxy)} refused CONNECT {authority}: {status_line}", hints
        )


_TlsOutcome = Literal["ok", "fail", "suspect"]


async def _tls_step(
    checklist: _Checklist,
    config: Config,
    route: Route,
    ctx: ssl.SSLContext,
    addresses: Sequence[str],
    proxy: str | None,
) -> _TlsOutcome:
    """TCP (+ CONNECT) + TLS handshake to the token server; "suspect" when it dropped the client certificate."""
    creds = route.credentials
    host, port = _endpoint(creds.token_url)
    secure = creds.token_url.startswith("https://")
    name = "tls" if secure else "tcp"
    timeout = config.timeouts.connect
    if proxy and urlsplit(proxy).scheme != "http":
        checklist.step(
            "skip", name, f"skipped (not checked through the {urlsplit(proxy).scheme}:// proxy {_proxy_display(proxy)})"
        )
        return "ok"
    connect_port = _endpoint(proxy)[1] if proxy else port
    writer: asyncio.StreamWriter | None = None
    try:
        reader, writer, address = await _open_tcp(addresses, connect_port, timeout)
        where = _hostport(address, connect_port)
        if proxy and not secure:
            where = f"the outbound proxy {_proxy_display(proxy)} ({where})"
        elif proxy:
            await _proxy_connect(reader, writer, proxy, host, port, timeout)
            where = f"{_hostport(host, port)} via {_proxy_display(proxy)}"
        if not secure:
            plain = "plain HTTP, no TLS"
            status: Status = "ok" if _is_loopback(host) else "warn"
            checklist.step(status, name, f"connected to {where} ({plain})")
            return "ok"
        try:
            async with asyncio.timeout(timeout):
                await writer.start_tls(ctx, server_hostname=host, ssl_handshake_timeout=timeout)
        except TimeoutError:
            raise _StepFailed(f"TLS handshake with {where}: no answer within {timeout:g} s") from None
        except (ssl.SSLError, ssl.CertificateError) as exc:
            raise _StepFailed(
                f"TLS handshake with {where} failed: {_ssl_reason(exc)}",
                _tls_hints(exc, host, creds.kind == "certificate"),
            ) from None
        except OSError as exc:
            raise _StepFailed(f"TLS handshake with {where} failed: {_os_reason(exc)}") from None
        detail = _describe_tls(writer, where)
        if creds.certificate is not None:
            problem = await _client_certificate_refused(reader, writer, host, port, creds.token_url, timeout)
            if problem is not None:
                status_, text, hints = problem
                checklist.step(status_, name, f"{detail}; {text}", hints)
                return "fail" if status_ == "fail" else "suspect"
        checklist.step("ok", name, detail)
        return "ok"
    except _StepFailed as exc:
        checklist.step("fail", name, exc.detail, exc.hints, why=exc.why)
        return "fail"
    finally:
        if writer is not None:
            writer.transport.abort()


def _short_name(name: x509.Name) -> str:
    """``CN=…`` when the name has a common name (server certificates: host and CA), else the whole RFC 4514 name."""
    common = name.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    if common:
        return f"CN={common[0].value!s}"
    return name.rfc4514_string() or "(empty)"


def _describe_tls(writer: asyncio.StreamWriter, where: str) -> str:
    ssl_object = writer.get_extra_info("ssl_object")
    if not isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
        return f"TLS with {where}"
    text = f"{ssl_object.version() or 'TLS'} with {where}"
    der = ssl_object.getpeercert(binary_form=True)
    if der:
        cert = x509.load_der_x509_certificate(der)
        text += f", server certificate {_short_name(cert.subject)}, issued by {_short_name(cert.issuer)}"
    return text


async def _client_certificate_refused(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, port: int, url: str, timeout: float
) -> tuple[Status, str, list[str]] | None:
    """One ``HEAD``: with TLS 1.3 a refused client certificate only shows after the handshake, on the first read."""
    path = urlsplit(url).path or "/"
    request = (
        f"HEAD {path} HTTP/1.1\r\nHost: {_hostport(host, port)}\r\nUser-Agent: odata-auth-proxy-check\r\n"
        "Connection: close\r\n\r\n"
    )
    try:
        writer.write(request.encode())
        async with asyncio.timeout(min(_HEAD_WAIT, timeout)):
            line = await reader.readline()
    except TimeoutError:
        return None  # no verdict: the token step will tell
    except ssl.SSLError as exc:
        return "fail", f"then the server ended the connection: {_ssl_reason(exc)}", _tls_hints(exc, host, True)
    except OSError as exc:
        line = b""
        reason = _os_reason(exc)
    else:
        reason = "closed"
    if line.startswith(b"HTTP/"):
        return None
    return (
        "warn",
        f"then the server ended the connection without an answer ({reason}): "
        "it may have refused the client certificate",
        [],
    )


def _scopes(response: TokenResponse) -> list[str] | None:
    """The granted scopes: the response's ``scope``, else the JWT's ``scope`` claim; None for an opaque token."""
    if response.scope:
        return response.scope.split()
    try:
        _, claims = decode_jwt(response.access_token.reveal())
    except ValueError:
        return None
    scope = claims.get("scope")
    if isinstance(scope, str):
        return scope.split()
    if isinstance(scope, list):
        return [str(s) for s in scope]
    return []


async def _token_step(
    checklist: _Checklist,
    config: Config,
    route: Route,
    ctx: ssl.SSLContext,
    session: aiohttp.ClientSession,
    certificate_suspect: bool = False,
) -> TokenResponse | None:
    source = ClientCredentialsSource(
        route.credentials,
        session,
        ctx,
        timeout=config.timeouts.token,
        connect_timeout=config.timeouts.connect,
        proxy=_proxy_for(config, route.credentials.token_url),
    )
    try:
        async with asyncio.timeout(config.timeouts.token + 1):
            response = await source.fetch()
    except TokenError as exc:
        status = f"HTTP {exc.http_status}: " if exc.http_status is not None else ""
        hints = []
        if certificate_suspect and exc.http_status is None:
            hints.append(
                "hint: the server drops the connection once it has seen the client certificate: the token server "
                "probably refused the client certificate: check that its chain reaches a root the server trusts"
            )
        # a token server that answered and said no is a credentials problem; one that did not answer is not
        why = REFUSED if exc.http_status is not None else UNREACHABLE
        checklist.step("fail", "token", f"{status}{exc.detail}", hints, why=why)
        return None
    except TimeoutError:
        detail = f"the token server did not answer within {config.timeouts.token:g} s"
        checklist.step("fail", "token", detail, why=UNREACHABLE)
        return None
    checklist.hide(response.access_token.reveal())
    scopes = _scopes(response)
    scope_text = "not stated (opaque token)" if scopes is None else (" ".join(scopes) or "none")
    detail = f"fp {response.access_token.fingerprint}, expires in {response.expires_in:.0f} s, scopes: {scope_text}"
    checklist.step("ok", "token", detail)
    if scopes == []:
        checklist.step(
            "warn",
            "token",
            "the token grants no scopes: API calls will likely be refused (403); assign roles to the service instance",
        )
    return response


async def _upstream_step(
    checklist: _Checklist,
    config: Config,
    route: Route,
    probe: str | None,
    token: TokenResponse,
    session: aiohttp.ClientSession,
) -> None:
    url = probe_url(route, probe)
    arrow = checklist.style.arrow
    timeouts = config.timeouts
    total = timeouts.connect + timeouts.token
    headers = {"Authorization": f"Bearer {token.access_token.reveal()}", "Accept": "application/json"}
    started = time.perf_counter()
    snippet = ""
    try:
        async with (
            asyncio.timeout(total + 1),
            session.get(
                url,
                headers=headers,
                allow_redirects=False,
                proxy=_proxy_for(config, url),
                timeout=aiohttp.ClientTimeout(total=total, connect=timeouts.connect),
            ) as resp,
        ):
            elapsed = (time.perf_counter() - started) * 1000
            status = resp.status
            reason = resp.reason or ""
            location = resp.headers.get("Location", "")
            challenge = resp.headers.get("WWW-Authenticate", "")
            if status >= 400:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    body = await resp.content.read(2048)
                    snippet = " ".join(body.decode("utf-8", "replace").split())[:200]
    except aiohttp.ClientConnectorCertificateError as exc:
        checklist.step(
            "fail",
            "upstream",
            f"GET {url}: the upstream's TLS certificate is not trusted: {_ssl_reason(exc.certificate_error)}",
            [CA_BUNDLE_HINT],
        )
        return
    except aiohttp.ClientConnectorDNSError as exc:
        checklist.step("fail", "upstream", f"GET {url}: cannot resolve {exc.host}: {_os_reason(exc.os_error)}")
        return
    except aiohttp.ClientConnectorSSLError as exc:
        host, _ = _endpoint(url)
        checklist.step(
            "fail",
            "upstream",
            f"GET {url}: TLS handshake failed: {_ssl_reason(exc.os_error)}",
            _tls_hints(exc.os_error, host, False),
        )
        return
    except aiohttp.ClientConnectorError as exc:
        where = _hostport(exc.host, exc.port or 0)
        checklist.step("fail", "upstream", f"GET {url}: cannot connect to {where}: {_os_reason(exc.os_error)}")
        return
    except TimeoutError:
        checklist.step("fail", "upstream", f"GET {url}: no answer within {total:g} s")
        return
    except aiohttp.ClientError as exc:
        checklist.step("fail", "upstream", f"GET {url}: {exc.__class__.__name__}: {str(exc)[:200]}")
        return
    line = f"GET {url} {arrow} {status}{' ' + reason if reason and status >= 400 else ''} in {elapsed:.0f} ms"
    if 200 <= status < 400:
        checklist.step("ok", "upstream", line + (f" (Location: {location})" if location else ""))
        return
    more: list[str] = []
    if challenge:
        more.append(f"WWW-Authenticate: {challenge[:200]}")
    if snippet:
        more.append(f"body: {snippet}")
    if status in (401, 403):
        more.append(ROLES_HINT)
    if status == 401:
        more.append(
            "hint: or the API does not accept this token at all: does the upstream belong to this key's tenant?"
        )
    elif status == 404:
        more.append("hint: nothing at this path: check the route's upstream URL, or give --probe PATH")
    checklist.step("fail", "upstream", line, more)


# --------------------------------------------------------------------------- the checklist


@dataclass
class _Sessions:
    tokens: aiohttp.ClientSession
    upstream: aiohttp.ClientSession


async def _check_route(
    checklist: _Checklist,
    config: Config,
    route: Route,
    probe: str | None,
    sessions: _Sessions | None,
) -> None:
    checklist.route(route)
    _config_step(checklist, route)
    ctx = _certificate_step(checklist, config, route)
    if sessions is None:
        return
    secure = route.credentials.token_url.startswith("https://")
    network = ["dns", "tls" if secure else "tcp", "token", "upstream"]
    if ctx is None:
        checklist.skip(network, "the certificate cannot be used")
        return
    proxy = _proxy_for(config, route.credentials.token_url)
    addresses = await _dns_step(checklist, config, route, proxy)
    if addresses is None:
        checklist.skip(network[1:], "no address")
        return
    outcome = await _tls_step(checklist, config, route, ctx, addresses, proxy)
    if outcome == "fail":
        checklist.skip(network[2:], "no connection to the token server")
        return
    token = await _token_step(checklist, config, route, ctx, sessions.tokens, outcome == "suspect")
    if token is None:
        checklist.skip(network[3:], "no token")
        return
    await _upstream_step(checklist, config, route, probe, token, sessions.upstream)


async def run_checks(
    config: Config,
    route: str | None = None,
    probe: str | None = None,
    offline: bool = False,
    out: TextIO | None = None,
    color: bool = False,
) -> bool:
    """Check every route (or only ``route``), writing the checklist to ``out``; True when every check passed.

    Raises ``ConfigError`` for an unknown ``route``, a bad ``probe`` or CA bundle (before any output), and,
    after the whole checklist is written, when a route's certificate cannot be used.
    """
    stream = out if out is not None else sys.stdout
    routes = [select_route(config, route)] if route is not None else list(config.routes)
    check_probe(probe)
    try:
        upstream_ctx = client_ssl_context(config.ca_bundle)
    except TlsConfigError as exc:
        raise ConfigError(str(exc)) from None
    checklist = _Checklist(stream, _Style(color))
    if offline:
        for index, item in enumerate(routes):
            if index:
                checklist.write("")
            await _check_route(checklist, config, item, probe, None)
    else:
        jar = aiohttp.DummyCookieJar
        async with (
            aiohttp.ClientSession(cookie_jar=jar(), trust_env=False) as token_session,
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=upstream_ctx),
                cookie_jar=jar(),
                trust_env=False,
                auto_decompress=False,
            ) as upstream_session,
        ):
            sessions = _Sessions(token_session, upstream_session)
            for index, item in enumerate(routes):
                if index:
                    checklist.write("")
                await _check_route(checklist, config, item, probe, sessions)
    warned = f" ({checklist.warnings} warning{'s' if checklist.warnings != 1 else ''})" if checklist.warnings else ""
    if checklist.failed:
        count = len(checklist.failed)
        checklist.write(f"{count} check{'s' if count != 1 else ''} failed: {', '.join(checklist.failed)}{warned}")
    elif offline:
        checklist.write(f"all offline checks passed{warned}")
    else:
        checklist.write(f"all checks passed{warned}")
    if checklist.config_errors:
        first = checklist.config_errors[0]
        more = len(checklist.config_errors) - 1
        raise ConfigError(first + (f" (and {more} more, see above)" if more else ""))
    return not checklist.failed


def _color_wanted(stream: TextIO) -> bool:
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    try:
        if not stream.isatty():
            return False
    except (AttributeError, ValueError):
        return False
    try:
        "✓✗→–".encode(getattr(stream, "encoding", None) or "ascii")
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def cmd_check(args: argparse.Namespace, overrides: Overrides) -> int:
    """``odata-auth-proxy check``: 0 all passed, 1 a check failed; ``ConfigError`` (exit 2) propagates."""
    from proxy.cli import EXIT_FAILURE, EXIT_OK, run_async

    config = load_config(overrides)
    color = not getattr(args, "no_color", False) and _color_wanted(sys.stdout)

    async def go() -> int:
        passed = await run_checks(
            config,
            route=getattr(args, "route", None),
            probe=getattr(args, "probe", None),
            offline=bool(getattr(args, "offline", False)),
            out=sys.stdout,
            color=color,
        )
        return EXIT_OK if passed else EXIT_FAILURE

    return run_async(go())
