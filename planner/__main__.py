"""`python -m planner`: see planner/cli/."""

import sys

from planner.cli import main

if __name__ == "__main__":  # verify's worker processes import this module again; they must not rerun main
    sys.exit(main())
