"""What the proxy does to a request and its answer, one filter per job (see :mod:`proxy.filters.base`)."""
