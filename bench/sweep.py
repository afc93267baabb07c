"""`bpfree bench sweep`: how fast layer-wise training goes over S stages and K clients, and why.

    bpfree bench sweep --preset readme --data-dir ../shared/datasets --out bench/results

Every run first measures this machine's ceilings (float32 matmul GFLOP/s on one core, raw loopback
TCP, a raw-bytes gRPC stream, the project's own activation stream), then visits the sweep points.
Points vary one factor at a time around a baseline (stages S, clients K, batch size, layer width,
wire dtype, in-flight window), or every combination with --grid.

A K = 1 point is one real pipeline: S `bpfree worker` processes on loopback gRPC, fed by this
process (the driver); one warm-up epoch, then `--epochs` measured ones (the fastest is kept). The
workers report per-stage busy / idle / blocked seconds, bytes and a per-batch timeline (step start,
step end, hand-off), from which come the bubble fraction and the Gantt chart. A K > 1 point is a
real federated run (`bpfree simulate`: Flower simulation, K clients x S workers) whose rounds are
split with bench/federated.py's accounting.

Beside each measurement sits the prediction of bench/model.py fed with what was measured here:
per-stage compute seconds per batch (the workers' busy time; the driver counts as stage -1 with
its packet-making time), bytes per batch on each link and the activation stream's measured
bytes/s. The same model then extrapolates on paper (4-8 stages, 10/100 Gbit/s links, a GPU).
Outputs: OUT/throughput.{csv,json,md} and OUT/throughput_*.png; RUN_DIR/metrics.jsonl (+ TensorBoard
when installed) with one record per point.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bpfree.bench.sweep_analysis import (
    analyse_federated,
    analyse_pipeline,
    extrapolate,
    load_average,
    replay_columns,
)
from bpfree.bench.sweep_report import MIB, write_outputs
from bpfree_core.config import WIRE_DTYPES, ExperimentConfig
from bpfree_core.errors import ConfigError

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Point:
    stages: int = 2
    clients: int = 1
    batch_size: int = 100
    width: int = 500
    wire: str = "float32"
    window: int = 4

    def label(self) -> str:
        return (f"S={self.stages} K={self.clients} B={self.batch_size} W={self.width} "
                f"{self.wire} win={self.window}")


@dataclass(frozen=True)
class Plan:
    """What to sweep: a baseline and the values each factor takes."""

    baseline: Point
    values: dict[str, tuple]     # factor -> values (Point field names)
    layers: int = 4              # hidden layers of `width` units each
    images: int = 4000           # MNIST training images per epoch (each client's share at K > 1)
    epochs: int = 2              # measured epochs per point (after one warm-up epoch)
    rounds: int = 2              # federated rounds at K > 1
    ceiling_mib: int = 128       # bytes sent per ceiling measurement
    grid: bool = False           # every combination instead of one factor at a time

    def points(self) -> list[Point]:
        if self.grid:
            keys = list(self.values)
            return [dataclasses.replace(self.baseline, **dict(zip(keys, combo, strict=True)))
                    for combo in itertools.product(*(self.values[k] for k in keys))]
        out = [self.baseline]
        for key, vals in self.values.items():
            for v in vals:
                p = dataclasses.replace(self.baseline, **{key: v})
                if p not in out:
                    out.append(p)
        return out


PRESETS: dict[str, Plan] = {
    # The committed table and plots: ~5 minutes on 2 busy cores.
    "readme": Plan(baseline=Point(), values={
        "stages": (1, 2, 4), "wire": WIRE_DTYPES, "batch_size": (25, 50, 100, 200, 400),
        "width": (250, 500, 1000), "window": (1, 2, 4, 8), "clients": (1, 2)}, epochs=3),
    # Seconds: what the tests run.
    "tiny": Plan(baseline=Point(stages=2, batch_size=50, width=64), values={"stages": (1, 2)},
                 layers=2, images=400, epochs=1, rounds=1, ceiling_mib=16),
}


# -- measuring ------------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    import grpc
    import torch

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
            "torch": torch.__version__, "grpc": grpc.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""}


def measure_ceilings(total_mib: int) -> dict[str, float]:
    """This machine's ceilings now: matmul per core (and per GPU), raw TCP, raw gRPC, our stream."""
    import torch

    from bpfree.bench.ceilings import grpc_raw_throughput, matmul_flops, tcp_throughput
    from bpfree.bench.pipeline import stream_throughput

    total = total_mib * MIB
    # best of three short runs: the least disturbed one is closest to what a free core does
    out = {"matmul_gflops_per_core": max(matmul_flops(1024, threads=1, seconds=0.4)
                                         for _ in range(3)) / 1e9,
           "tcp_bytes_per_s": tcp_throughput(MIB, total),
           "grpc_raw_bytes_per_s": grpc_raw_throughput(MIB, total)}
    stream = stream_throughput(MIB, "float32", total)
    out["stream_bytes_per_s"] = stream["wire_bytes_per_second"]
    if torch.cuda.is_available():
        out["matmul_gflops_per_gpu"] = _gpu_matmul_flops() / 1e9
    return out


def _gpu_matmul_flops(n: int = 8192, reps: int = 20) -> float:
    import torch

    a = torch.randn(n, n, device="cuda")
    b = torch.randn(n, n, device="cuda")
    a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def point_config(base: ExperimentConfig, p: Point, plan: Plan) -> ExperimentConfig:
    hidden = ",".join([str(p.width)] * plan.layers)
    return base.with_overrides([
        f"model.hidden={hidden}", f"train.batch_size={p.batch_size}", "train.threads=1",
        f"train.train_limit={plan.images * p.clients}", f"pipeline.stages={p.stages}",
        f"pipeline.wire_dtype={p.wire}", f"pipeline.window={p.window}",
        f"federation.clients={p.clients}", f"federation.rounds={plan.rounds}",
        "federation.local_epochs=1", "federation.partition=iid", "federation.executor=pipeline"])


def stage_flops(cfg: ExperimentConfig) -> list[float]:
    """FLOPs of one train batch on each stage (torch's FLOP counter, one real step in process)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from bpfree_core.balance import stage_ranges
    from bpfree_core.data.batches import train_packets
    from bpfree_core.data.datasets import load_dataset
    from bpfree_core.data.splits import limited
    from bpfree_core.model import Stage, build_layers, build_objective

    objective = build_objective(cfg)
    split = limited(load_dataset(cfg.model.dataset, cfg.train.data_dir or None).train,
                    cfg.train.batch_size)
    packet = next(iter(train_packets(objective, split, cfg, 0)))
    out = []
    for r in stage_ranges(cfg, cfg.pipeline.stages, objective):
        stage = Stage(build_layers(cfg, r, objective))
        with FlopCounterMode(display=False) as counter, torch.enable_grad():
            packet, _ = stage.train_step(packet)
        out.append(float(counter.get_total_flops()))
    return out


class WorkerPool:
    """Stage workers launched once and re-configured for every K = 1 point (no start-up per point)."""

    def __init__(self, n: int, tmp: Path):
        from bpfree.client.supervisor import launch_workers

        self.procs, self.addresses = launch_workers(n, tmp, threads=1) if n else ([], [])

    def close(self) -> None:
        from bpfree.client.supervisor import stop_processes

        stop_processes(self.procs)


def run_pipeline_point(cfg: ExperimentConfig, pool: WorkerPool, epochs: int) -> dict[str, Any]:
    """One warm-up epoch, then `epochs` measured ones; the fastest is kept (least disturbed)."""
    from bpfree.client.pipeline import Pipeline
    from bpfree_core.data.batches import train_packets
    from bpfree_core.data.datasets import load_dataset
    from bpfree_core.data.splits import limited
    from bpfree_core.model import build_objective

    objective = build_objective(cfg)
    split = limited(load_dataset(cfg.model.dataset, cfg.train.data_dir or None).train,
                    cfg.train.train_limit)
    runs = []
    total = epochs + 1
    pids = [p.pid for p in pool.procs[:cfg.pipeline.stages]]
    with Pipeline.connect(cfg, pool.addresses[:cfg.pipeline.stages]) as pipe:
        for e in range(total):
            cpu0 = [time.process_time(), *map(cpu_seconds, pids)]
            t0 = time.perf_counter()
            stats = pipe.train_epoch(train_packets(objective, split, cfg, e), e, total)
            stats["call_seconds"] = time.perf_counter() - t0   # + StartEpoch / FinishEpoch RPCs
            # CPU seconds of the driver and of each worker process (all threads: compute, gRPC)
            stats["cpu_seconds"] = [b - a for a, b in zip(
                cpu0, [time.process_time(), *map(cpu_seconds, pids)], strict=True)]
            runs.append(stats)
    return min(runs[1:] or runs, key=lambda r: r["seconds"])


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_federated_point(cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
    """A real `bpfree simulate` run (Flower simulation, K clients x S stage workers)."""
    from bpfree.bench.federated import overhead_rows
    from bpfree.server.simulate import simulate

    summary = simulate(cfg, run_dir)
    parallel = min(cfg.federation.clients, os.cpu_count() or 2)
    rows = overhead_rows(run_dir, parallel)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary.pop("weights", None)
    return {"summary": summary, "rounds": rows, "records": records, "parallel": parallel}


def rerender(out: Path) -> dict[str, Any]:
    """Recompute the derived columns of OUT/throughput.json from its stored timelines; rewrite all."""
    path = out / "throughput.json"
    if not path.is_file():
        raise ConfigError(f"--render-only: {path} does not exist; run a sweep into {out} first")
    res = json.loads(path.read_text())
    bw = res["ceilings"]["stream_bytes_per_s"]
    for row in res["rows"]:
        label = Point(**{f.name: row[f.name] for f in dataclasses.fields(Point)}).label()
        if row["kind"] == "pipeline" and label in res["timelines"]:
            row.update(replay_columns(res["timelines"][label],
                                      [b / bw for b in row["link_bytes_per_batch"]], row["window"],
                                      row["samples"], row["samples_per_s"]))
    write_outputs(res, out)
    return res


# -- the run ------------------------------------------------------------------------------------------

def run_sweep(plan: Plan, base: ExperimentConfig, out: Path, run_dir: Path | None,
              progress: bool = True, command: str = "") -> dict[str, Any]:
    from tqdm import tqdm

    from bpfree_core.metrics import MetricsWriter

    points = plan.points()
    for p in points:
        check_point(p, plan)
    res: dict[str, Any] = {"command": command, "machine": machine(), "load_before": load_average(),
                           "uptime_before": _uptime(), "plan": _plan_dict(plan), "rows": []}
    say = tqdm.write if progress else print
    say(f"load average before: {res['load_before']} on {res['machine']['cpus']} cores")
    say("measuring ceilings (matmul, raw TCP, raw gRPC, activation stream) ...")
    res["ceilings"] = c = measure_ceilings(plan.ceiling_mib)
    say(f"  matmul {c['matmul_gflops_per_core']:.1f} GFLOP/s per core, TCP "
        f"{c['tcp_bytes_per_s'] / 2**30:.2f} GiB/s, gRPC raw {c['grpc_raw_bytes_per_s'] / 2**30:.2f} "
        f"GiB/s, activation stream {c['stream_bytes_per_s'] / 2**30:.2f} GiB/s")
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
    writer = MetricsWriter(run_dir)
    logging.getLogger("bpfree.client.pipeline").setLevel(logging.WARNING)   # one line per point is enough
    timelines: dict[str, Any] = {}
    k1 = [p for p in points if p.clients == 1]
    pool_size = max((p.stages for p in k1), default=0)
    with tempfile.TemporaryDirectory(prefix="bpfree-sweep-") as tmp:
        pool = WorkerPool(pool_size, Path(tmp))
        try:
            bar = tqdm(points, desc="sweep", unit="point", disable=not progress or None)
            for i, p in enumerate(bar):
                bar.set_postfix_str(p.label())
                cfg = point_config(base, p, plan)
                flops = stage_flops(cfg)
                if p.clients == 1:
                    epoch = run_pipeline_point(cfg, pool, plan.epochs)
                    row = analyse_pipeline(p, cfg, epoch, flops, c)
                    timelines[p.label()] = {"driver_timeline": epoch["driver_timeline"],
                                            "stages": [{"timeline": s["timeline"]}
                                                       for s in epoch["stages"]]}
                else:
                    ref_point = dataclasses.replace(p, clients=1)
                    ref = next((r for r in res["rows"] if r["kind"] == "pipeline"
                                and Point(**{f.name: r[f.name] for f in dataclasses.fields(Point)})
                                == ref_point), None)
                    fed = run_federated_point(cfg, Path(tmp) / f"fed{i}")
                    row = analyse_federated(p, cfg, fed, flops, ref, c)
                row["layers"] = plan.layers
                res["rows"].append(row)
                writer.write({"point": p.label(), **_scalars(row)}, step=i)
                say(f"{p.label():<44} {row['samples_per_s']:8.0f} samples/s  (model "
                    f"{row['predicted_samples_per_s']:8.0f}, {row['model_error']:+.0%})")
        finally:
            pool.close()
            writer.close()
    res["timelines"] = timelines
    baseline = next((r for r in res["rows"] if r["kind"] == "pipeline"
                     and r["stages"] == plan.baseline.stages and r["clients"] == 1
                     and _same_but_stages(r, plan.baseline)), None)
    res["extrapolation"] = extrapolate(baseline, c) if baseline else []
    res["load_after"] = load_average()
    res["uptime_after"] = _uptime()
    write_outputs(res, out)
    return res


def check_point(p: Point, plan: Plan) -> None:
    if p.stages < 1 or p.stages > plan.layers:
        raise ConfigError(f"stages = {p.stages} cannot split {plan.layers} layers; use 1..{plan.layers} "
                          "(or more --layers)")
    if p.clients < 1 or p.batch_size < 1 or p.width < 1 or p.window < 1:
        raise ConfigError(f"sweep point {p.label()}: clients, batch size, width and window must be "
                          ">= 1")
    if p.wire not in WIRE_DTYPES:
        raise ConfigError(f"wire dtype {p.wire!r} is not one of {', '.join(WIRE_DTYPES)}")
    if plan.images < p.batch_size:
        raise ConfigError(f"--images {plan.images} is smaller than batch size {p.batch_size}")


def _same_but_stages(row: dict[str, Any], p: Point) -> bool:
    return all(row[k] == getattr(p, k) for k in ("batch_size", "width", "wire", "window"))


def _scalars(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if isinstance(v, int | float | str)}


def _plan_dict(plan: Plan) -> dict[str, Any]:
    d = dataclasses.asdict(plan)
    d["values"] = {k: list(v) for k, v in plan.values.items()}
    return d


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
