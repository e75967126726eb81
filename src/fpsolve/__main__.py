"""``python -m fpsolve`` is the ``fpsolve`` command."""

from .cli import main

raise SystemExit(main())
