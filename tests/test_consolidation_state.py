"""EWC / SI state travels with the stage that owns the layer: it is part of the stage's optimiser
tensors (what GetWeights(with_optimizer) and a checkpoint carry), so a stage rebuilt from them
continues exactly; without them the penalties are gone. The real stage workers are in
test_continual.py."""

from __future__ import annotations

import pytest
import torch

from bpfree_core.errors import ConfigError
from bpfree_core.model import CONSOLIDATION, OPTIMIZER, Stage, build_layers
from tests.test_agem import _agem_packets


def _task(stage: Stage, packets: list, epochs: int = 2) -> float:
    for epoch in range(epochs):
        stage.set_epoch(epoch, epochs)
        for p in packets:
            stage.train_step(p)
    return sum(stage.end_task().values())


@pytest.mark.parametrize("strategy", ["ewc", "si"])
def test_a_stage_rebuilt_from_its_tensors_continues_exactly(strategy: str) -> None:
    cfg, packets = _agem_packets("sffa", ["continual.ewc_lambda=100", "continual.si_c=10"],
                                 strategy=strategy)
    first, second = packets, packets[::-1]                    # two 'tasks' of 2 batches
    stage = Stage(build_layers(cfg))
    assert _task(stage, first) == 0.0                          # nothing to protect yet
    tensors = stage.optimizer_tensors()
    kept = [k for k in tensors if k.startswith(f"{OPTIMIZER}layers.1.{CONSOLIDATION}body.penalty.0")]
    assert kept, sorted(tensors)[:5]

    def rebuilt(with_consolidation: bool) -> Stage:
        other = Stage(build_layers(cfg))
        other.load_state_dict(stage.state_dict())
        other.load_optimizer_tensors({k: v for k, v in tensors.items()
                                      if with_consolidation or CONSOLIDATION not in k})
        return other

    restored, forgetful = rebuilt(True), rebuilt(False)
    penalty = _task(stage, second)
    assert penalty > 0
    assert _task(restored, second) == penalty
    assert all(torch.equal(v, restored.state_dict()[k]) for k, v in stage.state_dict().items())
    assert _task(forgetful, second) == 0.0                     # the penalty state was the point
    assert any(not torch.equal(v, forgetful.state_dict()[k]) for k, v in stage.state_dict().items())


def test_consolidation_state_that_does_not_fit_is_refused() -> None:
    cfg, packets = _agem_packets("ff", [], strategy="ewc")
    stage = Stage(build_layers(cfg))
    _task(stage, packets, epochs=1)
    tensors = stage.optimizer_tensors()
    key = next(k for k in tensors if k.endswith(f"{CONSOLIDATION}body.penalty.0.anchor.0"))
    tensors[key] = torch.zeros(3)
    with pytest.raises(ConfigError, match=r"layer \d \(body\): ewc tensor penalty.0.anchor.0 is \[3\]"):
        Stage(build_layers(cfg)).load_optimizer_tensors(tensors)
    naive = build_layers(cfg.with_overrides(["continual.strategy=naive"]))
    with pytest.raises(ConfigError, match="got EWC / SI state but continual.strategy = 'naive'"):
        Stage(naive).load_optimizer_tensors(stage.optimizer_tensors())
