"""How the defaults of `bpfree simulate` and `bpfree train` were chosen, and what they give.

    python -m bpfree.bench.defaults --data-dir ../shared/datasets --out bench/results

1. Candidates, each run exactly as a user would (`bpfree simulate ...` / `bpfree train ...`, a
   fresh process, wall time from launch to exit) with `train.validation=10000`: the last 10,000
   training images held out. The choice is made on their validation accuracy and wall time only.
   Candidates run on top of the current defaults, so each names every field it changes.
2. The defaults as a new user gets them (no flags but --data-dir and --out): test accuracy and
   wall time, the numbers README quotes.
Writes defaults.{md,json}; `--only choose|check` runs one part.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bpfree.bench.accuracy import machine_summary
from bpfree_core.run.checkpoint import atomic_write_json

RESULTS = Path(__file__).resolve().parent / "results"
MONO = ("--algorithm", "mono", "--set", "objective.vote_first=true", "--set", "train.jitter=1")
# The old defaults, as config files: a --config starts from the plain field defaults.
OLD = {"simulate": '[model]\nalgorithm = "symba"\n[federation]\nrounds = 5\n[train]\nthreads = 1\n',
       "train": "[train]\nepochs = 2\n"}
# (job, name, flags) tried on the validation split
CANDIDATES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("simulate", "symba K=3 S=2 2x500, 5 rounds (the old default)", ("OLD",)),
    ("simulate", "mono K=2 S=2 2x1000, 4 rounds, batch 100, lr 2e-3",
     (*MONO, "--clients", "2", "--layers", "1000,1000", "--rounds", "4", "--lr", "2e-3",
      "--local-epochs", "1", "--batch-size", "100")),
    ("simulate", "mono K=2 S=2 2x1000, 4 rounds x 2 local epochs, batch 50, lr 2e-3",
     (*MONO, "--clients", "2", "--layers", "1000,1000")),
    ("simulate", "mono K=2 S=2 2x500, 4 rounds x 2 local epochs, batch 50, lr 2e-3 (chosen)", ()),
    ("simulate", "mono K=3 S=2 2x1000, 5 rounds, batch 100, lr 1e-3",
     (*MONO, "--clients", "3", "--layers", "1000,1000", "--rounds", "5", "--lr", "1e-3",
      "--local-epochs", "1", "--batch-size", "100")),
    ("train", "ff 2x500, 2 epochs (the old default)", ("OLD",)),
    ("train", "mono 2x1000, 4 epochs, lr 1e-3, jitter 1 (chosen)", ()),
    ("train", "mono 2x1000, 3 epochs, lr 1e-3, jitter 1", ("--epochs", "3")),
    ("train", "mono 2x1000, 4 epochs, lr 2e-3, jitter 1", ("--lr", "2e-3")),
)


def run_job(job: str, flags: tuple[str, ...], data_dir: str, validation: bool) -> dict[str, Any]:
    """One `bpfree JOB` in a fresh process; its wall time and what its summary says."""
    with tempfile.TemporaryDirectory(prefix="bpfree-defaults-") as tmp:
        out = Path(tmp) / "run"
        if flags == ("OLD",):
            (Path(tmp) / "old.toml").write_text(OLD[job])
            flags = ("--config", str(Path(tmp) / "old.toml"))
        argv = [sys.executable, "-m", "bpfree", job, *flags, "--data-dir", data_dir,
                "--out", str(out), "--quiet"]
        if job == "simulate":
            argv.append("--no-plot")
        if validation:
            argv += ["--set", "train.validation=10000"]
        t0 = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
        wall = time.perf_counter() - t0
        if done.returncode:
            raise RuntimeError(f"bpfree {job} failed: {done.stderr.strip()[-500:]}")
        summary = json.loads((out / "summary.json").read_text())
    val = summary.get("val_accuracy_by_method") or {}
    return {"job": job, "flags": list(flags) if "--config" not in flags else ["(old defaults)"],
            "wall_seconds": wall,
            "algorithm": summary["algorithm"], "test_accuracy": summary["test_accuracy"],
            "val_accuracy": max(val.values()) if val else None}


def markdown(res: dict[str, Any]) -> str:
    lines = ["# Defaults: how they were chosen (validation split) and what they give (test set)", "",
             f"Machine: {res['machine']}. Command: `{res['command']}`. Wall time = launch to exit "
             "of the command (Flower, workers and data loading included).", "",
             "## 1. Candidates, on the validation split (the last 10,000 training images)", "",
             "Rule: the best validation accuracy within the time a first run should take "
             "(simulate: under 2 minutes on 2 cores with all 60,000 images, a sixth more than "
             "here; train: close to the old default's time). The old defaults are for scale.", "",
             "| job | candidate | validation accuracy | wall |", "|---|---|---|---|"]
    for r in res.get("choose", []):
        val = f"{r['val_accuracy']:.2%}" if r["val_accuracy"] is not None else "—"
        lines.append(f"| {r['job']} | {r['name']} | {val} | {r['wall_seconds']:.0f} s |")
    lines += ["", "## 2. The defaults a new user gets (no flags), on the test set", "",
              "| command | algorithm | test accuracy | wall |", "|---|---|---|---|"]
    for r in res.get("check", []):
        lines.append(f"| `bpfree {r['job']}` | {r['algorithm']} | {r['test_accuracy']:.2%} | "
                     f"{r['wall_seconds']:.0f} s |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bpfree.bench.defaults", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("BPFREE_DATA_DIR", ""))
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--only", choices=("choose", "check"))
    args = p.parse_args(argv)
    path = args.out / "defaults.json"
    res: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    res.update(command="python -m bpfree.bench.defaults " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        machine=machine_summary())
    args.out.mkdir(parents=True, exist_ok=True)
    if args.only in (None, "choose"):
        res["choose"] = []
        for job, name, flags in CANDIDATES:
            res["choose"].append({"name": name, **run_job(job, flags, args.data_dir, True)})
            print(f"{job} {name}: val {res['choose'][-1]['val_accuracy']}, "
                  f"{res['choose'][-1]['wall_seconds']:.0f} s", flush=True)
            atomic_write_json(path, res)
            (args.out / "defaults.md").write_text(markdown(res))
    if args.only in (None, "check"):
        res["check"] = []
        for job in ("simulate", "train"):
            res["check"].append(run_job(job, (), args.data_dir, False))
            print(f"{job}: test {res['check'][-1]['test_accuracy']:.4f}, "
                  f"{res['check'][-1]['wall_seconds']:.0f} s", flush=True)
            atomic_write_json(path, res)
            (args.out / "defaults.md").write_text(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
