"""``python -m atelier.gateway``: the same as ``atelier-gateway``."""

from atelier.gateway.app import main

raise SystemExit(main())
