"""`python -m kvcompress.bench`: see `kvcompress.bench.cli`."""

from .cli import main

raise SystemExit(main())
