"""`bpfree train`: the single-process reference trainer."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from bpfree_core.config import ALGORITHMS, DATASETS, load_config
from bpfree_core.errors import ConfigError


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every job shares: a TOML config, overrides and the common shortcuts."""
    parser.add_argument("--config", help="TOML config file (sections as in deploy/*.toml)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value, e.g. --set train.epochs=5 (repeatable)")
    parser.add_argument("--algorithm", help=" | ".join(ALGORITHMS))
    parser.add_argument("--dataset", help=" | ".join(DATASETS))
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
    return load_config(args.config, base + overrides + list(args.set))


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
    print(json.dumps(summary, indent=2))
    return 0
