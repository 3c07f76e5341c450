"""Outbound TLS contexts: built once per credential/upstream, never per request."""

from __future__ import annotations

import ssl
from pathlib import Path


class TlsConfigError(ValueError):
    """A CA bundle that cannot be used; the message names the file and the fix."""


def client_ssl_context(ca_bundle: str | None = None) -> ssl.SSLContext:
    """System trust store, plus ``ca_bundle`` (PEM) when given (corporate TLS inspection, private CAs)."""
    ctx = ssl.create_default_context()
    if ca_bundle:
        path = Path(ca_bundle).expanduser()
        try:
            ctx.load_verify_locations(cafile=str(path))
        except FileNotFoundError:
            raise TlsConfigError(f"CA bundle {ca_bundle}: file not found") from None
        except (ssl.SSLError, ValueError, OSError) as exc:
            raise TlsConfigError(
                f"CA bundle {ca_bundle}: not a readable PEM file of CA certificates ({exc.__class__.__name__})"
            ) from None
    return ctx
