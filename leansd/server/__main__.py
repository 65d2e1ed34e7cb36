"""`python -m leansd.server`: the same as `sd-serve`."""
from leansd.server.cli import main

raise SystemExit(main())
