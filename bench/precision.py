"""What train.precision = bf16 costs: test accuracy on full MNIST and samples/s beside float32.

    python -m bpfree.bench.precision --data-dir ../shared/datasets --out bench/results

For ff, symba, mono and deeper, the single-process reference trainer runs one short recipe twice,
float32 and bf16 (autocast: matmuls in bfloat16, weights float32), the two precisions of an
objective side by side (one process each, one thread each), so machine noise hits both alike.
bf16 pays off where the matmul units have it (CUDA GPUs, CPUs with AVX512-BF16/AMX); on a CPU
without them autocast emulates it and is slower: the table says which this machine is.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from bpfree.bench.accuracy import machine_summary
from bpfree_core.run.checkpoint import atomic_write_json

RECIPES = {
    "ff": ("model.algorithm=ff", "model.hidden=2x500"),
    "symba": ("model.algorithm=symba", "model.hidden=2x500", "optim.lr=3e-3"),
    "mono": ("model.algorithm=mono", "model.hidden=2x500", "objective.vote_first=true",
             "optim.lr=2e-3", "train.batch_size=50"),
    "deeper": ("model.algorithm=deeper", "model.hidden=2x500", "optim.lr=1e-2",
               "train.predict=goodness"),
}


def train_one(algorithm: str, precision: str, data_dir: str, epochs: int) -> dict[str, Any]:
    from bpfree_core.config import load_config
    from bpfree_core.run.trainer import train_reference

    cfg = load_config(None, [*RECIPES[algorithm], f"train.epochs={epochs}", "train.threads=1",
                             f"train.precision={precision}", f"train.data_dir={data_dir}"])
    with tempfile.TemporaryDirectory(prefix="bpfree-precision-") as tmp:
        t0 = time.perf_counter()
        summary = train_reference(cfg, Path(tmp) / "run", progress=False)
        wall = time.perf_counter() - t0
    return {"algorithm": algorithm, "precision": precision, "accuracy": summary["test_accuracy"],
            "samples_per_second": 60000 * epochs / wall, "wall_s": wall,
            "settings": [*RECIPES[algorithm], f"train.epochs={epochs}"]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    with ProcessPoolExecutor(max_workers=2) as pool:
        for algorithm in args.algorithms.split(","):
            print(f"{algorithm}: float32 and bf16 ...", file=sys.stderr, flush=True)
            jobs = [pool.submit(train_one, algorithm, p, args.data_dir, args.epochs)
                    for p in ("float32", "bf16")]
            rows += [job.result() for job in jobs]
    return {"rows": rows, "machine": machine_summary(), "epochs": args.epochs}


def table(res: dict[str, Any], command: str) -> str:
    out = [f"# train.precision = bf16 beside float32\n\n`{command}`\n\n{res['machine']}; "
           f"reference trainer, full MNIST (60000 train / 10000 test), {res['epochs']} epochs, "
           "one thread per run, float32 and bf16 of an objective at the same time.\n",
           "| objective | settings | float32 test acc | bf16 test acc | bf16 - float32 (pt) | "
           "float32 samples/s | bf16 samples/s | bf16 / float32 speed |",
           "|---|---|---|---|---|---|---|---|"]
    by = {(r["algorithm"], r["precision"]): r for r in res["rows"]}
    for algorithm in dict.fromkeys(r["algorithm"] for r in res["rows"]):
        f, b = by[(algorithm, "float32")], by[(algorithm, "bf16")]
        out.append(f"| {algorithm} | `{' '.join(f['settings'][1:])}` | {f['accuracy']:.2%} | "
                   f"{b['accuracy']:.2%} | {100 * (b['accuracy'] - f['accuracy']):+.2f} | "
                   f"{f['samples_per_second']:.0f} | {b['samples_per_second']:.0f} | "
                   f"{b['samples_per_second'] / f['samples_per_second']:.2f}x |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--algorithms", default=",".join(RECIPES))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    res = run(args)
    text = table(res, "python -m bpfree.bench.precision " + " ".join(argv or sys.argv[1:]))
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.out / "precision.json", res)
        (args.out / "precision.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
