"""`bpfree pipeline`: train one client's stack as a pipeline of stage workers, end to end.

Without --workers it launches cfg.pipeline.stages `bpfree worker` processes on 127.0.0.1;
with --workers HOST:PORT,... it drives workers that already run elsewhere. RUN_DIR (--out)
gets config.json, metrics.jsonl (one record per epoch, as `bpfree train`, plus per-stage
pipeline stats), weights.pt and summary.json.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from bpfree.client.executor import PipelineExecutor
from bpfree.client.pipeline import Pipeline
from bpfree_core.checkpoint import save_checkpoint
from bpfree_core.cli_train import (
    TRAIN_DEFAULTS,
    add_config_arguments,
    config_from_args,
    progress_from_args,
    report,
)
from bpfree_core.config import ExperimentConfig
from bpfree_core.errors import ConfigError, RunDirError
from bpfree_core.rundir import RunDir, os_error_sentence
from bpfree_core.runtime import set_threads
from bpfree_core.trainer import train_epochs

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--stages", type=int, help="stage workers to launch (pipeline.stages)")
    parser.add_argument("--workers", help="HOST:PORT,... of running workers, in stage order "
                                          "(default: launch them on 127.0.0.1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per launched worker")
    parser.add_argument("--worker-device", default="cpu",
                        help="device of launched workers: cpu | cuda | cuda:N")
    parser.add_argument("--wire-dtype", help="float32 | bfloat16 | float16 | int8 (per-row "
                        "scaled) (pipeline.wire_dtype)")
    parser.add_argument("--token", default=os.environ.get("BPFREE_TOKEN") or None,
                        help="shared secret of the workers (pipeline.token; default $BPFREE_TOKEN, "
                             "which keeps it out of `ps`)")
    parser.add_argument("--tls-ca", help="CA (PEM) that signed the workers' certificates")
    parser.add_argument("--log-dir", type=Path, help="where launched workers write their logs")
    parser.add_argument("--resume", action="store_true",
                        help="continue --out from its last epoch checkpoint (same config)")


def train_pipeline(cfg: ExperimentConfig, pipe: Pipeline, run_dir: Path | None = None,
                   progress: bool = True, resume: bool = False,
                   overwrite: bool = False) -> dict[str, Any]:
    """Train cfg.train.epochs epochs through `pipe`: the same epoch loop as `bpfree train`,
    with a checkpoint (weights + optimiser state of every stage) after each epoch, and a dead
    stage restarted (launched workers) and its epoch rerun, up to pipeline.restarts times."""
    summary = train_epochs(cfg, PipelineExecutor.from_pipeline(pipe), run_dir, resume=resume,
                           progress=progress, overwrite=overwrite)
    if run_dir:
        try:
            save_checkpoint(run_dir / "weights.pt", {"config": cfg.to_dict(),
                                                     "weights": summary["weights"]})
        except OSError as exc:
            raise RunDirError(os_error_sentence(exc, run_dir / "weights.pt", "writing")) from None
    return summary


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, TRAIN_DEFAULTS)
    extra = [f"pipeline.{key}={value}" for key, value in (
        ("stages", args.stages), ("wire_dtype", args.wire_dtype), ("token", args.token),
        ("tls_ca", args.tls_ca)) if value is not None]
    cfg = cfg.with_overrides(extra)
    if args.resume and not args.out:
        raise ConfigError("--resume continues a run directory: give it with --out RUN_DIR")
    if args.out:   # a bad, busy or taken --out is refused before any worker starts
        RunDir(args.out, resume=args.resume or args.overwrite).close()
    set_threads(cfg.train.threads)
    if args.workers:
        addresses = [a.strip() for a in args.workers.split(",") if a.strip()]
        pipe = Pipeline.connect(cfg, addresses)
    else:
        pipe = Pipeline.launch_local(cfg, device=args.worker_device, threads=args.threads,
                                     log_dir=args.log_dir)
    with pipe:
        summary = train_pipeline(cfg, pipe, args.out, progress=progress_from_args(args),
                                 resume=args.resume, overwrite=args.overwrite)
    summary.pop("weights")
    report(args, summary, args.out)
    return 0
