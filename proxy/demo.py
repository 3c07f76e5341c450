"""In-process stand-ins for an SAP BTP token endpoint and the Cloud Integration OData API.

``odata-auth-proxy demo`` and the test suite must work without an SAP tenant, yet exercise what makes the
real thing awkward: client ids and secrets with ``! | $ + =`` in them and three ways to send them, short-lived
opaque bearer tokens, server-driven paging with absolute ``__next`` links, absolute URLs in bodies (which a
proxy must rewrite), the CSRF token/session-cookie dance before writes, and large streamed responses.
Everything here is deliberately small, in memory, per app instance, and bound to loopback only.
"""

from __future__ import annotations

import base64
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from urllib.parse import quote, unquote_plus
from xml.sax.saxutils import escape, quoteattr

from aiohttp import web

DEMO_CLIENT_ID = "sb-demo-client!b1|it!b2"  # looks like an SAP id on purpose
DEMO_CLIENT_SECRET = "demo-secret$with+special="  # has $ + = on purpose
DEMO_SCOPE = "WorkspacePackagesRead WorkspacePackagesEdit"
SESSION_COOKIE = "SAP_SESSIONID_DEMO"
ENTITY_TYPE = "com.sap.hci.api.IntegrationPackage"
FIELDS = ("Id", "Name", "Description", "Version", "Vendor", "CreatedBy", "CreationDate")
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "MERGE", "DELETE"})
CHUNK = 64 * 1024
_PATTERN = bytes(range(256)) * (CHUNK // 256)

Package = dict[str, str]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class TokenStore:
    """Opaque access tokens issued by the token server and checked by the OData app."""

    def __init__(self) -> None:
        self._expiry: dict[str, float] = {}  # token -> time.monotonic() deadline
        self.issued = 0

    def issue(self, lifetime: int) -> str:
        now = time.monotonic()
        self._expiry = {t: exp for t, exp in self._expiry.items() if exp > now}
        token = secrets.token_urlsafe(32)
        self._expiry[token] = now + lifetime
        self.issued += 1
        return token

    def is_valid(self, token: str) -> bool:
        expiry = self._expiry.get(token)
        return expiry is not None and time.monotonic() < expiry

    def revoke_all(self) -> None:
        """Forget every token, as if the tenant rotated its keys: next request gets a 401."""
        self._expiry.clear()


@dataclass
class _CsrfState:
    sessions: dict[str, str] = field(default_factory=dict)  # session cookie -> CSRF token
    fetches: int = 0


STORE = web.AppKey("demo_token_store", TokenStore)
PACKAGES = web.AppKey("demo_packages", dict[str, Package])
PAGE_SIZE = web.AppKey("demo_page_size", int)
CSRF = web.AppKey("demo_csrf", _CsrfState)


@dataclass
class ODataError(Exception):
    """Raised by handlers; rendered as an OData V2 error document."""

    status: int
    code: str
    message: str


# --------------------------------------------------------------------------- token server


def _basic_credentials(header: str) -> list[tuple[str, str]]:
    """Both readings of an HTTP Basic header: raw values, and form-urlencoded values (RFC 6749 2.3.1)."""
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return []
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except ValueError:  # binascii.Error and UnicodeDecodeError are both ValueErrors
        return []
    user, sep, password = decoded.partition(":")
    return [(user, password), (unquote_plus(user), unquote_plus(password))] if sep else []


def _same(a: str, b: str) -> bool:
    return secrets.compare_digest(a.encode(), b.encode())


def build_token_server_app(
    store: TokenStore,
    *,
    client_id: str = DEMO_CLIENT_ID,
    client_secret: str = DEMO_CLIENT_SECRET,
    lifetime: int = 60,
) -> web.Application:
    """An XSUAA-like ``POST /oauth/token`` that only knows the client-credentials grant."""

    async def token(request: web.Request) -> web.Response:
        form = await request.post()

        def form_value(name: str) -> str | None:
            value = form.get(name)
            return value if isinstance(value, str) else None

        if "Authorization" in request.headers:
            candidates = _basic_credentials(request.headers["Authorization"])
        else:
            candidates = [(form_value("client_id") or "", form_value("client_secret") or "")]
        if not any(_same(cid, client_id) and _same(sec, client_secret) for cid, sec in candidates):
            body = {"error": "invalid_client", "error_description": "Bad credentials"}
            return web.json_response(body, status=401)
        grant = form_value("grant_type") or request.query.get("grant_type")
        if grant != "client_credentials":
            body = {"error": "unsupported_grant_type", "error_description": f"Unsupported grant type: {grant}"}
            return web.json_response(body, status=400)
        issued = {
            "access_token": store.issue(lifetime),
            "token_type": "bearer",
            "expires_in": lifetime,
            "scope": DEMO_SCOPE,
            "jti": uuid.uuid4().hex,
        }
        return web.json_response(issued, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})

    app = web.Application()
    app[STORE] = store
    app.router.add_post("/oauth/token", token)
    return app


# --------------------------------------------------------------------------- OData upstream: plumbing


def _seed_packages() -> dict[str, Package]:
    names = (
        "Order to Cash", "Procure to Pay", "Hire to Retire", "Record to Report", "Demand to Supply",
        "Lead to Order", "Invoice Archiving", "Payroll Replication", "Customer Master Sync",
        "Supplier Onboarding", "Travel Expense Export", "Weather Feed",
    )  # fmt: skip
    packages: dict[str, Package] = {}
    for i, name in enumerate(names, start=1):
        pid = "".join(word[:1].upper() + word[1:] for word in name.split())
        packages[pid] = {
            "Id": pid,
            "Name": name,
            "Description": f"Demo integration package: {name}",
            "Version": f"1.0.{i}",
            "Vendor": ("SAP", "Contoso", "Demo Corp")[i % 3],
            "CreatedBy": "demo-user",
            "CreationDate": str(1_700_000_000_000 + i * 86_400_000),
        }
    return packages


def _odata_error(status: int, code: str, message: str) -> web.Response:
    body = {"error": {"code": code, "message": {"lang": "en", "value": message}}}
    return web.json_response(body, status=status)


def _root(request: web.Request) -> str:
    """The service root as the client addressed it; SAP puts its own host in every absolute URL."""
    return f"{request.url.origin()}/api/v1/"


def _entity_uri(request: web.Request, pid: str) -> str:
    key = quote(pid.replace("'", "''"), safe="'")  # OData doubles quotes inside string keys
    return f"{_root(request)}IntegrationPackages('{key}')"


def _wants_json(request: web.Request) -> bool:
    fmt = request.query.get("$format")
    if fmt:
        return fmt.lower() == "json"
    return "application/json" in request.headers.get("Accept", "")


def _entity_key(request: web.Request) -> str:
    """``'X'`` or ``Id='X'`` from the URL, unquoted (OData doubles a quote inside a key)."""
    ref = request.match_info["key"].removeprefix("Id=")
    return ref[1:-1].replace("''", "'")


def _get_package(request: web.Request) -> Package:
    key = _entity_key(request)
    if (package := request.app[PACKAGES].get(key)) is None:
        raise ODataError(404, "Not Found", f"Integration package {key!r} does not exist.")
    return package


_FILTER_EQ = re.compile(r"^\s*(Id|Name|Vendor)\s+eq\s+'((?:[^']|'')*)'\s*$")
_FILTER_SUB = re.compile(r"^\s*substringof\(\s*'((?:[^']|'')*)'\s*,\s*(Id|Name|Vendor)\s*\)(?:\s+eq\s+true)?\s*$")


def _parse_filter(text: str | None) -> Callable[[Package], bool]:
    if text is None:
        return lambda _: True
    if m := _FILTER_EQ.match(text):
        name, value = m[1], m[2].replace("''", "'")
        return lambda p: p[name] == value
    if m := _FILTER_SUB.match(text):
        value, name = m[1].replace("''", "'"), m[2]
        return lambda p: value in p[name]
    raise ODataError(400, "Bad Request", f"Unsupported $filter expression: {text}")


def _int_option(request: web.Request, name: str) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    if not raw.isdigit():
        raise ODataError(400, "Bad Request", f"Invalid value for {name}: {raw}")
    return int(raw)


def _entity_json(request: web.Request, package: Package, select: list[str] | None = None) -> dict[str, object]:
    uri = _entity_uri(request, package["Id"])
    fields = {k: v for k, v in package.items() if select is None or k in select}
    return {"__metadata": {"id": uri, "uri": uri, "type": ENTITY_TYPE}, **fields}


def _entry_xml(request: web.Request, package: Package, select: list[str] | None = None) -> str:
    props = "".join(f"<d:{k}>{escape(v)}</d:{k}>" for k, v in package.items() if select is None or k in select)
    href = _entity_uri(request, package["Id"]).removeprefix(_root(request))
    return (
        f"<entry><id>{escape(_entity_uri(request, package['Id']))}</id>"
        f'<title type="text">IntegrationPackages</title>'
        f'<link rel="edit" title="IntegrationPackage" href={quoteattr(href)}/>'
        f'<category term="{ENTITY_TYPE}" scheme="http://schemas.microsoft.com/ado/2007/08/dataservices/scheme"/>'
        f'<content type="application/xml"><m:properties>{props}</m:properties></content></entry>'
    )


_XML_NS = (
    'xmlns="http://www.w3.org/2005/Atom" '
    'xmlns:m="http://schemas.microsoft.com/ado/2007/08/dataservices/metadata" '
    'xmlns:d="http://schemas.microsoft.com/ado/2007/08/dataservices"'
)
_XML_DECL = '<?xml version="1.0" encoding="utf-8"?>'

_PROPERTIES = "\n".join(
    f'    <Property Name="{f}" Type="Edm.String" Nullable="{"false" if f == "Id" else "true"}"/>' for f in FIELDS
)
_METADATA = f"""{_XML_DECL}
<edmx:Edmx Version="1.0" xmlns:edmx="http://schemas.microsoft.com/ado/2007/06/edmx">
 <edmx:DataServices m:DataServiceVersion="2.0"
   xmlns:m="http://schemas.microsoft.com/ado/2007/08/dataservices/metadata">
  <Schema Namespace="com.sap.hci.api" xmlns="http://schemas.microsoft.com/ado/2008/09/edm">
   <EntityType Name="IntegrationPackage">
    <Key><PropertyRef Name="Id"/></Key>
{_PROPERTIES}
   </EntityType>
   <EntityContainer Name="EntityContainer" m:IsDefaultEntityContainer="true">
    <EntitySet Name="IntegrationPackages" EntityType="{ENTITY_TYPE}"/>
   </EntityContainer>
  </Schema>
 </edmx:DataServices>
</edmx:Edmx>
"""


# --------------------------------------------------------------------------- OData upstream: handlers


async def _service_document(request: web.Request) -> web.Response:
    if _wants_json(request):
        return web.json_response({"d": {"EntitySets": ["IntegrationPackages"]}})
    root = _root(request)
    xml = (
        f'{_XML_DECL}<service xmlns="http://www.w3.org/2007/app" xmlns:atom="http://www.w3.org/2005/Atom" '
        f"xml:base={quoteattr(root)}><workspace><atom:title>Default</atom:title>"
        '<collection href="IntegrationPackages"><atom:title>IntegrationPackages</atom:title></collection>'
        "</workspace></service>"
    )
    return web.Response(text=xml, content_type="application/atomsvc+xml")


async def _metadata(request: web.Request) -> web.Response:
    return web.Response(text=_METADATA, content_type="application/xml")


async def _list(request: web.Request) -> web.Response:
    predicate = _parse_filter(request.query.get("$filter"))
    rows = [p for p in request.app[PACKAGES].values() if predicate(p)]
    skip = _int_option(request, "$skip") or 0
    top = _int_option(request, "$top")
    start = skip + (_int_option(request, "$skiptoken") or 0)  # skiptoken = rows already served after $skip
    window_end = len(rows) if top is None else min(len(rows), skip + top)
    page_end = min(start + request.app[PAGE_SIZE], window_end)
    page = rows[start:page_end]
    next_url = None
    if page_end < window_end:
        next_url = str(request.url.update_query({"$skiptoken": str(page_end - skip)}))
    select = None
    if "$select" in request.query:
        select = [s.strip() for s in request.query["$select"].split(",") if s.strip()]
        if unknown := [s for s in select if s not in FIELDS]:
            raise ODataError(400, "Bad Request", f"Unknown property in $select: {', '.join(unknown)}")
    count = request.query.get("$inlinecount") == "allpages"
    if _wants_json(request):
        d: dict[str, object] = {"results": [_entity_json(request, p, select) for p in page]}
        if count:
            d["__count"] = str(len(rows))
        if next_url:
            d["__next"] = next_url
        return web.json_response({"d": d})
    root = _root(request)
    parts = [f"{_XML_DECL}<feed {_XML_NS} xml:base={quoteattr(root)}>"]
    parts.append(f'<id>{escape(root)}IntegrationPackages</id><title type="text">IntegrationPackages</title>')
    if count:
        parts.append(f"<m:count>{len(rows)}</m:count>")
    parts.extend(_entry_xml(request, p, select) for p in page)
    if next_url:
        parts.append(f'<link rel="next" href={quoteattr(next_url)}/>')
    parts.append("</feed>")
    return web.Response(text="".join(parts), content_type="application/atom+xml")


async def _count(request: web.Request) -> web.Response:
    predicate = _parse_filter(request.query.get("$filter"))
    return web.Response(text=str(sum(1 for p in request.app[PACKAGES].values() if predicate(p))))


async def _get_entity(request: web.Request) -> web.Response:
    package = _get_package(request)
    if _wants_json(request):
        return web.json_response({"d": _entity_json(request, package)})
    xml = _entry_xml(request, package).replace("<entry>", f"<entry {_XML_NS} xml:base={quoteattr(_root(request))}>")
    return web.Response(text=_XML_DECL + xml, content_type="application/atom+xml")


async def _json_fields(request: web.Request) -> Package:
    try:
        body = await request.json()
    except ValueError:
        raise ODataError(400, "Bad Request", "Request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise ODataError(400, "Bad Request", "Request body must be a JSON object.")
    fields = {k: v for k, v in body.items() if not k.startswith("__")}
    bad = [k for k, v in fields.items() if k not in FIELDS or not isinstance(v, str)]
    if bad:
        raise ODataError(400, "Bad Request", f"Unknown or non-string properties: {', '.join(bad)}")
    return fields


async def _create(request: web.Request) -> web.Response:
    fields = await _json_fields(request)
    pid = fields.get("Id", "")
    if not pid:
        raise ODataError(400, "Bad Request", "Property Id is required.")
    packages = request.app[PACKAGES]
    if pid in packages:
        raise ODataError(409, "Conflict", f"Integration package {pid!r} already exists.")
    packages[pid] = {f: fields.get(f, "") for f in FIELDS}
    uri = _entity_uri(request, pid)
    return web.json_response({"d": _entity_json(request, packages[pid])}, status=201, headers={"Location": uri})


async def _write_entity(request: web.Request) -> web.Response:
    method = request.method
    if method == "POST":  # SAP clients tunnel MERGE (and friends) through POST
        method = request.headers.get("X-HTTP-Method", "").upper()
        if method not in {"PUT", "PATCH", "MERGE", "DELETE"}:
            raise ODataError(405, "Method Not Allowed", "POST on an entity needs X-HTTP-Method.")
    package = _get_package(request)
    if method == "DELETE":
        del request.app[PACKAGES][package["Id"]]
        return web.Response(status=204)
    fields = await _json_fields(request)
    fields.pop("Id", None)  # the key comes from the URL
    if method == "PUT":
        package.update({f: "" for f in FIELDS if f != "Id"})
    package.update(fields)
    return web.Response(status=204)


async def _echo(request: web.Request) -> web.Response:
    body = await request.read()
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    pairs = [[k, v] for k, v in request.headers.items()]
    echo = {"method": request.method, "path": request.raw_path, "headers": headers, "header_list": pairs}
    return web.json_response({**echo, "body_length": len(body)})


async def _large(request: web.Request) -> web.StreamResponse:
    raw = request.query.get("bytes", "0")
    if not raw.isdigit():
        raise ODataError(400, "Bad Request", f"Invalid bytes: {raw}")
    remaining = int(raw)
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    if request.query.get("chunked") == "1":
        response.enable_chunked_encoding()
    else:
        response.content_length = remaining
    await response.prepare(request)
    while remaining > 0 and request.method != "HEAD":
        chunk = _PATTERN[: min(CHUNK, remaining)]
        await response.write(chunk)
        remaining -= len(chunk)
    await response.write_eof()
    return response


# --------------------------------------------------------------------------- OData upstream: guards


def _authorized(request: web.Request) -> bool:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and request.app[STORE].is_valid(token.strip())


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bearer token first, then SAP-style CSRF on every write; turns ODataError into an error body."""
    if not _authorized(request):
        has_token = request.headers.get("Authorization", "").lower().startswith("bearer ")
        return web.Response(
            status=401, text="Unauthorized: a valid bearer token is required",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"' if has_token else "Bearer"},
        )  # fmt: skip
    if request.method in WRITE_METHODS:
        expected = request.app[CSRF].sessions.get(request.cookies.get(SESSION_COOKIE, ""))
        if expected is None or not _same(request.headers.get("X-CSRF-Token", ""), expected):
            return web.Response(status=403, text="CSRF token validation failed", headers={"X-CSRF-Token": "Required"})
    try:
        return await handler(request)
    except ODataError as exc:
        return _odata_error(exc.status, exc.code, exc.message)


async def _csrf_fetch(request: web.Request, response: web.StreamResponse) -> None:
    """``X-CSRF-Token: Fetch`` on an authorized GET/HEAD: hand out the session's token (and cookie).

    An ``on_response_prepare`` hook, so it also decorates error responses and streamed bodies.
    """
    if request.method not in {"GET", "HEAD"} or request.headers.get("X-CSRF-Token", "").lower() != "fetch":
        return
    if not _authorized(request):
        return
    csrf = request.app[CSRF]
    csrf.fetches += 1
    session = request.cookies.get(SESSION_COOKIE, "")
    if session not in csrf.sessions:  # like SAP: one token per session, a new session when none is sent
        session = secrets.token_hex(16)
        csrf.sessions[session] = secrets.token_urlsafe(24)
        # headers are final except for this hook, so write the cookie header ourselves
        response.headers.add("Set-Cookie", f"{SESSION_COOKIE}={session}; Path=/; HttpOnly")
    response.headers["X-CSRF-Token"] = csrf.sessions[session]


def csrf_fetch_count(app: web.Application) -> int:
    """How many ``X-CSRF-Token: Fetch`` requests the OData app has answered."""
    return app[CSRF].fetches


def build_odata_app(store: TokenStore, *, page_size: int = 5) -> web.Application:
    """A small Cloud Integration look-alike at ``/api/v1/`` with 12 packages, seeded per instance."""
    app = web.Application(middlewares=[_guard])
    app[STORE] = store
    app[PACKAGES] = _seed_packages()
    app[PAGE_SIZE] = page_size
    app[CSRF] = _CsrfState()
    app.on_response_prepare.append(_csrf_fetch)
    r = app.router
    r.add_get("/api/v1", _service_document)
    r.add_get("/api/v1/", _service_document)
    r.add_get("/api/v1/$metadata", _metadata)
    r.add_get("/api/v1/IntegrationPackages", _list)
    r.add_post("/api/v1/IntegrationPackages", _create)
    r.add_get("/api/v1/IntegrationPackages/$count", _count)
    entity = "/api/v1/IntegrationPackages({key:(?:Id=)?'.*'})"  # ('X') and the named form (Id='X')
    r.add_get(entity, _get_entity)
    for method in ("POST", "PUT", "PATCH", "MERGE", "DELETE"):
        r.add_route(method, entity, _write_entity)
    r.add_route("*", "/api/v1/echo", _echo)
    r.add_get("/api/v1/large", _large)
    return app


# --------------------------------------------------------------------------- running both


@dataclass(frozen=True)
class DemoBackend:
    """Where the running demo lives; ``odata_app`` is there for :func:`csrf_fetch_count`."""

    token_url: str  # http://127.0.0.1:<port>/oauth/token
    upstream_url: str  # http://127.0.0.1:<port>  (the OData API lives at /api/v1/)
    client_id: str
    client_secret: str = field(repr=False)
    store: TokenStore = field(repr=False)
    odata_app: web.Application | None = field(default=None, repr=False, compare=False)


async def _serve(app: web.Application, host: str, runners: list[web.AppRunner]) -> str:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    runners.append(runner)
    await web.TCPSite(runner, host, 0).start()
    port = int(runner.addresses[0][1])
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


@asynccontextmanager
async def start_demo_backend(
    *, lifetime: int = 60, page_size: int = 5, host: str = "127.0.0.1"
) -> AsyncIterator[DemoBackend]:
    """Run the token server and the OData upstream on two free loopback ports until the block exits."""
    store = TokenStore()
    odata = build_odata_app(store, page_size=page_size)
    runners: list[web.AppRunner] = []
    try:
        token_base = await _serve(build_token_server_app(store, lifetime=lifetime), host, runners)
        upstream = await _serve(odata, host, runners)
        yield DemoBackend(f"{token_base}/oauth/token", upstream, DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, store, odata)
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
