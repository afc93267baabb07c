"""`bpfree pipeline`: train one client's stack as a pipeline of stage workers, end to end.

Without --workers it launches cfg.pipeline.stages `bpfree worker` processes on 127.0.0.1;
with --workers HOST:PORT,... it drives workers that already run elsewhere. RUN_DIR (--out)
gets config.json, metrics.jsonl (one record per epoch, as `bpfree train`, plus per-stage
pipeline stats), weights.pt and summary.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from bpfree_core.checkpoint import atomic_write_json, save_checkpoint
from bpfree_core.cli_train import add_config_arguments, config_from_args
from bpfree_core.config import ExperimentConfig
from bpfree_core.data import load_dataset
from bpfree_core.metrics import MetricsWriter
from bpfree_core.model import build_objective
from bpfree_core.runtime import set_threads
from bpfree_core.trainer import (
    TRAIN_EVAL_SAMPLES,
    evaluate,
    headline,
    limited,
    prediction_modes,
    train_packets,
)
from client.pipeline import Pipeline

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--stages", type=int, help="stage workers to launch (pipeline.stages)")
    parser.add_argument("--workers", help="HOST:PORT,... of running workers, in stage order "
                                          "(default: launch them on 127.0.0.1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per launched worker")
    parser.add_argument("--worker-device", default="cpu",
                        help="device of launched workers: cpu | cuda | cuda:N")
    parser.add_argument("--wire-dtype", help="float32 | bfloat16 | float16 (pipeline.wire_dtype)")
    parser.add_argument("--token", help="shared secret of the workers (pipeline.token)")
    parser.add_argument("--tls-ca", help="CA (PEM) that signed the workers' certificates")
    parser.add_argument("--log-dir", type=Path, help="where launched workers write their logs")


def train_pipeline(cfg: ExperimentConfig, pipe: Pipeline, run_dir: Path | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """Train cfg.train.epochs epochs through `pipe`, evaluating after each like train_reference."""
    data = load_dataset(cfg.model.dataset, cfg.train.data_dir or None)
    train_split = limited(data.train, cfg.train.train_limit)
    test_split = limited(data.test, cfg.train.test_limit)
    objective = build_objective(cfg)
    prediction_modes(objective, cfg)   # a bad train.predict fails before any training
    if run_dir:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "config.json", cfg.public_dict())   # no token on disk
    writer = MetricsWriter(run_dir)
    start = time.perf_counter()
    acc: dict[str, float] = {}
    for epoch in range(cfg.train.epochs):
        stats = pipe.train_epoch(train_packets(objective, train_split, cfg, epoch), epoch,
                                 cfg.train.epochs)
        acc = evaluate(pipe.eval_forward, objective, test_split, cfg)
        train_acc = evaluate(pipe.eval_forward, objective,
                             train_split.subset(slice(0, TRAIN_EVAL_SAMPLES)), cfg)
        record = {"epoch": epoch + 1, "layers": stats["layers"], "test_accuracy": acc,
                  "train_accuracy": train_acc, "epoch_seconds": stats["seconds"],
                  "samples_per_second": stats["samples_per_second"],
                  # per-batch timelines stay out of the JSONL (`bpfree bench sweep` plots them)
                  "stages": [{k: v for k, v in s.items() if k != "timeline"}
                             for s in stats["stages"]]}
        writer.write(record, step=epoch + 1)
        line = (f"epoch {epoch + 1}/{cfg.train.epochs}  test {_fmt(acc)}  train {_fmt(train_acc)}  "
                f"{stats['seconds']:.1f}s  {stats['samples_per_second']:.0f} samples/s  busy "
                + " ".join(f"{s['busy_seconds']:.1f}s" for s in stats["stages"]))
        log.info("%s", line)
        if progress:
            print(line, flush=True)
    writer.close()
    weights = pipe.get_weights()
    summary = {"algorithm": cfg.model.algorithm, "dataset": cfg.model.dataset,
               "test_accuracy": headline(acc, cfg), "test_accuracy_by_method": acc,
               "epochs": cfg.train.epochs, "stages": len(pipe.addresses),
               "wire_dtype": cfg.pipeline.wire_dtype, "wall_seconds": time.perf_counter() - start}
    if run_dir:
        save_checkpoint(run_dir / "weights.pt", {"config": cfg.public_dict(), "weights": weights})
        atomic_write_json(run_dir / "summary.json", summary)
    summary["weights"] = weights
    return summary


def _fmt(acc: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in sorted(acc.items()))


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    extra = [f"pipeline.{key}={value}" for key, value in (
        ("stages", args.stages), ("wire_dtype", args.wire_dtype), ("token", args.token),
        ("tls_ca", args.tls_ca)) if value is not None]
    cfg = cfg.with_overrides(extra)
    set_threads(cfg.train.threads)
    if args.workers:
        addresses = [a.strip() for a in args.workers.split(",") if a.strip()]
        pipe = Pipeline.connect(cfg, addresses)
    else:
        pipe = Pipeline.launch_local(cfg, device=args.worker_device, threads=args.threads,
                                     log_dir=args.log_dir)
    with pipe:
        summary = train_pipeline(cfg, pipe, args.out)
    summary.pop("weights")
    print(json.dumps(summary, indent=2))
    return 0
