"""A federated client's local work for one round: its data, schedule, seed and epochs.

`local_round` is the single definition of what client k does in round r, whoever runs it:
- data: its partition `partition_indices(train labels, K, federation.partition, train.seed)[k]`;
- schedule: global epochs `r * local_epochs + e` (e < local_epochs) out of `rounds * local_epochs`,
  so batch order, negatives and the learning-rate cool-down continue across rounds exactly as a
  centralised run's epochs would;
- randomness: batches and negatives are drawn from `client_seed(train.seed, k)`, so clients draw
  different streams but every run of client k draws the same one;
- state: it starts from the global weights with fresh optimiser state every round (FedAvg
  averages weights only, so optimiser moments would describe weights that no longer exist).

Each local epoch is bpfree_core.run.trainer.run_epoch, the one epoch loop, over any Executor
(bpfree_core.run.executor): `InProcessExecutor` (the reference) or client.executor.PipelineExecutor
(S stage worker processes over gRPC). Fed the same packets, both end with identical weights on
CPU. Torch only: the client (ClientApp) and the server (coordinator, reference) build on it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time

import torch

from bpfree_core.config import ExperimentConfig, train_sample_size
from bpfree_core.continual.stream import client_round_data, consolidates, end_task, rounds_per_task
from bpfree_core.data.datasets import Split
from bpfree_core.data.partition import partition_indices
from bpfree_core.data.splits import run_splits
from bpfree_core.errors import ConfigError
from bpfree_core.federation.aggregate import ClientUpdate, Weights
from bpfree_core.metrics import flat_numbers
from bpfree_core.model import Stage, build_layers, build_objective
from bpfree_core.run.executor import Executor, InProcessExecutor
from bpfree_core.run.restarts import with_restarts
from bpfree_core.run.trainer import run_epoch
from bpfree_core.seeds import derive, generator


# -- the plan -------------------------------------------------------------------------------------
def total_epochs(cfg: ExperimentConfig) -> int:
    return cfg.federation.rounds * cfg.federation.local_epochs


def round_epochs(cfg: ExperimentConfig, rnd: int) -> range:
    """Global epoch indices trained in round `rnd` (0-based)."""
    e = cfg.federation.local_epochs
    return range(rnd * e, (rnd + 1) * e)


def draw_clients(cfg: ExperimentConfig, rnd: int, fraction: float, minimum: int, purpose: str) -> list[int]:
    """Flower's count of the K clients (max(int(K * fraction), minimum), at most K), ascending:
    all of them, or a draw from derive(seed, purpose, rnd), the same in every process and on resume."""
    k = cfg.federation.clients
    n = train_sample_size(k, fraction, minimum)
    if n == k:
        return list(range(k))
    return sorted(torch.randperm(k, generator=generator(cfg.train.seed, purpose, rnd))[:n].tolist())


def sampled_clients(cfg: ExperimentConfig, rnd: int) -> list[int]:
    """The partitions that train in round `rnd` (0-based), under federation.fraction_train."""
    fed = cfg.federation
    return draw_clients(cfg, rnd, fed.fraction_train, fed.min_train_clients, "sample")


def client_seed(seed: int, client: int) -> int:
    """Seed of client `client`'s batch order and negatives (distinct per client, fixed per run)."""
    return derive(seed, "client", client)


def client_config(cfg: ExperimentConfig, client: int, samples: int | None = None) -> ExperimentConfig:
    """The config a client trains with: the run's, with its own batch/negative seed; a client
    holding fewer than train.batch_size `samples` trains on batches of what it has."""
    batch = cfg.train.batch_size if samples is None else min(cfg.train.batch_size, samples)
    return dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, seed=client_seed(cfg.train.seed, client), batch_size=batch))


def train_split(cfg: ExperimentConfig) -> Split:
    """The run's whole training split (train.train_limit applied, train.validation held out),
    before partitioning."""
    return run_splits(cfg)[0]


_PARTITIONS: dict[tuple, list[torch.Tensor]] = {}   # the last split's K parts, by what fixes them


def partitions(cfg: ExperimentConfig, split: Split,
               min_size: int | None = None) -> list[torch.Tensor]:
    """Every client's sample indices, computed once per process and split (the training and the
    test split: two entries): a Dirichlet split of K = 1000 costs ~0.2 s, and each client (each
    round) would otherwise draw it again. `min_size` defaults to federation.min_partition_size."""
    fed = cfg.federation
    least = fed.min_partition_size if min_size is None else min_size
    digest = hashlib.blake2b(split.labels.numpy().tobytes(), digest_size=16)
    if split.groups is not None:
        digest.update(split.groups.numpy().tobytes())
    key = (fed.clients, fed.partition, least, cfg.train.seed, digest.digest())
    if key not in _PARTITIONS:
        if len(_PARTITIONS) >= 2:
            _PARTITIONS.pop(next(iter(_PARTITIONS)))
        _PARTITIONS[key] = partition_indices(split.labels, fed.clients, fed.partition,
                                             cfg.train.seed, min_size=least, groups=split.groups)
    return _PARTITIONS[key]


def client_split(cfg: ExperimentConfig, train: Split, client: int) -> Split:
    """Client `client`'s partition of `train`."""
    k = cfg.federation.clients
    if not 0 <= client < k:
        raise ConfigError(f"partition id {client} is out of range for federation.clients = {k}; "
                          f"valid ids are 0..{k - 1}")
    idx = partitions(cfg, train)[client]
    if len(idx) == 0:
        raise ConfigError(
            f"client {client} holds no samples under federation.partition = "
            f"{cfg.federation.partition!r}; set federation.min_partition_size = 1 or more, use "
            "fewer clients or a less skewed partition")
    return train.subset(idx)


# -- the round ------------------------------------------------------------------------------------
def local_round(executor: Executor, cfg: ExperimentConfig, data: Split, client: int, rnd: int,
                global_weights: Weights, terms: dict[str, float] | None = None,
                state: Weights | None = None) -> ClientUpdate:
    """Client `client`'s round `rnd`: load the global weights, train its local epochs (plus the
    strategy's client `terms`: "proximal-mu" anchors every layer at its global weights), report.
    `state` is what its last round left it (ClientUpdate.state: a federated task stream's EWC /
    SI importance, its own, never aggregated); the update carries the new one.

    A stage failure is survived up to pipeline.restarts times (bpfree_core.run.restarts): the stages
    are recovered and the round reruns from `global_weights`, ending exactly as an undisturbed
    round would. The update's metrics count the reruns ("restarts").
    """
    update, events = with_restarts(
        executor, cfg.pipeline.restarts,
        lambda: _round_once(executor, cfg, data, client, rnd, global_weights, terms or {},
                            state or {}),
        f"client {client} round {rnd + 1}")
    update.metrics["restarts"] = float(len(events))
    return update


def _round_once(executor: Executor, cfg: ExperimentConfig, data: Split, client: int, rnd: int,
                global_weights: Weights, terms: dict[str, float], state: Weights) -> ClientUpdate:
    memory = None
    if cfg.continual.federated:   # this round's task (+ the client's own replay memory)
        data, memory = client_round_data(cfg, data, client, rnd, client_seed(cfg.train.seed, client))
    ccfg = client_config(cfg, client, samples=len(data))
    objective = build_objective(ccfg)
    executor.load_weights({**global_weights, **state}, proximal_mu=terms.get("proximal-mu", 0.0))
    t0 = time.perf_counter()
    metrics: dict[str, float] = {}
    for epoch in round_epochs(cfg, rnd):
        stats = run_epoch(executor, objective, data, ccfg, epoch, total_epochs(cfg),
                          replay=memory.replay() if memory is not None else None)
        metrics = flat_numbers(stats["layers"], "train/")  # the last local epoch's means
    metrics["train_seconds"] = time.perf_counter() - t0
    kept: Weights = {}
    if cfg.continual.federated and consolidates(cfg):   # the client's own EWC / SI, kept by it
        if (rnd + 1) % rounds_per_task(cfg) == 0:
            metrics["penalty"] = end_task(executor, cfg)
        kept = executor.consolidation_state()  # type: ignore[attr-defined]
    return ClientUpdate(client=client, num_examples=len(data), weights=executor.get_weights(),
                        metrics=metrics, state=kept)


def stack_template(cfg: ExperimentConfig) -> Weights:
    """Initial global weights: every layer built from its own seed (as any process builds it)."""
    return Stage(build_layers(cfg)).state_dict()


__all__ = ["Executor", "InProcessExecutor", "client_config", "client_seed", "client_split",
           "local_round", "round_epochs", "sampled_clients", "stack_template", "total_epochs",
           "train_split"]
