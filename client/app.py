"""The Flower ClientApp: one federated client, training its partition on its pipeline of stages.

Each "train" message carries the global weights, the round and the resolved experiment config
(client.messages). The client loads the weights into its executor, runs its local round
(bpfree_core.federation.client.local_round) and replies with its weights, example count and metrics.

Per-node settings come from `node_config` (`--node-config` of flower-supernode; filled in by the
simulation engine for partition-id/num-partitions):
  partition-id     int   which partition of the training set this client holds
  num-partitions   int   must equal federation.clients
  stage-addresses  str   "host:port,host:port": this client's stage workers, in stage order;
                         absent = run_config stage-addresses ("0=h:p,h:p;1=...", what `bpfree
                         simulate` passes), else launch the workers locally for each round
  stage-tls-ca     str   CA certificate (PEM) that signed the stage workers' TLS certificates
  data-dir         str   where this node's dataset files are (default: the config's)
  dataset          str   a site's own data ("npz:PATH", ...): trained and evaluated instead of a
                         partition of the run's dataset (client.site_data)
  device           str   cpu | cuda | cuda:N for a locally launched pipeline or in-process run
  stages           int   how many stage workers this node runs its layers on (default
                         pipeline.client_stages' entry for its partition, else pipeline.stages)
The stage workers' shared token, if they require one, comes from this node's $BPFREE_TOKEN (it
never travels through Flower).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from bpfree.client.executor import PipelineExecutor, make_executor
from bpfree.client.messages import (
    evaluate_reply,
    partition_reply,
    read_partition_query,
    read_train_content,
    read_train_message,
    reply_content,
)
from bpfree.client.pool import lease, parse_pool, parse_stage_map
from bpfree.client.site_data import node_test_data, node_train_data
from bpfree_core.config import ExperimentConfig
from bpfree_core.errors import ConfigError
from bpfree_core.federation.client import local_round
from bpfree_core.federation.client_evaluation import local_evaluate
from bpfree_core.run.executor import InProcessExecutor
from bpfree_core.run.restarts import reconnecting
from bpfree_core.runtime import set_threads

log = logging.getLogger(__name__)
CLIENT_STATE = "bpfree.client-state"   # Context.state record: ClientUpdate.state between rounds


@dataclass(frozen=True)
class ClientSettings:
    """Settings a launcher binds into a ClientApp (e.g. `bpfree simulate`'s stage workers)."""

    stage_addresses: dict[int, list[str]] = field(default_factory=dict)  # partition -> addresses
    log_dir: str | None = None
    token: str = field(default="", repr=False)   # the stage workers' token (never in messages)


def node_partition(node_config: dict[str, Any], cfg: ExperimentConfig) -> int:
    """This node's partition id, checked against federation.clients."""
    for key in ("partition-id", "num-partitions"):
        if key not in node_config:
            raise ConfigError(f"node_config has no {key!r}; start the SuperNode with --node-config "
                              f"\"partition-id=K num-partitions={cfg.federation.clients}\"")
    pid, num = int(node_config["partition-id"]), int(node_config["num-partitions"])
    if num != cfg.federation.clients:
        raise ConfigError(f"node_config num-partitions = {num} but federation.clients = "
                          f"{cfg.federation.clients}; they must be equal")
    if not 0 <= pid < num:
        raise ConfigError(f"node_config partition-id = {pid} is outside 0..{num - 1}")
    return pid


def node_addresses(node_config: dict[str, Any], run_config: dict[str, Any],
                   settings: ClientSettings, pid: int) -> list[str]:
    """This partition's stage workers: bound settings, else run_config `stage-addresses`
    ("0=h:p,h:p;1=..."), else the node's own `stage-addresses`; none = launch them locally."""
    if pid in settings.stage_addresses:
        return list(settings.stage_addresses[pid])
    mine = parse_stage_map(str(run_config.get("stage-addresses", "") or "")).get(pid)
    if mine:
        return mine
    raw = str(node_config.get("stage-addresses", "") or "")
    return [a.strip() for a in raw.split(",") if a.strip()]


@contextmanager
def stage_workers(node_config: dict[str, Any], run_config: dict[str, Any],
                  settings: ClientSettings, pid: int) -> Iterator[list[str]]:
    """This round's stage workers: a pipeline leased from run_config `stage-pool` (held for the
    round; client.pool), else this partition's own (node_addresses)."""
    pool = parse_pool(str(run_config.get("stage-pool", "") or ""))
    if not pool:
        yield node_addresses(node_config, run_config, settings, pid)
        return
    if not run_config.get("pool-dir"):
        raise ConfigError("run_config has stage-pool but no pool-dir (the pipelines' lock files)")
    with lease(pool, Path(str(run_config["pool-dir"])), pid) as addresses:
        yield addresses


def env_mods() -> list[Mod]:
    """Client mods named in $BPFREE_CLIENT_MODS ("module:function,..."), on this node only: they
    wrap the train handler (each sees and may change every train message and its reply; query
    and evaluate messages pass by them, as Flower's LocalDpMod expects: it needs the arrays of a
    train reply)."""
    mods = []
    for spec in filter(None, (s.strip() for s in os.environ.get("BPFREE_CLIENT_MODS", "").split(","))):
        module, _, name = spec.partition(":")
        try:
            mods.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"BPFREE_CLIENT_MODS names {spec!r}, which cannot be imported "
                              f"({exc}); give module:function") from exc
    return mods


def node_config_overrides(cfg: ExperimentConfig, node_config: dict[str, Any],
                          token: str = "", pid: int = 0) -> ExperimentConfig:
    """Apply the node's own data dir, device, stage count, stage TLS CA and stage token to the
    run's config. The stage count is node_config `stages`, else pipeline.client_stages' entry
    for this partition: placement, not maths, so the weights stay those of the reference."""
    train, pipeline = cfg.train, cfg.pipeline
    stages = int(node_config.get("stages", 0) or 0) or pipeline.stages_of(pid)
    if stages != pipeline.stages:
        pipeline = dataclasses.replace(pipeline, stages=stages)
    if node_config.get("data-dir"):
        train = dataclasses.replace(train, data_dir=str(node_config["data-dir"]))
    if node_config.get("device"):
        train = dataclasses.replace(train, device=str(node_config["device"]))
    if node_config.get("stage-tls-ca"):
        pipeline = dataclasses.replace(pipeline, tls_ca=str(node_config["stage-tls-ca"]))
    token = token or os.environ.get("BPFREE_TOKEN", "")
    if token:
        pipeline = dataclasses.replace(pipeline, token=token)
    return dataclasses.replace(cfg, train=train, pipeline=pipeline)


def handle_train(msg: Message, context: Context, settings: ClientSettings) -> Message:
    """One local round for this node's partition; the reply carries weights and metrics."""
    t0 = time.perf_counter()
    rnd, weights, cfg, terms = read_train_message(msg.content)
    node_config = dict(context.node_config)
    pid = node_partition(node_config, cfg)
    cfg = node_config_overrides(cfg, node_config, settings.token, pid)
    set_threads(cfg.train.threads)
    data = node_train_data(cfg, node_config, pid)
    run_config = dict(context.run_config)
    log_dir = settings.log_dir or str(run_config.get("log-dir", "") or "") or None
    with stage_workers(node_config, run_config, settings, pid) as addresses:
        executor, retries = connect(cfg, addresses, log_dir)
        try:
            update = local_round(executor, cfg, data, pid, rnd, weights, terms,
                                 kept_state(context))
        finally:
            executor.close()
    keep_state(context, update.state)
    update.metrics["restarts"] = update.metrics.get("restarts", 0.0) + retries
    update.metrics["handler_seconds"] = time.perf_counter() - t0  # all of this client's round
    log.info("client %d round %d: %d examples, %.1fs", pid, rnd + 1, update.num_examples,
             update.metrics["handler_seconds"])
    return Message(reply_content(update), reply_to=msg)


def kept_state(context: Context) -> dict[str, torch.Tensor]:
    """What this node's last round left it (ClientUpdate.state): in Flower's node state, which
    persists across rounds on the node and is never sent."""
    record = context.state.get(CLIENT_STATE)
    return {k: torch.as_tensor(v) for k, v in record.to_torch_state_dict().items()} if record else {}


def keep_state(context: Context, state: dict[str, torch.Tensor]) -> None:
    if state:
        context.state[CLIENT_STATE] = ArrayRecord(torch_state_dict=state)


def connect(cfg: ExperimentConfig, addresses: list[str] | None,
            log_dir: str | None) -> tuple[InProcessExecutor | PipelineExecutor, int]:
    """The executor, and how many times its stages had to be reached again: a stage that dies
    while being configured is respawned by its supervisor (on its port), so Configure is tried
    again within pipeline.restarts, as a stage dying mid-round is (bpfree_core.run.restarts)."""
    return reconnecting(cfg.pipeline.restarts, lambda: make_executor(cfg, addresses, log_dir),
                        "configuring the stages")


def handle_evaluate(msg: Message, context: Context) -> Message:
    """Score the global weights on this node's test data (client.site_data), in this process."""
    rnd, weights, cfg = read_train_content(msg.content)
    node_config = dict(context.node_config)
    pid = node_partition(node_config, cfg)
    cfg = node_config_overrides(cfg, node_config, "", pid)
    set_threads(cfg.train.threads)
    result = local_evaluate(cfg, node_test_data(cfg, node_config, pid), pid, weights)
    log.info("client %d evaluated round %d: %d test samples", pid, rnd + 1, result.num_examples)
    return Message(evaluate_reply(result), reply_to=msg)


def handle_query(msg: Message, context: Context) -> Message:
    """Which partition this node holds: the coordinator's map for sampled rounds."""
    cfg = read_partition_query(msg.content)
    return Message(partition_reply(node_partition(dict(context.node_config), cfg)), reply_to=msg)


def make_client_app(settings: ClientSettings | None = None, mods: Sequence[Mod] = ()) -> ClientApp:
    """A ClientApp bound to `settings`; `mods` are Flower client mods (middleware) around its
    train handler."""
    bound = settings or ClientSettings()
    client_app = ClientApp()

    @client_app.train(mods=list(mods))
    def _train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, bound)

    @client_app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context)

    @client_app.query()
    def _query(msg: Message, context: Context) -> Message:
        return handle_query(msg, context)

    return client_app


app = make_client_app(mods=env_mods())
