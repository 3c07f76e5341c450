"""The token manager's promises: single flight, refresh ahead, keep a valid token through failures, back off,
fail fast with the token server's own words, replay once after an upstream 401."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import aiohttp
import pytest

from proxy.app import prepare
from proxy.redact import Secret
from proxy.tokens import ClientCredentialsSource, Token, TokenError, TokenManager
from tests.conftest import Backend, free_port, make_config, running_proxy, secret_route


def manager_for(tmp_path: Path, backend: Backend, session: aiohttp.ClientSession, **cred: str) -> TokenManager:
    route = secret_route(backend)
    route["credentials"].update(cred)
    config = make_config(tmp_path, backend, [route])
    prepared = prepare(config)
    creds = config.routes[0].credentials
    source = ClientCredentialsSource(creds, session, prepared.credentials[creds].ssl_context, timeout=2)
    return TokenManager(source, "api")


def test_token_schedule() -> None:
    long = Token(Secret("t"), obtained_at=0, lifetime=43200)
    assert long.refresh_at == 43200 - 300  # 5 minutes before expiry beats half-life for long tokens
    assert long.usable_until == 43200 - 30  # margin capped at 30 s
    short = Token(Secret("t"), obtained_at=100, lifetime=10)
    assert short.refresh_at == 105  # half its life
    assert short.usable_until == pytest.approx(109)  # 10 % margin for short tokens


def test_backoff_bounds() -> None:
    first = [TokenManager.backoff_delay(1) for _ in range(200)]
    assert max(first) <= 1.0 and min(first) > 0
    assert len({round(d, 6) for d in first}) > 50  # jittered
    capped = [TokenManager.backoff_delay(40) for _ in range(200)]
    assert max(capped) <= 30.0 and min(capped) >= 15.0


async def test_single_flight_200_concurrent_requests_one_token_request(tmp_path: Path, backend: Backend) -> None:
    backend.tokens.delay = 0.3  # the fetch is still running when all 200 requests arrive
    async with running_proxy(make_config(tmp_path, backend)) as proxy, aiohttp.ClientSession() as client:

        async def one() -> int:
            async with client.get(proxy.url + "/api/v1/echo") as resp:
                await resp.read()
                return resp.status

        statuses = await asyncio.gather(*(one() for _ in range(200)))
    assert statuses == [200] * 200
    assert backend.tokens.requests == 1
    assert len(backend.upstream.requests) == 200


async def test_single_flight_in_manager_and_no_wait_when_valid(tmp_path: Path, backend: Backend) -> None:
    backend.tokens.delay = 0.2
    async with aiohttp.ClientSession() as session:
        manager = manager_for(tmp_path, backend, session)
        tokens = await asyncio.gather(*(manager.get() for _ in range(50)))
        assert len({t.value for t in tokens}) == 1
        assert backend.tokens.requests == 1
        started = time.perf_counter()
        await manager.get()
        assert time.perf_counter() - started < 0.05  # served from cache, no token request
        assert backend.tokens.requests == 1
        await manager.close()


async def test_refresh_ahead_in_background_without_blocking(tmp_path: Path, backend: Backend) -> None:
    backend.tokens.lifetime = 2  # refresh after 1 s (half its life)
    async with aiohttp.ClientSession() as session:
        manager = manager_for(tmp_path, backend, session)
        manager.start()
        first = await manager.get()
        backend.tokens.delay = 0.5  # the refresh is slow: requests must keep using the current token
        await asyncio.sleep(1.15)
        assert backend.tokens.requests == 2  # refresh started by the background loop
        started = time.perf_counter()
        during = await manager.get()
        assert time.perf_counter() - started < 0.05
        assert during.value == first.value
        await asyncio.sleep(0.6)
        after = await manager.get()
        assert after.value != first.value
        await manager.close()


async def test_failed_refresh_keeps_valid_token_and_retries(tmp_path: Path, backend: Backend) -> None:
    backend.tokens.lifetime = 2  # refresh at 1 s, usable until 1.8 s
    async with aiohttp.ClientSession() as session:
        manager = manager_for(tmp_path, backend, session)
        manager._backoff = lambda failures: 0.1  # deterministic and fast; the real curve is tested above
        manager.start()
        first = await manager.get()
        backend.tokens.fail = "500"
        await asyncio.sleep(1.45)
        assert (await manager.get()).value == first.value  # still valid, still served
        assert manager.last_error is not None and manager.last_error.http_status == 500
        assert backend.tokens.requests >= 3  # the refresh failed and was retried
        backend.tokens.fail = None
        await asyncio.sleep(0.3)
        fresh = await manager.get()
        assert fresh.value != first.value
        assert manager.last_error is None
        await manager.close()


async def test_invalid_client_fails_fast_with_server_words_and_no_hammering(
    tmp_path: Path, backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    config = make_config(tmp_path, backend)
    backend.tokens.client_secret = "the-server-expects-another-secret"
    async with running_proxy(config) as proxy, aiohttp.ClientSession() as client:
        started = time.perf_counter()

        async def one() -> tuple[int, dict[str, object]]:
            async with client.get(proxy.url + "/api/v1/echo") as resp:
                return resp.status, await resp.json()

        results = await asyncio.gather(*(one() for _ in range(50)))
        elapsed = time.perf_counter() - started
    assert elapsed < 5
    for status, body in results:
        assert status == 502
        assert body["error"] == "token_unavailable"
        assert body["token_server_error"] == "invalid_client"
        assert body["token_server_error_description"] == "Bad credentials"
        assert body["token_url"] == backend.tokens.url + "/oauth/token"
        assert "client id and secret" in str(body["detail"])
    assert backend.tokens.requests <= 3  # waiting requests shared attempts; failures are rate-limited
    assert backend.upstream.requests == []
    from tests.conftest import CLIENT_SECRET

    assert CLIENT_SECRET not in caplog.text
    assert CLIENT_SECRET not in str(results)


async def test_unreachable_token_server_503(tmp_path: Path, backend: Backend) -> None:
    route = secret_route(backend)
    route["credentials"]["token_url"] = f"https://127.0.0.1:{free_port()}/oauth/token"
    async with running_proxy(make_config(tmp_path, backend, [route])) as proxy, aiohttp.ClientSession() as client:
        started = time.perf_counter()
        async with client.get(proxy.url + "/api/v1/echo") as resp:
            body = await resp.json()
            assert resp.status == 503
            assert resp.content_type == "application/json"
        assert time.perf_counter() - started < 5
    assert body["token_server_error"] == "unreachable"
    assert "cannot connect to the token server" in body["detail"]


async def test_token_server_timeout_504(tmp_path: Path, backend: Backend) -> None:
    backend.tokens.fail = "hang"
    config = make_config(tmp_path, backend, timeouts={"token": 1})
    async with running_proxy(config) as proxy, aiohttp.ClientSession() as client:
        started = time.perf_counter()
        async with client.get(proxy.url + "/api/v1/echo") as resp:
            body = await resp.json()
            assert resp.status == 504
        assert time.perf_counter() - started < 4
    assert body["token_server_error"] == "timeout"


async def test_untrusted_token_server_certificate(tmp_path: Path, backend: Backend) -> None:
    config = make_config(tmp_path, backend, tls={})  # no CA bundle: the throwaway CA is not trusted
    async with running_proxy(config) as proxy, aiohttp.ClientSession() as client:
        async with client.get(proxy.url + "/api/v1/echo") as resp:
            body = await resp.json()
            assert resp.status == 503
    assert body["token_server_error"] == "tls_error"
    assert "--ca-bundle" in body["detail"]


async def test_html_instead_of_token_says_check_url(tmp_path: Path, backend: Backend) -> None:
    backend.tokens.fail = "html"
    async with aiohttp.ClientSession() as session:
        manager = manager_for(tmp_path, backend, session)
        with pytest.raises(TokenError) as info:
            await manager.get()
    assert info.value.status == 502
    assert "token URL" in info.value.detail


@pytest.mark.parametrize("mode", ["post", "basic", "basic-encoded"])
async def test_client_auth_modes(tmp_path: Path, backend: Backend, mode: str) -> None:
    backend.tokens.auth_mode = mode
    async with aiohttp.ClientSession() as session:
        manager = manager_for(tmp_path, backend, session, client_auth=mode)
        token = await manager.get()
        assert token.value.reveal() in backend.tokens.issued
        # every other mode is refused by this strict server: the modes really differ on the wire
        for other in {"post", "basic", "basic-encoded"} - {mode}:
            wrong = manager_for(tmp_path, backend, session, client_auth=other)
            with pytest.raises(TokenError) as info:
                await wrong.get()
            assert info.value.error == "invalid_client"


async def test_extra_token_parameters_are_sent(tmp_path: Path, backend: Backend) -> None:
    async with aiohttp.ClientSession() as session:
        manager = manager_for(tmp_path, backend, session, scope="a b", audience="api://x")
        await manager.get()
    form = backend.tokens.forms[-1]
    assert form["grant_type"] == "client_credentials"
    assert form["scope"] == "a b" and form["audience"] == "api://x"


async def test_upstream_401_invalidates_and_replays_once(tmp_path: Path, backend: Backend) -> None:
    async with running_proxy(make_config(tmp_path, backend)) as proxy, aiohttp.ClientSession() as client:
        async with client.get(proxy.url + "/api/v1/echo") as resp:
            assert resp.status == 200
        backend.upstream.revoked.update(backend.tokens.issued)  # the tenant revoked the token
        body = b'{"Name": "replayed"}'
        async with client.post(proxy.url + "/api/v1/echo", data=body) as resp:
            assert resp.status == 200
            echo = await resp.json()
        assert echo["body_length"] == len(body)  # the buffered body was sent again in full
        assert backend.tokens.requests == 2
        posts = [r for r in backend.upstream.requests if r["method"] == "POST"]
        assert len(posts) == 2  # the rejected attempt and the replay


async def test_streamed_body_is_not_replayed_after_401(tmp_path: Path, backend: Backend) -> None:
    async with running_proxy(make_config(tmp_path, backend)) as proxy, aiohttp.ClientSession() as client:
        async with client.get(proxy.url + "/api/v1/echo") as resp:
            assert resp.status == 200
        backend.upstream.revoked.update(backend.tokens.issued)

        async def big() -> object:
            for _ in range(40):
                yield b"y" * 65536  # 2.5 MiB, chunked: larger than the replay buffer

        async with client.post(proxy.url + "/api/v1/echo", data=big()) as resp:
            assert resp.status == 401  # the client gets the upstream's answer
        # the next request gets the new token
        async with client.get(proxy.url + "/api/v1/echo") as resp:
            assert resp.status == 200


async def test_persistent_401_does_not_loop_token_requests(tmp_path: Path, backend: Backend) -> None:
    async with running_proxy(make_config(tmp_path, backend)) as proxy, aiohttp.ClientSession() as client:
        await asyncio.sleep(0.1)
        original = list(backend.tokens.issued)
        backend.upstream._authorized = lambda request: False  # type: ignore[method-assign]  # e.g. a missing role
        for _ in range(5):
            async with client.get(proxy.url + "/api/v1/echo") as resp:
                assert resp.status == 401
        assert len(original) == 1
        assert backend.tokens.requests == 2  # one replay with a fresh token, then no more fetches
