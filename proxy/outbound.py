"""Which outbound HTTP proxy a request to a URL goes through: the explicit ``outbound_proxy`` setting, or
``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``NO_PROXY`` from the environment.

Why not aiohttp's ``trust_env``: it also reads ``~/.netrc``, which would add someone's Basic credentials to
token requests (and clash with the bearer token upstream). Proxies from the environment are wanted; netrc
is not. Decisions are cached per scheme and host, so the hot path does one dict lookup.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Mapping

from yarl import URL


class OutboundProxies:
    def __init__(self, explicit: str | None, environ: Mapping[str, str] | None = None) -> None:
        self._explicit = explicit
        if explicit is not None:
            self._env: dict[str, str] = {}
        elif environ is None:
            self._env = urllib.request.getproxies_environment()
        else:
            self._env = _proxies_from(environ)
        self._cache: dict[tuple[str, str], str | None] = {}

    def for_url(self, url: URL | str) -> str | None:
        """The proxy URL (credentials included, aiohttp takes them from it) or None for a direct connection."""
        if self._explicit is not None:
            return self._explicit
        if not self._env:
            return None
        parsed = url if isinstance(url, URL) else URL(url)
        key = (parsed.scheme, parsed.host or "")
        if key not in self._cache:
            self._cache[key] = self._lookup(parsed)
        return self._cache[key]

    def _lookup(self, url: URL) -> str | None:
        proxy = self._env.get(url.scheme)
        if not proxy or not url.host:
            return None
        host = url.host if url.explicit_port is None else f"{url.host}:{url.explicit_port}"
        if urllib.request.proxy_bypass_environment(host, self._env):  # type: ignore[attr-defined]
            return None
        return proxy


def _proxies_from(environ: Mapping[str, str]) -> dict[str, str]:
    """Like ``urllib.request.getproxies_environment`` but over a given mapping (lower case wins)."""
    proxies: dict[str, str] = {}
    for name, value in environ.items():
        lowered = name.lower()
        if value and lowered.endswith("_proxy"):
            proxies.setdefault(lowered[: -len("_proxy")], value)
    for name, value in environ.items():
        if value and name.endswith("_proxy") and name.islower():
            proxies[name[: -len("_proxy")]] = value
    return proxies
