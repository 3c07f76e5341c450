"""Turn an SAP BTP service key, exactly as downloaded, into credentials and an upstream URL.

Shapes (samples in tests/fixtures/service-keys):
- Process Integration Runtime (plans ``api`` / ``integration-flow``): everything under ``oauth``
  (``clientid``, ``clientsecret`` *or* ``certificate`` [+ ``key``], ``tokenurl``, ``url`` = the API host);
- generic XSUAA binding at the top level: ``clientid``, ``clientsecret`` + ``url`` (token server), or
  ``credential-type: x509`` with ``certificate``, ``key`` and ``certurl``; the token URL is ``<url>/oauth/token``;
- a binding nested under ``uaa`` with the API's own URL at the top level ``url``.
Unknown fields are ignored, so new cockpit versions keep working.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from proxy.credentials import Material
from proxy.redact import Secret

KeyKind = Literal["secret", "certificate", "external-certificate"]


class ServiceKeyError(ValueError):
    """One line naming the key and the missing/invalid field; never a secret."""


@dataclass(frozen=True)
class ServiceKey:
    """What a service key tells us: who we are, where tokens come from, and (maybe) where the API is."""

    source: str
    kind: KeyKind
    client_id: str
    token_url: str
    upstream_url: str | None
    client_secret: Secret | None = None
    certificate: Material | None = None
    key: Material | None = None


def load_service_key_file(path: str) -> ServiceKey:
    """Read and parse a key file; errors say ``service key <path>: …``."""
    label = f"service key {path}"
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ServiceKeyError(f"{label}: file not found") from None
    except IsADirectoryError:
        raise ServiceKeyError(f"{label}: is a directory, expected the JSON file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ServiceKeyError(f"{label}: cannot read it ({exc.__class__.__name__})") from None
    return parse_service_key_text(text, label)


def parse_service_key_text(text: str, label: str) -> ServiceKey:
    """Parse a key given as JSON text (a file's content or ``ODATA_AUTH_PROXY_SERVICE_KEY_JSON``)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ServiceKeyError(
            f"{label}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
            "paste the key exactly as the BTP cockpit shows it"
        ) from None
    return parse_service_key(data, label)


def parse_service_key(data: object, label: str) -> ServiceKey:
    if not isinstance(data, dict):
        raise ServiceKeyError(f"{label}: expected a JSON object, got {type(data).__name__}")
    if "credentials" in data and isinstance(data["credentials"], dict) and "oauth" not in data:
        # `cf service-key` / some tools wrap the key as {"credentials": {...}}
        data = data["credentials"]
    if isinstance(data.get("oauth"), dict):
        return _parse_oauth(data["oauth"], label)
    if isinstance(data.get("uaa"), dict):
        outer_url = data.get("url")
        key = _parse_xsuaa(data["uaa"], label, "uaa.")
        if isinstance(outer_url, str) and outer_url:
            _check_url(outer_url, label, "url")
            return _with_upstream(key, outer_url.rstrip("/"))
        return key
    if "clientid" in data:
        return _parse_xsuaa(data, label, "")
    raise ServiceKeyError(
        f'{label}: missing "oauth" (or top-level "clientid"): this does not look like an SAP BTP service key'
    )


def _with_upstream(key: ServiceKey, upstream: str) -> ServiceKey:
    return ServiceKey(
        source=key.source,
        kind=key.kind,
        client_id=key.client_id,
        token_url=key.token_url,
        upstream_url=upstream,
        client_secret=key.client_secret,
        certificate=key.certificate,
        key=key.key,
    )


def _parse_oauth(oauth: dict[str, Any], label: str) -> ServiceKey:
    client_id = _required_str(oauth, "clientid", label, "oauth.")
    token_url = _required_str(oauth, "tokenurl", label, "oauth.")
    _check_url(token_url, label, "oauth.tokenurl")
    upstream = _optional_str(oauth, "url", label, "oauth.")
    if upstream:
        _check_url(upstream, label, "oauth.url")
    secret = _optional_str(oauth, "clientsecret", label, "oauth.")
    cert = _optional_str(oauth, "certificate", label, "oauth.")
    pem_key = _optional_str(oauth, "key", label, "oauth.")
    common = {
        "source": label,
        "client_id": client_id,
        "token_url": token_url,
        "upstream_url": upstream.rstrip("/") if upstream else None,
    }
    if cert:
        return ServiceKey(
            kind="certificate" if pem_key else "external-certificate",
            certificate=Material.inline(cert, f"{label}: oauth.certificate"),
            key=Material.inline(pem_key, f"{label}: oauth.key") if pem_key else None,
            **common,  # type: ignore[arg-type]
        )
    if secret:
        return ServiceKey(kind="secret", client_secret=Secret(secret), **common)  # type: ignore[arg-type]
    raise ServiceKeyError(f'{label}: missing "oauth.clientsecret" (or "oauth.certificate" for a certificate key)')


def _parse_xsuaa(obj: dict[str, Any], label: str, prefix: str) -> ServiceKey:
    client_id = _required_str(obj, "clientid", label, prefix)
    cert = _optional_str(obj, "certificate", label, prefix)
    cred_type = obj.get("credential-type")
    if cert or cred_type == "x509":
        if not cert:
            raise ServiceKeyError(f'{label}: missing "{prefix}certificate" (credential-type is x509)')
        base = _optional_str(obj, "certurl", label, prefix) or _required_str(obj, "url", label, prefix)
        field = "certurl" if obj.get("certurl") else "url"
        _check_url(base, label, prefix + field)
        pem_key = _optional_str(obj, "key", label, prefix)
        return ServiceKey(
            source=label,
            kind="certificate" if pem_key else "external-certificate",
            client_id=client_id,
            token_url=_token_endpoint(base),
            upstream_url=None,
            certificate=Material.inline(cert, f"{label}: {prefix}certificate"),
            key=Material.inline(pem_key, f"{label}: {prefix}key") if pem_key else None,
        )
    secret = _required_str(obj, "clientsecret", label, prefix)
    base = _required_str(obj, "url", label, prefix)
    _check_url(base, label, prefix + "url")
    return ServiceKey(
        source=label,
        kind="secret",
        client_id=client_id,
        token_url=_token_endpoint(base),
        upstream_url=None,
        client_secret=Secret(secret),
    )


def _token_endpoint(base: str) -> str:
    base = base.rstrip("/")
    return base if base.endswith("/oauth/token") else base + "/oauth/token"


def _required_str(obj: dict[str, Any], name: str, label: str, prefix: str) -> str:
    value = _optional_str(obj, name, label, prefix)
    if not value:
        raise ServiceKeyError(f'{label}: missing "{prefix}{name}"')
    return value


def _optional_str(obj: dict[str, Any], name: str, label: str, prefix: str) -> str | None:
    value = obj.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ServiceKeyError(f'{label}: "{prefix}{name}" must be a string, got {type(value).__name__}')
    return value.strip() or None


def _check_url(value: str, label: str, name: str) -> None:
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ServiceKeyError(f'{label}: "{name}" is not an http(s) URL')
