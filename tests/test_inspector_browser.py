"""The inspector page (``GET /-/``) in a real headless browser: Debian's ``chromium`` driven by its
``chromium-driver`` through Selenium, against the real proxy with a real token server and upstream on 127.0.0.1.

Nothing here downloads a browser or a driver: the system chromedriver is given to Selenium explicitly and
Selenium Manager is told to stay offline (``SE_OFFLINE``). Without chromium the test is skipped, except under
``CI=true`` where it fails (``.ci/run`` installs both packages).

``INSPECTOR_SCREENSHOT=docs/inspector.png`` also saves a 1280×800 screenshot of the populated page there (the one
in the README); without it the test writes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web

from tests.conftest import CLIENT_SECRET, PROXY_VARS, Backend, TokenServer, make_config, running_proxy, serve

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ROOT = Path(__file__).resolve().parent.parent

# values that must never reach the page or its JSON (the token values are added as they are issued)
WRONG_SECRET = "wr0ng-s3cret+not/the=right-one"
CLIENT_COOKIE = "client-cookie-5b8e0f3a9d"  # a cookie the client sends
SESSION_COOKIE = "upstream-session-7c4d2e91ab"  # the session cookie the upstream hands out with its CSRF token
CSRF_TOKEN = "csrf-token-3f9a61c0d7e2"
TOKEN_LIFETIME = 43199  # what SAP's token servers grant: 12 hours

T = TypeVar("T")


def require_browser() -> None:
    """Skip (fail under CI=true) when Debian's chromium and chromium-driver are not installed."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if not missing:
        return
    reason = f"{' and '.join(missing)} missing: apt-get install -y chromium chromium-driver (.ci/run does)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but {reason}")
    pytest.skip(reason)


# --------------------------------------------------------------------------- the upstream API


@dataclass
class ODataApi:
    """An upstream like Cloud Integration's: bearer tokens from the token server, SAP's CSRF rule for writes
    (403 ``X-CSRF-Token: Required`` until the token and its session cookie come back), a session cookie."""

    tokens: TokenServer
    seen: list[dict[str, str]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(dict(request.headers))
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer ") or header[7:] not in self.tokens.issued:
            return web.json_response({"error": "unauthorized"}, status=401, headers={"WWW-Authenticate": "Bearer"})
        if request.headers.get("X-CSRF-Token", "").lower() == "fetch":
            resp = web.Response(status=200, text="", headers={"X-CSRF-Token": CSRF_TOKEN})
            resp.set_cookie("SESSION", SESSION_COOKIE, path="/", httponly=True)
            return resp
        if request.method not in ("GET", "HEAD") and (
            request.headers.get("X-CSRF-Token") != CSRF_TOKEN or request.cookies.get("SESSION") != SESSION_COOKIE
        ):
            return web.Response(status=403, text="CSRF token validation failed", headers={"X-CSRF-Token": "Required"})
        await request.read()
        if "('missing')" in request.path or "('Retired')" in request.path:
            return web.json_response({"error": {"code": "Not Found", "message": "no such entity"}}, status=404)
        resp = web.json_response(
            {"d": {"results": [{"Id": "OrderToCash", "Name": "Order to Cash", "Version": "1.0.3"}]}},
            status=201 if request.method == "POST" else 200,
        )
        resp.set_cookie("SESSION", SESSION_COOKIE, path="/", httponly=True)
        return resp

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app


# --------------------------------------------------------------------------- plain HTTP from the browser thread

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, never an HTTP proxy


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: str


def http(method: str, url: str, headers: dict[str, str] | None = None, body: bytes | None = None) -> Answer:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with _DIRECT.open(request, timeout=10) as resp:
            return Answer(resp.status, dict(resp.headers.items()), resp.read().decode())
    except urllib.error.HTTPError as err:
        return Answer(err.code, dict(err.headers.items()), err.read().decode())


def event_stream_sample(url: str, seconds: float) -> str:
    """What ``/-/api/events`` sends in ``seconds`` (it never ends by itself)."""
    request = urllib.request.Request(url, headers={"Accept": "text/event-stream"})
    chunks: list[bytes] = []
    end = time.monotonic() + seconds
    with _DIRECT.open(request, timeout=seconds + 5) as resp:
        assert resp.status == 200
        assert resp.headers.get("Content-Type", "").startswith("text/event-stream")
        while time.monotonic() < end:
            line = resp.readline()
            if not line:
                break
            chunks.append(line)
    return b"".join(chunks).decode()


# --------------------------------------------------------------------------- the browser


class Page:
    """One headless Chromium tab on the inspector, with the few waits the test needs."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver

    def size(self, width: int, height: int) -> None:
        """The viewport exactly ``width``×``height`` CSS pixels (the window size would include the browser's UI)."""
        self.driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def wait(self, what: str, probe: Callable[[], T], timeout: float = 5) -> T:
        """Poll ``probe`` until it returns something truthy; fail with ``what`` and the page's state otherwise."""
        end = time.monotonic() + timeout
        while True:
            value = probe()
            if value:
                return value
            if time.monotonic() > end:
                raise AssertionError(f"{what}: not within {timeout} s; page text:\n{self.text()}")
            time.sleep(0.05)

    def text(self) -> str:
        return str(self.js("return document.body.innerText"))

    def row_seq(self, marker: str) -> int | None:
        """The ``data-seq`` of the table row whose path contains ``marker``, None while there is none."""
        seq = self.js(
            """const rows = document.querySelectorAll('#requests tbody tr');
               for (const tr of rows) if (tr.querySelector('.c-path').textContent.includes(arguments[0]))
                 return Number(tr.dataset.seq);
               return null;""",
            marker,
        )
        return int(seq) if seq is not None else None

    def visible_paths(self) -> list[str]:
        return list(
            self.js(
                "return [...document.querySelectorAll('#requests tbody tr .c-path')]"
                ".filter(td => td.offsetParent !== null).map(td => td.textContent)"
            )
        )

    def click(self, selector: str) -> None:
        self.js("document.querySelector(arguments[0]).click()", selector)

    def route_field(self, route: str, selector: str) -> str | None:
        return self.js(
            'const n = document.querySelector(`[data-route="${arguments[0]}"] ${arguments[1]}`);'
            "return n && n.offsetParent !== null ? n.textContent : null",
            route,
            selector,
        )

    def console_errors(self) -> list[str]:
        return [entry["message"] for entry in self.driver.get_log("browser") if entry["level"] == "SEVERE"]


@contextlib.contextmanager
def chromium() -> Iterator[Page]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in CI containers
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-proxy-server",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,800",
        "--force-color-profile=srgb",
        "--hide-scrollbars",
        "--lang=en-US",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        page = Page(driver)
        page.size(1280, 800)
        yield page
    finally:
        driver.quit()


# --------------------------------------------------------------------------- the test


@pytest.fixture
def offline_selenium(monkeypatch: pytest.MonkeyPatch) -> None:
    """Selenium Manager never fetches anything; neither the driver nor urllib go through an HTTP proxy."""
    monkeypatch.setenv("SE_OFFLINE", "true")
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.mark.timeout(180)
async def test_inspector_page_in_headless_chromium(tmp_path: Path, backend: Backend, offline_selenium: None) -> None:
    require_browser()
    backend.tokens.lifetime = TOKEN_LIFETIME
    api = ODataApi(backend.tokens)
    api_runner, api_url = await serve(api.app(), backend.tls.server_ctx)
    token_url = backend.tokens.url + "/oauth/token"
    routes = [
        {
            "name": "cpi",
            "prefix": "/",
            "upstream": api_url,
            "credentials": {
                "token_url": token_url,
                "client_id": backend.tokens.client_id,
                "client_secret": CLIENT_SECRET,
            },
        },
        {
            "name": "reporting",
            "prefix": "/reporting/",
            "upstream": api_url + "/reporting",
            "credentials": {"token_url": token_url, "client_id": "sb-reporting!b777", "client_secret": WRONG_SECRET},
        },
    ]
    config = make_config(tmp_path, backend, routes)
    shot = os.environ.get("INSPECTOR_SCREENSHOT")
    try:
        with chromium() as page:
            async with running_proxy(config) as proxy:
                # every browser step blocks, so it runs in a thread while this loop serves proxy and upstreams
                await asyncio.to_thread(scenario, page, proxy.url, backend, shot)
            # the proxy is gone: the page says so instead of showing stale numbers as live
            badge = "return document.querySelector('#conn').textContent"
            down = await asyncio.to_thread(
                page.wait, "the disconnected badge", lambda: "disconnected" in page.js(badge)
            )
            assert down
    finally:
        await api_runner.cleanup()


def scenario(page: Page, base: str, backend: Backend, shot: str | None) -> None:
    # ---- the page itself: its three files, same-origin only, CSP
    html = http("GET", base + "/-/")
    assert html.status == 200, html
    assert html.headers.get("Content-Type", "").startswith("text/html")
    assert "default-src 'self'" in html.headers.get("Content-Security-Policy", ""), html.headers
    assert "<script>" not in html.body and " style=" not in html.body, "no inline script, no style attribute"
    assert re.findall(r'(?:src|href)="([^"]*)"', html.body) and all(
        ref.startswith("/-/") for ref in re.findall(r'(?:src|href)="([^"]*)"', html.body)
    ), "every asset is the proxy's own"
    assets = {path: http("GET", base + path) for path in ("/-/inspector.js", "/-/inspector.css")}
    for path, answer in assets.items():
        assert answer.status == 200, (path, answer.status)
    assert "innerHTML" not in assets["/-/inspector.js"].body

    page.driver.get(base + "/-/")
    page.wait("the live badge", lambda: page.js("return document.querySelector('#conn').textContent") == "live")

    # ---- routes: the good route's token with a countdown that moves; the refused one in words
    countdown = page.wait("the countdown of route cpi", lambda: page.route_field("cpi", ".countdown"))
    assert re.fullmatch(r"(11 h \d\d m \d\d s|12 h 00 m 00 s)", countdown), countdown
    assert page.route_field("cpi", ".f-fingerprint dd") not in (None, "", "no token")
    shown = {r["name"]: r for r in json.loads(http("GET", base + "/-/api/routes").body)["routes"]}
    assert page.route_field("cpi", ".route-upstream") == shown["cpi"]["upstream"]
    assert page.route_field("cpi", ".route-prefix") == "/"
    assert page.route_field("cpi", ".route-credential") == "client secret"
    assert page.route_field("cpi", ".f-client dd") == backend.tokens.client_id
    time.sleep(2.2)
    later = page.route_field("cpi", ".countdown")
    assert later and later != countdown, f"the countdown did not move in 2.2 s: {countdown!r} then {later!r}"

    # the refused route: the proxy fetches its token at start (or at the first request); say it in words
    http("GET", base + "/reporting/Reports?$top=1")
    error = page.wait(
        "the refused token request of route reporting", lambda: page.route_field("reporting", ".token-error")
    )
    assert "invalid_client" in error, error
    assert page.route_field("reporting", ".f-fingerprint dd") == "no token"

    # ---- requests made through the proxy appear within 2 s, newest first
    client_headers = {"Cookie": f"JSESSIONID={CLIENT_COOKIE}", "Accept": "application/json"}
    made: list[tuple[str, int]] = []
    for method, path, body in (
        ("GET", "/api/v1/IntegrationPackages?$format=json&$top=2&marker=m-list", None),
        ("GET", "/api/v1/IntegrationPackages('missing')?marker=m-missing", None),
        ("POST", "/api/v1/IntegrationPackages?marker=m-create", b'{"Id": "New", "Name": "New package"}'),
        ("GET", "/reporting/Reports?marker=m-refused", None),
    ):
        headers = dict(client_headers)
        if body is not None:
            headers["Content-Type"] = "application/json"
        answer = http(method, base + path, headers, body)
        marker = path.rsplit("marker=", 1)[1]
        seq = page.wait(f"the row for {method} {path}", lambda m=marker: page.row_seq(m), timeout=2)
        made.append((marker, answer.status))
        status = page.js(
            "return document.querySelector(`#requests tbody tr[data-seq='${arguments[0]}'] .c-status`).textContent", seq
        )
        assert status == str(answer.status), (path, status, answer.status)
    assert [status for _, status in made][:3] == [200, 404, 201]
    assert made[3][1] >= 500, made
    rows = page.js("return [...document.querySelectorAll('#requests tbody tr')].map(tr => Number(tr.dataset.seq))")
    assert rows == sorted(rows, reverse=True), "newest first"
    create = page.row_seq("m-create")
    assert (
        page.js(
            "return document.querySelector(`#requests tbody tr[data-seq='${arguments[0]}'] .c-replayed`).textContent",
            create,
        )
        == "↻ csrf"
    ), "the POST went through SAP's CSRF dance (403 Required, fetch, replay)"

    # ---- the detail view: headers as forwarded and as answered, secrets marked [redacted]
    page.click(f"#requests tbody tr[data-seq='{create}']")
    page.wait("the detail view", lambda: page.js("return document.querySelector('#detail.loaded') !== null"))
    detail = page.js(
        """const out = {};
           for (const section of document.querySelectorAll('#detail .headers')) {
             const rows = [...section.querySelectorAll('tr')].map(tr => [
               tr.querySelector('.h-name').textContent, tr.querySelector('td').textContent,
               tr.querySelector('td .redacted') !== null]);
             out[section.querySelector('h3').textContent] = rows;
           }
           return out;"""
    )
    sent, answered = detail["Request headers (as forwarded)"], detail["Response headers (as answered)"]
    lower = {name.lower(): (value, marked) for name, value, marked in sent}
    for name in ("authorization", "cookie", "x-csrf-token"):
        assert name in lower, (name, sent)
        value, marked = lower[name]
        assert marked and "[redacted]" in value, (name, sent)
    assert lower["content-type"] == ("application/json", False)
    set_cookie = [(value, marked) for name, value, marked in answered if name.lower() == "set-cookie"]
    assert set_cookie and all(marked and "[redacted]" in value for value, marked in set_cookie), answered
    page.click("#detail-close")

    # ---- filter by text and status class, pause and resume
    page.js("const f = document.querySelector('#filter'); f.value = 'm-missing'; f.dispatchEvent(new Event('input'))")
    assert all("m-missing" in path for path in page.visible_paths()) and page.visible_paths()
    page.js("const f = document.querySelector('#filter'); f.value = ''; f.dispatchEvent(new Event('input'))")
    page.click("#status-filter button[data-class='5xx']")
    assert page.visible_paths() and all("/reporting/" in path for path in page.visible_paths())
    page.click("#status-filter button[data-class='']")
    page.click("#pause")
    http("GET", base + "/api/v1/IntegrationPackages?marker=m-paused")
    page.wait(
        "the paused counter",
        lambda: page.js("const b = document.querySelector('#new-count'); return !b.hidden && b.textContent") == "1 new",
    )
    assert page.row_seq("m-paused") is None, "paused: the table stays still"
    page.click("#pause")
    assert page.row_seq("m-paused") is not None, "resumed: the buffered request is shown"
    for n in range(6):
        http("GET", base + f"/api/v1/IntegrationRuntimeArtifacts?$top={n + 1}&marker=m-more")

    # ---- at a glance: drawn from the stats events, once a 5-second bucket with requests has closed
    page.wait(
        "the latency chart",
        lambda: page.js("return document.querySelectorAll('#chart-latency polyline.line-p99').length") > 0,
        timeout=12,
    )
    assert page.js("return document.querySelectorAll('#chart-rps polyline.line-rps').length") > 0
    assert re.fullmatch(r"\d+(\.\d+)? (ms|s)", page.js("return document.querySelector('#p50-now').textContent"))

    # ---- no token, secret or cookie value in the page or any of its JSON
    secrets = [CLIENT_SECRET, WRONG_SECRET, CLIENT_COOKIE, SESSION_COOKIE, CSRF_TOKEN]
    issued = list(backend.tokens.issued)
    assert issued, "the good route has a token"
    secrets += issued + [token.split(".")[1] for token in issued]  # the whole token and its claims part
    seqs = [summary["seq"] for summary in json.loads(http("GET", base + "/-/api/requests?limit=500").body)["requests"]]
    documents = {
        "page (live DOM)": page.driver.page_source,
        "page text": page.text(),
        "/-/": html.body,
        **{path: answer.body for path, answer in assets.items()},
        "/-/api/events": event_stream_sample(base + "/-/api/events", 2.5),
    }
    for path in ("/-/api/requests?limit=500", "/-/api/routes", "/-/api/stats", *(f"/-/api/requests/{s}" for s in seqs)):
        answer = http("GET", base + path)
        assert answer.status == 200, (path, answer.status, answer.body)
        json.loads(answer.body)
        documents[path] = answer.body
    assert len(seqs) >= 11
    for where, text in documents.items():
        for secret in secrets:
            for form in {secret, json.dumps(secret)[1:-1], urllib.parse.quote(secret, safe="")}:
                assert form not in text, f"a secret value ({secret[:6]}…) appears in {where}"
    gone = http("GET", base + "/-/api/requests/999999")
    assert gone.status == 404 and set(json.loads(gone.body)) >= {"error", "detail"}

    # ---- the screenshot for the README (only when asked: CI leaves the tree clean)
    if shot:
        populate(base, seconds=40)
        page.wait("the charts with the new traffic", lambda: page.js(BUCKETS_WITH_LATENCY) >= 6, timeout=12)
        page.js("window.scrollTo(0, 0)")
        time.sleep(0.3)
        target = ROOT / shot if not os.path.isabs(shot) else Path(shot)
        target.parent.mkdir(parents=True, exist_ok=True)
        assert page.driver.save_screenshot(str(target))

    # ---- 400 px wide: nothing overflows sideways, the essential columns stay, the detail fits
    page.size(400, 800)
    time.sleep(0.3)
    width = page.js("return [document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert width[0] <= 400 and width[0] <= width[1] + 1, f"horizontal overflow at 400 px: {width}"
    essential = page.js(
        """const tr = document.querySelector('#requests tbody tr');
           const seen = c => { const td = tr.querySelector(c); const r = td.getBoundingClientRect();
                               return td.offsetParent !== null && r.width > 0 && r.right <= 400; };
           return ['.c-method', '.c-path', '.c-status', '.c-duration'].map(seen);"""
    )
    assert essential == [True, True, True, True], essential
    page.click("#requests tbody tr")
    page.wait("the detail view at 400 px", lambda: page.js("return document.querySelector('#detail.loaded') !== null"))
    box = page.js("const r = document.querySelector('#detail').getBoundingClientRect(); return [r.left, r.right]")
    assert box[0] >= 0 and box[1] <= 400, box
    assert page.js("return document.documentElement.scrollWidth") <= 400

    # ---- and nothing went wrong inside the page (a CSP violation or a script error would be logged here)
    assert page.console_errors() == []


BUCKETS_WITH_LATENCY = (  # points drawn on the p50 line
    "return [...document.querySelectorAll('#chart-latency polyline.line-p50')]"
    ".reduce((n, line) => n + line.points.numberOfItems, 0)"
)


def populate(base: str, seconds: float) -> None:
    """A plausible minute of traffic for the screenshot: reads at a varying rate, an occasional 404, a write
    (with its CSRF replay), and a request on the route whose token is refused."""
    reads = [
        "/api/v1/IntegrationPackages?$format=json&$top=20",
        "/api/v1/IntegrationDesigntimeArtifacts?$format=json&$filter=PackageId%20eq%20'OrderToCash'",
        "/api/v1/IntegrationRuntimeArtifacts?$format=json",
        "/api/v1/MessageProcessingLogs?$format=json&$top=50&$orderby=LogEnd%20desc",
        "/api/v1/$metadata",
    ]
    start = time.monotonic()
    n = 0
    while (elapsed := time.monotonic() - start) < seconds:
        n += 1
        if n % 23 == 0:
            http("POST", base + "/api/v1/IntegrationPackages", {"Content-Type": "application/json"}, b'{"Id": "P"}')
        elif n % 17 == 0:
            http("GET", base + "/api/v1/IntegrationPackages('Retired')")
        elif n % 29 == 0:
            http("GET", base + "/reporting/Reports?$top=10")
        else:
            http("GET", base + reads[n % len(reads)])
        rate = 3 + 2.5 * math.sin(elapsed / 4) ** 2 + (4 if 18 < elapsed < 24 else 0)
        time.sleep(1 / rate)
