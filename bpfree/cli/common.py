"""What every job's command line shares: the config flags, how they become a config, how a run
ends on the terminal. Imports only the standard library and bpfree_core.config (no torch), so
`--help` is instant; the data and the rules are imported when a job runs."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

from bpfree_core.config import BUILTIN_RULES, DATASETS, ExperimentConfig, load_config
from bpfree_core.paths import absolute

SHORTCUTS = {"algorithm": "model.algorithm", "dataset": "model.dataset", "layers": "model.hidden",
             "epochs": "train.epochs", "batch_size": "train.batch_size", "lr": "optim.lr",
             "seed": "train.seed", "data_dir": "train.data_dir", "device": "train.device"}

# Without --config, `bpfree train` and `bpfree pipeline` run the recipe a first run should see
# (chosen on a validation split: bench/results/defaults.md); a config file, and the library,
# start from the plain field defaults instead.
TRAIN_DEFAULTS = ("model.algorithm=mono", "model.hidden=1000,1000", "optim.lr=1e-3",
                  "train.jitter=1", "objective.vote_first=true", "train.epochs=4")

# Without --config: a first run that shows what bpfree does in under 2 minutes on 2 cores
# (K = 2 clients x S = 2 stages, Mono-Forward; chosen on a validation split, test accuracy
# ~98.5%: bench/results/defaults.md). A config file starts from the plain field defaults.
SIMULATE_DEFAULTS = ("model.algorithm=mono", "model.hidden=500,500", "objective.vote_first=true",
                     "train.jitter=1", "optim.lr=2e-3", "train.batch_size=50",
                     "federation.clients=2", "federation.rounds=4", "federation.local_epochs=2",
                     "train.threads=1")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows a flag's default after its help unless the help names it already, or it has none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.default not in (None, False, [], "", argparse.SUPPRESS)
        if shown and "default" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


def field_default(key: str, recipe: tuple[str, ...] = ()) -> str:
    """A config key's default as the user meets it: the recipe's value without --config, else
    the plain field default."""
    for item in recipe:
        if item.split("=", 1)[0] == key:
            value, plain = item.split("=", 1)[1], _plain(key)
            return value if _same(value, plain) else f"{value}; {plain} with --config"
    return _plain(key)


def _same(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return a.lower() == b.lower()


def _plain(key: str) -> str:
    """The field's declared default, read without building a config (building one imports the
    server strategies, and torch with them: --help would no longer be instant)."""
    section, name = key.split(".", 1)
    sections = {f.name: f for f in dataclasses.fields(ExperimentConfig)}
    kind = sections[section].default_factory   # type: ignore[misc]
    declared = {f.name: f for f in dataclasses.fields(kind)}[name]
    value = (declared.default if declared.default is not dataclasses.MISSING
             else declared.default_factory())   # type: ignore[misc]
    if isinstance(value, tuple | list):
        value = ",".join(map(str, value))
    return f"{value if value != '' else 'none'}"


def show_defaults(parser: argparse.ArgumentParser, shortcuts: dict[str, str],
                  recipe: tuple[str, ...] = ()) -> None:
    """Append each shortcut flag's default (the recipe's, else the field's) to its help."""
    for action in parser._actions:
        key = shortcuts.get(action.dest)
        if key and action.help and "default" not in action.help:
            action.help += f" (default: {field_default(key, recipe)})"


def add_config_arguments(parser: argparse.ArgumentParser, recipe: tuple[str, ...] = (),
                         epochs: bool = True) -> None:
    """The flags every job shares: a TOML config, overrides and the common shortcuts. `recipe`:
    the job's defaults without --config (shown in --help); `epochs`: offer --epochs (a
    federated run has --rounds and --local-epochs instead)."""
    parser.add_argument("--config", help="TOML config file (sections as in deploy/*.toml); without "
                        "it the job starts from its recipe")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value, e.g. --set train.threads=2 (repeatable)")
    parser.add_argument("--algorithm", help=" | ".join(BUILTIN_RULES) + " | an installed plug-in | "
                        "your own: pkg.module:Class or path/to/rule.py:Class")
    parser.add_argument("--dataset", help=" | ".join(DATASETS) + " | your own: npz:PATH | csv:DIR | "
                        "folder:PATH[@HxW] (docs/data.md)")
    parser.add_argument("--layers", help="hidden layer sizes, e.g. 500,500 or 3x1000")
    if epochs:
        parser.add_argument("--epochs", type=int, help="passes over the training data")
    parser.add_argument("--batch-size", type=int, help="samples per optimiser step")
    parser.add_argument("--lr", type=float, help="learning rate of every layer's optimiser")
    parser.add_argument("--seed", type=int, help="seed of every random draw: the same seed, the "
                        "same weights on any launcher")
    parser.add_argument("--data-dir", help="directory with the dataset's files (default: "
                        "$BPFREE_DATA_DIR, else download into $BPFREE_CACHE_DIR)")
    parser.add_argument("--device", help="cpu | cuda | cuda:N")
    parser.add_argument("--out", type=Path, help="run directory for metrics, checkpoints, summary "
                        "and plots")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run already in --out (without it, that is refused)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no live progress bar (epoch/round lines are still printed)")
    parser.add_argument("--quiet", action="store_true",
                        help="print only the final summary (and errors)")
    parser.add_argument("--json", action="store_true",
                        help="end with the whole summary as JSON (for scripts) instead of a few lines")
    show_defaults(parser, SHORTCUTS, recipe)


def progress_from_args(args: argparse.Namespace) -> bool:
    """Whether to draw live bars; --quiet also silences bpfree's own per-epoch/round lines."""
    if getattr(args, "quiet", False):
        logging.getLogger().setLevel(logging.WARNING)
    return not (getattr(args, "no_progress", False) or getattr(args, "quiet", False))


SET_ENV = "BPFREE_SET"   # "section.key=value;...": applied after every flag, e.g. to shrink every
                         # run of a script that cannot be edited (the README test uses it)


def env_overrides() -> list[str]:
    """$BPFREE_SET's overrides, which win over the command line's."""
    return [s.strip() for s in os.environ.get(SET_ENV, "").split(";") if s.strip()]


def shortcut_overrides(args: argparse.Namespace,
                       shortcuts: dict[str, str] = SHORTCUTS) -> list[str]:
    """The flags (argparse dest -> config key) the user gave, as overrides in `shortcuts`' order;
    --data-dir made absolute where it was typed."""
    if "data_dir" in shortcuts and getattr(args, "data_dir", None):
        args.data_dir = absolute(args.data_dir)
    return [f"{key}={getattr(args, flag)}" for flag, key in shortcuts.items()
            if getattr(args, flag, None) is not None]


def config_from_args(args: argparse.Namespace, defaults: tuple[str, ...] = ()) -> ExperimentConfig:
    """The config: `defaults` (only without --config), the file, the shortcuts, then --set."""
    from bpfree_core.data.datasets import bind_data, run_spec
    from bpfree_core.data.readers import is_user_dataset
    from bpfree_core.schedule import JITTER_MIN, small_data_schedule

    overrides = shortcut_overrides(args) + list(args.set) + env_overrides()
    base = [] if args.config else list(defaults)
    cfg = bind_data(load_config(args.config, base + overrides))
    asked = {o.split("=", 1)[0] for o in overrides}
    if cfg.train.jitter and "train.jitter" not in asked and run_spec(cfg).shape[1] < JITTER_MIN:
        cfg = cfg.with_overrides(["train.jitter=0"])   # a default jitter: large images only
    if base and is_user_dataset(cfg.model.dataset):   # a recipe's defaults on your (small) data
        federated = any(d.startswith("federation.") for d in base)
        cfg = small_data_schedule(cfg, asked, federated)
    return cfg


def wall_seconds(summary: dict[str, Any]) -> float:
    """Seconds since the command was launched (the run's own count where no command set it)."""
    from bpfree_core.run.clock import LAUNCHED_ENV, seconds_since_launch

    return seconds_since_launch() if LAUNCHED_ENV in os.environ else summary.get("wall_seconds", 0.0)


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def report(args: argparse.Namespace, summary: dict[str, Any], run_dir: Path | None,
           plots: list[str] = ()) -> None:
    """How a finished run ends: a few lines (accuracy, time since the command started, where the
    outputs are), or with --json the whole summary for scripts."""
    if getattr(args, "json", False):
        print(json.dumps({**summary, **({"plots": list(plots)} if plots else {})}, indent=2))
        return
    acc = summary.get("test_accuracy", float("nan"))
    what = (f"{plural(summary['rounds'], 'round')} of {summary['clients']} clients"
            if "rounds" in summary else plural(summary.get("epochs_trained", summary["epochs"]), "epoch")
            + (f" of {summary['epochs']}" if summary.get("stopped_early") else "") if "epochs" in summary
            else "")
    head = (f"average accuracy {summary['average_accuracy']:.4f} over the tasks seen, forgetting "
            f"{summary.get('forgetting', float('nan')):.4f}" if "average_accuracy" in summary
            else f"test accuracy {acc:.4f}")
    print(f"bpfree {args.command}: {head}"
          + (f" after {what}" if what else "") + f" ({wall_seconds(summary):.1f} s)")
    if "val_accuracy" in summary:
        print(f"  validation accuracy {summary['val_accuracy']:.4f}"
              + (f", best at epoch {summary['best_epoch']}" if "best_epoch" in summary else ""))
    if run_dir is not None:
        print(f"  run directory {run_dir} (summary.json, metrics.jsonl)")
    for plot in plots:
        print(f"  plot {plot}")
