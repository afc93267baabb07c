"""`bpfree export RUN_DIR --out model.pt`: a self-contained TorchScript module, forward(x) ->
class scores, loadable with torch.jit.load where bpfree is not installed."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="a finished run directory (--out of a run)")
    parser.add_argument("--out", type=Path, required=True, help="the TorchScript file to write")


def run(args: argparse.Namespace) -> int:
    from bpfree_core.errors import RunDirError
    from bpfree_core.predict import export, load_run
    from bpfree_core.rundir import os_error_sentence

    cfg, weights = load_run(args.run_dir)
    try:
        path = export(cfg, weights, args.out)
    except OSError as exc:
        raise RunDirError(os_error_sentence(exc, args.out, "writing")) from None
    c, h, w = cfg.model.input_shape or (0, 0, 0)
    shape = f" ({c}x{h}x{w} values per row)" if c else ""
    print(f"bpfree export: {path}: torch.jit.load(path)(x) -> class scores for x of shape "
          f"(batch, features){shape}, scaled as the training data was")
    return 0
