"""Allow ``python -m proxy`` as a synonym for the ``odata-auth-proxy`` command."""

from proxy.cli import main

raise SystemExit(main())
