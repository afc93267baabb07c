"""GPU rows, measured: the step's samples/s against the GPU's fp32/bf16 matmul roofline, and S = 1, 2
pipeline stages on one GPU (what throughput.md's H100 rows predict on paper).

    bash bench/gpu_check.sh            # from a clean checkout: installs, then runs this (~5 min)
    python -m bpfree.bench.gpu_check --out bench/results

Synthetic MNIST-shaped batches (throughput does not depend on the pixels), so the machine needs no
dataset. Rows: for each objective and net, the training step of the whole net in one process at
batch 100 and 1000, float32 and train.precision = bf16: samples/s, ms per layer per batch, matmul
TFLOP/s (torch.utils.flop_counter) and its fraction of the matmul ceiling of that precision,
measured here; ff, symba and mono again with train.compile (compile vs eager). Then real stage
workers (`bpfree worker` processes on this GPU) for S = 1 and 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bpfree_core.batches import train_packets
from bpfree_core.checkpoint import atomic_write_json
from bpfree_core.config import load_config
from bpfree_core.data import Split
from bpfree_core.model import Stage, build_layers, build_objective

NETS = (("mono", "2x500"), ("ff", "2x1000"), ("symba", "2x1000"), ("deeper", "2x1000"),
        ("mono", "4x2000"))
H100_PREDICTED_MS = 0.015   # throughput.md: one 500-wide layer, batch 100, per stage (on paper)


def matmul_ceiling(dtype: torch.dtype, n: int = 8192, seconds: float = 2.0) -> float:
    a, b = (torch.randn(n, n, device="cuda", dtype=dtype) for _ in range(2))
    a @ b
    torch.cuda.synchronize()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def _cfg(algorithm: str, hidden: str, batch: int, precision: str, extra: tuple[str, ...] = ()):
    return load_config(None, [f"model.algorithm={algorithm}", f"model.hidden={hidden}",
                              f"train.batch_size={batch}", f"train.precision={precision}",
                              "train.device=cuda", *extra])


def _packets(cfg, batches: int) -> list:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batches * cfg.train.batch_size, 784, generator=gen)
    y = torch.randint(0, 10, (x.shape[0],), generator=gen)
    return list(train_packets(build_objective(cfg), Split(x, y), cfg, epoch=0))


def step_row(algorithm: str, hidden: str, batch: int, precision: str, ceiling: float,
             batches: int = 50, compiled: bool = False) -> dict[str, Any]:
    from bpfree.bench.step import step_flops

    cfg = _cfg(algorithm, hidden, batch, precision)
    packets = _packets(cfg, batches)
    flops_per_step = step_flops(Stage(build_layers(cfg), "cuda"), packets[0])
    if compiled:
        cfg = cfg.with_overrides(["train.compile=true"])
    stage = Stage(build_layers(cfg), "cuda")
    for p in packets[:5]:   # warm-up (train.compile: builds its kernels here)
        stage.train_step(p)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for p in packets:
        stage.train_step(p)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    flops = flops_per_step * len(packets) / seconds
    return {"algorithm": algorithm, "hidden": hidden, "batch": batch, "precision": precision,
            "compile": compiled,
            "samples_per_second": len(packets) * batch / seconds,
            "ms_per_layer_batch": 1e3 * seconds / len(packets) / len(stage.layers),
            "tflops": flops / 1e12, "fraction": flops / ceiling}


def pipeline_row(stages: int, batch: int, plane: str = "tcp", batches: int = 200) -> dict[str, Any]:
    from bpfree.client.pipeline import Pipeline

    cfg = _cfg("mono", "2x500", batch, "float32", (f"pipeline.stages={stages}",
                                                     f"pipeline.data_plane={plane}"))
    packets = _packets(cfg, batches)
    with Pipeline.launch_local(cfg, device="cuda", threads=1) as pipeline:
        pipeline.train_epoch(packets[:20], 0, 2)   # warm-up: CUDA contexts, allocator
        t0 = time.perf_counter()
        pipeline.train_epoch(packets, 1, 2)
        seconds = time.perf_counter() - t0
    return {"stages": stages, "batch": batch, "data_plane": plane,
            "samples_per_second": len(packets) * batch / seconds}


def run() -> dict[str, Any]:
    ceilings = {"float32": matmul_ceiling(torch.float32), "bf16": matmul_ceiling(torch.bfloat16)}
    rows = [step_row(a, h, b, p, ceilings[p]) for a, h in NETS for b in (100, 1000)
            for p in ("float32", "bf16")]
    rows += [step_row(a, h, 100, "float32", ceilings["float32"], compiled=True)   # vs eager
             for a, h in NETS[:3]]
    pipes = [pipeline_row(s, b) for s in (1, 2) for b in (100, 1000)]
    pipes += [pipeline_row(2, b, "grpc") for b in (100, 1000)]   # where the link shows on a GPU
    return {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "ceilings_tflops": {k: v / 1e12 for k, v in ceilings.items()}, "steps": rows,
            "pipelines": pipes}


def table(res: dict[str, Any]) -> str:
    c = res["ceilings_tflops"]
    out = [f"# GPU check: {res['gpu']}\n\n`bash bench/gpu_check.sh` (torch {res['torch']}); "
           f"matmul ceilings measured here: float32 {c['float32']:.1f} TFLOP/s, bf16 "
           f"{c['bf16']:.1f} TFLOP/s (8192^2). throughput.md predicted {H100_PREDICTED_MS} ms per "
           "500-wide layer per batch of 100 on an H100.\n",
           "| objective | net | batch | precision | samples/s | ms per layer per batch | "
           "matmul TFLOP/s | of ceiling |", "|---|---|---|---|---|---|---|---|"]
    for r in res["steps"]:
        precision = r["precision"] + (" + train.compile" if r.get("compile") else "")
        out.append(f"| {r['algorithm']} | {r['hidden']} | {r['batch']} | {precision} | "
                   f"{r['samples_per_second']:.0f} | {r['ms_per_layer_batch']:.3f} | "
                   f"{r['tflops']:.2f} | {r['fraction']:.0%} |")
    out += ["", "Stage workers on this one GPU (mono 2x500, float32, loopback between them):", "",
            "| stages | batch | data plane | samples/s |", "|---|---|---|---|"]
    out += [f"| {p['stages']} | {p['batch']} | {p.get('data_plane', 'grpc')} | "
            f"{p['samples_per_second']:.0f} |" for p in res["pipelines"]]
    out += ["", "`+ train.compile` rows: the same step with each layer's forward and loss through "
            "torch.compile (timed after its warm-up compiled them), beside the eager row above.", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.gpu_check: torch sees no CUDA GPU on this machine; run it on one with a "
              "CUDA build of torch (bash bench/gpu_check.sh installs it).", file=sys.stderr)
        return 1
    res = run()
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "gpu_check.json", res)
    (args.out / "gpu_check.md").write_text(table(res))
    print(table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
