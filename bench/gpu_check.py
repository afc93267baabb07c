"""GPU rows, measured: the step's samples/s against the GPU's fp32/bf16 matmul roofline, and S = 1, 2
pipeline stages on one GPU (what throughput.md's H100 rows predict on paper).

    bash bench/gpu_check.sh            # on a GPU box: sets itself up, then runs this (~8 min)
    bash bench/gpu_check.sh --quick    # ~3 min
    python -m bpfree.bench.gpu_check --dry-run --out /tmp/gc   # every row on the CPU, toy sizes

Synthetic MNIST-shaped batches (throughput does not depend on the pixels), so the machine needs no
dataset. Rows: for each objective and net, the training step of the whole net in one process at
batch 100 and 1000, float32 and train.precision = bf16: samples/s, ms per layer per batch, matmul
TFLOP/s (torch.utils.flop_counter) and its fraction of the matmul ceiling of that precision,
measured here; ff, symba and mono again with train.compile (compile vs eager). Then real stage
workers (`bpfree worker` processes on this GPU) for S = 1 and 2. Last, the paper-scale recipes
(deploy/recipes/*-gpu.toml: ASGE and DeeperForward on CIFAR-10 and Fashion-MNIST), a few
batches each at their own batch size: samples/s and what a whole run of them would take.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bpfree_core.config import load_config
from bpfree_core.data.batches import train_packets
from bpfree_core.data.datasets import Split, run_spec
from bpfree_core.model import Stage, build_layers, build_objective
from bpfree_core.run.checkpoint import atomic_write_bytes, atomic_write_json

NETS = (("mono", "2x500"), ("ff", "2x1000"), ("symba", "2x1000"), ("deeper", "2x1000"),
        ("mono", "4x2000"))
H100_PREDICTED_MS = 0.015   # throughput.md: one 500-wide layer, batch 100, per stage (on paper)


def matmul_ceiling(dtype: torch.dtype, device: str = "cuda", n: int = 8192,
                   seconds: float = 2.0) -> float:
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    _sync(device)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass(frozen=True)
class Plan:
    """What a check measures: the full run (~8 min on an H100), --quick (~3) or --dry-run (every
    row on the CPU at toy sizes, for CI and for trying the script before a GPU is at hand)."""

    device: str = "cuda"
    nets: tuple[tuple[str, str], ...] = NETS
    batches: tuple[int, ...] = (100, 1000)
    steps: int = 50
    pipeline_batches: int = 200
    ceiling_n: int = 8192
    ceiling_seconds: float = 2.0
    compile_rows: bool = True
    recipe_steps: int = 20          # timed batches of each GPU recipe (after 3 of warm-up)
    recipe_batch: int = 0           # 0 = the recipe's own batch size


PLANS = {
    "full": Plan(),
    "quick": Plan(nets=NETS[:3], batches=(1000,), steps=30, pipeline_batches=100, ceiling_seconds=1.0,
                  recipe_steps=8),
    "dry-run": Plan(device="cpu", nets=(("mono", "2x64"), ("ff", "2x64")), batches=(32,), steps=3,
                    pipeline_batches=6, ceiling_n=256, ceiling_seconds=0.1, recipe_steps=1,
                    recipe_batch=2),
}


def _cfg(algorithm: str, hidden: str, batch: int, precision: str, extra: tuple[str, ...] = (),
         device: str = "cuda"):
    return load_config(None, [f"model.algorithm={algorithm}", f"model.hidden={hidden}",
                              f"train.batch_size={batch}", f"train.precision={precision}",
                              f"train.device={device}", *extra])


def _packets(cfg, batches: int) -> list:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batches * cfg.train.batch_size, 784, generator=gen)
    y = torch.randint(0, 10, (x.shape[0],), generator=gen)
    return list(train_packets(build_objective(cfg), Split(x, y), cfg, epoch=0))


def step_row(algorithm: str, hidden: str, batch: int, precision: str, ceiling: float,
             plan: Plan = PLANS["full"], compiled: bool = False) -> dict[str, Any]:
    from bpfree.bench.step import step_flops

    tf32 = ("train.tf32=true",) if precision == "tf32" else ()
    cfg = _cfg(algorithm, hidden, batch, "float32" if precision == "tf32" else precision, tf32,
               device=plan.device)
    packets = _packets(cfg, plan.steps)
    flops_per_step = step_flops(Stage(build_layers(cfg), plan.device), packets[0])
    if compiled:
        cfg = cfg.with_overrides(["train.compile=true"])
    stage = Stage(build_layers(cfg), plan.device)
    for p in packets[:5]:   # warm-up (train.compile: builds its kernels here)
        stage.train_step(p)
    _sync(plan.device)
    t0 = time.perf_counter()
    for p in packets:
        stage.train_step(p)
    _sync(plan.device)
    seconds = time.perf_counter() - t0
    flops = flops_per_step * len(packets) / seconds
    return {"algorithm": algorithm, "hidden": hidden, "batch": batch, "precision": precision,
            "compile": compiled,
            "samples_per_second": len(packets) * batch / seconds,
            "ms_per_layer_batch": 1e3 * seconds / len(packets) / len(stage.layers),
            "tflops": flops / 1e12, "fraction": flops / ceiling}


def pipeline_row(stages: int, batch: int, plane: str = "tcp",
                 plan: Plan = PLANS["full"]) -> dict[str, Any]:
    from bpfree.client.pipeline import Pipeline

    cfg = _cfg("mono", _pipeline_net(plan), batch, "float32", (f"pipeline.stages={stages}",
                                                  f"pipeline.data_plane={plane}"), plan.device)
    packets = _packets(cfg, plan.pipeline_batches)
    with Pipeline.launch_local(cfg, device=plan.device, threads=1) as pipeline:
        pipeline.train_epoch(packets[:max(len(packets) // 10, 1)], 0, 2)   # warm-up: contexts, allocator
        t0 = time.perf_counter()
        pipeline.train_epoch(packets, 1, 2)
        seconds = time.perf_counter() - t0
    return {"stages": stages, "batch": batch, "data_plane": plane,
            "samples_per_second": len(packets) * batch / seconds}


RECIPES = Path(__file__).resolve().parent.parent / "deploy" / "recipes"


def recipe_row(recipe: Path, plan: Plan = PLANS["full"]) -> dict[str, Any]:
    """A few batches of a paper-scale recipe on random images of its dataset's shape: samples/s
    and the wall of its whole schedule at that rate (training only, no evaluation)."""
    cfg = load_config(recipe, [f"train.device={plan.device}", "train.validation=0",
                               *([f"train.batch_size={plan.recipe_batch}"] if plan.recipe_batch else [])])
    c, h, w = run_spec(cfg).shape
    n = cfg.train.batch_size * (plan.recipe_steps + 3)
    gen = torch.Generator().manual_seed(0)
    split = Split(torch.rand(n, c * h * w, generator=gen), torch.randint(0, 10, (n,), generator=gen))
    objective = build_objective(cfg)
    packets = list(train_packets(objective, split, cfg, 0))
    stage = Stage(build_layers(cfg, objective=objective), plan.device)
    stage.set_epoch(0, cfg.train.epochs)
    for p in packets[:3]:
        stage.train_step(p)
    _sync(plan.device)
    t0 = time.perf_counter()
    for p in packets[3:]:
        stage.train_step(p)
    _sync(plan.device)
    rate = (len(packets) - 3) * cfg.train.batch_size / (time.perf_counter() - t0)
    train_images = {"cifar10": 50000, "cifar100": 50000}.get(cfg.model.dataset, 60000)
    return {"recipe": recipe.stem, "algorithm": cfg.model.algorithm, "batch": cfg.train.batch_size,
            "layers": len(stage.layers), "epochs": cfg.train.epochs, "samples_per_second": rate,
            "hours_for_the_run": train_images * cfg.train.epochs / rate / 3600}


def _pipeline_net(plan: Plan) -> str:
    return plan.nets[0][1] if plan.device == "cpu" else "2x500"


def machine(plan: Plan) -> dict[str, Any]:
    """What the numbers were measured on: GPU, driver, CUDA, torch, Python, the commit."""
    gpu = torch.cuda.get_device_name(0) if plan.device != "cpu" else f"CPU dry run ({os.cpu_count()} cores)"
    return {"gpu": gpu, "driver": _command(["nvidia-smi", "--query-gpu=driver_version",
                                            "--format=csv,noheader"]),
            "cuda": torch.version.cuda or "none", "torch": torch.__version__,
            "python": platform.python_version(), "commit": _command(["git", "rev-parse", "HEAD"]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _command(cmd: list[str]) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=20,
                              cwd=Path(__file__).resolve().parent)
        lines = done.stdout.strip().splitlines() if done.returncode == 0 else []
        return lines[0] if lines else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def rows(plan: Plan, ceilings: dict[str, float]) -> Iterator[tuple[str, Callable[[], dict[str, Any]]]]:
    """(section, measure) for every row, in order."""
    for a, h in plan.nets:
        for b in plan.batches:
            for p in ceilings:   # float32, bf16 (and tf32 on a GPU)
                yield "steps", lambda a=a, h=h, b=b, p=p: step_row(a, h, b, p, ceilings[p], plan)
    for a, h in plan.nets[:3] if plan.compile_rows else ():   # vs eager
        yield "steps", lambda a=a, h=h: step_row(a, h, plan.batches[0], "float32",
                                                 ceilings["float32"], plan, compiled=True)
    pipe_batches = plan.batches if plan.device == "cpu" else (100, 1000)
    for s in (1, 2):
        for b in pipe_batches:
            yield "pipelines", lambda s=s, b=b: pipeline_row(s, b, "tcp", plan)
    for b in pipe_batches:   # where the link shows on a GPU
        yield "pipelines", lambda b=b: pipeline_row(2, b, "grpc", plan)
    for recipe in sorted(RECIPES.glob("*-gpu.toml")):
        yield "recipes", lambda recipe=recipe: recipe_row(recipe, plan)


def run(plan: Plan, out: Path) -> dict[str, Any]:
    """Measure row by row; after each, the results so far are written (a crash loses one row,
    which is recorded with its error, and the check goes on)."""
    ceilings = {"float32": matmul_ceiling(torch.float32, plan.device, plan.ceiling_n,
                                          plan.ceiling_seconds),
                "bf16": matmul_ceiling(torch.bfloat16, plan.device, plan.ceiling_n,
                                       plan.ceiling_seconds)}
    if plan.device != "cpu":   # train.tf32: float32 matmuls on the tensor cores
        torch.backends.cuda.matmul.allow_tf32 = True
        ceilings["tf32"] = matmul_ceiling(torch.float32, plan.device, plan.ceiling_n,
                                          plan.ceiling_seconds)
        torch.backends.cuda.matmul.allow_tf32 = False
    res: dict[str, Any] = {**machine(plan), "ceilings_tflops": {k: v / 1e12 for k, v in ceilings.items()},
                           "ceiling_n": plan.ceiling_n, "pipeline_net": _pipeline_net(plan),
                           "steps": [], "pipelines": [], "recipes": [], "errors": []}
    for section, measure in rows(plan, ceilings):
        try:
            res[section].append(measure())
        except Exception as exc:  # noqa: BLE001 - one row lost, with its reason, not the check
            res["errors"].append(f"{section}: {type(exc).__name__}: {exc}"[:2000])
        write(res, out)
    return res


def write(res: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "gpu_check.json", res)
    atomic_write_bytes(out / "gpu_check.md", table(res).encode())


def table(res: dict[str, Any]) -> str:
    c = res["ceilings_tflops"]
    out = [f"# GPU check: {res['gpu']}\n\n`bash bench/gpu_check.sh` (torch {res['torch']}, CUDA "
           f"{res['cuda']}, driver {res['driver']}, Python {res['python']}, commit "
           f"{res['commit'][:12]}, {res['date']}); "
           f"matmul ceilings measured here: float32 {c['float32']:.1f} TFLOP/s, bf16 "
           f"{c['bf16']:.1f} TFLOP/s ({res.get('ceiling_n', 8192)}^2). throughput.md predicted "
           f"{H100_PREDICTED_MS} ms per "
           "500-wide layer per batch of 100 on an H100.\n",
           "| objective | net | batch | precision | samples/s | ms per layer per batch | "
           "matmul TFLOP/s | of ceiling |", "|---|---|---|---|---|---|---|---|"]
    for r in res["steps"]:
        precision = r["precision"] + (" + train.compile" if r.get("compile") else "")
        out.append(f"| {r['algorithm']} | {r['hidden']} | {r['batch']} | {precision} | "
                   f"{r['samples_per_second']:.0f} | {r['ms_per_layer_batch']:.3f} | "
                   f"{r['tflops']:.2f} | {r['fraction']:.0%} |")
    out += ["", f"Stage workers on this one device (mono {res.get('pipeline_net', '2x500')}, float32, "
            "loopback between them):", "",
            "| stages | batch | data plane | samples/s |", "|---|---|---|---|"]
    out += [f"| {p['stages']} | {p['batch']} | {p.get('data_plane', 'grpc')} | "
            f"{p['samples_per_second']:.0f} |" for p in res["pipelines"]]
    out += ["", "Paper-scale recipes (deploy/recipes/*-gpu.toml), training steps only, random "
            "images of the dataset's shape:", "",
            "| recipe | rule | layers | batch | samples/s | the whole run (epochs) at this rate |",
            "|---|---|---|---|---|---|"]
    out += [f"| {r['recipe']} | {r['algorithm']} | {r['layers']} | {r['batch']} | "
            f"{r['samples_per_second']:.0f} | {r['hours_for_the_run']:.2f} h ({r['epochs']}) |"
            for r in res.get("recipes", [])]
    out += ["", "`+ train.compile` rows: the same step with each layer's forward and loss through "
            "torch.compile (timed after its warm-up compiled them), beside the eager row above.", ""]
    out += [f"Row lost: {e}" for e in res.get("errors", [])]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--quick", action="store_true", help="fewer rows: ~3 min on an H100")
    how.add_argument("--dry-run", action="store_true",
                     help="every row on the CPU at toy sizes (CI; trying the script without a GPU)")
    args = parser.parse_args(argv)
    plan = PLANS["dry-run" if args.dry_run else "quick" if args.quick else "full"]
    if plan.device != "cpu" and not torch.cuda.is_available():
        print("bench.gpu_check: torch sees no CUDA GPU on this machine; run it on one with a "
              "CUDA build of torch (bash bench/gpu_check.sh installs it), or try --dry-run.",
              file=sys.stderr)
        return 1
    res = run(plan, args.out)
    print(table(res))
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
