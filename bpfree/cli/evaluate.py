"""`bpfree evaluate RUN_DIR [--dataset NAME]`: a trained model's accuracy on any dataset's test
split (default: the run's own), by prediction method."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="a finished run directory (--out of a run)")
    parser.add_argument("--algorithm", help="the rule's code, when the run names a file or module "
                        "(pkg.module:Class, path/to/rule.py:Class): a run directory never runs code "
                        "by itself")
    parser.add_argument("--dataset", help="mnist, ..., npz:PATH, csv:DIR, folder:PATH (default: "
                        "the run's); it must have the run's sample shape and classes")
    parser.add_argument("--data-dir", help="where a built-in dataset's files are")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    from bpfree_core.data.datasets import load_dataset
    from bpfree_core.errors import DataError
    from bpfree_core.predict import ScoreModel, load_run, scores

    cfg, weights = load_run(args.run_dir, args.algorithm)
    model = ScoreModel(cfg, weights)
    name = args.dataset or cfg.model.dataset
    own = cfg.model.data_fingerprint if name == cfg.model.dataset else ""   # the run's data: same?
    data = load_dataset(name, args.data_dir or cfg.train.data_dir or None, own)
    if math.prod(data.spec.shape) != math.prod(model.objective.spec.shape):
        raise DataError(f"{name} has samples of shape {data.spec.shape}; the run was trained on "
                        f"{model.objective.spec.shape}")
    pred = scores(model, data.test.images).argmax(1)
    acc = float((pred == data.test.labels).float().mean())
    unit = "images" if data.spec.shape[1] > 1 else "rows"
    result = {"dataset": name, "test_images": len(data.test), "test_accuracy": acc,
              "method": "goodness" if model.goodness else "softmax"}
    print(json.dumps(result, indent=2) if args.json else
          f"bpfree evaluate: test accuracy {acc:.4f} on {len(data.test)} {unit} of {name} "
          f"({result['method']})")
    return 0
