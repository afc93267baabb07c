"""`bpfree predict RUN_DIR --input FILE`: class and scores for every input row, to a CSV file."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="a finished run directory (--out of a run)")
    parser.add_argument("--algorithm", help="the rule's code, when the run names a file or module "
                        "(pkg.module:Class, path/to/rule.py:Class): a run directory never runs code "
                        "by itself")
    parser.add_argument("--input", required=True,
                        help="an .npz (array x or x_test), a .csv or a folder of images")
    parser.add_argument("--out", type=Path, help="where to write the predictions "
                        "(default RUN_DIR/predictions.csv)")


def run(args: argparse.Namespace) -> int:
    from bpfree_core.errors import RunDirError
    from bpfree_core.predict import ScoreModel, load_run, read_inputs, scores
    from bpfree_core.run.rundir import os_error_sentence

    cfg, weights = load_run(args.run_dir, args.algorithm)
    x = read_inputs(args.input, cfg)
    s = scores(ScoreModel(cfg, weights), x)
    out = args.out or args.run_dir / "predictions.csv"
    lines = ["index,class," + ",".join(f"score_{c}" for c in range(s.shape[1]))]
    lines += [f"{i},{int(row.argmax())}," + ",".join(f"{v:.6g}" for v in row.tolist())
              for i, row in enumerate(s)]
    try:
        out.write_text("\n".join(lines) + "\n")
    except OSError as exc:
        raise RunDirError(os_error_sentence(exc, out, "writing")) from None
    print(f"bpfree predict: {len(x)} predictions in {out}")
    return 0
