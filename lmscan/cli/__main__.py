"""`python -m lmscan.cli` (the bench runs each scan this way)."""

from lmscan.cli import main

main()
