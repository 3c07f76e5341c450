"""What a route authenticates with: plain data shared by config, service keys, certificates and tokens.

Kept apart from the code that *uses* credentials (Envoy's lesson: where a credential comes from is
separate from how it is injected), so every module can import these types without cycles.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from proxy.redact import Secret

ClientAuth = Literal["post", "basic", "basic-encoded"]
CLIENT_AUTH_CHOICES: tuple[ClientAuth, ...] = ("post", "basic", "basic-encoded")


@dataclass(frozen=True)
class Material:
    """A PEM/PKCS#12 blob given inline (service key, YAML, env) or as a file path.

    ``origin`` is the human name used in every error message, e.g. ``service key k.json: oauth.key``
    or ``file /etc/proxy/client.key``; it never contains the material itself.
    """

    origin: str = field(compare=False)
    text: str | None = field(default=None, repr=False)
    path: str | None = None

    @classmethod
    def from_file(cls, path: str, what: str = "file") -> Material:
        return cls(origin=f"{what} {path}", path=path)

    @classmethod
    def inline(cls, text: str, origin: str) -> Material:
        return cls(origin=origin, text=text)

    def read_bytes(self) -> bytes:
        """The raw bytes; raises OSError with the path for a missing/unreadable file."""
        if self.text is not None:
            return self.text.encode()
        assert self.path is not None
        return Path(self.path).expanduser().read_bytes()


@dataclass(frozen=True)
class CertificateSpec:
    """Client certificate for mutual TLS at the token server: chain + key, or one PKCS#12 bundle."""

    certificate: Material | None = None
    key: Material | None = None
    key_password: Secret | None = None
    pkcs12: Material | None = None
    pkcs12_password: Secret | None = None


@dataclass(frozen=True)
class Credentials:
    """Everything needed to obtain a client-credentials token. Hashable: equal credentials share a token."""

    token_url: str
    client_id: str
    client_secret: Secret | None = None
    client_auth: ClientAuth = "post"
    certificate: CertificateSpec | None = None
    scope: str | None = None
    resource: str | None = None
    audience: str | None = None
    token_params: tuple[tuple[str, str], ...] = ()
    source: str = field(default="config", compare=False)  # for messages: "service key ~/k.json"
    files: tuple[str, ...] = field(default=(), compare=False)  # the service key and ``*_file`` secrets read

    def watched_files(self) -> tuple[str, ...]:
        """Every file these credentials were read from: the service key, ``*_file`` secrets, certificate,
        key and PKCS#12 bundle (a change to any of them is a reason to reload)."""
        spec = self.certificate
        materials = (spec.certificate, spec.key, spec.pkcs12) if spec is not None else ()
        paths = [m.path for m in materials if m is not None and m.path is not None]
        return tuple(dict.fromkeys([*self.files, *paths]))

    @property
    def kind(self) -> str:
        return "certificate" if self.certificate is not None else "secret"

    def form_params(self) -> dict[str, str]:
        """Extra token request parameters besides grant_type and client authentication."""
        params: dict[str, str] = {}
        if self.scope:
            params["scope"] = self.scope
        if self.resource:
            params["resource"] = self.resource
        if self.audience:
            params["audience"] = self.audience
        params.update(dict(self.token_params))
        return params
