"""`bpfree train`: the single-process reference trainer."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from bpfree_core.config import DATASETS, ExperimentConfig, load_config
from bpfree_core.data import bind_data, run_spec
from bpfree_core.errors import ConfigError
from bpfree_core.objectives import BUILTIN
from bpfree_core.readers import is_user_dataset


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every job shares: a TOML config, overrides and the common shortcuts."""
    parser.add_argument("--config", help="TOML config file (sections as in deploy/*.toml)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value, e.g. --set train.epochs=5 (repeatable)")
    parser.add_argument("--algorithm", help=" | ".join(BUILTIN) + " | an installed plug-in | your "
                        "own: pkg.module:Class or path/to/rule.py:Class")
    parser.add_argument("--dataset", help=" | ".join(DATASETS) + " | your own: npz:PATH | "
                        "csv:DIR | folder:PATH[@HxW] (README: Your own data)")
    parser.add_argument("--layers", help="hidden layer sizes, e.g. 500,500 or 3x1000")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--data-dir", help="directory with the dataset's IDX .gz files")
    parser.add_argument("--device", help="cpu | cuda | cuda:N")
    parser.add_argument("--out", type=Path, help="run directory for metrics, checkpoint, summary")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run already in --out (without it, that is refused)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no live progress bar (epoch/round lines are still printed)")
    parser.add_argument("--quiet", action="store_true",
                        help="print only the final summary (and errors)")
    parser.add_argument("--json", action="store_true",
                        help="end with the whole summary as JSON (for scripts) instead of a few lines")


def progress_from_args(args: argparse.Namespace) -> bool:
    """Whether to draw live bars; --quiet also silences bpfree's own per-epoch/round lines."""
    if getattr(args, "quiet", False):
        logging.getLogger().setLevel(logging.WARNING)
    return not (getattr(args, "no_progress", False) or getattr(args, "quiet", False))


SHORTCUTS = {"algorithm": "model.algorithm", "dataset": "model.dataset", "layers": "model.hidden",
             "epochs": "train.epochs", "batch_size": "train.batch_size", "lr": "optim.lr",
             "seed": "train.seed", "data_dir": "train.data_dir", "device": "train.device"}


# Without --config, `bpfree train` and `bpfree pipeline` run the recipe a first run should see
# (chosen on a validation split: bench/results/defaults.md); a config file, and the library,
# start from the plain field defaults instead.
TRAIN_DEFAULTS = ("model.algorithm=mono", "model.hidden=1000,1000", "optim.lr=1e-3",
                  "train.jitter=1", "objective.vote_first=true", "train.epochs=4")


def config_from_args(args: argparse.Namespace, defaults: tuple[str, ...] = ()):  # noqa: ANN201
    """The config: `defaults` (only without --config), the file, the shortcuts, then --set."""
    overrides = [f"{key}={getattr(args, flag)}" for flag, key in SHORTCUTS.items()
                 if getattr(args, flag, None) is not None]
    base = [] if args.config else list(defaults)
    cfg = bind_data(load_config(args.config, base + overrides + list(args.set)))
    asked = {o.split("=", 1)[0] for o in overrides + list(args.set)}
    if cfg.train.jitter and "train.jitter" not in asked and run_spec(cfg).shape[1] < JITTER_MIN:
        cfg = cfg.with_overrides(["train.jitter=0"])   # a default jitter: large images only
    if base and is_user_dataset(cfg.model.dataset):   # a recipe's defaults on your (small) data
        federated = any(d.startswith("federation.") for d in base)
        cfg = small_data_schedule(cfg, asked, federated)
    return cfg


JITTER_MIN = 16    # a default jitter shifts images at least this tall (on 8x8 it cost 3 pt on
                   # validation: bench/results/small_data.md); flat features are never shifted
MIN_STEPS = 1000   # optimiser steps a default run takes at least (chosen on validation splits:
                   # bench/results/small_data.md)
MAX_EPOCHS = 100


def small_data_schedule(cfg: ExperimentConfig, asked: set[str], federated: bool) -> ExperimentConfig:
    """The default recipes were chosen on MNIST (600 steps an epoch); on a few hundred or
    thousand samples their few epochs are a few dozen steps. Stretch the epochs (a federated
    run: the local epochs) the user did not set so that training takes at least MIN_STEPS steps
    (a client: its own steps), at most MAX_EPOCHS epochs in all."""
    from bpfree_core.data import load_dataset

    n = len(load_dataset(cfg.model.dataset, None, cfg.model.data_fingerprint).train)
    n = min(cfg.train.train_limit or n, n) - cfg.train.validation
    key = "federation.local_epochs" if federated else "train.epochs"
    rounds = cfg.federation.rounds if federated else 1
    per = cfg.federation.local_epochs if federated else cfg.train.epochs
    steps = max(n // (cfg.federation.clients if federated else 1) // cfg.train.batch_size, 1)
    if key not in asked and steps * per * rounds < MIN_STEPS:
        want = min(MAX_EPOCHS // rounds, -(-MIN_STEPS // (steps * rounds)))
        cfg = cfg.with_overrides([f"{key}={max(want, per)}"])
    return cfg


def report(args: argparse.Namespace, summary: dict[str, Any], run_dir: Path | None,
           plots: list[str] = ()) -> None:
    """How a finished run ends: a few lines (accuracy, time, where the outputs are), or with
    --json the whole summary for scripts."""
    if getattr(args, "json", False):
        print(json.dumps({**summary, **({"plots": list(plots)} if plots else {})}, indent=2))
        return
    acc = summary.get("test_accuracy", float("nan"))
    what = (f"{summary['rounds']} rounds of {summary['clients']} clients" if "rounds" in summary
            else f"{summary['epochs']} epochs" if "epochs" in summary else "")
    head = (f"average accuracy {summary['average_accuracy']:.4f} over the tasks seen, forgetting "
            f"{summary.get('forgetting', float('nan')):.4f}" if "average_accuracy" in summary
            else f"test accuracy {acc:.4f}")
    print(f"bpfree {args.command}: {head}"
          + (f" after {what}" if what else "") + f" ({summary.get('wall_seconds', 0.0):.1f} s)")
    if "val_accuracy" in summary:
        print(f"  validation accuracy {summary['val_accuracy']:.4f}")
    if run_dir is not None:
        print(f"  run directory {run_dir} (summary.json, metrics.jsonl)")
    for plot in plots:
        print(f"  plot {plot}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")


def run(args: argparse.Namespace) -> int:
    from bpfree_core.trainer import train_reference

    cfg = config_from_args(args, TRAIN_DEFAULTS)
    if args.resume and not args.out:
        raise ConfigError("--resume continues a run directory: give it with --out RUN_DIR")
    summary = train_reference(cfg, args.out, resume=args.resume, progress=progress_from_args(args),
                              overwrite=args.overwrite)
    summary.pop("weights")
    report(args, summary, args.out)
    return 0
