"""pipeline.restarts, the one retry budget (bpfree_core.run.restarts): a round or epoch is rerun only
by an executor that declares it `recovers`, at most `restarts` times; reaching the stages again
(Configure after a respawn) gets the same budget. Real stage kills are in test_faults.py."""

from __future__ import annotations

import pytest

from bpfree_core.config import load_config
from bpfree_core.errors import BpfreeError, PeerUnavailableError
from bpfree_core.run.executor import InProcessExecutor
from bpfree_core.run.restarts import RoundFailedError, reconnecting, rerun_from, with_restarts


class _Recovering:
    """Stands for a pipeline whose stages a supervisor respawns: counts recoveries."""

    recovers = True

    def __init__(self) -> None:
        self.recovered = 0
        self.restored: list[dict] = []

    def restore(self, snapshot: dict) -> None:
        self.restored.append(snapshot)

    def recover(self) -> list[int]:
        self.recovered += 1
        return [1]


def _failing(times: int):  # noqa: ANN202
    calls = {"n": 0}

    def attempt() -> str:
        calls["n"] += 1
        if calls["n"] <= times:
            raise PeerUnavailableError(f"stage 1 is gone (call {calls['n']})")
        return "done"

    return attempt


def test_a_recovering_executor_reruns_within_the_budget_and_then_stops() -> None:
    executor = _Recovering()
    result, events = with_restarts(executor, 2, _failing(2), "round 1")
    assert result == "done" and executor.recovered == 2 and len(events) == 2
    with pytest.raises(RoundFailedError, match="pipeline.restarts = 1"):
        with_restarts(_Recovering(), 1, _failing(2), "round 1")


def test_an_in_process_executor_is_never_rerun() -> None:
    executor = InProcessExecutor(load_config(None, ["model.hidden=8", "train.threads=1"]))
    assert executor.recovers is False
    with pytest.raises(BpfreeError, match="call 1"):
        with_restarts(executor, 5, _failing(1), "epoch 1")


def test_reaching_the_stages_again_has_the_same_budget() -> None:
    assert reconnecting(2, _failing(2), "configuring the stages") == ("done", 2)
    with pytest.raises(PeerUnavailableError, match="call 2"):
        reconnecting(1, _failing(2), "configuring the stages")


def test_an_epoch_rerun_starts_again_from_its_snapshot() -> None:
    executor, start = _Recovering(), {"weights": "epoch start"}
    result, events = rerun_from(executor, start, 3, _failing(2), "epoch 1")
    assert result == "done" and len(events) == 2
    assert executor.restored == [start, start]   # before each rerun, never before the first try
