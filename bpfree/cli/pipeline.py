"""`bpfree pipeline`: one client's stack as a pipeline of stage workers, end to end.

Without --workers it launches pipeline.stages `bpfree worker` processes on 127.0.0.1; with
--workers HOST:PORT,... it drives workers that already run elsewhere. RUN_DIR (--out) gets
config.json, metrics.jsonl (one record per epoch, as `bpfree train`, plus per-stage pipeline
stats), weights.pt, summary.json and layers.png.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from bpfree.cli.common import TRAIN_DEFAULTS, add_config_arguments
from bpfree.cli.train import layer_plots

PIPELINE_FLAGS = {"stages": "pipeline.stages", "wire_dtype": "pipeline.wire_dtype",
                  "token": "pipeline.token", "tls_ca": "pipeline.tls_ca"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, TRAIN_DEFAULTS)
    parser.add_argument("--stages", type=int, help="stage workers to launch (pipeline.stages, "
                        "default 2)")
    parser.add_argument("--workers", help="HOST:PORT,... of running workers, in stage order "
                                          "(default: launch them on 127.0.0.1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per launched worker")
    parser.add_argument("--worker-device", default="cpu",
                        help="device of launched workers: cpu | cuda | cuda:N")
    parser.add_argument("--wire-dtype", help="float32 | bfloat16 | float16 | int8 (per-row "
                        "scaled) (pipeline.wire_dtype, default float32)")
    parser.add_argument("--token", default=os.environ.get("BPFREE_TOKEN") or None,
                        help="shared secret of the workers (pipeline.token; default $BPFREE_TOKEN, "
                             "which keeps it out of `ps`)")
    parser.add_argument("--tls-ca", help="CA (PEM) that signed the workers' certificates")
    parser.add_argument("--log-dir", type=Path, help="where launched workers write their logs")
    parser.add_argument("--resume", action="store_true",
                        help="continue --out from its last epoch checkpoint (same config)")
    parser.add_argument("--no-plot", action="store_true", help="skip RUN_DIR/layers.png")


def run(args: argparse.Namespace) -> int:
    from bpfree.cli.common import config_from_args, progress_from_args, report, shortcut_overrides
    from bpfree.client.pipeline import Pipeline
    from bpfree.client.train import train_pipeline
    from bpfree_core.errors import ConfigError
    from bpfree_core.run.rundir import RunDir
    from bpfree_core.runtime import set_threads

    cfg = config_from_args(args, TRAIN_DEFAULTS)
    cfg = cfg.with_overrides(shortcut_overrides(args, PIPELINE_FLAGS))
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
    report(args, summary, args.out, layer_plots(args))
    return 0
