"""The epoch loop every job runs, and the single-process reference trainer built on it.

`train_packets` (bpfree_core.data.batches) yields an epoch's first-layer packets; `run_epoch` feeds them
through any Executor (bpfree_core.run.executor); `train_epochs` adds evaluation
(bpfree_core.evaluation), the run directory (bpfree_core.run.rundir) and reruns around it
for `bpfree train` (in process: `train_reference`, the golden reference) and `bpfree pipeline`
(stage workers). Every random draw is a pure function of (seed, epoch, batch index), and layer i is
initialised from its own seed, so a pipeline fed the same packets reproduces the reference exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from bpfree_core.config import ExperimentConfig
from bpfree_core.data.batches import num_train_batches, train_packets
from bpfree_core.data.datasets import Split, bind_data
from bpfree_core.data.splits import limited, run_splits
from bpfree_core.diagnostics import format_table, layer_diagnostics
from bpfree_core.errors import ConfigError
from bpfree_core.evaluation import evaluate, headline, prediction_modes
from bpfree_core.layers import Packet
from bpfree_core.model import build_objective
from bpfree_core.objectives import Objective
from bpfree_core.run.callbacks import Callback
from bpfree_core.run.executor import Executor, InProcessExecutor
from bpfree_core.run.restarts import rerun_from
from bpfree_core.run.rundir import RunDir, check_resumable, open_run_dir
from bpfree_core.run.runlog import RunLog
from bpfree_core.runtime import progress_bar, resolve_device

log = logging.getLogger(__name__)

TRAIN_EVAL_SAMPLES = 10_000   # train accuracy is measured on this many training images
DIAGNOSTIC_SAMPLES = 1000     # held-out images each epoch's per-layer diagnostics score


def stuck_layers(layer_means: dict[str, dict[str, float]], lr: float) -> dict[str, str]:
    """{layer: sentence} for each goodness layer that separated nothing over an epoch.

    Deep layers can sit at chance for the first few hundred steps, so the trainer warns only
    about a layer stuck two epochs running: by then it is dead or blown up, and a dead ReLU
    layer gets no gradient from y^2, so it does not recover by itself.
    """
    out = {}
    for name, m in layer_means.items():
        if not {"g_pos", "g_neg", "ff_acc"} <= m.keys() or m["ff_acc"] > 0.51:
            continue
        gap = abs(m["g_pos"] - m["g_neg"]) / max(abs(m["g_pos"]), abs(m["g_neg"]), 1e-12)
        if gap < 1e-3:
            state = "its units are dead" if m["g_pos"] == 0 else "its goodness does not depend on the label"
            out[name] = (f"layer {name} separated nothing for two epochs (mean G+ = "
                         f"{m['g_pos']:.4g}, G- = {m['g_neg']:.4g}, pos/neg accuracy "
                         f"{m['ff_acc']:.0%}): {state}; restart with a lower optim.lr (now "
                         f"{lr:g}; 2000-wide FF layers need <= 5e-4)")
    return out


# -- the epoch loop --------------------------------------------------------------------------------
def run_epoch(executor: Executor, objective: Objective, split: Split, cfg: ExperimentConfig,
              epoch: int, total_epochs: int, progress: bool = False,
              replay: Callable[[int, torch.Generator], Split] | None = None) -> dict[str, Any]:
    """One training epoch of `split` (+ `replay` samples, see train_packets) through `executor`:
    the step every job's epochs run."""
    packets: Iterator[Packet] = train_packets(objective, split, cfg, epoch, replay)
    if progress:  # a live bar on a terminal (tqdm stays silent elsewhere)
        packets = iter(progress_bar(packets, total=num_train_batches(split, cfg), leave=False,
                                    unit="batch", desc=f"epoch {epoch + 1}/{total_epochs}"))
    return executor.train_epoch(packets, epoch, total_epochs)


def train_epochs(cfg: ExperimentConfig, executor: Executor, run_dir: Path | None = None,
                 resume: bool = False, progress: bool = True,
                 overwrite: bool = False, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Train cfg.train.epochs epochs through `executor`, evaluating after each: `bpfree train`
    (in process) and `bpfree pipeline` (stage workers) both run this loop.

    RUN_DIR (bpfree_core.run.rundir: locked while this runs; a finished run in it is refused unless
    `overwrite`) gets config.json, and per epoch checkpoint.pt then a metrics.jsonl line, and
    summary.json at the end (bpfree_core.run.runlog); `resume` continues from
    the checkpoint. An executor that can `recover()` (a pipeline) survives a stage failure: the
    stages are recovered, the epoch's starting snapshot restored and the epoch rerun (at most
    pipeline.restarts times), ending exactly as an undisturbed epoch would. Each callback gets
    every epoch's metrics record once it is committed; one that returns something truthy stops
    the run after that epoch (bpfree.EarlyStopping).
    """
    cfg = bind_data(cfg)   # your own data: its shape, classes and fingerprint in the config
    train_split, val_split, test_split = run_splits(cfg)
    objective = build_objective(cfg)
    prediction_modes(objective, cfg)   # a bad train.predict fails before any training
    with open_run_dir(run_dir, resume=resume, overwrite=overwrite) as rd:
        return _train_loop(cfg, executor, objective, (train_split, val_split, test_split), rd,
                           progress, callbacks)


def _resume_state(rd: RunDir, cfg: ExperimentConfig, executor: Executor) -> tuple[int, Any]:
    """(first epoch, its starting snapshot) of a resumed run; metrics cut back to the checkpoint."""
    if not (rd.path / "checkpoint.pt").exists():
        rd.rewind_metrics("epoch", 0, None)
        return 0, None
    state = rd.load("checkpoint.pt")
    check_resumable(ExperimentConfig.from_dict(state["config"]), cfg, rd.path)
    snapshot = {"weights": state["weights"], "optimizer": state["optimizer"]}
    executor.restore(snapshot)
    rd.rewind_metrics("epoch", state["epoch"] + 1, state.get("record"))
    return state["epoch"] + 1, snapshot


def _train_loop(cfg: ExperimentConfig, executor: Executor, objective: Objective,
                splits: tuple[Split, Split, Split], rd: RunDir | None,
                progress: bool, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    train_split, val_split, test_split = splits
    held_out = val_split if len(val_split) else test_split   # what diagnostics score
    rerun = executor.recovers
    first_epoch, snapshot = 0, None
    best = BestEpoch(cfg, rd)
    if rd is not None and rd.resume:
        first_epoch, snapshot = _resume_state(rd, cfg, executor)
        best.resume()
    runlog = RunLog(cfg, rd, callbacks)
    acc: dict[str, float] = {}
    val: dict[str, float] = {}
    diagnostics: dict[str, dict[str, float]] = {}
    stuck_before: dict[str, str] = {}
    total = cfg.train.epochs
    trained, stopped = first_epoch, False
    for epoch in range(first_epoch, total):
        if rerun and snapshot is None:
            snapshot = executor.snapshot()   # the epoch's start
        stats, reruns = _epoch_with_reruns(executor, snapshot if rerun else None, objective,
                                           train_split, cfg, epoch, total, progress)
        # cheap per-epoch scores on eval_limit images; the last epoch scores the whole test set
        part = cfg.train.eval_limit if epoch + 1 < total else 0
        test_part = limited(test_split, part)
        acc = evaluate(executor.eval_forward, objective, test_part, cfg)
        train_acc = evaluate(executor.eval_forward, objective,
                             limited(train_split, min(part or TRAIN_EVAL_SAMPLES, TRAIN_EVAL_SAMPLES)),
                             cfg)
        stuck = stuck_layers(stats["layers"], cfg.optim.lr)
        warnings = [msg for name, msg in stuck.items() if name in stuck_before]
        stuck_before = stuck
        for w in warnings:
            log.warning("%s", w)
        record = {"epoch": epoch + 1, "layers": stats["layers"], "test_accuracy": acc,
                  "test_images": len(test_part),
                  "warnings": warnings, "train_accuracy": train_acc, "reruns": reruns,
                  "epoch_seconds": stats["seconds"],
                  "elapsed_seconds": runlog.elapsed(),   # since the command started
                  "samples_per_second": stats["samples_per_second"]}
        if "stages" in stats:   # per-batch timelines stay out of the JSONL (bench sweep plots them)
            record["stages"] = [{k: v for k, v in s.items() if k != "timeline"}
                                for s in stats["stages"]]
        if len(val_split):
            val = record["val_accuracy"] = evaluate(executor.eval_forward, objective, val_split,
                                                    cfg)
        # which layer learns what, on held-out images (validation if there is one)
        every = cfg.train.diagnostics_every
        if epoch + 1 == total or (every and (epoch + 1) % every == 0):
            diagnostics = record["layer_diagnostics"] = layer_diagnostics(
                executor.get_weights(), cfg, objective, held_out, DIAGNOSTIC_SAMPLES,
                resolve_device(cfg.train.device))
        _say(_epoch_line(record, stats, total, bool(len(val_split))), progress)
        # The state after this epoch: the checkpoint, and the next epoch's starting point.
        keep = rd is not None or rerun or best.on
        snapshot = executor.snapshot() if keep else None
        asked = runlog.commit(epoch + 1, record, ("checkpoint.pt", {
            "epoch": epoch, "config": cfg.to_dict(), **snapshot}) if snapshot is not None else None)
        trained = epoch + 1
        if best.update(record, snapshot):
            stopped = epoch + 1 < total
            _say(f"no better validation accuracy for {cfg.train.patience} epochs: stopping after "
                 f"epoch {epoch + 1}/{total}, keeping epoch {best.epoch}", progress)
            break
        if asked:
            stopped = epoch + 1 < total
            if stopped:
                _say(f"stopped by a callback after epoch {epoch + 1}/{total}", progress)
            break
    if best.restore(executor, trained):   # the best epoch's weights, scored again
        acc = evaluate(executor.eval_forward, objective, test_split, cfg)
        val = evaluate(executor.eval_forward, objective, val_split, cfg)
    weights = executor.get_weights()
    if stopped and cfg.train.eval_limit:   # the last epoch scored a subset: score the whole set
        acc = evaluate(executor.eval_forward, objective, test_split, cfg)
    if not acc:  # resumed a finished run: evaluate what was loaded
        acc = evaluate(executor.eval_forward, objective, test_split, cfg)
        if len(val_split):
            val = evaluate(executor.eval_forward, objective, val_split, cfg)
        diagnostics = layer_diagnostics(weights, cfg, objective, held_out, DIAGNOSTIC_SAMPLES)
    summary = {"test_accuracy": headline(acc, cfg), "test_accuracy_by_method": acc,
               **({"val_accuracy": headline(val, cfg), "val_accuracy_by_method": val} if val else {}),
               "epochs": cfg.train.epochs, "epochs_trained": trained, "stopped_early": stopped,
               **executor.describe(), **best.describe(), "layer_diagnostics": diagnostics}
    if progress:
        tqdm.write("per layer, on " + ("validation" if len(val_split) else "test")
                   + " samples:\n" + format_table(diagnostics))
    return runlog.finish(summary, weights)


class BestEpoch:
    """train.patience: the epoch with the best validation accuracy (its state kept in memory and,
    with a run directory, in best.pt so that a resumed run ends as an uninterrupted one), and
    whether `patience` epochs have passed without a better one."""

    def __init__(self, cfg: ExperimentConfig, rd: RunDir | None):
        self.cfg, self.rd, self.on = cfg, rd, cfg.train.patience > 0
        self.epoch, self.score, self.state = 0, -1.0, None

    def resume(self) -> None:
        if self.on and self.rd is not None and (self.rd.path / "best.pt").exists():
            saved = self.rd.load("best.pt")
            self.epoch, self.score, self.state = saved["epoch"], saved["score"], saved["state"]

    def update(self, record: dict[str, Any], state: dict[str, Any] | None) -> bool:
        """Note this epoch; True when the run should stop."""
        if not self.on:
            return False
        if "val_accuracy" not in record:
            raise ConfigError("train.patience watches the validation accuracy: hold out a "
                              "validation split (train.validation = N) or set train.patience = 0")
        score = headline(record["val_accuracy"], self.cfg)
        if score > self.score:
            self.epoch, self.score, self.state = record["epoch"], score, state
            if self.rd is not None:
                self.rd.save("best.pt", {"epoch": self.epoch, "score": score, "state": state})
        return record["epoch"] - self.epoch >= self.cfg.train.patience

    def restore(self, executor: Executor, trained: int) -> bool:
        """Back to the best epoch's state if a later epoch ended the run; True if it did."""
        if not self.on or self.state is None or self.epoch == trained:
            return False
        executor.restore(self.state)
        return True

    def describe(self) -> dict[str, Any]:
        return {"best_epoch": self.epoch, "patience": self.cfg.train.patience} if self.on else {}


def _epoch_line(record: dict[str, Any], stats: dict[str, Any], total: int, has_val: bool) -> str:
    line = (f"epoch {record['epoch']}/{total}  test {_fmt(record['test_accuracy'])}  "
            f"train {_fmt(record['train_accuracy'])}  "
            + (f"val {_fmt(record['val_accuracy'])}  " if has_val else "")
            + f"{stats['seconds']:.1f}s  {stats['samples_per_second']:.0f} samples/s")
    if "stages" in stats:
        line += "  busy " + " ".join(f"{s['busy_seconds']:.1f}s" for s in stats["stages"])
    return line


def _say(line: str, progress: bool) -> None:
    if progress:
        tqdm.write(line)
    else:
        log.info("%s", line)


def _epoch_with_reruns(executor: Executor, start: dict[str, Any] | None, objective: Objective,
                       split: Split, cfg: ExperimentConfig, epoch: int, total: int,
                       progress: bool) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """run_epoch; after a stage failure (executors that recover), rerun it from `start`."""
    def run() -> dict[str, Any]:
        return run_epoch(executor, objective, split, cfg, epoch, total, progress)

    if start is None:
        return run(), []
    return rerun_from(executor, start, cfg.pipeline.restarts, run, f"epoch {epoch + 1}")


def train_reference(
    cfg: ExperimentConfig,
    run_dir: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    overwrite: bool = False,
    callbacks: Sequence[Callback] = (),
) -> dict[str, Any]:
    """Train the whole stack in this process; write metrics, checkpoint and summary to run_dir."""
    with InProcessExecutor(cfg, resolve_device(cfg.train.device)) as executor:
        return train_epochs(cfg, executor, run_dir, resume, progress, overwrite, callbacks)


def _fmt(acc: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in sorted(acc.items()))
