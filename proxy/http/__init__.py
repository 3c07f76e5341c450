"""HTTP/1.1 on plain asyncio Protocols: the listener (client side) and the upstream pool.

This package knows nothing of tokens, routes or OData: it parses and frames messages, streams bodies with
flow control both ways, keeps connections alive, and times out slow peers. What the proxy does to a request
lives in :mod:`proxy.filters`; :mod:`proxy.pipeline` joins the two.
"""
