"""`python -m lmcoh` runs the `lmcoh` command line."""

from .cli import main

raise SystemExit(main())
