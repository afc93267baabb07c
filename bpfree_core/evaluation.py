"""Scoring a stack: accuracy of every prediction method, through any forward function."""

from __future__ import annotations

from collections.abc import Callable

import torch

from bpfree_core.config import ExperimentConfig
from bpfree_core.data.datasets import Split
from bpfree_core.errors import ConfigError
from bpfree_core.layers import Packet
from bpfree_core.model import Stage, build_layers
from bpfree_core.objectives import Objective
from bpfree_core.runtime import resolve_device

EVAL_BATCH = 1000

def prediction_modes(objective: Objective, cfg: ExperimentConfig) -> tuple[bool, bool]:
    """(softmax, goodness) prediction switches for this objective and config."""
    mode = cfg.train.predict
    if mode in ("goodness", "both") and not objective.supports_goodness:
        raise ConfigError(
            f"train.predict = {mode!r} but {objective.name} has no goodness; use softmax"
        )
    return mode in ("softmax", "both"), mode in ("goodness", "both")

def evaluate(
    forward: Callable[[Packet], Packet], objective: Objective, split: Split, cfg: ExperimentConfig
) -> dict[str, float]:
    """Accuracy of every prediction method on `split`, running packets through `forward`."""
    _, goodness = prediction_modes(objective, cfg)
    correct: dict[str, int] = {}
    for start in range(0, len(split), EVAL_BATCH):
        x = split.images[start:start + EVAL_BATCH]
        y = split.labels[start:start + EVAL_BATCH]
        out = forward(objective.encode_eval(x, goodness))
        for method, pred in objective.predict(out).items():
            correct[method] = correct.get(method, 0) + int((pred.cpu() == y).sum())
    return {m: c / len(split) for m, c in correct.items()}

def evaluate_weights(
    weights: dict[str, torch.Tensor], objective: Objective, split: Split, cfg: ExperimentConfig
) -> dict[str, float]:
    """Accuracy of a whole stack's weights (say, a federated global model) on `split`."""
    stage = Stage(build_layers(cfg, objective=objective), resolve_device(cfg.train.device))
    stage.load_state_dict(weights)
    return evaluate(stage.eval_step, objective, split, cfg)

def headline(acc: dict[str, float], cfg: ExperimentConfig) -> float:
    """The accuracy a run reports: the configured method, the better of both with `both`."""
    if cfg.train.predict == "both":
        return max(acc.values())
    return acc.get(cfg.train.predict, max(acc.values(), default=0.0))
