"""`python -m bpfree ...`: the same command line as `bpfree ...`."""

import sys

from bpfree.cli import main

sys.exit(main())
