"""One clock for a run: every printed time and summary.json's wall_seconds count from the moment
the command was launched, in every process it starts (they inherit $BPFREE_LAUNCHED_AT)."""

from __future__ import annotations

import os
import time

LAUNCHED_ENV = "BPFREE_LAUNCHED_AT"


def launch_time() -> float:
    """The command's launch (time.time()), or now where no command set it (the Python API)."""
    try:
        return float(os.environ[LAUNCHED_ENV])
    except (KeyError, ValueError):
        return time.time()


def seconds_since_launch() -> float:
    return time.time() - launch_time()
