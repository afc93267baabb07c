"""What every run loop does with its run directory and callbacks, in one order: train and
pipeline epochs (bpfree_core.run.trainer), a task stream's tasks (bpfree_core.continual.stream) and a
federation's rounds (server.coordinator) each build their own record and summary, and hand
them here.

At the start: the resolved config (no secrets) to config.json, and the clock. At each step
(`commit`): the checkpoint (carrying the record, so a resumed run restores a lost metrics line),
then the metrics line, then every callback sees the record; a truthy answer, or a file
RUN_DIR/STOP (what a launcher's callbacks leave when they run in another process), asks the
loop to stop after this step. At the end (`finish`): the summary's common fields, summary.json,
and the summary handed back with the final weights.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from bpfree_core.config import ExperimentConfig
from bpfree_core.federation.aggregate import Weights
from bpfree_core.run.callbacks import Callback, stop_asked
from bpfree_core.run.clock import launch_time
from bpfree_core.run.rundir import STOP, RunDir


class RunLog:
    """One run's record keeping: `commit` each step, `finish` once."""

    def __init__(self, cfg: ExperimentConfig, rd: RunDir | None, callbacks: Sequence[Callback] = ()):
        self.cfg, self.rd, self.callbacks = cfg, rd, list(callbacks)
        self.start = launch_time()   # the command's launch: one clock for every printed time
        if rd is not None:
            rd.write_config(cfg)

    def elapsed(self) -> float:
        return time.time() - self.start

    def commit(self, step: int, record: dict[str, Any],
               checkpoint: tuple[str, dict[str, Any]] | None = None) -> bool:
        """Step `step`'s checkpoint (name, state) if any, then its metrics line, then the
        callbacks; True when a callback or RUN_DIR/STOP asks the run to stop."""
        if self.rd is not None:
            if checkpoint is not None:
                t0 = time.perf_counter()
                self.rd.save(checkpoint[0], {**checkpoint[1], "record": record})
                if isinstance(record.get("seconds"), dict):   # a round's own timing table
                    record["seconds"]["checkpoint"] = time.perf_counter() - t0
            self.rd.log_metrics(record, step=step)
        asked = stop_asked(self.callbacks, record)
        if self.rd is not None and (self.rd.path / STOP).exists():
            (self.rd.path / STOP).unlink(missing_ok=True)
            asked = True
        return asked

    def finish(self, summary: dict[str, Any], weights: Weights) -> dict[str, Any]:
        """summary.json (the config's algorithm, dataset and fingerprint, `summary`, the wall
        time); returns it with the final "weights"."""
        cfg = self.cfg
        summary = {"algorithm": cfg.model.algorithm, "dataset": cfg.model.dataset, **summary,
                   "fingerprint": cfg.fingerprint(), "wall_seconds": self.elapsed()}
        if self.rd is not None:
            self.rd.write_json("summary.json", summary)
        return {**summary, "weights": weights}
