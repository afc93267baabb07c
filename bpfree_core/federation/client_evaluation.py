"""Federated evaluation: sampled clients score the global model on their own test data.

Each round, after aggregation, `federation.fraction_evaluate` of the clients (Flower's
`fraction_evaluate` / `min_evaluate_nodes` count, drawn from derive(seed, "evaluate", round))
evaluate the new global weights on their test data: a site's own test split (node_config
`dataset`) or, without one, their partition of the run's test split (the training partitioner
applied to the test labels). The coordinator records each client's accuracy and the
example-weighted mean: what a federation reports when the server holds no test set of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from bpfree_core.config import ExperimentConfig
from bpfree_core.data.datasets import Split
from bpfree_core.errors import ConfigError
from bpfree_core.evaluation import evaluate_weights, headline
from bpfree_core.federation.aggregate import Weights
from bpfree_core.federation.client import draw_clients, partitions
from bpfree_core.model import build_objective


@dataclass(frozen=True)
class ClientEvaluation:
    client: int                   # partition id
    num_examples: int             # test samples scored
    accuracy: dict[str, float]    # by prediction method, as the coordinator's own evaluation


def sampled_evaluators(cfg: ExperimentConfig, rnd: int) -> list[int]:
    """The partitions that evaluate after round `rnd` (0-based), ascending; [] when off."""
    fed = cfg.federation
    if fed.fraction_evaluate == 0:
        return []
    return draw_clients(cfg, rnd, fed.fraction_evaluate, fed.min_evaluate_clients, "evaluate")


def client_test_split(cfg: ExperimentConfig, test: Split, client: int) -> Split:
    """Client `client`'s share of the run's test split, by the run's partitioner."""
    idx = partitions(cfg, test, min_size=0)[client]
    if len(idx) == 0:
        raise ConfigError(f"client {client} holds no test samples under federation.partition = "
                          f"{cfg.federation.partition!r}; raise train.test_limit or use fewer clients")
    return test.subset(idx)


def local_evaluate(cfg: ExperimentConfig, data: Split, client: int, weights: Weights) -> ClientEvaluation:
    """Client `client`'s score of `weights` on its test data, in its own process."""
    acc = evaluate_weights(weights, build_objective(cfg), data, cfg)
    return ClientEvaluation(client=client, num_examples=len(data), accuracy=acc)


def evaluate_partitions(cfg: ExperimentConfig, test: Split, weights: Weights,
                        clients: list[int]) -> list[ClientEvaluation]:
    """Federated evaluation where the clients' test data is here (the in-process reference, and
    the Ray backend, whose clients the coordinator drives)."""
    return [local_evaluate(cfg, client_test_split(cfg, test, k), k, weights) for k in clients]


def summarize(results: list[ClientEvaluation], cfg: ExperimentConfig) -> dict:
    """The round record's `federated_evaluation`: per client, and the example-weighted headline."""
    total = sum(r.num_examples for r in results)
    weighted = (sum(headline(r.accuracy, cfg) * r.num_examples for r in results) / total
                if total else float("nan"))
    return {"accuracy": weighted,
            "clients": {str(r.client): {"num_examples": r.num_examples, **r.accuracy}
                        for r in sorted(results, key=lambda r: r.client)}}
