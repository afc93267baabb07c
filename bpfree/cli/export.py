"""`bpfree export RUN_DIR --out model.pt2`: the trained model as a self-contained torch.export
program, forward(x) -> class scores, loadable with `torch.export.load(path).module()` where
bpfree is not installed (`--format torchscript` writes a TorchScript module instead)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="a finished run directory (--out of a run)")
    parser.add_argument("--algorithm", help="the rule's code, when the run names a file or module "
                        "(pkg.module:Class, path/to/rule.py:Class): a run directory never runs code "
                        "by itself")
    parser.add_argument("--out", type=Path, required=True, help="the file to write, e.g. model.pt2")
    parser.add_argument("--format", choices=("pt2", "torchscript"), default="pt2",
                        help="pt2: torch.export (torch.export.load); torchscript: torch.jit.load, "
                             "which torch deprecates")


def run(args: argparse.Namespace) -> int:
    from bpfree_core.errors import RunDirError
    from bpfree_core.predict import export, load_run
    from bpfree_core.run.rundir import os_error_sentence

    cfg, weights = load_run(args.run_dir, args.algorithm)
    try:
        path = export(cfg, weights, args.out, fmt=args.format)
    except OSError as exc:
        raise RunDirError(os_error_sentence(exc, args.out, "writing")) from None
    print(f"bpfree export: {path}: class scores for x of shape (batch, {row_size(cfg)}), "
          f"float32, scaled as the training data was{image_note(cfg)}")
    load = (f"torch.export.load('{path}').module()" if args.format == "pt2"
            else f"torch.jit.load('{path}')")
    print(f"  check: python -c \"import torch; m = {load}; "
          f"print(m(torch.rand(2, {row_size(cfg)})).argmax(1))\"")
    return 0


def row_size(cfg) -> int:  # noqa: ANN001
    from bpfree_core.data.datasets import run_spec

    c, h, w = run_spec(cfg).shape
    return c * h * w


def image_note(cfg) -> str:  # noqa: ANN001
    from bpfree_core.data.datasets import run_spec

    c, h, w = run_spec(cfg).shape
    return f" (images of {c}x{h}x{w}, flattened)" if h > 1 else " (feature rows)"
