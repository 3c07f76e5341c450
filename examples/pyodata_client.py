"""SAP's pyodata client against the proxy: no credentials, no CSRF handling, no link fixing in the client.

The proxy adds the bearer token, fetches the CSRF token for writes, and rewrites the ``__next`` and
``__metadata.uri`` links in the bodies so they point back at the proxy (pyodata refuses a ``__next`` link
on another host than the service root, which is what an un-rewritten upstream link would be).

    odata-auth-proxy demo                      # or: odata-auth-proxy run --service-key key.json
    python examples/pyodata_client.py          # default http://127.0.0.1:8080/api/v1/

The service URL comes from the first argument, else ``ODATA_PROXY_URL``, else the default above.
Needs ``pip install pyodata requests``. Exit code 0 when every step worked, 1 otherwise.
"""

from __future__ import annotations

import os
import sys
import time

import pyodata
import requests
from pyodata.exceptions import HttpError, PyODataException

DEFAULT_URL = "http://127.0.0.1:8080/api/v1/"
PAGE = 3  # client-side page size for $top/$skip


def service_url(argv: list[str]) -> str:
    url = argv[1] if len(argv) > 1 else os.environ.get("ODATA_PROXY_URL") or DEFAULT_URL
    return url.rstrip("/") + "/"


def main(argv: list[str]) -> int:
    url = service_url(argv)
    session = requests.Session()  # no auth at all: the proxy adds the bearer token
    session.trust_env = False  # the proxy is local: no HTTP(S)_PROXY detour, no ~/.netrc credentials
    client = pyodata.Client(url, session)  # reads $metadata through the proxy
    packages = client.entity_sets.IntegrationPackages
    print(f"service: {url} entity sets: {', '.join(sorted(es.name for es in client.schema.entity_sets))}")

    # 1. $filter
    sap = packages.get_entities().filter("Vendor eq 'SAP'").execute()
    print(f"filter Vendor eq 'SAP': {len(sap)} package(s): {', '.join(p.Id for p in sap)}")
    assert sap and all(p.Vendor == "SAP" for p in sap), "filter returned a package of another vendor"

    # 2. client-side paging with $top/$skip
    seen: list[str] = []
    skip = 0
    while True:
        page = packages.get_entities().top(PAGE).skip(skip).execute()
        print(f"top {PAGE} skip {skip}: {', '.join(p.Id for p in page) or '(empty)'}")
        seen.extend(p.Id for p in page)
        if len(page) < PAGE:
            break
        skip += PAGE

    # 3. server-side paging: follow the __next links (rewritten by the proxy to point at the proxy)
    followed: list[str] = []
    request = packages.get_entities()
    pages = 0
    while True:
        page = request.execute()
        pages += 1
        followed.extend(p.Id for p in page)
        print(f"server page {pages}: {len(page)} package(s), next: {page.next_url or '-'}")
        if not page.next_url:
            break
        assert page.next_url.startswith(url), f"__next not rewritten to the proxy: {page.next_url}"
        request = packages.get_entities().next_url(page.next_url)
    assert followed == seen, "server-side paging and $top/$skip paging disagree"
    print(f"all packages: {len(followed)} in {pages} server page(s)")

    # 4. create, update, read back, delete: the proxy fetches and attaches the CSRF token.
    #    Keys go positionally: get_entity(pid) -> IntegrationPackages('pid'), the form the demo API understands
    #    (get_entity(Id=pid) would send the named form IntegrationPackages(Id='pid')).
    pid = f"PyODataDemo{int(time.time() * 1000)}"
    created = packages.create_entity().set(Id=pid, Name="Created by pyodata", Vendor="Demo Corp").execute()
    print(f"created: {created.Id} ({created.Name})")
    try:
        packages.update_entity(pid).set(Description="updated by pyodata").execute()  # PATCH
        updated = packages.get_entity(pid).execute()
        print(f"updated: {updated.Id} description={updated.Description!r}")
        assert updated.Description == "updated by pyodata"
    finally:
        packages.delete_entity(pid).execute()  # also when the update failed: leave nothing behind
        print(f"deleted: {pid}")
    try:
        packages.get_entity(pid).execute()
    except HttpError as exc:
        assert exc.response.status_code == 404, exc.response.status_code
        print(f"read after delete: {exc.response.status_code} as expected")
    else:
        raise AssertionError(f"{pid} still exists after delete")
    print("OK")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except (PyODataException, requests.RequestException, AssertionError) as exc:
        print(f"FAILED: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        sys.exit(1)
