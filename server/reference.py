"""The single-process federated reference: the golden reference for every federated run.

No Flower, no gRPC: each round, each client trains in this process from the global weights
(bpfree_core.federated.local_round on an InProcessExecutor), then bpfree_core.aggregate.fedavg averages
every layer. A Flower run with pipeline clients must end with identical weights on CPU.
"""

from __future__ import annotations

from collections.abc import Callable

from bpfree_core.aggregate import ClientUpdate, Weights, fedavg
from bpfree_core.config import ExperimentConfig
from bpfree_core.federated import (
    InProcessExecutor,
    client_split,
    local_round,
    stack_template,
    train_split,
)


def federated_reference(
    cfg: ExperimentConfig,
    rounds: int | None = None,
    on_round: Callable[[int, Weights, list[ClientUpdate]], None] | None = None,
) -> Weights:
    """Train `rounds` (default federation.rounds) rounds of K in-process clients; return weights.

    `on_round(round, new_weights, updates)` is called after each round's aggregation.
    """
    train = train_split(cfg)  # each InProcessExecutor sets train.threads
    parts = [client_split(cfg, train, k) for k in range(cfg.federation.clients)]
    weights = stack_template(cfg)
    for rnd in range(cfg.federation.rounds if rounds is None else rounds):
        updates = []
        for k, part in enumerate(parts):
            executor = InProcessExecutor(cfg, cfg.train.device)
            updates.append(local_round(executor, cfg, part, k, rnd, weights))
            executor.close()
        weights = fedavg(weights, updates)
        if on_round is not None:
            on_round(rnd, weights, updates)
    return weights
