"""Paths the user gives are resolved once, where they were typed: a run's other processes (the
Flower ServerApp and ClientApps, stage workers) start in other working directories."""

from __future__ import annotations

import os

PATH_ENVS = ("BPFREE_DATA_DIR", "BPFREE_CACHE_DIR", "BPFREE_DECODED_DIR", "BPFREE_RUNS_DIR")


def absolute_env_paths() -> None:
    """Make every bpfree path variable in this process's environment absolute (children inherit it)."""
    for name in PATH_ENVS:
        value = os.environ.get(name, "")
        if value and not os.path.isabs(os.path.expanduser(value)):
            os.environ[name] = os.path.abspath(value)


def absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path)) if path else path
