"""The single-process federated reference: the golden reference for every federated run.

No Flower, no gRPC: the Coordinator (the one round loop every backend uses) driven by an
`InProcessTransport`, which trains each client in this process from the global weights
(bpfree_core.federation.client.local_round on an InProcessExecutor). A Flower, `flwr run`, deployment or
Ray run with pipeline clients must end with identical weights on CPU.
"""

from __future__ import annotations

from collections.abc import Callable

from bpfree.server.coordinator import Coordinator, Receive, RoundReplies
from bpfree_core.config import ExperimentConfig
from bpfree_core.data.splits import run_splits
from bpfree_core.federation.aggregate import Weights
from bpfree_core.federation.client import InProcessExecutor, client_split, local_round, train_split
from bpfree_core.federation.client_evaluation import ClientEvaluation, evaluate_partitions
from bpfree_core.federation.strategies import ClientTerms


class InProcessTransport:
    """Delivers a round to the sampled clients, trained one after another in this process."""

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        train = train_split(cfg)
        self.parts = [client_split(cfg, train, k) for k in range(cfg.federation.clients)]
        self.client_state: dict[int, Weights] = {}   # ClientUpdate.state between rounds

    def evaluate_round(self, rnd: int, weights: Weights, clients: list[int]) -> list[ClientEvaluation]:
        return evaluate_partitions(self.cfg, run_splits(self.cfg)[2], weights, clients)

    def train_round(self, rnd: int, weights: Weights, clients: list[int],
                    terms: ClientTerms, receive: Receive) -> RoundReplies:
        for k in clients:
            with InProcessExecutor(self.cfg, self.cfg.train.device) as executor:
                update = local_round(executor, self.cfg, self.parts[k], k, rnd, weights, terms,
                                     self.client_state.get(k))
            self.client_state[k] = update.state   # the client's own, kept with it
            receive(update)
        return RoundReplies(sent=len(clients))


def federated_reference(
    cfg: ExperimentConfig,
    rounds: int | None = None,
    on_round: Callable[[int, Weights], None] | None = None,
) -> Weights:
    """Train `rounds` (default federation.rounds) rounds of K in-process clients; return weights.

    `on_round(round, new_weights)` is called after each round's aggregation.
    """
    coordinator = Coordinator(cfg, evaluate=False, on_round=on_round)
    return coordinator.run(InProcessTransport(cfg), rounds=rounds)["weights"]
