"""`bpfree train`: the single-process reference trainer (the golden reference of every
distributed run)."""

from __future__ import annotations

import argparse

from bpfree.cli.common import TRAIN_DEFAULTS, add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, TRAIN_DEFAULTS)
    parser.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    parser.add_argument("--no-plot", action="store_true", help="skip RUN_DIR/layers.png")


def run(args: argparse.Namespace) -> int:
    from bpfree.cli.common import config_from_args, progress_from_args, report
    from bpfree_core.errors import ConfigError
    from bpfree_core.run.trainer import train_reference

    cfg = config_from_args(args, TRAIN_DEFAULTS)
    if args.resume and not args.out:
        raise ConfigError("--resume continues a run directory: give it with --out RUN_DIR")
    summary = train_reference(cfg, args.out, resume=args.resume, progress=progress_from_args(args),
                              overwrite=args.overwrite)
    summary.pop("weights")
    report(args, summary, args.out, layer_plots(args))
    return 0


def layer_plots(args: argparse.Namespace) -> list[str]:
    """RUN_DIR/layers.png: per-layer loss and accuracy over the epochs (or rounds)."""
    if args.no_plot or not args.out:
        return []
    from bpfree.server.plot import plot_layers

    path = plot_layers(args.out)
    return [str(path)] if path else []
