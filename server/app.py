"""The Flower ServerApp: the federated coordinator behind `flwr run .` and `bpfree simulate`.

A custom round loop on the Grid's push and pull (server.coordinator) rather than a stock Strategy,
so the coordinator decides what a failed, late or malformed reply means: each is left out of that
round's aggregate, counted and logged, and the run continues while at least
`federation.min_clients` replies are usable.

`flwr run .` reads run_config keys `config-toml` (a bpfree TOML file; a relative path is taken
relative to the app directory) and `overrides` ("section.key=value;section.key=value") or
`config-json` (a resolved config file: `bpfree simulate` submits its runs this way), and
writes the run directory to run_config `out-dir` if that key exists, else
$BPFREE_RUNS_DIR/flwr-<run id>, else ./runs/flwr-<run id>.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, MessageType
from flwr.serverapp import Grid, ServerApp

from bpfree.client.messages import (
    partition_query,
    read_evaluate_reply,
    read_partition_reply,
    read_reply,
    train_content,
)
from bpfree.server.coordinator import Coordinator, Receive, RoundReplies, required_replies
from bpfree.server.flower_run import APP_DIR
from bpfree_core.config import ExperimentConfig, load_config
from bpfree_core.errors import AggregationError, ConfigError, ProtocolError
from bpfree_core.federation.aggregate import Weights
from bpfree_core.federation.client_evaluation import ClientEvaluation
from bpfree_core.federation.strategies import ClientTerms

log = logging.getLogger(__name__)

NODE_POLL_SECONDS = 0.5
PULL_FIRST, PULL_MOST = 0.01, 0.1   # seconds between pulls for replies: doubling from/up to


class FlowerTransport:
    """Sends a round's train messages to the sampled clients' SuperNodes and collects the replies.

    When every client trains, every connected node gets the round. When clients are sampled,
    the nodes are first asked which partition each holds (a "query" message, once per node), and
    each sampled partition goes to its node.
    """

    def __init__(self, grid: Grid, cfg: ExperimentConfig):
        self.grid = grid
        self.cfg = cfg
        self.partition_of: dict[int, int] = {}   # node id -> partition id

    def nodes(self) -> list[int]:
        """The connected nodes, waiting (up to federation.round_timeout) for all K to register."""
        want, need = self.cfg.federation.clients, required_replies(self.cfg)
        deadline = time.monotonic() + self.cfg.federation.round_timeout
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= want or time.monotonic() > deadline:
                break
            time.sleep(NODE_POLL_SECONDS)  # nodes register on their own schedule; poll the grid
        if len(nodes) < need:
            raise AggregationError(
                f"only {len(nodes)} of federation.clients = {want} client nodes connected within "
                f"federation.round_timeout = {self.cfg.federation.round_timeout}s and "
                f"{need} are needed; start the missing SuperNodes or lower federation.min_clients")
        if len(nodes) < want:
            log.warning("only %d of %d client nodes connected; training with those", len(nodes), want)
        return nodes

    def _map_partitions(self, nodes: list[int]) -> None:
        """Learn the partition of every node not yet asked (nodes that fail to say stay unknown)."""
        new = [node for node in nodes if node not in self.partition_of]
        if not new:
            return
        query = partition_query(self.cfg)
        messages = [Message(query, dst_node_id=node, message_type=MessageType.QUERY) for node in new]
        for reply in self.exchange(messages):
            if reply.has_error():
                log.warning("node %d did not say its partition: %s", reply.metadata.src_node_id,
                            reply.error.reason)
                continue
            try:
                self.partition_of[reply.metadata.src_node_id] = read_partition_reply(reply)
            except ProtocolError as exc:
                log.warning("%s", exc)

    def _targets(self, clients: list[int]) -> tuple[list[int], list[int]]:
        """(nodes to send to, sampled partitions no connected node holds)."""
        nodes = self.nodes()
        if len(clients) == self.cfg.federation.clients:   # everyone: every node
            return nodes, []
        self._map_partitions(nodes)   # sampled: each partition to its node
        node_of = {p: n for n, p in sorted(self.partition_of.items()) if n in set(nodes)}
        return [node_of[k] for k in clients if k in node_of], [k for k in clients if k not in node_of]

    def evaluate_round(self, rnd: int, weights: Weights, clients: list[int]) -> list[ClientEvaluation]:
        """Each evaluating node scores `weights` on its own test data; failures are logged and
        left out."""
        nodes, missing = self._targets(clients)
        for k in missing:
            log.warning("round %d: no connected node holds partition %d to evaluate", rnd + 1, k)
        content = train_content(rnd, weights, self.cfg)
        messages = [Message(content, dst_node_id=node, message_type=MessageType.EVALUATE,
                            group_id=str(rnd + 1)) for node in nodes]
        results = []
        for reply in self.exchange(messages):
            try:
                if reply.has_error():
                    raise ProtocolError(f"node {reply.metadata.src_node_id}: {reply.error.reason}")
                results.append(read_evaluate_reply(reply))
            except ProtocolError as exc:
                log.warning("round %d: an evaluation is left out: %s", rnd + 1, exc)
        return results

    def exchange(self, messages: list[Message]) -> Iterator[Message]:
        """Push `messages`, then yield each reply as soon as it is pulled, until all have replied
        or federation.round_timeout has passed (what is not yielded timed out). Our own loop
        rather than Grid.send_and_receive: that returns only when every reply is in, all at once
        (the coordinator would hold K replies; a deployment's grid pulls every 3 s)."""
        waiting = {i for i in self.grid.push_messages(messages) if i}   # "": refused by the SuperLink
        deadline = time.monotonic() + self.cfg.federation.round_timeout
        pause = PULL_FIRST
        while waiting and time.monotonic() < deadline:
            replies = list(self.grid.pull_messages(waiting))
            for reply in replies:
                waiting.discard(reply.metadata.reply_to_message_id)
            pause = PULL_FIRST if replies else min(pause * 2, PULL_MOST)
            while replies:
                yield replies.pop(0)   # dropped here: the caller keeps what it folds, not the message
            if waiting:   # the Grid offers no blocking wait: poll, backing off while nothing comes
                time.sleep(min(pause, max(0.0, deadline - time.monotonic())))

    def train_round(self, rnd: int, weights: Weights, clients: list[int],
                    terms: ClientTerms, receive: Receive) -> RoundReplies:
        nodes, missing = self._targets(clients)
        content = train_content(rnd, weights, self.cfg, terms)
        messages = [Message(content, dst_node_id=node, message_type=MessageType.TRAIN,
                            group_id=str(rnd + 1)) for node in nodes]
        out = RoundReplies(sent=len(messages) + len(missing), timed_out=len(messages))
        for k in missing:
            out.failed[f"client {k}"] = f"client {k}: no connected node holds partition {k}"
        for reply in self.exchange(messages):
            out.timed_out -= 1
            node = f"node {reply.metadata.src_node_id}"
            if reply.has_error():
                out.failed[node] = f"{node}: {reply.error.reason}"
                continue
            try:
                update = read_reply(reply)
            except ProtocolError as exc:
                out.rejected[node] = str(exc)
                continue
            receive(update)
        return out


@dataclass
class ServerSettings:
    """Everything the ServerApp needs besides the grid."""

    cfg: ExperimentConfig
    run_dir: Path | None
    resume: bool = False
    progress: bool = False
    lock: bool = True   # False: the launcher (bpfree simulate) holds the run directory's lock
    overwrite: bool = False   # replace a run already in the run directory


def run_server(grid: Grid, settings: ServerSettings) -> dict[str, Any]:
    """The coordinator's whole run; returns the summary (with final "weights")."""
    coordinator = Coordinator(settings.cfg, settings.run_dir, resume=settings.resume,
                              progress=settings.progress, lock=settings.lock,
                              overwrite=settings.overwrite)
    coordinator.release_training_data()   # the ClientApps train, in their own processes
    return coordinator.run(FlowerTransport(grid, settings.cfg))


def config_from_run_config(run_config: dict[str, Any]) -> ExperimentConfig:
    """The experiment config named by run_config key `config-json` (a resolved config, as
    `bpfree simulate` writes it), else keys `config-toml` and `overrides`."""
    resolved = str(run_config.get("config-json", "") or "")
    if resolved:
        try:
            return ExperimentConfig.from_dict(json.loads(Path(resolved).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"run_config config-json = {resolved!r} is not a readable JSON "
                              f"config ({exc})") from exc
    path = str(run_config.get("config-toml", "") or "")
    if path and not Path(path).is_absolute():
        path = str(APP_DIR / path)   # as `flwr run` resolves it: the app's folder
    overrides = [o.strip() for o in str(run_config.get("overrides", "") or "").split(";") if o.strip()]
    return load_config(path or None, overrides)


def run_dir_from_context(context: Context) -> Path:
    out = str(context.run_config.get("out-dir", "") or "")
    if out:
        return Path(out)
    base = os.environ.get("BPFREE_RUNS_DIR") or "runs"
    return Path(base) / f"flwr-{context.run_id}"


app = ServerApp()


def _log_through_flower() -> None:
    """Under `flwr run` only Flower's logger reaches `--stream`: route ours through its handlers."""
    handlers = logging.getLogger("flwr").handlers
    for name in ("bpfree", "bpfree_core"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        for handler in handlers:
            if handler not in logger.handlers:
                logger.addHandler(handler)
        logger.propagate = False


@app.main()
def main(grid: Grid, context: Context) -> None:
    """`flwr run .`: config from run_config, run directory from out-dir (see module doc)."""
    _log_through_flower()
    cfg = config_from_run_config(dict(context.run_config))
    run_dir = run_dir_from_context(context)
    if not cfg.pipeline.session:   # every client's pipelines, every round, drive as one run: the
        # run directory's (a resumed run is the same run to the workers it left behind)
        digest = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
        cfg = cfg.with_overrides([f"pipeline.session=run-{digest}"])
    log.info("bpfree coordinator: %d clients x %d stages, %d rounds, run dir %s",
             cfg.federation.clients, cfg.pipeline.stages, cfg.federation.rounds, run_dir.resolve())
    summary = run_server(grid, ServerSettings(
        cfg, run_dir, resume=bool(context.run_config.get("resume", False)),
        lock=not bool(context.run_config.get("run-dir-locked", False)),
        overwrite=bool(context.run_config.get("overwrite", False))))
    log.info("bpfree coordinator done: test accuracy %.4f after %d rounds (%.1fs)",
             summary["test_accuracy"], summary["rounds"], summary["wall_seconds"])
