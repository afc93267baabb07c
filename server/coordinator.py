"""The federated round loop, independent of how replies arrive (Flower today, Ray later).

Each round: draw the clients that train (all K, or federation.fraction_train of them:
bpfree_core.federation.client.sampled_clients), send them the global weights (through a `RoundTransport`),
fold each reply that validates into federation.strategy's running aggregate as it arrives
(bpfree_core.federation.strategies: FedAvg, FedAdam, FedMedian, Krum, ...;
bpfree_core.federation.round_fold: no reply is held once folded, for the strategies that only
need the mean), evaluate the global
model on the test set in this process, append a metrics line, write a checkpoint. A round needs
at least `federation.min_clients` accepted replies (0 = every sampled client); clients that fail,
time out or send a malformed reply are left out of that round, counted and logged.

Run directory: config.json (resolved config), metrics.jsonl (one line per round),
checkpoints/round-NNNN.pt (global weights after round N), summary.json (at the end).
A resumed run continues after the last checkpoint; optimiser state is reset every round and all
randomness is a function of (seed, epoch, batch), so the weights after a checkpointed round are
the whole state and a killed-and-resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bpfree_core.config import ExperimentConfig, train_sample_size
from bpfree_core.continual.stream import TaskEvaluator, rounds_per_task
from bpfree_core.data.datasets import Split, bind_data, release_datasets
from bpfree_core.data.splits import limited, run_splits
from bpfree_core.diagnostics import layer_diagnostics
from bpfree_core.errors import AggregationError, DataError, ProtocolError
from bpfree_core.evaluation import evaluate_weights, headline
from bpfree_core.federation.aggregate import ClientUpdate, Weights, validate_update
from bpfree_core.federation.client import sampled_clients, stack_template
from bpfree_core.federation.client_evaluation import sampled_evaluators, summarize
from bpfree_core.federation.round_fold import RoundFold
from bpfree_core.federation.strategies import ClientTerms, build_strategy
from bpfree_core.model import build_objective
from bpfree_core.run.callbacks import Callback
from bpfree_core.run.checkpoint import load_checkpoint
from bpfree_core.run.rundir import STOP, RunDir, check_resumable
from bpfree_core.run.runlog import RunLog
from bpfree_core.runtime import progress_bar, rss_mb, set_threads

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"


@dataclass
class RoundReplies:
    """What else happened in a round (each readable reply went to `receive` as it arrived)."""

    failed: dict[str, str] = field(default_factory=dict)     # node -> reason (errors)
    rejected: dict[str, str] = field(default_factory=dict)   # node -> reason (unreadable replies)
    timed_out: int = 0                                       # sent but no reply in time
    sent: int = 0


Receive = Callable[[ClientUpdate], None]


def weights_bytes(weights: Weights) -> int:
    """The bytes of `weights`' tensors (what one copy of the model moves)."""
    return sum(t.numel() * t.element_size() for t in weights.values())


class RoundTransport(Protocol):
    """Delivers the global weights to `clients` (partition ids) for round `rnd` and hands each
    update to `receive` as it arrives (in this thread; the transport then drops it)."""

    def train_round(self, rnd: int, weights: Weights, clients: list[int],
                    terms: ClientTerms, receive: Receive) -> RoundReplies: ...

    # Transports that run federated evaluation (federation.fraction_evaluate > 0) also have
    # evaluate_round(rnd, weights, clients) -> list[ClientEvaluation].


class ReplyIntake:
    """A round's replies as they arrive: each is checked, folded into the strategy's running
    aggregate and then remembered only by its example count and metrics."""

    def __init__(self, fold: RoundFold, template: Weights, clients: int, sampled: set[int]):
        self.fold, self.template, self.clients, self.sampled = fold, template, clients, sampled
        self.accepted: dict[int, dict[str, float]] = {}   # partition -> num_examples and metrics
        self.rejected: dict[str, str] = {}
        self.received_bytes = 0
        self.seconds = 0.0   # spent checking and folding, inside the transport's wait

    def __call__(self, update: ClientUpdate) -> None:
        t0 = time.perf_counter()
        try:
            validate_update(update, self.template)
            if not 0 <= update.client < self.clients:
                raise ProtocolError(f"reply names partition {update.client}, outside 0.."
                                    f"{self.clients - 1}")
            if update.client not in self.sampled:
                raise ProtocolError(f"a reply for partition {update.client}, which was not "
                                    "sampled to train this round")
            if update.client in self.accepted:
                raise ProtocolError(f"a second reply for partition {update.client}")
        except ProtocolError as exc:
            self.rejected[f"client {update.client}"] = str(exc)
        else:
            self.accepted[update.client] = {"num_examples": update.num_examples, **update.metrics}
            self.received_bytes += weights_bytes(update.weights)
            self.fold.add(update)
        self.seconds += time.perf_counter() - t0


def required_replies(cfg: ExperimentConfig) -> int:
    """Accepted replies a round needs: federation.min_clients, or every sampled client."""
    fed = cfg.federation
    return fed.min_clients or train_sample_size(fed.clients, fed.fraction_train, fed.min_train_clients)


class Coordinator:
    """Owns the global weights, the run directory and the round loop."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path | None = None, resume: bool = False,
                 progress: bool = False, evaluate: bool = True,
                 on_round: Callable[[int, Weights], None] | None = None,
                 overwrite: bool = False, lock: bool = True,
                 callbacks: Sequence[Callback] = ()):
        """`evaluate = False` skips the per-round test evaluation (the in-process reference's
        callers only want weights); `on_round(round, new weights)` runs after each round's
        aggregation. RUN_DIR is a bpfree_core.run.rundir.RunDir (`overwrite`, `lock`:
        see there), held until `run` ends. Each callback gets every round's record once it is
        committed; a truthy answer, or a file RUN_DIR/STOP (what `bpfree simulate`'s callbacks
        leave: they run in the launcher), ends the run after that round."""
        cfg = bind_data(cfg)
        self.cfg = cfg
        self.stopped = False
        self.run_dir = run_dir
        self.progress = progress
        self.evaluate_rounds = evaluate
        self.on_round = on_round
        self.weights = stack_template(cfg)
        self.template = {k: v.clone() for k, v in self.weights.items()}
        fed = cfg.federation
        sampled = train_sample_size(fed.clients, fed.fraction_train, fed.min_train_clients)
        self.strategy = build_strategy(fed.strategy, fed.strategy_args, fed.dp, fed.dp_args,
                                       cfg.train.seed, sampled)
        self.first_round = 0
        self.history: list[dict[str, Any]] = []
        self.totals = {"accepted": 0, "failed": 0, "timed_out": 0, "rejected": 0}
        self.rd = RunDir(run_dir, resume=resume, overwrite=overwrite, lock=lock) if run_dir else None
        try:
            if self.rd is not None:
                (self.rd.path / STOP).unlink(missing_ok=True)   # a stop asked of an earlier run
                if resume:
                    self._resume(self.rd)
            self.runlog = RunLog(cfg, self.rd, callbacks)
        except BaseException:
            self.close()
            raise
        objective = build_objective(cfg)
        self.objective = objective
        _, self.val, self.test = run_splits(cfg)
        # A federated task stream: every task's accuracy after each task's last round.
        self.tasks = TaskEvaluator(cfg) if cfg.continual.federated else None
        self.before_tasks = self.tasks.row(self.template) if self.tasks else {}

    # -- resume -----------------------------------------------------------------------------------
    def _resume(self, rd: RunDir) -> None:
        latest = latest_checkpoint(rd.path)
        if latest is None:
            log.info("no checkpoint in %s: starting from round 1", rd.path)
            self.history = rd.rewind_metrics("round", 0, None)
            return
        state = load_round_checkpoint(latest)
        check_resumable(ExperimentConfig.from_dict(state["config"]), self.cfg, rd.path)
        self.weights = state["weights"]
        self.first_round = int(state["round"])
        self.totals = dict(state.get("totals", self.totals))
        self.strategy.load_state_dict(dict(state.get("strategy", {})))   # server momentum, moments
        # Metric lines of rounds after the checkpoint belong to work that was lost: drop them.
        self.history = rd.rewind_metrics("round", self.first_round, state.get("record"))
        log.info("resuming %s after round %d", rd.path, self.first_round)

    # -- the loop -------------------------------------------------------------------------------
    def run(self, transport: RoundTransport, rounds: int | None = None) -> dict[str, Any]:
        """Run the remaining rounds (up to `rounds`, default federation.rounds; the schedule
        always spans federation.rounds); return the summary (with the final "weights")."""
        cfg = self.cfg
        set_threads(cfg.train.threads)
        rounds = cfg.federation.rounds if rounds is None else rounds
        bar = progress_bar(total=rounds, initial=self.first_round, desc="rounds", unit="round",
                           enabled=self.progress, leave=True)
        try:
            for rnd in range(self.first_round, rounds):
                record = self._round(transport, rnd)
                asked = self.runlog.commit(rnd + 1, record, (checkpoint_name(rnd + 1), {
                    "round": rnd + 1, "config": self.cfg.to_dict(), "weights": self.weights,
                    "totals": self.totals, "strategy": self.strategy.state_dict()}))
                self.history.append(record)
                bar.update(1)
                bar.set_postfix(acc=f"{record['test_accuracy_headline']:.4f}",
                                clients=f"{record['clients']['accepted']}/{record['clients']['sent']}")
                if asked and rnd + 1 < rounds:
                    log.info("stopped by a callback after round %d/%d", rnd + 1, rounds)
                    self.stopped = True
                    break
            return self._summary()
        finally:
            bar.close()
            self.close()

    def release_training_data(self) -> None:
        """Keep copies of the validation and test images only and forget this process's datasets:
        a coordinator whose clients train in their own processes (Flower) never reads the
        training images (~190 MB of float32 for MNIST)."""
        if self.tasks is None:   # a task stream's evaluator holds views of the test images
            self.val, self.test = self.val.copy(), self.test.copy()
            release_datasets()

    def close(self) -> None:
        """Release the run directory (its lock); `run` does this when it ends."""
        if self.rd is not None:
            self.rd.close()

    def client_terms(self, rnd: int) -> ClientTerms:
        """The strategy's client-side terms; federation.proximal_mu adds FedProx's to any strategy."""
        mu = self.cfg.federation.proximal_mu
        return {**({"proximal-mu": mu} if mu > 0 else {}), **self.strategy.client_terms(rnd)}

    def _round(self, transport: RoundTransport, rnd: int) -> dict[str, Any]:
        cfg = self.cfg
        t0 = time.perf_counter()
        clients = sampled_clients(cfg, rnd)
        intake = ReplyIntake(self.strategy.fold(rnd, self.weights, clients), self.template,
                             cfg.federation.clients, set(clients))
        replies = transport.train_round(rnd, self.weights, clients, self.client_terms(rnd), intake)
        t_clients = time.perf_counter() - t0 - intake.seconds

        t1 = time.perf_counter()
        rejected = {**replies.rejected, **intake.rejected}
        counts = {"sent": replies.sent, "accepted": len(intake.accepted), "failed": len(replies.failed),
                  "timed_out": replies.timed_out, "rejected": len(rejected)}
        self._log_left_out(rnd, replies, rejected)
        need = required_replies(cfg)
        if len(intake.accepted) < need:
            raise AggregationError(
                f"round {rnd + 1}: only {len(intake.accepted)} usable replies of {replies.sent} sent "
                f"({counts['failed']} failed, {counts['timed_out']} timed out, {counts['rejected']} "
                f"rejected) but {need} are needed (federation.min_clients = "
                f"{cfg.federation.min_clients}, 0 = all {len(clients)} sampled); the last "
                "checkpoint is kept: fix the clients and --resume")
        new = intake.fold.result()
        stats = intake.fold.stats(new)
        sent = weights_bytes(self.weights) * len(clients)
        self.weights = new
        t_aggregate = time.perf_counter() - t1 + intake.seconds
        for key in ("accepted", "failed", "timed_out", "rejected"):
            self.totals[key] += counts[key]

        if self.on_round is not None:
            self.on_round(rnd, new)
        t2 = time.perf_counter()
        extra = self._scores(transport, rnd, new)
        t_eval = time.perf_counter() - t2
        acc = extra.pop("test_accuracy")
        metrics = dict(sorted(intake.accepted.items()))
        return {**extra,
            "bytes": {"sent": sent, "received": intake.received_bytes},
            "rss_mb": rss_mb(),
            "round": rnd + 1,
            "test_accuracy": acc,
            "test_accuracy_headline": headline(acc, cfg) if acc else float("nan"),
            "clients": counts,
            "left_out": {**replies.failed, **rejected},   # who, and why (shown on the terminal)
            "sampled": clients,
            "layers": stats,
            "client_metrics": {str(k): m for k, m in metrics.items()},
            "seconds": {"clients": t_clients,
                        "slowest_client_training": max((m.get("train_seconds", 0.0)
                                                        for m in metrics.values()), default=0.0),
                        "aggregate": t_aggregate, "evaluate": t_eval},
        }

    def _log_left_out(self, rnd: int, replies: RoundReplies, rejected: dict[str, str]) -> None:
        for reason in replies.failed.values():
            log.warning("round %d: a client failed and is left out: %s", rnd + 1, reason)
        for reason in rejected.values():
            log.warning("round %d: reply rejected and left out: %s", rnd + 1, reason)
        if replies.timed_out:
            log.warning("round %d: %d client(s) did not reply within federation.round_timeout = "
                        "%ss", rnd + 1, replies.timed_out, self.cfg.federation.round_timeout)

    def _scores(self, transport: RoundTransport, rnd: int, new: Weights) -> dict[str, Any]:
        """The new weights' test accuracy (rounds before the last score eval_limit test images,
        the last the whole set), validation accuracy, the clients' own scores, the task stream."""
        cfg = self.cfg
        part = cfg.train.eval_limit if rnd + 1 < cfg.federation.rounds else 0
        out: dict[str, Any] = {"test_accuracy": self.evaluate(new, limited(self.test, part))
                               if self.evaluate_rounds else {}}
        if self.evaluate_rounds and len(self.val):
            out["val_accuracy"] = self.evaluate(new, self.val)
        evaluators = sampled_evaluators(cfg, rnd)
        if evaluators:   # the clients score the new weights on their own test data
            out["federated_evaluation"] = summarize(
                transport.evaluate_round(rnd, new, evaluators), cfg)   # type: ignore[attr-defined]
        if self.tasks is not None and (rnd + 1) % rounds_per_task(cfg) == 0:
            out["continual"] = {"task": (rnd + 1) // rounds_per_task(cfg), "accuracy": self.tasks.row(new)}
        return out

    def evaluate(self, weights: Weights, split: Split | None = None) -> dict[str, float]:
        """Accuracy of `weights` on `split` (default: the test set), evaluated in this process."""
        return evaluate_weights(weights, self.objective, self.test if split is None else split,
                                self.cfg)

    def _summary(self) -> dict[str, Any]:
        cfg = self.cfg
        acc = self.history[-1]["test_accuracy"] if self.history else {}
        if self.stopped and cfg.train.eval_limit and self.evaluate_rounds:   # scored a subset
            acc = self.evaluate(self.weights)
        acc = acc or (self.evaluate(self.weights) if self.evaluate_rounds else {})
        summary = {
            "test_accuracy": headline(acc, cfg) if acc else float("nan"),
            "test_accuracy_by_method": acc,
            **({"val_accuracy_by_method": self.history[-1]["val_accuracy"]}
               if self.history and "val_accuracy" in self.history[-1] else {}),
            "accuracy_per_round": [r["test_accuracy_headline"] for r in self.history],
            **({"federated_accuracy": self.history[-1]["federated_evaluation"]["accuracy"]}
               if self.history and "federated_evaluation" in self.history[-1] else {}),
            "rounds": len(self.history), "stopped_early": self.stopped,
            "clients": cfg.federation.clients,
            "stages": cfg.pipeline.stages, "executor": cfg.federation.executor,
            "partition": cfg.federation.partition, "strategy": cfg.federation.strategy,
            "dp": cfg.federation.dp,
            "replies": self.totals,
        }
        if self.evaluate_rounds:   # which layer of the global model learns what
            summary["layer_diagnostics"] = layer_diagnostics(
                self.weights, cfg, self.objective, self.val if len(self.val) else self.test)
        rows = [r["continual"]["accuracy"] for r in self.history if "continual" in r]
        if self.tasks is not None and rows:
            summary["continual"] = self.tasks.summary(rows, self.before_tasks, self.weights)
        return self.runlog.finish(summary, self.weights)


def checkpoint_name(rnd: int) -> str:
    """Round `rnd`'s checkpoint, relative to the run directory."""
    return f"{CHECKPOINTS}/round-{rnd:04d}.pt"


def checkpoint_path(run_dir: Path, rnd: int) -> Path:
    return run_dir / checkpoint_name(rnd)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / CHECKPOINTS).glob("round-*.pt"))
    return found[-1] if found else None


def load_round_checkpoint(path: Path) -> dict[str, Any]:
    """A round checkpoint; if it cannot be read, the error says which earlier round is intact
    and how to resume from it (nothing is skipped silently)."""
    try:
        return load_checkpoint(path)
    except DataError as exc:
        earlier = sorted(path.parent.glob("round-*.pt"))
        for older in reversed([p for p in earlier if p.name < path.name]):
            try:
                state = load_checkpoint(older)
            except DataError:
                continue
            raise DataError(f"{exc}. The checkpoint of round {state['round']} ({older.name}) is "
                            f"intact: move {path} out of {path.parent} and --resume again to "
                            f"continue after round {state['round']}") from None
        raise DataError(f"{exc}. No earlier round checkpoint is intact: start a new run") from None
