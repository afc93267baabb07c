"""What runs a stack's layers for the epoch loop: the Executor protocol and its in-process form.

Every executor can `snapshot()` / `restore()` its whole state (weights and optimiser): checkpoints
and `--resume`. One that declares `recovers` can `recover()` its stages after a stage failure:
epoch and round reruns (bpfree_core.run.restarts). Abilities are declared, never probed for.

Every job drives its layers through this protocol, whoever holds them: `InProcessExecutor` (one
Stage with every layer, in this process: the reference) or client.executor.PipelineExecutor
(S stage worker processes over gRPC). bpfree_core.run.trainer.train_epochs (train, pipeline) and
bpfree_core.federation.client.local_round (a federated client's round) call nothing else, so the
single-process reference, the pipeline and the federated client run the same epoch loop.

`train_epoch` returns the epoch's statistics in one shape for every executor:
  {"layers": {layer: {metric: mean}}, "batches", "samples", "seconds", "samples_per_second"}
plus, for pipelines, per-stage statistics ("stages").
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, Protocol

import torch

from bpfree_core.config import ExperimentConfig
from bpfree_core.federation.aggregate import Weights
from bpfree_core.layers import LABELS, Packet, add_proximal_term
from bpfree_core.metrics import RunningMeans
from bpfree_core.model import OPTIMIZER, Stage, build_layers, build_objective, consolidation_only
from bpfree_core.runtime import resolve_device, set_threads


class Executor(Protocol):
    """Runs a stack's layers: the in-process Stage or a pipeline of stage workers."""

    recovers: bool   # recover() restarts or reconnects failed stages (pipelines)

    def load_weights(self, state: Weights, proximal_mu: float = 0.0) -> None: ...
    def snapshot(self) -> dict[str, Any]: ...
    def restore(self, snapshot: dict[str, Any]) -> None: ...
    def recover(self) -> list[int]: ...
    def get_weights(self) -> Weights: ...
    def train_epoch(self, packets: Iterable[Packet], epoch: int, total_epochs: int) -> dict: ...
    def eval_forward(self, packet: Packet) -> Packet: ...
    def describe(self) -> dict[str, Any]: ...
    def close(self) -> None: ...


def epoch_stats(layers: dict[str, dict[str, float]], batches: int, samples: int,
                seconds: float, **extra: Any) -> dict[str, Any]:
    """The statistics of one epoch, in the shape every executor returns."""
    return {"layers": layers, "batches": batches, "samples": samples, "seconds": seconds,
            "samples_per_second": samples / seconds if seconds > 0 else 0.0, **extra}


class InProcessExecutor:
    """Every layer in this process, in one Stage: the reference executor."""

    recovers = False   # nothing to restart: an error here is the run's

    def __init__(self, cfg: ExperimentConfig, device: str | torch.device = "cpu"):
        # GEMM summation order depends on the torch thread count: train with the configured
        # count, as the stage workers do, or the golden rule fails in the last bits.
        set_threads(cfg.train.threads)
        self.cfg = cfg
        self.device = resolve_device(str(device))   # a missing GPU is one sentence, here
        self.objective = build_objective(cfg)
        self.stage: Stage | None = None

    def load_weights(self, state: Weights, proximal_mu: float = 0.0) -> None:
        # Fresh layers on every load: fresh optimisers, nothing carried over but the weights and
        # the `optimizer.` tensors that come with them (a stage worker's LoadWeights, the same).
        self.stage = self._fresh()
        optimizer = {k: v for k, v in state.items() if k.startswith(OPTIMIZER)}
        self.stage.load_state_dict({k: v for k, v in state.items() if k not in optimizer})
        self.stage.load_optimizer_tensors(optimizer)
        add_proximal_term(self.stage.layers, proximal_mu)

    def get_weights(self) -> Weights:
        return self._stage().state_dict()

    def snapshot(self) -> dict[str, Any]:
        """Everything needed to continue exactly from here: weights and optimiser state."""
        stage = self._stage()
        return {"weights": stage.state_dict(), "optimizer": stage.optimizer_state()}

    def restore(self, snapshot: dict[str, Any]) -> None:
        self.load_weights(snapshot["weights"])
        self._stage().load_optimizer_state(snapshot["optimizer"])

    def train_epoch(self, packets: Iterable[Packet], epoch: int, total_epochs: int) -> dict:
        stage = self._stage()
        stage.set_epoch(epoch, total_epochs)
        means = RunningMeans()
        batches = samples = 0
        t0 = time.perf_counter()
        for packet in packets:
            _, metrics = stage.train_step(packet)
            means.add(metrics)
            batches += 1
            samples += int(packet[LABELS].shape[0])
        return epoch_stats(means.means(), batches, samples, time.perf_counter() - t0)

    def eval_forward(self, packet: Packet) -> Packet:
        return self._stage().eval_step(packet)

    def end_task(self) -> dict[int, float]:
        """Continual learning's task boundary (EWC / SI): see Stage.end_task."""
        return self._stage().end_task()

    def consolidation_state(self) -> Weights:
        """Every layer's EWC / SI state (Stage.optimizer_tensors' consolidation part)."""
        return consolidation_only(self._stage().optimizer_tensors())

    def describe(self) -> dict[str, Any]:
        return {}

    def recover(self) -> list[int]:
        raise NotImplementedError("an in-process executor has no stages to recover (recovers = False)")

    def close(self) -> None:
        self.stage = None

    def _fresh(self) -> Stage:
        return Stage(build_layers(self.cfg, objective=self.objective), self.device)

    def _stage(self) -> Stage:
        if self.stage is None:   # not loaded: every layer from its own seed
            self.stage = self._fresh()
        return self.stage

    def __enter__(self) -> InProcessExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
