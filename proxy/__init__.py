"""odata-auth-proxy: a local reverse proxy that adds OAuth 2.0 client-credentials tokens to requests."""

__version__ = "0.1.0"

from proxy.compiled import choose

#: whether the request path runs compiled (mypyc) or from its sources; decided before any of it is imported
BUILD = choose()
