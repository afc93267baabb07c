"""How `bpfree train`'s defaults behave on small data of your own, and how their stretch was chosen.

    python -m bpfree.bench.small_data --data-dir ../shared/datasets --out bench/results

Two small sets, written as npz files the way a user would bring them:
- digits8: the first 1500 MNIST training images (test: 500 test images) average-pooled to 8x8
  uint8, a stand-in for scikit-learn's 8x8 digits;
- blobs: 4 Gaussian clusters in 12 dimensions, 600 training / 200 test samples (flat features).

Candidates are scored on a validation split (the last 300 training samples, never trained on);
the test set is scored once, for the chosen defaults only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from bpfree.bench.accuracy import machine_summary

NOTES = """
What it says (validation scores only choose; the test column is scored once, for the defaults):
- The MNIST recipe's 4 epochs are a few dozen steps on small data: 77% on 8x8 digits. At least
  1000 optimiser steps (84 epochs here) reach 88.7%; 250 epochs gave 89.7% in a separate run, at 3x
  the time. The defaults stretch the epochs the user did not set to >= 1000 steps, capped at 100
  epochs (`bpfree_core/schedule.py: MIN_STEPS, MAX_EPOCHS`).
- Jitter 1 on 8x8 images costs 3 points on validation (85.7% vs 88.7%), so the default jitter
  applies only to images at least 16 pixels tall; flat features are never shifted (refused).
- The tabular blobs are easy for every schedule (97.7%).
- Wall seconds were measured while a full test suite ran on the same 2 cores: compare within a row
  group only.
"""

CANDIDATES = [("4 epochs (the MNIST recipe as is), no jitter", ["--epochs", "4", "--set", "train.jitter=0"]),
              ("25 epochs (>= 300 steps), no jitter", ["--epochs", "25", "--set", "train.jitter=0"]),
              ("84 epochs (>= 1000 steps), no jitter", ["--epochs", "84", "--set", "train.jitter=0"]),
              ("84 epochs (>= 1000 steps), jitter 1", ["--epochs", "84", "--set", "train.jitter=1"])]


def write_sets(data_dir: str, folder: Path) -> dict[str, Path]:
    from bpfree_core.data.datasets import load_dataset

    mnist = load_dataset("mnist", data_dir)

    def pooled(split, n: int) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
        x = torch.nn.functional.adaptive_avg_pool2d(split.images[:n].view(n, 1, 28, 28), 8)
        return (x * 255).round().to(torch.uint8).numpy(), split.labels[:n].numpy()

    rng = np.random.default_rng(0)
    centers = rng.normal(0, 2, (4, 12))

    def blobs(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 4, n)
        return (centers[y] + rng.normal(0, 1.5, (n, 12))).astype(np.float32), y

    out = {"digits8": folder / "digits8.npz", "blobs": folder / "blobs.npz"}
    for name, (train, test) in {"digits8": (pooled(mnist.train, 1500), pooled(mnist.test, 500)),
                                "blobs": (blobs(600), blobs(200))}.items():
        np.savez(out[name], x_train=train[0], y_train=train[1], x_test=test[0], y_test=test[1])
    return out


def train(dataset: Path, flags: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-m", "bpfree", "train", "--dataset", f"npz:{dataset}",
                           "--quiet", "--no-progress", "--json", *flags],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sets = write_sets(args.data_dir, Path(tmp))
        for name, path in sets.items():
            for label, flags in CANDIDATES:
                if name == "blobs" and "train.jitter=1" in flags:
                    continue   # flat features: jitter is refused (it shifts images)
                s = train(path, [*flags, "--set", "train.validation=300"])
                rows.append((name, label, f"{s['val_accuracy']:.4f}", "", f"{s['wall_seconds']:.0f}"))
                print(rows[-1], flush=True)
            s = train(path, [])   # the defaults as a user gets them
            rows.append((name, f"the defaults ({s['epochs']} epochs)", "", f"{s['test_accuracy']:.4f}",
                         f"{s['wall_seconds']:.0f}"))
            print(rows[-1], flush=True)
    lines = ["# Small data: the defaults of `bpfree train` on your own npz files", "",
             "`python -m bpfree.bench.small_data --data-dir ../shared/datasets --out bench/results`; "
             + machine_summary(), "",
             "| data | candidate | validation accuracy | test accuracy | wall s |", "|---|---|---|---|---|"]
    lines += [f"| {' | '.join(r)} |" for r in rows]
    lines += NOTES.splitlines()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "small_data.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
