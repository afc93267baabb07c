"""A fixed pool of pipelines that the sampled clients take in turn (`pipeline.pool = P`).

`bpfree simulate` starts P pipelines, not one per client, and passes their addresses in
run_config `stage-pool` ("0=h:p,h:p;1=..."). A ClientApp holds one pipeline for its whole round:
it takes an exclusive lock on the pipeline's file under `pool-dir` (flock, so a ClientApp that
dies releases it with its process) and loads the round's global weights into its workers (they are
configured once per run, client.pipeline), so which pipeline served a client never changes weights.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bpfree_core.errors import ConfigError


def format_stage_map(pipelines: dict[int, list[str]]) -> str:
    """{client or pool slot: stage addresses} -> run_config's "0=h:p,h:p;1=..." (the one format
    of `stage-addresses` and `stage-pool`; parse_stage_map reads it)."""
    return ";".join(f"{k}={','.join(addresses)}" for k, addresses in sorted(pipelines.items()))


def parse_stage_map(raw: str, what: str = "stage-addresses") -> dict[int, list[str]]:
    """run_config's "0=h:p,h:p;1=..." -> {client or pool slot: stage addresses in order}."""
    out: dict[int, list[str]] = {}
    for part in filter(None, (p.strip() for p in raw.split(";"))):
        key, _, value = part.partition("=")
        addresses = [a.strip() for a in value.split(",") if a.strip()]
        if not key.strip().isdigit() or not addresses:
            raise ConfigError(f"run_config {what} has {part!r}; give slot=host:port,host:port;...")
        out[int(key)] = addresses
    return out


def parse_pool(raw: str) -> list[list[str]]:
    """run_config `stage-pool` -> the pool's pipelines, each its stage addresses in order."""
    return [addresses for _, addresses in sorted(parse_stage_map(raw, "stage-pool").items())]


@contextmanager
def lease(pipelines: list[list[str]], lock_dir: Path, client: int) -> Iterator[list[str]]:
    """One free pipeline's addresses, held until the block ends. Tries every pipeline once,
    starting at client mod P; when all are taken (more ClientApps than pipelines), waits on
    that first one."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    order = [(client + i) % len(pipelines) for i in range(len(pipelines))]
    fd, chosen = -1, order[0]
    try:
        for slot in order:
            fd = os.open(lock_dir / f"pipeline{slot}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                chosen = slot
                break
            except BlockingIOError:
                os.close(fd)
                fd = -1
        if fd < 0:
            fd = os.open(lock_dir / f"pipeline{chosen}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield list(pipelines[chosen])
    finally:
        if fd >= 0:
            os.close(fd)   # closing the descriptor releases the lock
