"""``python -m expbus``: the expbus command line."""

from expbus._cli import main

raise SystemExit(main())
