"""`python -m farmesh_ws` is the `farmesh-ws` command."""

from farmesh_ws.cli import main

raise SystemExit(main())
