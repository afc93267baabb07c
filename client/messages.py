"""The Flower message contents the coordinator and the clients exchange: weights, config, metrics.

Coordinator -> client ("train" message):
  arrays  ArrayRecord  global weights, keys "layers.<i>.<name>"
  config  ConfigRecord round (0-based int), experiment (the resolved config as JSON)
Client -> coordinator (reply):
  arrays  ArrayRecord  the client's weights after its local round
  metrics MetricRecord num-examples (FedAvg weight), partition-id, train/... per-layer means
Coordinator -> client ("query" message, once per node, when clients are sampled):
  config  ConfigRecord experiment (to check the node's partition against federation.clients)
Client -> coordinator (reply):
  metrics MetricRecord partition-id (so the coordinator sends a sampled partition to its node)

Only weights, configs and metrics travel through Flower; activations between a client's stage
workers travel over the project's gRPC stream. The config travels in the message itself, so a
client needs nothing from `run_config` (which `run_simulation` leaves empty anyway).
"""

from __future__ import annotations

import json

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from bpfree_core.aggregate import ClientUpdate, Weights
from bpfree_core.config import ExperimentConfig
from bpfree_core.errors import ConfigError, ProtocolError

ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"
NUM_EXAMPLES, PARTITION_ID = "num-examples", "partition-id"


def train_content(rnd: int, weights: Weights, cfg: ExperimentConfig) -> RecordDict:
    return RecordDict({
        ARRAYS: ArrayRecord(weights),
        # The token stays home: each client has its own ($BPFREE_TOKEN or ClientSettings.token).
        CONFIG: ConfigRecord({"round": rnd, "experiment": json.dumps(cfg.to_dict())}),
    })


def read_train_content(content: RecordDict) -> tuple[int, Weights, ExperimentConfig]:
    """(round, global weights, config) of a train message."""
    try:
        config = content.config_records[CONFIG]
        weights = content.array_records[ARRAYS].to_torch_state_dict()
        cfg = ExperimentConfig.from_dict(json.loads(str(config["experiment"])))
        return int(config["round"]), weights, cfg  # type: ignore[arg-type]
    except ConfigError:
        raise
    except (KeyError, ValueError, TypeError) as exc:
        raise ProtocolError(f"malformed train message from the coordinator: {exc!r}") from exc


def reply_content(update: ClientUpdate) -> RecordDict:
    metrics: dict[str, int | float] = {NUM_EXAMPLES: update.num_examples,
                                       PARTITION_ID: update.client}
    metrics.update(update.metrics)
    return RecordDict({ARRAYS: ArrayRecord(update.weights), METRICS: MetricRecord(metrics)})


def partition_query(cfg: ExperimentConfig) -> RecordDict:
    return RecordDict({CONFIG: ConfigRecord({"experiment": json.dumps(cfg.to_dict())})})


def read_partition_query(content: RecordDict) -> ExperimentConfig:
    try:
        return ExperimentConfig.from_dict(json.loads(str(content.config_records[CONFIG]["experiment"])))
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
        weights = {k: torch.as_tensor(v) for k, v in
                   content.array_records[ARRAYS].to_torch_state_dict().items()}
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
