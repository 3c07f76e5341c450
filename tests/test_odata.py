"""Link rewriting in streamed bodies and the CSRF helpers of ``proxy.odata``, the latter against the demo upstream."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
from collections.abc import AsyncIterator, Sequence

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from proxy.demo import SESSION_COOKIE, DemoBackend, csrf_fetch_count, start_demo_backend
from proxy.odata import (
    WRITE_METHODS,
    CsrfSession,
    CsrfStore,
    MultiRewriter,
    StreamRewriter,
    client_manages_csrf,
    csrf_fetch_url,
    csrf_required,
    fetch_csrf,
    is_write,
    link_rewrite_pairs,
    merge_cookie_header,
    parse_set_cookie,
    reverse_rewrite,
    should_rewrite,
)

UP = "https://tenant.example.com/"
PROXY = "http://127.0.0.1:8080/"

# --------------------------------------------------------------------------- helpers


def run(rewriter: StreamRewriter | MultiRewriter, chunks: Sequence[bytes]) -> bytes:
    out = [rewriter.feed(chunk) for chunk in chunks]
    out.append(rewriter.flush())
    return b"".join(out)


def split_at(body: bytes, cuts: Sequence[int]) -> list[bytes]:
    points = sorted({min(max(c, 0), len(body)) for c in cuts})
    edges = [0, *points, len(body)]
    return [body[a:b] for a, b in itertools.pairwise(edges)]


def reference_multi(body: bytes, pairs: Sequence[tuple[bytes, bytes]]) -> bytes:
    """Single pass, leftmost then longest, no rescanning — the documented MultiRewriter semantics."""
    mapping: dict[bytes, bytes] = {}
    for old, new in pairs:
        mapping.setdefault(old, new)
    regex = re.compile(b"|".join(re.escape(o) for o in sorted(mapping, key=len, reverse=True)))
    return regex.sub(lambda m: mapping[m.group()], body)


def sequential(body: bytes, pairs: Sequence[tuple[bytes, bytes]]) -> bytes:
    for old, new in pairs:
        body = body.replace(old, new)
    return body


# --------------------------------------------------------------------------- StreamRewriter


def test_match_split_at_every_position_across_two_chunks() -> None:
    old, new = UP.encode(), PROXY.encode()
    body = b'{"uri":"' + old + b'Things(\'1\')","next":"' + old + b'Things?$skiptoken=5"}'
    expected = body.replace(old, new)
    assert expected.count(new) == 2 and old not in expected
    for cut in range(len(body) + 1):
        assert run(StreamRewriter(old, new), [body[:cut], body[cut:]]) == expected, cut


def test_one_byte_chunks() -> None:
    old, new = b"https://h/", b"http://127.0.0.1:1/x/"
    body = b"https://h/https://h/ahttps://h" + b"https://h/" * 3 + b"https:/"
    rewriter = StreamRewriter(old, new)
    out = []
    for i in range(len(body)):
        piece = rewriter.feed(body[i : i + 1])
        out.append(piece)
    out.append(rewriter.flush())
    assert b"".join(out) == body.replace(old, new)


def test_holds_back_only_what_could_start_a_match() -> None:
    for rewriter in (StreamRewriter(b"abcdef", b"X"), MultiRewriter([(b"abcdef", b"X")])):
        assert rewriter.feed(b"0123456789abcde") == b"0123456789"  # "abcde" could still become a match
        assert rewriter.feed(b"") == b""
        assert rewriter.feed(b"f!") == b"X!"
        assert rewriter.feed(b"xyzab") == b"xyz"
        assert rewriter.feed(b"a") == b"ab"
        assert rewriter.feed(b"abcdeab") == b"aabcde"  # the held "a" could not start a match after all
        assert rewriter.flush() == b"ab"
        assert rewriter.flush() == b""
        assert rewriter.feed(b"no prefix at the end") == b"no prefix at the end"


def test_multi_holds_a_short_match_that_a_longer_pattern_may_win() -> None:
    rewriter = MultiRewriter([(b"b", b"1"), (b"abc", b"2")])
    assert rewriter.feed(b"xab") == b"x"  # "ab" may become "abc"; "b" alone must wait
    assert rewriter.feed(b"c b") == b"2 1"
    rewriter = MultiRewriter([(b"b", b"1"), (b"abc", b"2")])
    assert rewriter.feed(b"xab") == b"x"
    assert rewriter.feed(b"d") == b"a1d"
    assert rewriter.feed(b"ab") == b""
    assert rewriter.flush() == b"a1"


def test_no_match_passes_bytes_unchanged() -> None:
    body = bytes(range(256)) * 50
    chunks = split_at(body, [1, 7, 300, 301, 5000])
    assert run(StreamRewriter(b"https://nowhere/", b"http://x/"), chunks) == body
    assert run(MultiRewriter(link_rewrite_pairs(UP, PROXY)), chunks) == body


def test_non_overlapping_left_to_right_like_bytes_replace() -> None:
    # a replacement that forms the pattern again with its neighbours is not rescanned
    for old, new, body in [
        (b"aba", b"X", b"ababababa"),
        (b"ab", b"a", b"aabb"),
        (b"ab", b"b", b"aab"),
        (b"aa", b"aaa", b"aaaaa"),
        (b"xy", b"", b"xxyy"),
    ]:
        expected = body.replace(old, new)
        for cut in range(len(body) + 1):
            assert run(StreamRewriter(old, new), [body[:cut], body[cut:]]) == expected
        assert run(StreamRewriter(old, new), [bytes([b]) for b in body]) == expected


def test_empty_pattern_is_refused() -> None:
    with pytest.raises(ValueError):
        StreamRewriter(b"", b"x")
    with pytest.raises(ValueError):
        MultiRewriter([(b"a", b"b"), (b"", b"x")])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    old=st.binary(min_size=1, max_size=5).map(lambda b: bytes(97 + x % 3 for x in b)),
    new=st.binary(max_size=6).map(lambda b: bytes(97 + x % 3 for x in b)),
    body=st.binary(max_size=80).map(lambda b: bytes(97 + x % 3 for x in b)),
    cuts=st.lists(st.integers(min_value=0, max_value=80), max_size=12),
)
def test_random_chunking_equals_bytes_replace(old: bytes, new: bytes, body: bytes, cuts: list[int]) -> None:
    # tiny alphabet {a, b, c}: lots of overlapping and boundary-straddling matches
    chunks = split_at(body, cuts)
    assert b"".join(chunks) == body
    assert run(StreamRewriter(old, new), chunks) == body.replace(old, new)
    assert run(MultiRewriter([(old, new)]), chunks) == body.replace(old, new)


alphabet = st.binary(max_size=6).map(lambda b: bytes(97 + x % 3 for x in b))


@settings(max_examples=300, deadline=None)
@given(
    pairs=st.lists(st.tuples(alphabet.filter(bool), alphabet), min_size=1, max_size=4),
    body=st.binary(max_size=80).map(lambda b: bytes(97 + x % 3 for x in b)),
    cuts=st.lists(st.integers(min_value=0, max_value=80), max_size=12),
)
def test_multi_random_chunking_equals_one_pass_reference(
    pairs: list[tuple[bytes, bytes]], body: bytes, cuts: list[int]
) -> None:
    assert run(MultiRewriter(pairs), split_at(body, cuts)) == reference_multi(body, pairs)


link_body = st.lists(
    st.sampled_from(
        [
            UP.encode(),
            UP.replace("/", "\\/").encode(),
            b"https://tenant.example.com:443/",
            b"https://tenant.example.com",
            b"https://tenant.example.com.evil/",
            b"IntegrationPackages('a')",
            b'"',
            b"/",
            b"\\",
            b":",
        ]
    ),
    max_size=30,
).map(b"".join)


@settings(max_examples=200, deadline=None)
@given(body=link_body, cuts=st.lists(st.integers(min_value=0, max_value=600), max_size=20))
def test_link_pairs_random_chunking_equals_sequential_replace(body: bytes, cuts: list[int]) -> None:
    pairs = link_rewrite_pairs(UP, PROXY + "a/")
    expected = sequential(body, pairs)
    assert run(MultiRewriter(pairs), split_at(body, cuts)) == expected
    assert reverse_rewrite(expected, pairs) == body.replace(b"https://tenant.example.com:443/", UP.encode()).replace(
        b"https:\\/\\/tenant.example.com:443\\/", UP.replace("/", "\\/").encode()
    )


def test_multiple_pairs_and_escaped_slash_json() -> None:
    upstream = "https://tenant.example.com/api/v1/"
    proxy = "http://127.0.0.1:8080/cpi/"
    doc = {
        "d": {
            "results": [
                {"__metadata": {"uri": f"{upstream}IntegrationPackages('A')", "type": "x"}, "Id": "A"},
                {"__metadata": {"uri": "https://tenant.example.com:443/api/v1/IntegrationPackages('B')"}},
                {"Artifacts": {"__deferred": {"uri": f"{upstream}IntegrationPackages('A')/Artifacts"}}},
            ],
            "__next": f"{upstream}IntegrationPackages?$skiptoken=3",
            "elsewhere": "https://tenant.example.com/other/",
        }
    }
    plain = json.dumps(doc).encode()
    escaped = json.dumps(doc).replace("/", "\\/").encode()
    assert b"https:\\/\\/tenant.example.com\\/api\\/v1\\/" in escaped
    pairs = link_rewrite_pairs(upstream, proxy)
    for body in (plain, escaped):
        for size in (1, 3, 17, 64, 4096):
            chunks = [body[i : i + size] for i in range(0, len(body), size)]
            out = run(MultiRewriter(pairs), chunks)
            parsed = json.loads(out)["d"]
            assert parsed["results"][0]["__metadata"]["uri"] == "http://127.0.0.1:8080/cpi/IntegrationPackages('A')"
            assert parsed["results"][1]["__metadata"]["uri"] == "http://127.0.0.1:8080/cpi/IntegrationPackages('B')"
            assert parsed["results"][2]["Artifacts"]["__deferred"]["uri"].startswith("http://127.0.0.1:8080/cpi/")
            assert parsed["__next"] == "http://127.0.0.1:8080/cpi/IntegrationPackages?$skiptoken=3"
            assert parsed["elsewhere"] == "https://tenant.example.com/other/"  # outside the route: untouched


def test_atom_xml_links_and_xml_base() -> None:
    pairs = link_rewrite_pairs(UP, PROXY)
    body = (
        f'<feed xml:base="{UP}api/v1/"><id>{UP}api/v1/IntegrationPackages</id>'
        f'<link rel="next" href="{UP}api/v1/IntegrationPackages?$skiptoken=5"/></feed>'
    ).encode()
    out = run(MultiRewriter(pairs), split_at(body, [10, 11, 40, 41, 42]))
    assert out == body.replace(UP.encode(), PROXY.encode())
    assert UP.encode() not in out


def test_multi_does_not_rewrite_its_own_output() -> None:
    # proxy URL extends the upstream URL: sequential replacement would rewrite the result again
    pairs = [(b"http://h/", b"http://h/p/"), (b"http://h/p/", b"WRONG")]
    assert run(MultiRewriter(pairs), [b"http://h/x"]) == b"http://h/p/x"
    assert run(MultiRewriter([]), [b"abc", b"def"]) == b"abcdef"


# --------------------------------------------------------------------------- link_rewrite_pairs, reverse_rewrite


def test_link_rewrite_pairs_forms() -> None:
    assert link_rewrite_pairs("https://tenant/", "http://127.0.0.1:8080/") == [
        (b"https://tenant/", b"http://127.0.0.1:8080/"),
        (b"https:\\/\\/tenant\\/", b"http:\\/\\/127.0.0.1:8080\\/"),
        (b"https://tenant:443/", b"http://127.0.0.1:8080/"),
        (b"https:\\/\\/tenant:443\\/", b"http:\\/\\/127.0.0.1:8080\\/"),
    ]
    # an explicit default port in the configuration: the short form is matched too
    pairs = link_rewrite_pairs("https://tenant:443/api/v1/", "http://127.0.0.1:8080/a/")
    assert [old for old, _ in pairs] == [
        b"https://tenant:443/api/v1/",
        b"https:\\/\\/tenant:443\\/api\\/v1\\/",
        b"https://tenant/api/v1/",
        b"https:\\/\\/tenant\\/api\\/v1\\/",
    ]
    # a non-default port has no alternative spelling; http's default is 80
    assert len(link_rewrite_pairs("http://127.0.0.1:5000/", "http://127.0.0.1:8080/")) == 2
    assert (b"http://h:80/", b"http://127.0.0.1:8080/") in link_rewrite_pairs("http://h/", "http://127.0.0.1:8080/")


def test_link_rewrite_pairs_normalises_proxy_base() -> None:
    assert link_rewrite_pairs("https://t/", "http://127.0.0.1:8080" + "/a/")[0][1] == b"http://127.0.0.1:8080/a/"
    assert link_rewrite_pairs("https://t/", "http://127.0.0.1:8080/" + "/")[0][1] == b"http://127.0.0.1:8080/"
    assert link_rewrite_pairs("https://t/", "http://127.0.0.1:8080/" + "/a/")[0][1] == b"http://127.0.0.1:8080/a/"
    assert link_rewrite_pairs("https://t", "http://127.0.0.1:8080")[0] == (b"https://t/", b"http://127.0.0.1:8080/")
    assert link_rewrite_pairs("http://same/", "http://same/") == [
        (b"http://same:80/", b"http://same/"),
        (b"http:\\/\\/same:80\\/", b"http:\\/\\/same\\/"),
    ]


def test_reverse_rewrite_request_body() -> None:
    pairs = link_rewrite_pairs("https://tenant/api/v1/", "http://127.0.0.1:8080/a/")
    body = json.dumps({"__metadata": {"uri": "http://127.0.0.1:8080/a/IntegrationPackages('A')"}, "Name": "x"}).encode()
    assert json.loads(reverse_rewrite(body, pairs))["__metadata"]["uri"] == (
        "https://tenant/api/v1/IntegrationPackages('A')"  # the canonical spelling, not the :443 one
    )
    escaped = b'{"uri":"http:\\/\\/127.0.0.1:8080\\/a\\/X"}'
    assert reverse_rewrite(escaped, pairs) == b'{"uri":"https:\\/\\/tenant\\/api\\/v1\\/X"}'
    assert reverse_rewrite(b"nothing here", pairs) == b"nothing here"
    assert reverse_rewrite(b"abc", []) == b"abc"
    # upstream URL extends the proxy URL: one pass, not rewritten twice
    nested = link_rewrite_pairs("http://127.0.0.1:8080/up/", "http://127.0.0.1:8080/")
    assert reverse_rewrite(b"http://127.0.0.1:8080/x", nested) == b"http://127.0.0.1:8080/up/x"


@pytest.mark.parametrize(
    ("content_type", "content_encoding", "expected"),
    [
        ("application/json", None, True),
        ("application/json;odata=verbose;charset=utf-8", None, True),
        ("Application/JSON; charset=UTF-8", "identity", True),
        ("application/xml", None, True),
        ("application/atom+xml;type=feed", None, True),
        ("application/atomsvc+xml", "", True),
        ("text/xml; charset=utf-8", " Identity ", True),
        ("application/json", "gzip", False),
        ("application/json", "br", False),
        ("application/atom+xml", "deflate", False),
        ("application/octet-stream", None, False),
        ("text/plain", None, False),
        ("text/html", None, False),
        ("multipart/mixed; boundary=batch_1", None, False),
        ("application/jsonx", None, False),
        ("", None, False),
        (None, None, False),
    ],
)
def test_should_rewrite(content_type: str | None, content_encoding: str | None, expected: bool) -> None:
    assert should_rewrite(content_type, content_encoding) is expected


# --------------------------------------------------------------------------- CSRF, pure


def test_write_methods() -> None:
    assert frozenset({"POST", "PUT", "PATCH", "MERGE", "DELETE"}) == WRITE_METHODS
    assert all(is_write(m) for m in ("POST", "put", "Patch", "MERGE", "delete"))
    assert not any(is_write(m) for m in ("GET", "HEAD", "OPTIONS", "TRACE", "CONNECT"))


def test_client_manages_csrf() -> None:
    assert client_manages_csrf({"X-CSRF-Token": "abc123=="})
    assert client_manages_csrf({"x-csrf-token": "abc"})
    assert client_manages_csrf(CIMultiDict({"X-Csrf-Token": "abc"}))
    for value in ("Fetch", "fetch", " FETCH ", "", "  "):
        assert not client_manages_csrf({"X-CSRF-Token": value}), value
    assert not client_manages_csrf({})
    assert not client_manages_csrf({"Cookie": "X-CSRF-Token=abc"})


def test_csrf_required() -> None:
    for value in ("Required", "required", "REQUIRED", " Required "):
        assert csrf_required(403, {"X-CSRF-Token": value})
        assert csrf_required(403, {"x-csrf-token": value})
        assert csrf_required(403, CIMultiDict({"X-Csrf-Token": value}))
    assert not csrf_required(403, {})
    assert not csrf_required(403, {"X-CSRF-Token": "abc"})
    assert not csrf_required(200, {"X-CSRF-Token": "Required"})
    assert not csrf_required(401, {"X-CSRF-Token": "Required"})


def test_session_store_headers_for_clear() -> None:
    session = CsrfSession()
    assert session.headers_for("fp1") is None
    session.store("fp1", "tok-1", [f"{SESSION_COOKIE}=s1; Path=/; HttpOnly", "sap-usercontext=sap-client=100; path=/"])
    assert session.headers_for("fp1") == {
        "X-CSRF-Token": "tok-1",
        "Cookie": f"{SESSION_COOKIE}=s1; sap-usercontext=sap-client=100",
    }
    assert session.headers_for("fp1") is not None  # asking does not consume
    session.clear()
    assert (session.token, session.cookies, session.bearer_fp) == (None, {}, None)
    assert session.headers_for("fp1") is None


def test_session_bearer_change_drops_cache() -> None:
    session = CsrfSession()
    session.store("fp1", "tok-1", ["a=1"])
    assert session.headers_for("fp2") is None
    assert (session.token, session.cookies, session.bearer_fp) == (None, {}, None)
    assert session.headers_for("fp1") is None  # gone for good, not just hidden


def test_session_store_replaces_and_rejects_non_tokens() -> None:
    session = CsrfSession()
    session.store("fp1", "tok-1", ["a=1", "b=2"])
    session.store("fp1", "tok-2", ["c=3"])
    assert session.headers_for("fp1") == {"X-CSRF-Token": "tok-2", "Cookie": "c=3"}
    session.store("fp1", "tok-3", [])
    assert session.headers_for("fp1") == {"X-CSRF-Token": "tok-3"}  # no empty Cookie header
    for bad in (None, "", "Required", "fetch"):
        session.store("fp1", bad, ["a=1"])
        assert session.token is None and session.headers_for("fp1") is None


def test_set_cookie_parsing() -> None:
    headers = [
        "SAP_SESSIONID_ABC_100=Xyz%3d%3d-_.~!; path=/; secure; HttpOnly; SameSite=None",
        "sap-usercontext=sap-client=100; path=/",
        'quoted="a b"; Max-Age=3600',
        "MYSAPSSO2=AjQx+/=; Expires=Wed, 21 Oct 2037 07:28:00 GMT; Domain=.example.com",
        "gone=1; Max-Age=0",
        "old=1; Expires=Thu, 01 Jan 1970 00:00:00 GMT",
        "neg=1; max-age=-5; Expires=Wed, 21 Oct 2037 07:28:00 GMT",
        "novalue",
        "=nameless",
        "  spaced  =  v  ; path=/",
        "empty=; path=/",
        "dup=first",
        "dup=second",
        "badexpiry=1; Expires=not a date",
    ]
    live, expired = parse_set_cookie(headers)
    assert live == {
        "SAP_SESSIONID_ABC_100": "Xyz%3d%3d-_.~!",
        "sap-usercontext": "sap-client=100",
        "quoted": '"a b"',
        "MYSAPSSO2": "AjQx+/=",
        "spaced": "v",
        "empty": "",
        "dup": "second",
        "badexpiry": "1",
    }
    assert expired == {"gone", "old", "neg"}
    session = CsrfSession()
    session.store("fp", "t", headers)
    assert session.cookies == live


def test_update_cookies() -> None:
    session = CsrfSession()
    session.store("fp", "t", ["a=1", "b=2"])
    session.update_cookies(["b=3; Path=/", "a=; Max-Age=0", "c=4"])
    assert session.cookies == {"b": "3", "c": "4"}


def test_merge_cookie_header() -> None:
    assert merge_cookie_header(None, {"S": "1"}) == "S=1"
    assert merge_cookie_header("", {"S": "1", "T": "2"}) == "S=1; T=2"
    assert merge_cookie_header("a=b; c=d", {}) == "a=b; c=d"
    assert merge_cookie_header("a=b;S=client; c=d", {"S": "session"}) == "a=b; c=d; S=session"
    assert merge_cookie_header(" a=b ;; flag ", {"x": "y"}) == "a=b; flag; x=y"
    assert merge_cookie_header(None, {}) == ""


async def test_store_keys_and_single_flight() -> None:
    store = CsrfStore()
    key = ("route-a", "cred-1")
    assert store.session(key) is store.session(("route-a", "cred-1"))
    assert store.session(key) is not store.session(("route-b", "cred-1"))
    assert store.lock(key) is store.lock(("route-a", "cred-1"))
    assert store.lock(key) is not store.lock(("route-a", "cred-2"))
    assert store.fetch_count == 0

    async def needs_token() -> dict[str, str]:
        async with store.lock(key):
            headers = store.session(key).headers_for("fp")
            if headers is None:
                store.record_fetch()
                await asyncio.sleep(0.01)  # the fetch
                store.session(key).store("fp", "tok", ["S=1"])
                headers = store.session(key).headers_for("fp")
            assert headers is not None
            return headers

    results = await asyncio.gather(*(needs_token() for _ in range(20)))
    assert store.fetch_count == 1
    assert all(r == {"X-CSRF-Token": "tok", "Cookie": "S=1"} for r in results)


def test_csrf_fetch_url() -> None:
    assert csrf_fetch_url("https://tenant/") == "https://tenant/api/v1/"
    assert csrf_fetch_url("https://tenant:443/") == "https://tenant:443/api/v1/"
    assert csrf_fetch_url("https://tenant") == "https://tenant/api/v1/"
    assert csrf_fetch_url("https://host/api/v1/") == "https://host/api/v1/"
    assert csrf_fetch_url("https://host/sap/opu/odata/sap/API_X/") == "https://host/sap/opu/odata/sap/API_X/"


# --------------------------------------------------------------------------- against the demo upstream


@pytest.fixture
async def demo() -> AsyncIterator[DemoBackend]:
    async with start_demo_backend(host="127.0.0.1") as backend:
        yield backend


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        yield session


async def demo_bearer(http: aiohttp.ClientSession, demo: DemoBackend) -> str:
    form = {"grant_type": "client_credentials", "client_id": demo.client_id, "client_secret": demo.client_secret}
    async with http.post(demo.token_url, data=form) as resp:
        assert resp.status == 200
        token: str = (await resp.json())["access_token"]
        return token


async def test_fetch_csrf_then_write_against_demo(
    demo: DemoBackend, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    bearer = await demo_bearer(http, demo)
    auth = {"Authorization": f"Bearer {bearer}"}
    packages = f"{demo.upstream_url}/api/v1/IntegrationPackages"
    url = csrf_fetch_url(demo.upstream_url + "/")
    assert url == f"{demo.upstream_url}/api/v1/"

    # without a token: refused, and recognised as such
    async with http.post(packages, json={"Id": "NoToken"}, headers=auth) as resp:
        assert resp.status == 403
        assert csrf_required(resp.status, resp.headers)

    token, set_cookies = await fetch_csrf(http, url, bearer, timeout=5)
    assert token
    assert any(c.startswith(f"{SESSION_COOKIE}=") for c in set_cookies)
    assert demo.odata_app is not None and csrf_fetch_count(demo.odata_app) == 1

    store = CsrfStore()
    session = store.session(("demo", "cred"))
    session.store("fp-1", token, set_cookies)
    store.record_fetch()
    headers = session.headers_for("fp-1")
    assert headers is not None and headers["X-CSRF-Token"] == token
    assert headers["Cookie"].startswith(f"{SESSION_COOKIE}=")

    # the token alone is not enough: SAP binds it to the session cookie
    async with http.post(
        packages, json={"Id": "TokenOnly"}, headers={**auth, "X-CSRF-Token": token, "Cookie": "other=1"}
    ) as resp:
        assert resp.status == 403

    # token + session cookie (merged with a cookie of the client's own): created
    cookie = merge_cookie_header("client=1", session.cookies)
    write_headers = {**auth, "X-CSRF-Token": headers["X-CSRF-Token"], "Cookie": cookie}
    async with http.post(packages, json={"Id": "WithToken", "Name": "n"}, headers=write_headers) as resp:
        assert resp.status == 201, await resp.text()
        assert not csrf_required(resp.status, resp.headers)

    # a new bearer token drops the cached pair
    assert session.headers_for("fp-2") is None
    assert bearer not in caplog.text


async def test_fetch_csrf_without_valid_bearer(demo: DemoBackend, http: aiohttp.ClientSession) -> None:
    token, set_cookies = await fetch_csrf(http, f"{demo.upstream_url}/api/v1/", "not-a-token", timeout=5)
    assert token is None
    assert set_cookies == []


async def test_rewrite_demo_feed_streamed(demo: DemoBackend, http: aiohttp.ClientSession) -> None:
    bearer = await demo_bearer(http, demo)
    upstream = f"{demo.upstream_url}/api/v1/"
    pairs = link_rewrite_pairs(upstream, "http://127.0.0.1:8080/" + "/cpi/")
    for fmt in ("json", "atom"):
        query = "?$format=json" if fmt == "json" else ""
        async with http.get(
            f"{upstream}IntegrationPackages{query}", headers={"Authorization": f"Bearer {bearer}"}
        ) as r:
            assert r.status == 200
            assert should_rewrite(r.headers.get("Content-Type"), r.headers.get("Content-Encoding"))
            original = await r.read()
        rewriter = MultiRewriter(pairs)
        out = run(rewriter, [original[i : i + 7] for i in range(0, len(original), 7)])
        assert out == sequential(original, pairs)
        assert demo.upstream_url.encode() not in out
        assert b"http://127.0.0.1:8080/cpi/IntegrationPackages" in out
        if fmt == "json":
            d = json.loads(out)["d"]
            assert d["__next"].startswith("http://127.0.0.1:8080/cpi/IntegrationPackages?")
            assert d["results"][0]["__metadata"]["uri"].startswith("http://127.0.0.1:8080/cpi/IntegrationPackages('")
