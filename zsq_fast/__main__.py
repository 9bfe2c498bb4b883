"""`python -m zsq_fast ...` is `zsq-fast ...`."""
from .cli import main

raise SystemExit(main())
