"""How a stack of layers splits into contiguous pipeline stages (pipeline.balance).

* layers: near-equal layer counts (the default: no measurement, the same split everywhere);
* flops: the split whose costliest stage has the fewest multiply-adds, from the layer shapes;
* measured: the split whose costliest stage is cheapest in seconds, from timing each layer's
  training step on a few real batches in this process (on small conv layers memory traffic, not
  multiply-adds, sets the cost: bench/results/deep_conv.md).

Where layers run never changes what they compute: every split ends with the reference's weights.
"""

from __future__ import annotations

import logging
import time

import torch

from bpfree_core.config import ExperimentConfig
from bpfree_core.data.batches import train_packets
from bpfree_core.data.splits import limited, run_splits
from bpfree_core.errors import ConfigError
from bpfree_core.model import Stage, build_layers, build_objective
from bpfree_core.objectives import Objective
from bpfree_core.objectives.base import numel

log = logging.getLogger(__name__)

_MEASURED: dict[tuple[str, str, int], list[float]] = {}   # one measurement per net and process


def layer_flops(objective: Objective) -> list[float]:
    """Multiply-adds of each layer's forward pass per sample, from its shapes: a conv layer
    H_out * W_out * C_in * C_out * 9, a linear one D_in * D_out."""
    shapes = objective.layer_shapes()
    return [float(numel(after) * (before[0] * 9 if len(after) == 3 else numel(before)))
            for before, after in zip(shapes, shapes[1:], strict=False)]


def measure_layer_costs(cfg: ExperimentConfig, objective: Objective | None = None,
                        device: str = "cpu", batches: int = 6, warmup: int = 2) -> list[float]:
    """Seconds per training batch of every layer (forward, local loss, backward into its own
    weights, optimiser step), timed on the run's first training batches with train.threads
    threads. Runs on copies and leaves torch's random state and thread count as they were."""
    objective = objective or build_objective(cfg)
    key = (cfg.fingerprint(), device, cfg.train.threads)
    if key in _MEASURED:
        return _MEASURED[key]
    run = torch.device(device if device.startswith("cuda") and torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if run.type == "cuda" else (lambda: None)
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.set_num_threads(max(cfg.train.threads, 1))
        try:
            stage = Stage(build_layers(cfg, objective=objective), run)
            stage.set_epoch(0, cfg.train.epochs)
            train, _, _ = run_splits(cfg)
            images = (batches + warmup) * cfg.train.batch_size
            spent, timed = [0.0] * len(stage.layers), 0
            for b, packet in enumerate(train_packets(objective, limited(train, images), cfg, 0)):
                packet = {k: v.to(run) for k, v in packet.items()}
                for i, layer in enumerate(stage.layers):
                    sync()
                    t0 = time.perf_counter()
                    packet, _ = layer.train_step(packet)
                    sync()
                    if b >= warmup:
                        spent[i] += time.perf_counter() - t0
                timed += b >= warmup
        finally:
            torch.set_num_threads(threads)
    costs = [s / max(timed, 1) for s in spent]
    log.info("measured layer costs (ms per batch on %s): %s", run,
             ", ".join(f"{c * 1e3:.1f}" for c in costs))
    _MEASURED[key] = costs
    return costs


def stage_ranges(cfg: ExperimentConfig, stages: int, objective: Objective | None = None,
                 device: str = "cpu") -> list[range]:
    """The layers each of `stages` stages owns, by pipeline.balance (see the module's doc).
    `device`: where stages train, for `measured` (timed there if this process has it, else on
    the CPU)."""
    objective = objective or build_objective(cfg)
    n = len(objective.layer_sizes())
    costs = None
    if cfg.pipeline.balance == "flops":
        costs = layer_flops(objective)
    elif cfg.pipeline.balance == "measured" and 1 < stages <= n:
        costs = measure_layer_costs(cfg, objective, device)
    return split_stages(n, stages, costs)


def split_stages(num_layers: int, stages: int, costs: list[float] | None = None) -> list[range]:
    """Contiguous split of `num_layers` layers into `stages` non-empty ranges: near-equal layer
    counts, or, given each layer's cost, the split whose costliest stage is cheapest."""
    if stages < 1:
        raise ConfigError(f"pipeline.stages = {stages} must be >= 1")
    if stages > num_layers:
        raise ConfigError(
            f"pipeline.stages = {stages} but the model has only {num_layers} layer(s); use at "
            f"most {num_layers} stages or add layers to model.hidden"
        )
    if costs is not None:
        return _balanced(costs, stages)
    base, extra = divmod(num_layers, stages)
    out, start = [], 0
    for s in range(stages):
        n = base + (1 if s < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


def _balanced(costs: list[float], stages: int) -> list[range]:
    """Min-max contiguous partition (dynamic programming; ties go to the count split's side)."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][i]: the least max-stage cost of layers 0..i-1 in k stages; cut[k][i]: last start
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for i in range(k, n - (stages - k) + 1):
            for j in range(i - 1, k - 2, -1):   # later cuts first: ties keep the count split
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if cost < best[k][i] - 1e-9 * max(1.0, cost):
                    best[k][i], cut[k][i] = cost, j
    out, i = [], n
    for k in range(stages, 0, -1):
        j = cut[k][i]
        out.append(range(j, i))
        i = j
    return out[::-1]
