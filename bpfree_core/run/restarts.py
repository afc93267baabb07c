"""A client's round that survives a stage failure: recover the stages, rerun the round.

A round is a pure function of (global weights, client, round) — local_round loads the global
weights with fresh optimiser state and all randomness comes from (seed, epoch, batch) — so a
rerun from the round's starting weights ends exactly where an undisturbed round ends. Recovery
is the executor's job (Pipeline.recover: respawn dead local stage processes, or wait for remote
ones to answer again, then reconfigure every stage); this module only bounds and logs the reruns.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from bpfree_core.errors import BpfreeError, ConfigError, DataError, PeerUnavailableError

log = logging.getLogger(__name__)

T = TypeVar("T")

# Deterministic user errors: rerunning cannot fix them, so they are never retried.
NOT_RETRIED = (ConfigError, DataError)


class RoundFailedError(BpfreeError):
    """A round failed on every attempt pipeline.restarts allowed (or could not be recovered)."""


def with_restarts(executor: Any, restarts: int, attempt: Callable[[], T],
                  what: str) -> tuple[T, list[dict[str, Any]]]:
    """Run `attempt()`; after a stage failure call `executor.recover()` and run it again.

    At most `restarts` reruns. Returns the result and one record per recovery (error, restarted
    stages, seconds to recover). Executors that do not recover (in-process) are never retried.
    """
    events: list[dict[str, Any]] = []
    while True:
        try:
            return attempt(), events
        except NOT_RETRIED:
            raise
        except BpfreeError as exc:
            if not executor.recovers:
                raise
            if len(events) >= restarts:
                raise RoundFailedError(
                    f"{what} failed {len(events) + 1} time(s), the limit set by pipeline.restarts = "
                    f"{restarts}; last error: {exc}. Fix the failing stage (see its log) or raise "
                    "pipeline.restarts") from exc
            log.warning("%s: attempt %d failed (%s); recovering the stages and rerunning the round "
                        "from its starting weights", what, len(events) + 1, exc)
            t0 = time.perf_counter()
            try:
                restarted = executor.recover()
            except BpfreeError as rexc:
                raise RoundFailedError(f"{what} failed ({exc}) and its stages could not be "
                                       f"recovered: {rexc}") from rexc
            events.append({"error": str(exc), "restarted_stages": list(restarted or []),
                           "recover_seconds": time.perf_counter() - t0})


def rerun_from(executor: Any, start: dict[str, Any], restarts: int, run: Callable[[], T],
               what: str) -> tuple[T, list[dict[str, Any]]]:
    """`with_restarts` for work that changes the executor's state (an epoch): every rerun first
    restores the snapshot `start` taken before the first attempt, since recovered stages start
    fresh."""
    attempts = 0

    def attempt() -> T:
        nonlocal attempts
        attempts += 1
        if attempts > 1:
            executor.restore(start)
        return run()

    return with_restarts(executor, restarts, attempt, what)


def reconnecting(restarts: int, connect: Callable[[], T], what: str) -> tuple[T, int]:
    """`connect()`, tried again while a stage is unavailable (its supervisor respawns it on its
    port), up to `restarts` more times: the same pipeline.restarts budget a round's reruns have.
    Returns the result and how many retries it took."""
    for attempt in range(restarts + 1):
        try:
            return connect(), attempt
        except PeerUnavailableError as exc:
            if attempt == restarts:
                raise
            log.warning("%s failed (%s); trying again (%d/%d)", what, exc, attempt + 1, restarts)
    raise AssertionError("unreachable")
