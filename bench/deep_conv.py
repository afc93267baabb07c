"""A deep DeeperForward conv net over S = 1, 2, 4 stage workers: throughput and stage balance.

    python -m bpfree.bench.deep_conv --data-dir ../shared/datasets --out bench/results

1. Each layer's cost, measured in this process on one thread: seconds per training batch
   (forward, local loss, backward into its own weights, optimiser step), after a warm-up
   (bpfree_core.balance.measure_layer_costs: what pipeline.balance = measured splits by).
2. Real pipelines of S = 1, 2, 4 `bpfree worker` processes (1 thread each) on loopback: one
   warm-up epoch, one measured epoch; samples/s and each stage's busy seconds. For S > 1 a
   second pipeline splits by the measured costs (pipeline.balance = measured).
3. On paper, every stage on a core of its own and the link free: samples/s = batch / (the
   slowest stage's summed layer cost), and the balance = fastest / slowest stage. With fewer
   cores than stages (S = 4 on 2 cores here) the measured row is core-bound and the paper row
   is what 4 cores or GPUs would do.
Writes deep_conv.{md,json}.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from bpfree.bench.accuracy import machine_summary
from bpfree_core.balance import measure_layer_costs, split_stages, stage_ranges
from bpfree_core.config import ExperimentConfig, load_config
from bpfree_core.data.splits import limited, run_splits
from bpfree_core.model import build_objective
from bpfree_core.run.checkpoint import atomic_write_json
from bpfree_core.run.trainer import run_epoch

RESULTS = Path(__file__).resolve().parent / "results"
NET = ("model.algorithm=deeper", "model.conv=20,20,40,40,80,80,160,160", "model.hidden=[]",
       "optim.lr=1e-2", "train.batch_size=100", "train.threads=1")


def pipeline_row(cfg: ExperimentConfig, stages: int, images: int) -> dict[str, Any]:
    from bpfree.client.executor import PipelineExecutor  # gRPC only here

    cfg = cfg.with_overrides([f"pipeline.stages={stages}"])
    objective = build_objective(cfg)
    train, _, _ = run_splits(cfg)
    split = limited(train, images)
    with PipelineExecutor(cfg) as executor:
        run_epoch(executor, objective, split, cfg, 0, 2)          # warm-up
        stats = run_epoch(executor, objective, split, cfg, 1, 2)
    return {"stages": stages, "samples_per_second": stats["samples_per_second"],
            "seconds": stats["seconds"],
            "busy_seconds": [s["busy_seconds"] for s in stats["stages"]],
            "layers": [s["layers"] for s in stats["stages"]]}


def on_paper(cfg: ExperimentConfig, costs: list[float], stages: int) -> dict[str, Any]:
    """Each split priced with the measured per-layer costs: the pipeline's own (equal layer
    counts), by multiply-adds (pipeline.balance = flops), and the best one for these costs."""
    out: dict[str, Any] = {"stages": stages}
    for name, ranges in (("split", split_stages(len(costs), stages)),
                         ("flops_split", stage_ranges(cfg.with_overrides(["pipeline.balance=flops"]),
                                                      stages)),
                         ("best_split", split_stages(len(costs), stages, costs))):
        per_stage = [sum(costs[i] for i in r) for r in ranges]
        out[name] = {"layers": [list(r) for r in ranges], "stage_seconds_per_batch": per_stage,
                     "samples_per_second": cfg.train.batch_size / max(per_stage),
                     "balance": min(per_stage) / max(per_stage)}
    return out


def markdown(res: dict[str, Any]) -> str:
    lines = [
        "# Deep conv net (DeeperForward-style) over S stages",
        "",
        f"Net: `{' '.join(res['net'])}` ({len(res['layer_costs'])} conv layers, 28->14->7->4 "
        f"pixels). Machine: {res['machine']}. Command: `{res['command']}`.",
        "",
        "Per-layer cost (ms per batch of 100, one thread): "
        + ", ".join(f"L{i} {c * 1e3:.1f}" for i, c in enumerate(res["layer_costs"])) + ".",
        "",
        "| S | layers per stage (equal counts) | measured samples/s | stage busy seconds "
        "(measured) | on paper samples/s (a core per stage) | stage balance on paper (fastest / "
        "slowest) | speed-up on paper | split by multiply-adds | best split for these costs | "
        "pipeline.balance = measured: measured samples/s (busy seconds) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = res["paper"][0]["split"]["samples_per_second"]
    for meas, paper in zip(res["measured"], res["paper"], strict=True):
        busy = " / ".join(f"{b:.1f}" for b in meas["busy_seconds"])
        split, flops, best = paper["split"], paper["flops_split"], paper["best_split"]
        lines.append(f"| {meas['stages']} | {_split_text(split['layers'])} | "
                     f"{meas['samples_per_second']:.0f} | {busy} | "
                     f"{split['samples_per_second']:.0f} | {split['balance']:.2f} | "
                     f"{split['samples_per_second'] / base:.2f}x | "
                     f"{flops['samples_per_second'] / base:.2f}x (balance {flops['balance']:.2f}) | "
                     f"{best['samples_per_second'] / base:.2f}x (balance {best['balance']:.2f}: "
                     f"{_split_text(best['layers'])}) | "
                     f"{_balanced_cell(meas)} |")
    lines += ["", f"This machine has {os.cpu_count()} cores: rows with more stages than cores "
              "are core-bound when measured; the paper column is what a core (or GPU) per stage "
              "gives with a free link (bench/model.py's compute bound).", ""]
    return "\n".join(lines)


def _balanced_cell(meas: dict[str, Any]) -> str:
    if "balanced" not in meas:
        return "-"
    b = meas["balanced"]
    busy = " / ".join(f"{x:.1f}" for x in b["busy_seconds"])
    return f"{b['samples_per_second']:.0f} ({busy}; {_split_text(b['layers'])})"


def _split_text(ranges: list[list[int]]) -> str:
    """[[0, 1], [2, 3]] -> "0,1 / 2,3"."""
    return " / ".join(",".join(map(str, r)) for r in ranges)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bpfree.bench.deep_conv", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("BPFREE_DATA_DIR", ""))
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--stages", default="1,2,4")
    p.add_argument("--images", type=int, default=2000, help="training images per measured epoch")
    p.add_argument("--set", action="append", default=[], help="extra overrides")
    args = p.parse_args(argv)
    cfg = load_config(None, [*NET, f"train.data_dir={args.data_dir}", *args.set])
    stages = [int(s) for s in args.stages.split(",")]
    torch.set_num_threads(1)
    costs = measure_layer_costs(cfg, batches=12, warmup=3)   # the pipelines below reuse these
    res: dict[str, Any] = {
        "net": [*NET, *args.set], "layer_costs": costs,
        "command": "python -m bpfree.bench.deep_conv " + " ".join(
            shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "machine": machine_summary(),
        "paper": [on_paper(cfg, costs, s) for s in stages], "measured": []}
    measured = cfg.with_overrides(["pipeline.balance=measured"])
    for s in stages:
        row = pipeline_row(cfg, s, args.images)
        if s > 1:
            row["balanced"] = pipeline_row(measured, s, args.images)
        res["measured"].append(row)
        print(f"S={s}: {row['samples_per_second']:.0f} samples/s measured"
              + (f" ({row['balanced']['samples_per_second']:.0f} split by measured costs)"
                 if s > 1 else ""), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "deep_conv.json", res)
    (args.out / "deep_conv.md").write_text(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
