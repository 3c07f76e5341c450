"""Routing: longest prefix wins, the prefix is cut and the rest joined to the upstream's base path byte for byte;
the prefix without its slash is the route's root. A route whose upstream base path equals its prefix (the usual
``/api/v1/`` → ``https://tenant/api/v1``) forwards the target exactly as it came."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import Overrides, load_config
from proxy.router import Router

_CREDENTIALS = '{token_url: "https://t.example/oauth/token", client_id: a, client_secret: secret-a}'
CONFIG = "routes:\n" + "".join(
    f"  - {{name: {name}, prefix: {prefix}, upstream: {upstream!r}, credentials: {_CREDENTIALS}}}\n"
    for name, prefix, upstream in [
        ("api", "/api/v1/", "https://tenant.example/api/v1"),
        ("deeper", "/api/v1/x/", "https://other.example/elsewhere/"),
        ("odata", "/odata/", "https://tenant.example/sap/opu/odata"),
        ("rest", "/", "https://third.example:8443"),
    ]
)


@pytest.fixture
def router(tmp_path: Path) -> Router:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    return Router(load_config(Overrides(config=str(path)), env={}).routes)


@pytest.mark.parametrize(
    ("target", "route", "upstream_target"),
    [
        ("/api/v1/IntegrationPackages?$format=json", "api", "/api/v1/IntegrationPackages?$format=json"),
        (
            "/api/v1/Packages('a%20b')?$filter=Name%20eq%20'x'",
            "api",
            "/api/v1/Packages('a%20b')?$filter=Name%20eq%20'x'",
        ),
        ("/api/v1", "api", "/api/v1/"),  # the root, without its slash
        ("/api/v1?$top=1", "api", "/api/v1/?$top=1"),
        ("/api/v1/x", "deeper", "/elsewhere/"),  # the longer prefix's root beats the shorter prefix
        ("/api/v1/x?y=1", "deeper", "/elsewhere/?y=1"),
        ("/api/v1/x/z/?q", "deeper", "/elsewhere/z/?q"),
        ("/api/v1/xy", "api", "/api/v1/xy"),
        ("/odata/Entity(1)?$expand=a", "odata", "/sap/opu/odata/Entity(1)?$expand=a"),
        ("/odata", "odata", "/sap/opu/odata/"),
        ("/odatax", "rest", "/odatax"),
        ("/api/v1x", "rest", "/api/v1x"),
        ("/", "rest", "/"),
        ("/?q", "rest", "/?q"),
    ],
)
def test_targets_map_onto_the_upstream_byte_for_byte(
    router: Router, target: str, route: str, upstream_target: str
) -> None:
    match = router.match(target)
    assert match is not None
    assert (match[0].name, match[2]) == (route, upstream_target)


def test_no_route_without_a_catch_all(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG.split("  - {name: rest")[0])
    router = Router(load_config(Overrides(config=str(path)), env={}).routes)
    assert router.match("/other") is None
    assert router.match("/api/v") is None
