"""Run metrics: JSONL always, TensorBoard when it is installed (`pip install tensorboard`; said
once per process when it is not)."""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)
_SAID: list[bool] = []   # the missing-TensorBoard line, once per process


class MetricsWriter:
    """Appends one JSON object per line to RUN_DIR/metrics.jsonl (and TensorBoard if present)."""

    def __init__(self, run_dir: Path | None, tensorboard: bool = True):
        self.path = run_dir / "metrics.jsonl" if run_dir else None
        self.tb = None
        if run_dir and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"))
            except Exception as exc:  # noqa: BLE001 - tensorboard is optional
                self.tb = None
                if not _SAID:
                    _SAID.append(True)
                    log.info("TensorBoard logs are off (%s); metrics go to metrics.jsonl. "
                             "pip install tensorboard to get RUN_DIR/tb", str(exc).split("\n")[0])

    def write(self, record: dict[str, Any], step: int | None = None) -> None:
        if self.path:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record, sort_keys=True) + "\n")
        if self.tb is not None and step is not None:
            for key, value in flatten(record).items():
                if isinstance(value, int | float) and math.isfinite(value):
                    self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"prefix" + "a/b": value}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def flat_numbers(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """`flatten`, keeping only the numbers (as floats); bools, strings and lists are dropped."""
    return {k: float(v) for k, v in flatten(d, prefix).items()
            if isinstance(v, int | float) and not isinstance(v, bool)}


class RunningMeans:
    """Per-layer running means of train-step metrics over an epoch.

    Steps report 0-dim tensors on their device; the sums stay there (float64) and are read back
    once, in `means()`, so a GPU step never waits for the host.
    """

    def __init__(self) -> None:
        self.sums: dict[int, dict[str, Any]] = defaultdict(dict)
        self.counts: dict[int, int] = defaultdict(int)

    def add(self, per_layer: dict[int, dict[str, Any]]) -> None:
        for layer, metrics in per_layer.items():
            self.counts[layer] += 1
            sums = self.sums[layer]
            for k, v in metrics.items():
                v = v.detach().double() if isinstance(v, torch.Tensor) else float(v)
                sums[k] = sums[k] + v if k in sums else v

    def means(self) -> dict[str, dict[str, float]]:
        return {str(layer): {k: float(v) / self.counts[layer] for k, v in sums.items()}
                for layer, sums in sorted(self.sums.items())}
