"""The training step's throughput: per-tensor Adam + per-batch host reads (before) vs now.

One process, one net, real MNIST batches; the variants take turns (ABCABC...) so machine noise
hits all of them alike, and the table reports each one's samples/s and its ratio to "before".

    python -m bpfree.bench.step --data-dir ../shared/datasets --out bench/results

Variants (same maths, same batches):
- before:  Adam's per-tensor loop, and every step's statistics read back as Python floats (what
           the step did until the renovation: a host sync per statistic per layer per batch);
- foreach: the default now: foreach Adam, statistics left on the device until the epoch ends;
- fused:   fused Adam (the default on CUDA; on CPU opt-in, optim.kernels = fused, as its last bits
           differ from foreach and every committed CPU run used the per-tensor maths).

`--ceiling` instead measures every MLP objective at each width in --widths (3 layers, batch 100,
the default kernels): samples/s, the matmul GFLOP/s those samples carry (forward and backward
matmuls of one step, counted by torch.utils.flop_counter) and their fraction of the one-core
float32 matmul ceiling measured in the same run (bench.ceilings.matmul_flops):

    python -m bpfree.bench.step --ceiling --data-dir ../shared/datasets --out bench/results
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from bpfree_core.config import load_config
from bpfree_core.data.batches import train_packets
from bpfree_core.data.datasets import load_dataset
from bpfree_core.metrics import RunningMeans
from bpfree_core.model import Stage, build_layers, build_objective
from bpfree_core.objectives import registered
from bpfree_core.run.checkpoint import atomic_write_json
from bpfree_core.runtime import set_threads

CEILING_OBJECTIVES = ("ff", "symba", "mono", "sffa", "ffcl", "uff", "deeper", "bp")

VARIANTS = {"before": ("single", True), "foreach": ("foreach", False), "fused": ("fused", False)}


def measure(cfg, packets: list, kernels: str, read_back: bool, stage: Stage | None = None) -> float:
    """Seconds to train `packets` once from a fresh stack (or on `stage`, as it is)."""
    stage = stage or Stage(build_layers(cfg))
    for layer in stage.layers:
        layer.place(torch.device("cpu"), kernels)
    means = RunningMeans()
    t0 = time.perf_counter()
    for packet in packets:
        _, metrics = stage.train_step(packet)
        if read_back:
            metrics = {i: {k: float(v) for k, v in m.items()} for i, m in metrics.items()}
        means.add(metrics)
    means.means()
    return time.perf_counter() - t0


def run(data_dir: str, algorithm: str, hidden: str, batches: int, repeats: int) -> dict[str, Any]:
    cfg = load_config(None, [f"model.algorithm={algorithm}", f"model.hidden={hidden}",
                             "train.threads=1", f"train.data_dir={data_dir}"])
    set_threads(1)
    split = load_dataset(cfg.model.dataset, data_dir or None).train
    split = split.subset(slice(0, batches * cfg.train.batch_size))
    packets = list(train_packets(build_objective(cfg), split, cfg, epoch=0))
    measure(cfg, packets[:5], "foreach", False)   # warm-up: allocator, kernels
    seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(repeats):
        for name, (kernels, read_back) in VARIANTS.items():
            seconds[name].append(measure(cfg, packets, kernels, read_back))
    samples = len(packets) * cfg.train.batch_size
    best = {name: min(s) for name, s in seconds.items()}
    return {"algorithm": algorithm, "hidden": hidden, "batch_size": cfg.train.batch_size,
            "batches": len(packets), "repeats": repeats,
            "samples_per_second": {n: samples / s for n, s in best.items()},
            "ratio_to_before": {n: best["before"] / s for n, s in best.items()},
            "seconds": seconds, "machine": f"{platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores, torch {torch.__version__}, 1 thread"}


def step_flops(stage: Stage, packet) -> int:
    """Matmul FLOPs (forward + backward) of one training step of `stage` on `packet` (the step is
    taken), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        stage.train_step(packet)
    return counter.get_total_flops()


def ceiling_row(data_dir: str, algorithm: str, width: int, batches: int, repeats: int,
                ceiling: float, kernels: str = "foreach", extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """One row; `kernels` is K[+compile][+one_pass]: optimiser kernels K, and train.compile /
    train.one_pass on (a compiled stack is timed after its compile)."""
    variant = kernels
    kernels, *flags = variant.split("+")
    compiled = "compile" in flags
    cfg = load_config(None, [f"model.algorithm={algorithm}", f"model.hidden=3x{width}",
                             "train.threads=1", "train.batch_size=100", f"train.data_dir={data_dir}",
                             *extra, *(f"train.{f}=true" for f in flags if f != "compile")])
    split = load_dataset(cfg.model.dataset, data_dir or None).train
    packets = list(train_packets(build_objective(cfg), split.subset(slice(0, batches * 100)), cfg,
                                 epoch=0))
    flops = step_flops(Stage(build_layers(cfg)), packets[0])
    # compiled: one stack, compiled during the warm-up and then timed, as a run would use it
    stage = Stage(build_layers(cfg.with_overrides(["train.compile=true"]))) if compiled else None
    measure(cfg, packets[:3], kernels, False, stage)   # warm-up
    best = min(measure(cfg, packets, kernels, False, stage) for _ in range(repeats))
    achieved = flops * len(packets) / best
    return {"algorithm": algorithm, "width": width, "kernels": variant,
            "settings": " ".join(extra), "samples_per_second": len(packets) * 100 / best,
            "gflops": achieved / 1e9, "fraction": achieved / ceiling,
            "step_mflop_per_sample": flops / 100 / 1e6}


def run_ceiling(data_dir: str, widths: list[int], objectives: list[str], batches: int,
                repeats: int, kernels: list[str]) -> dict[str, Any]:
    from bpfree.bench.ceilings import matmul_flops

    set_threads(1)
    rows = []
    for w in widths:
        for a in objectives:
            for k in kernels:   # the ceiling right before each row: these machines drift
                rule = registered()[a]   # the variants an objective refuses are skipped
                if ("+compile" in k and not rule.supports_compile
                        or "+one_pass" in k and not rule.uses_negatives):
                    continue
                ceiling = matmul_flops(threads=1, seconds=0.5)
                rows.append({**ceiling_row(data_dir, a, w, batches, repeats, ceiling, k),
                             "ceiling_gflops": ceiling / 1e9})
    return {"rows": rows, "batches": batches,
            "repeats": repeats, "machine": f"{platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores, torch {torch.__version__}, 1 thread"}


def render_ceiling(result: dict[str, Any], command: str) -> str:
    lines = ["# The training step against the matmul ceiling (CPU, one core)", "", f"`{command}`", "",
             f"3 layers of WIDTH units, batch 100, {result['batches']} real MNIST batches, best of "
             f"{result['repeats']}; {result['machine']}. Ceiling: a 1024 x 1024 float32 matmul "
             "on one thread, measured right before each row.", "",
             "| objective | width | optimiser kernels (+ train options) | samples/s | "
             "matmul MFLOP/sample | GFLOP/s | "
             "ceiling GFLOP/s | of ceiling |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['algorithm']} | {r['width']} | {r['kernels']} | {r['samples_per_second']:.0f} | "
                     f"{r['step_mflop_per_sample']:.1f} | {r['gflops']:.1f} | "
                     f"{r['ceiling_gflops']:.1f} | {r['fraction']:.0%} |")
    lines += ["", "GFLOP/s counts only the matmuls of a step (forward and backward, as "
              "torch.utils.flop_counter sees them); the gap to the ceiling is the elementwise "
              "work, the optimiser and the Python around them. foreach is the default (torch.optim's "
              "bits); fused (`--set optim.kernels=fused`) updates each tensor in one pass, within "
              "1e-5 of foreach (tests/test_step.py). +compile (`--set train.compile=true`) runs each "
              "layer's forward and loss through torch.compile, timed after it compiled (seconds "
              "per layer shape); its float bits differ from eager (tests/test_compile.py). "
              "+one_pass (`--set train.one_pass=true`) sends positive and negative data through "
              "each layer as one batch; other float bits too (tests/test_one_pass.py).", ""]
    return "\n".join(lines)


def render(result: dict[str, Any], command: str) -> str:
    lines = ["# Training-step throughput (CPU)", "",
             f"`{command}`", "",
             f"{result['algorithm']} {result['hidden']}, batch {result['batch_size']}, "
             f"{result['batches']} real MNIST batches, best of {result['repeats']} interleaved "
             f"repeats; {result['machine']}.", "",
             "| variant | samples/s | vs before |", "|---|---|---|"]
    for name in VARIANTS:
        lines.append(f"| {name} | {result['samples_per_second'][name]:.0f} | "
                     f"{result['ratio_to_before'][name]:.2f}x |")
    lines += ["", "before = per-tensor Adam and a host read of every statistic each batch (the "
              "step until the renovation); foreach = the default now (bit-identical weights on "
              "CPU); fused = the CUDA default, on CPU opt-in with `--set optim.kernels=fused` (its "
              "last bits differ from foreach, so committed CPU runs keep foreach).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bpfree bench step", description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=os.environ.get("BPFREE_DATA_DIR", ""))
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--algorithm", default="ff")
    p.add_argument("--hidden", default="3x1000")
    p.add_argument("--batches", type=int, default=60)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--ceiling", action="store_true",
                   help="every MLP objective's fraction of the one-core matmul ceiling instead")
    p.add_argument("--widths", default="500,1000", help="--ceiling: layer widths")
    p.add_argument("--objectives", default=",".join(CEILING_OBJECTIVES), help="--ceiling: objectives")
    p.add_argument("--kernels", default="foreach,fused",
                   help="--ceiling: optimiser kernels; K+compile, K+one_pass turn those train options on")
    args = p.parse_args(argv)
    if args.ceiling:
        return ceiling_main(args)
    result = run(args.data_dir, args.algorithm, args.hidden, args.batches, args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "step.json", result)
    command = (f"python -m bpfree.bench.step --data-dir DIR --algorithm {args.algorithm} --hidden "
               f"{args.hidden} --batches {args.batches} --repeats {args.repeats}")
    (args.out / "step.md").write_text(render(result, command))
    print(render(result, command))
    return 0


def ceiling_main(args: argparse.Namespace) -> int:
    result = run_ceiling(args.data_dir, [int(w) for w in args.widths.split(",")],
                         args.objectives.split(","), args.batches, args.repeats,
                         args.kernels.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "step_ceiling.json", result)
    command = (f"python -m bpfree.bench.step --ceiling --data-dir DIR --widths {args.widths} "
               f"--objectives {args.objectives} --kernels {args.kernels} --batches {args.batches} "
               f"--repeats {args.repeats}")
    (args.out / "step_ceiling.md").write_text(render_ceiling(result, command))
    print(render_ceiling(result, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
