"""The Flower message contents the coordinator and the clients exchange: weights, config, metrics.

Coordinator -> client ("train" message):
  arrays   ArrayRecord  global weights, keys "layers.<i>.<name>", all but the counters
  counters ConfigRecord the integer scalar buffers (each layer's `steps`) as ints
  config   ConfigRecord round (0-based int), experiment (the resolved config as JSON), and the
                        strategy's client terms (floats, Flower's keys: FedProx's proximal-mu)
Client -> coordinator (reply):
  arrays   ArrayRecord  the client's weights after its local round, all but the counters
  counters ConfigRecord its counters
  metrics  MetricRecord num-examples (FedAvg weight), partition-id, train/... per-layer means
Counters travel outside the one ArrayRecord so that Flower's client mods that scale or noise
every array (LocalDpMod's `array *= scale`) see only the floating weights.
Coordinator -> client ("evaluate" message): as a train message (the new global weights)
Client -> coordinator (reply):
  metrics  MetricRecord num-examples (test samples scored), partition-id, acc/<method> accuracies
Coordinator -> client ("query" message, once per node, when clients are sampled):
  config  ConfigRecord experiment (to check the node's partition against federation.clients)
Client -> coordinator (reply):
  metrics MetricRecord partition-id (so the coordinator sends a sampled partition to its node)

Only weights, configs and metrics travel through Flower; activations between a client's stage
workers travel over the project's gRPC stream. The config travels in the message itself, so a
client needs nothing from `run_config` (which `run_simulation` leaves empty anyway).
"""

from __future__ import annotations

import functools
import json

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from bpfree_core.config import ExperimentConfig
from bpfree_core.errors import ConfigError, ProtocolError
from bpfree_core.federation.aggregate import ClientUpdate, Weights
from bpfree_core.federation.client_evaluation import ClientEvaluation

ARRAYS, CONFIG, METRICS, COUNTERS = "arrays", "config", "metrics", "counters"
NUM_EXAMPLES, PARTITION_ID = "num-examples", "partition-id"


def _is_counter(t: torch.Tensor) -> bool:
    return t.dim() == 0 and t.dtype == torch.int64


def split_weights(weights: Weights) -> dict[str, ArrayRecord | ConfigRecord]:
    """The records that carry `weights`: the arrays, and the counters as plain ints."""
    return {ARRAYS: ArrayRecord({k: v for k, v in weights.items() if not _is_counter(v)}),
            COUNTERS: ConfigRecord({k: int(v) for k, v in weights.items() if _is_counter(v)})}


def joined_weights(content: RecordDict) -> Weights:
    """The weights `split_weights` carried (KeyError/TypeError when a record is missing/mistyped)."""
    weights = {k: torch.as_tensor(v) for k, v in content.array_records[ARRAYS].to_torch_state_dict().items()}
    for key, value in content.config_records[COUNTERS].items():
        if not isinstance(value, int):
            raise TypeError(f"counter {key} = {value!r} is not an int")
        weights[key] = torch.tensor(value, dtype=torch.int64)
    return weights


def train_content(rnd: int, weights: Weights, cfg: ExperimentConfig,
                  terms: dict[str, float] | None = None) -> RecordDict:
    return RecordDict({
        **split_weights(weights),
        # The token stays home: each client has its own ($BPFREE_TOKEN or ClientSettings.token).
        CONFIG: ConfigRecord({"round": rnd, "experiment": json.dumps(cfg.to_dict()),
                              **{k: float(v) for k, v in (terms or {}).items()}}),
    })


@functools.lru_cache(maxsize=4)
def parse_experiment(text: str) -> ExperimentConfig:
    """A run's config from its JSON, parsed and checked once per process per run: every round's
    message carries the same text (the config is frozen, so sharing it is safe)."""
    return ExperimentConfig.from_dict(json.loads(text))


def read_train_content(content: RecordDict) -> tuple[int, Weights, ExperimentConfig]:
    """(round, global weights, config) of a train message."""
    return read_train_message(content)[:3]   # type: ignore[return-value]


def read_train_message(content: RecordDict) -> tuple[int, Weights, ExperimentConfig, dict[str, float]]:
    """(round, global weights, config, client terms: the strategy's local regularisers such as
    "proximal-mu") of a train message."""
    try:
        config = content.config_records[CONFIG]
        weights = joined_weights(content)
        cfg = parse_experiment(str(config["experiment"]))
        terms = {k: float(v) for k, v in config.items() if k not in ("round", "experiment")}  # type: ignore[arg-type]
        return int(config["round"]), weights, cfg, terms  # type: ignore[arg-type]
    except ConfigError:
        raise
    except (KeyError, ValueError, TypeError) as exc:
        raise ProtocolError(f"malformed train message from the coordinator: {exc!r}") from exc


def reply_content(update: ClientUpdate) -> RecordDict:
    metrics: dict[str, int | float] = {NUM_EXAMPLES: update.num_examples,
                                       PARTITION_ID: update.client}
    metrics.update(update.metrics)
    return RecordDict({**split_weights(update.weights), METRICS: MetricRecord(metrics)})


def evaluate_reply(result: ClientEvaluation) -> RecordDict:
    metrics: dict[str, int | float] = {NUM_EXAMPLES: result.num_examples, PARTITION_ID: result.client}
    metrics.update({f"acc/{k}": float(v) for k, v in result.accuracy.items()})
    return RecordDict({METRICS: MetricRecord(metrics)})


def read_evaluate_reply(msg: Message) -> ClientEvaluation:
    try:
        metrics = dict(msg.content.metric_records[METRICS])
        num, client = metrics[NUM_EXAMPLES], metrics[PARTITION_ID]
        if not isinstance(num, int) or not isinstance(client, int):
            raise TypeError(f"{NUM_EXAMPLES} and {PARTITION_ID} must be ints")
        acc = {k[4:]: float(v) for k, v in metrics.items() if k.startswith("acc/")}  # type: ignore[arg-type]
        return ClientEvaluation(client=client, num_examples=num, accuracy=acc)
    except (KeyError, TypeError) as exc:
        raise ProtocolError(f"evaluate reply from node {msg.metadata.src_node_id} is malformed: "
                            f"{exc!r}") from exc


def partition_query(cfg: ExperimentConfig) -> RecordDict:
    return RecordDict({CONFIG: ConfigRecord({"experiment": json.dumps(cfg.to_dict())})})


def read_partition_query(content: RecordDict) -> ExperimentConfig:
    try:
        return parse_experiment(str(content.config_records[CONFIG]["experiment"]))
    except (KeyError, ValueError, TypeError) as exc:
        raise ProtocolError(f"malformed query message from the coordinator: {exc!r}") from exc


def partition_reply(partition: int) -> RecordDict:
    return RecordDict({METRICS: MetricRecord({PARTITION_ID: partition})})


def read_partition_reply(msg: Message) -> int:
    """The partition id a node holds; ProtocolError if the reply does not say."""
    try:
        partition = msg.content.metric_records[METRICS][PARTITION_ID]
        if not isinstance(partition, int):
            raise TypeError(f"{PARTITION_ID} must be an int, got {partition!r}")
        return partition
    except (KeyError, TypeError) as exc:
        raise ProtocolError(f"partition reply from node {msg.metadata.src_node_id} is malformed: "
                            f"{exc!r}") from exc


def read_reply(msg: Message) -> ClientUpdate:
    """The ClientUpdate in a reply; ProtocolError if a record or key is missing or mistyped."""
    try:
        content = msg.content
        metrics = dict(content.metric_records[METRICS])
        weights = joined_weights(content)
        num = metrics.pop(NUM_EXAMPLES)
        client = metrics.pop(PARTITION_ID)
        if not isinstance(num, int) or not isinstance(client, int):
            raise TypeError(f"{NUM_EXAMPLES} and {PARTITION_ID} must be ints")
        return ClientUpdate(client=client, num_examples=num, weights=weights,
                            metrics={k: float(v) for k, v in metrics.items()
                                     if isinstance(v, int | float)})
    except (KeyError, ValueError, TypeError) as exc:
        raise ProtocolError(f"reply from node {msg.metadata.src_node_id} is malformed: "
                            f"{exc!r}") from exc
