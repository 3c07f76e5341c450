"""odata-auth-proxy: a local reverse proxy that adds OAuth 2.0 client-credentials tokens to requests."""

__version__ = "0.1.0"
