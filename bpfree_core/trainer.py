"""The epoch loop every job runs, and the single-process reference trainer built on it.

`train_packets` yields an epoch's first-layer packets; `run_epoch` feeds them through any
Executor (bpfree_core.executor); `train_epochs` adds evaluation, metrics and checkpoints around it
for `bpfree train` (in process: `train_reference`, the golden reference) and `bpfree pipeline`
(stage workers). Every random draw is a pure function of (seed, epoch, batch index), and layer i is
initialised from its own seed, so a pipeline fed the same packets reproduces the reference exactly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from bpfree_core.config import ExperimentConfig
from bpfree_core.data import Split, bind_data, epoch_batches, load_dataset
from bpfree_core.diagnostics import format_table, layer_diagnostics
from bpfree_core.errors import ConfigError
from bpfree_core.executor import Executor, InProcessExecutor
from bpfree_core.layers import Packet
from bpfree_core.model import Stage, build_layers, build_objective
from bpfree_core.objectives import Objective
from bpfree_core.restarts import with_restarts
from bpfree_core.rundir import RunDir, open_run_dir
from bpfree_core.runtime import progress_bar, resolve_device
from bpfree_core.seeds import generator

log = logging.getLogger(__name__)

EVAL_BATCH = 1000
TRAIN_EVAL_SAMPLES = 10_000   # train accuracy is measured on this many training images
DIAGNOSTIC_SAMPLES = 1000     # held-out images each epoch's per-layer diagnostics score


def batch_generator(seed: int, epoch: int, batch: int) -> torch.Generator:
    """The generator for every random draw of one batch (negatives, noise)."""
    return generator(seed, "batch", epoch, batch)


def train_packets(
    objective: Objective, split: Split, cfg: ExperimentConfig, epoch: int,
    replay: Callable[[int, torch.Generator], Split] | None = None,
) -> Iterator[Packet]:
    """The first-layer packets of one training epoch, in order. `replay(n, gen)` (continual
    learning's memory) appends n old samples to each batch of n, drawn from the batch's generator."""
    for b, idx in enumerate(epoch_batches(len(split), cfg.train.batch_size, cfg.train.seed, epoch)):
        gen = batch_generator(cfg.train.seed, epoch, b)
        x, y = split.images[idx], split.labels[idx]
        if replay is not None:
            old = replay(len(idx), gen)
            x, y = torch.cat([x, old.images]), torch.cat([y, old.labels])
        if cfg.train.jitter:
            x = jitter(x, objective.spec.shape, cfg.train.jitter, gen)
        yield objective.encode_train(x, y, gen)


def jitter(x: torch.Tensor, shape: tuple[int, int, int], pixels: int,
           gen: torch.Generator) -> torch.Tensor:
    """Shift every image by its own random (dy, dx) in [-pixels, pixels], zero fill.

    x (B, C*H*W) -> (B, C*H*W). Drawn from the batch's generator, so every process agrees.
    """
    c, h, w = shape
    b = x.shape[0]
    padded = torch.nn.functional.pad(x.view(b, c, h, w), (pixels,) * 4)  # (B, C, H+2p, W+2p)
    dy, dx = torch.randint(0, 2 * pixels + 1, (2, b), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]              # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]              # (B, 1, 1, W)
    out = padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None],
                 rows, cols]                                               # (B, C, H, W)
    return out.reshape(b, c * h * w)


def num_train_batches(split: Split, cfg: ExperimentConfig) -> int:
    return len(split) // cfg.train.batch_size


def prediction_modes(objective: Objective, cfg: ExperimentConfig) -> tuple[bool, bool]:
    """(softmax, goodness) prediction switches for this objective and config."""
    mode = cfg.train.predict
    if mode in ("goodness", "both") and not objective.supports_goodness:
        raise ConfigError(
            f"train.predict = {mode!r} but {objective.name} has no goodness; use softmax"
        )
    return mode in ("softmax", "both"), mode in ("goodness", "both")


def evaluate(
    forward: Callable[[Packet], Packet], objective: Objective, split: Split, cfg: ExperimentConfig
) -> dict[str, float]:
    """Accuracy of every prediction method on `split`, running packets through `forward`."""
    _, goodness = prediction_modes(objective, cfg)
    correct: dict[str, int] = {}
    for start in range(0, len(split), EVAL_BATCH):
        x = split.images[start:start + EVAL_BATCH]
        y = split.labels[start:start + EVAL_BATCH]
        out = forward(objective.encode_eval(x, goodness))
        for method, pred in objective.predict(out).items():
            correct[method] = correct.get(method, 0) + int((pred.cpu() == y).sum())
    return {m: c / len(split) for m, c in correct.items()}


def evaluate_weights(
    weights: dict[str, torch.Tensor], objective: Objective, split: Split, cfg: ExperimentConfig
) -> dict[str, float]:
    """Accuracy of a whole stack's weights (say, a federated global model) on `split`."""
    stage = Stage(build_layers(cfg, objective=objective), cfg.train.device)
    stage.load_state_dict(weights)
    return evaluate(stage.eval_step, objective, split, cfg)


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


def headline(acc: dict[str, float], cfg: ExperimentConfig) -> float:
    """The accuracy a run reports: the configured method, the better of both with `both`."""
    if cfg.train.predict == "both":
        return max(acc.values())
    return acc.get(cfg.train.predict, max(acc.values(), default=0.0))


def limited(split: Split, limit: int) -> Split:
    return split.subset(slice(0, limit)) if limit else split


def run_splits(cfg: ExperimentConfig) -> tuple[Split, Split, Split]:
    """(train, validation, test) of a run: train.train_limit first, then the last
    train.validation images of that are held out (never trained on); train.test_limit on test."""
    data = load_dataset(cfg.model.dataset, cfg.train.data_dir or None, cfg.model.data_fingerprint)
    train = limited(data.train, cfg.train.train_limit)
    if cfg.train.batch_size > len(train):
        raise ConfigError(f"train.batch_size = {cfg.train.batch_size} is larger than the "
                          f"{len(train)} training images; give a batch size of at most {len(train)}")
    n = len(train) - cfg.train.validation
    if n < cfg.train.batch_size:
        raise ConfigError(f"train.validation = {cfg.train.validation} leaves {max(n, 0)} of "
                          f"{len(train)} training images, fewer than one batch; hold out fewer")
    val = train.subset(slice(n, len(train)))
    if not cfg.train.validation and data.val is not None:   # the source's own validation split
        val = data.val
    return train.subset(slice(0, n)), val, limited(data.test, cfg.train.test_limit)


def check_resumable(saved: ExperimentConfig, cfg: ExperimentConfig, run_dir: Path) -> None:
    """Refuse to resume a run whose computed config changed (runtime fields may change)."""
    old, new = saved.computed_dict(), cfg.computed_dict()
    diff = [f"{s}.{k}" for s in old for k in old[s] if old[s][k] != new[s][k]]
    if "model.data_fingerprint" in diff:
        raise ConfigError(
            f"cannot resume {run_dir}: the data of model.dataset = {cfg.model.dataset!r} changed "
            f"since the run started (fingerprint {new['model']['data_fingerprint']}, the run's is "
            f"{old['model']['data_fingerprint']}); restore the original files or start a new --out")
    if diff:
        raise ConfigError(
            f"cannot resume {run_dir}: the config differs from the checkpoint's in "
            f"{', '.join(diff)}; resume with the same config (or start a new --out)")


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


Callback = Callable[[dict[str, Any]], object]   # called with each epoch's record; truthy: stop


def train_epochs(cfg: ExperimentConfig, executor: Executor, run_dir: Path | None = None,
                 resume: bool = False, progress: bool = True,
                 overwrite: bool = False, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Train cfg.train.epochs epochs through `executor`, evaluating after each: `bpfree train`
    (in process) and `bpfree pipeline` (stage workers) both run this loop.

    RUN_DIR (bpfree_core.rundir: locked while this runs; a finished run in it is refused unless
    `overwrite`) gets config.json, and per epoch checkpoint.pt (when the executor can `snapshot()`
    its state) then a metrics.jsonl line, and summary.json at the end; `resume` continues from
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
    executor.restore(snapshot)  # type: ignore[attr-defined]
    rd.rewind_metrics("epoch", state["epoch"] + 1, state.get("record"))
    return state["epoch"] + 1, snapshot


def _train_loop(cfg: ExperimentConfig, executor: Executor, objective: Objective,
                splits: tuple[Split, Split, Split], rd: RunDir | None,
                progress: bool, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    train_split, val_split, test_split = splits
    held_out = val_split if len(val_split) else test_split   # what diagnostics score
    resumable = hasattr(executor, "snapshot")
    rerun = resumable and hasattr(executor, "recover")
    first_epoch, snapshot = 0, None
    if rd is not None:
        if rd.resume and resumable:
            first_epoch, snapshot = _resume_state(rd, cfg, executor)
        rd.write_config(cfg)   # no token on disk
    start = time.perf_counter()
    acc: dict[str, float] = {}
    val: dict[str, float] = {}
    diagnostics: dict[str, dict[str, float]] = {}
    stuck_before: dict[str, str] = {}
    total = cfg.train.epochs
    trained, stopped = first_epoch, False
    for epoch in range(first_epoch, total):
        if rerun and snapshot is None:
            snapshot = executor.snapshot()  # type: ignore[attr-defined]   # the epoch's start
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
                  "elapsed_seconds": time.perf_counter() - start,   # since the loop began
                  "samples_per_second": stats["samples_per_second"]}
        if "stages" in stats:   # per-batch timelines stay out of the JSONL (bench sweep plots them)
            record["stages"] = [{k: v for k, v in s.items() if k != "timeline"}
                                for s in stats["stages"]]
        if len(val_split):
            val = record["val_accuracy"] = evaluate(executor.eval_forward, objective, val_split,
                                                    cfg)
        # which layer learns what, on held-out images (validation if there is one)
        diagnostics = record["layer_diagnostics"] = layer_diagnostics(
            executor.get_weights(), cfg, objective, held_out, DIAGNOSTIC_SAMPLES)
        _say(_epoch_line(record, stats, total, bool(len(val_split))), progress)
        # The state after this epoch: the checkpoint, and the next epoch's starting point.
        keep = resumable and (rd is not None or rerun)
        snapshot = executor.snapshot() if keep else None  # type: ignore[attr-defined]
        if rd is not None and snapshot is not None:   # one commit: checkpoint, then metrics
            rd.commit("checkpoint.pt", {"epoch": epoch, "config": cfg.to_dict(), **snapshot},
                      record, step=epoch + 1)
        elif rd is not None:
            rd.log_metrics(record, step=epoch + 1)
        trained = epoch + 1
        if any([bool(cb(record)) for cb in callbacks]):   # every callback sees every record
            stopped = epoch + 1 < total
            if stopped:
                _say(f"stopped by a callback after epoch {epoch + 1}/{total}", progress)
            break
    weights = executor.get_weights()
    if stopped and cfg.train.eval_limit:   # the last epoch scored a subset: score the whole set
        acc = evaluate(executor.eval_forward, objective, test_split, cfg)
    if not acc:  # resumed a finished run: evaluate what was loaded
        acc = evaluate(executor.eval_forward, objective, test_split, cfg)
        if len(val_split):
            val = evaluate(executor.eval_forward, objective, val_split, cfg)
        diagnostics = layer_diagnostics(weights, cfg, objective, held_out, DIAGNOSTIC_SAMPLES)
    summary = {"algorithm": cfg.model.algorithm, "dataset": cfg.model.dataset,
               "test_accuracy": headline(acc, cfg), "test_accuracy_by_method": acc,
               **({"val_accuracy": headline(val, cfg), "val_accuracy_by_method": val} if val else {}),
               "epochs": cfg.train.epochs, "epochs_trained": trained, "stopped_early": stopped,
               "fingerprint": cfg.fingerprint(), **executor.describe(),
               "layer_diagnostics": diagnostics, "wall_seconds": time.perf_counter() - start}
    if progress:
        tqdm.write("per layer, on " + ("validation" if len(val_split) else "test")
                   + " images:\n" + format_table(diagnostics))
    if rd is not None:
        rd.write_json("summary.json", summary)
    summary["weights"] = weights
    return summary


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
    if start is None:
        return run_epoch(executor, objective, split, cfg, epoch, total, progress), []
    attempts = 0

    def attempt() -> dict[str, Any]:
        nonlocal attempts
        attempts += 1
        if attempts > 1:   # the stages were recovered with fresh state: back to the epoch start
            executor.restore(start)  # type: ignore[attr-defined]
        return run_epoch(executor, objective, split, cfg, epoch, total, progress)

    return with_restarts(executor, cfg.pipeline.restarts, attempt, f"epoch {epoch + 1}")


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
