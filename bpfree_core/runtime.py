"""Process-level settings: device resolution, torch threads, live progress bars."""

from __future__ import annotations

import os
import resource
import shutil
from typing import Any

import torch
from tqdm import tqdm

from bpfree_core.config import check_device_name
from bpfree_core.errors import ConfigError


def resolve_device(device: str) -> torch.device:
    """`cpu`, `cuda` or `cuda:N`, checked against what this machine has: every entry point and
    executor asks here, and every refusal is one sentence."""
    index = check_device_name(device)
    if device == "cpu":
        return torch.device("cpu")
    if torch.version.cuda is None:
        raise ConfigError(f"device {device!r} was asked for but this torch ({torch.__version__}) is "
                          "a CPU-only build; install a CUDA build of torch, or use --device cpu")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"device {device!r} was asked for but this machine has no usable CUDA GPU "
            "(torch.cuda.is_available() is False: no GPU, or no driver); use --device cpu"
        )
    count = torch.cuda.device_count()
    if index is not None and index >= count:
        raise ConfigError(f"device {device!r} does not exist: this machine has {count} GPU(s), "
                          f"cuda:0 .. cuda:{count - 1}")
    return torch.device("cuda" if index is None else f"cuda:{index}")


def set_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)


def progress_bar(iterable: Any = None, enabled: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar on a terminal (silent elsewhere). Its size comes from shutil, which falls back
    to $COLUMNS/$LINES or 80x24 where the terminal reports 0x0 (a fresh pty, `script`, some
    container shells): there tqdm itself would hide every bar."""
    size = shutil.get_terminal_size()
    return tqdm(iterable, disable=None if enabled else True, ncols=size.columns,
                nrows=size.lines, **kwargs)


def rss_mb() -> float:
    """This process's resident memory now, in MiB (the peak where /proc is absent)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux: peak instead of current
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
