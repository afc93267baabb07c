"""`bpfree continual`: a task stream (SplitMNIST) through one process or a pipeline of stage workers.

    bpfree continual --algorithm sffa --strategy replay --data-dir ../shared/datasets --out runs/cl
    bpfree continual --quick --data-dir ../shared/datasets                   # seconds, a tiny subset
    bpfree continual --executor pipeline --stages 2 --strategy replay ...    # stages as processes
    bpfree continual --clients 4 --stages 2 --strategy replay ...            # federated (Flower)

RUN_DIR gets config.json, metrics.jsonl (one record per task), summary.json (the accuracy
matrix, average accuracy, forgetting, backward and forward transfer, per-layer sparsity and
specialisation) and two PNGs: the accuracy matrix as a heatmap, and each task's accuracy as
tasks arrive.

With --clients K the stream is federated (`continual.federated`): every client trains its share of
the current task (and replays its own memory, which never leaves it) for continual.epochs_per_task
rounds of one local epoch, the coordinator averages each layer per round and tests every task after
each task's last round; the Flower simulation runs it (summary.json's "continual" holds the matrix).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bpfree.cli.common import (
    add_config_arguments,
    env_overrides,
    progress_from_args,
    report,
    shortcut_overrides,
)
from bpfree_core.config import SCENARIOS, STRATEGIES, ExperimentConfig, load_config

# A tiny subset: 600 training and 200 test images per task, narrow layers.
QUICK = ("train.train_limit=600", "train.test_limit=200", "train.batch_size=50",
         "model.hidden=[200,200]", "continual.memory=100")


CONTINUAL_FLAGS = {"scenario": "continual.scenario", "strategy": "continual.strategy",
                   "tasks": "continual.tasks", "epochs_per_task": "continual.epochs_per_task",
                   "memory": "continual.memory", "stages": "pipeline.stages"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--scenario", choices=SCENARIOS, help="class | domain | task "
                        "(continual.scenario)")
    parser.add_argument("--strategy", choices=STRATEGIES, help="continual.strategy")
    parser.add_argument("--tasks", type=int, help="continual.tasks (classes split evenly)")
    parser.add_argument("--epochs-per-task", type=int, help="continual.epochs_per_task")
    parser.add_argument("--memory", type=int, help="replay memory size (continual.memory)")
    parser.add_argument("--executor", choices=("inprocess", "pipeline"), default="inprocess",
                        help="inprocess (default) | pipeline: pipeline.stages worker processes")
    parser.add_argument("--stages", type=int, help="pipeline.stages (with --executor pipeline)")
    parser.add_argument("--clients", type=int, help="federated continual learning with K clients "
                        "(Flower simulation; each client's stages as --executor says)")
    parser.add_argument("--quick", action="store_true", help="a tiny subset (seconds): "
                        + " ".join(QUICK) + " (explicit --set / flags win)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNGs")


def resolve(args: argparse.Namespace) -> ExperimentConfig:
    from bpfree_core.continual.stream import continual_config

    flags = shortcut_overrides(args, CONTINUAL_FLAGS)
    if args.clients:
        flags.append(f"federation.clients={args.clients}")
    shortcuts = shortcut_overrides(args)
    # --quick first: every flag and --set the user gave wins over it
    cfg = load_config(args.config, [*(QUICK if args.quick else ()), *shortcuts, *args.set, *flags,
                                    *env_overrides()])
    if args.clients:   # one round of one local epoch per epoch of a task
        cfg = cfg.with_overrides([
            "continual.federated=true", "federation.local_epochs=1",
            f"federation.rounds={cfg.continual.tasks * cfg.continual.epochs_per_task}",
            f"federation.executor={args.executor}"])
    return continual_config(cfg)


def run(args: argparse.Namespace) -> int:
    from bpfree.server.continual import continual

    cfg = resolve(args)
    run_dir = args.out or Path("runs") / time.strftime("continual-%Y%m%d-%H%M%S")
    summary = continual(cfg, args.executor, run_dir, progress_from_args(args), args.overwrite)
    summary.pop("weights")
    plots = []
    if not args.no_plot:
        from bpfree.server.plot import plot_continual

        plots = [str(p) for p in plot_continual(run_dir)]
    shown = {**summary, **summary.pop("continual", {})}
    report(args, {k: v for k, v in shown.items() if k != "by_method"}, run_dir, plots)
    return 0
