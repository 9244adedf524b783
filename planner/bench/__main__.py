"""`python -m planner.bench [flags]`: the same as `python -m planner bench [flags]`."""

import sys

from planner.bench_cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
