"""The live inspector: a page under ``/-/`` and its JSON under ``/-/api/``, fed by what the proxy records.

``recorder`` keeps the last exchanges and the latency buckets (cheap, on the request path); ``api`` builds the
JSON answers and serves the page's files; ``events`` streams server-sent events; ``adminapp`` offers the same on
``--admin-listen``. The filter that records and serves on the main port is ``proxy.filters.inspect``.
"""
