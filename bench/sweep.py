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

import csv
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
from statistics import median
from typing import Any

from bpfree_core.config import WIRE_DTYPES, ExperimentConfig
from bpfree_core.errors import ConfigError

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 2**20


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


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def measure_ceilings(total_mib: int) -> dict[str, float]:
    """This machine's ceilings now: matmul per core (and per GPU), raw TCP, raw gRPC, our stream."""
    import torch

    from bench.ceilings import grpc_raw_throughput, matmul_flops, tcp_throughput
    from bench.pipeline import stream_throughput

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

    from bpfree_core.data import load_dataset
    from bpfree_core.model import Stage, build_layers, build_objective, split_stages
    from bpfree_core.trainer import limited, train_packets

    objective = build_objective(cfg)
    split = limited(load_dataset(cfg.model.dataset, cfg.train.data_dir or None).train,
                    cfg.train.batch_size)
    packet = next(iter(train_packets(objective, split, cfg, 0)))
    out = []
    for r in split_stages(len(objective.layer_sizes()), cfg.pipeline.stages):
        stage = Stage(build_layers(cfg, r, objective))
        with FlopCounterMode(display=False) as counter, torch.enable_grad():
            packet, _ = stage.train_step(packet)
        out.append(float(counter.get_total_flops()))
    return out


class WorkerPool:
    """Stage workers launched once and re-configured for every K = 1 point (no start-up per point)."""

    def __init__(self, n: int, tmp: Path):
        from client.supervisor import launch_workers

        self.procs, self.addresses = launch_workers(n, tmp, threads=1) if n else ([], [])

    def close(self) -> None:
        from client.supervisor import stop_processes

        stop_processes(self.procs)


def run_pipeline_point(cfg: ExperimentConfig, pool: WorkerPool, epochs: int) -> dict[str, Any]:
    """One warm-up epoch, then `epochs` measured ones; the fastest is kept (least disturbed)."""
    from bpfree_core.data import load_dataset
    from bpfree_core.model import build_objective
    from bpfree_core.trainer import limited, train_packets
    from client.pipeline import Pipeline

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


def predict(model: Any, batches: int, batch_size: int, cpu_per_batch: list[float],
            cores: int) -> float:
    """bench/model.py's samples/s, with one more bound: all processes' CPU work per batch shared
    by `cores` cores (the model gives every stage a core of its own; here S + 1 processes and
    their gRPC threads share 2)."""
    period = max(model.period(), sum(cpu_per_batch) / cores)
    return batches * batch_size / (model.fill() + max(batches - 1, 0) * period)


def run_federated_point(cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
    """A real `bpfree simulate` run (Flower simulation, K clients x S stage workers)."""
    from bench.federated import overhead_rows
    from server.simulate import simulate

    summary = simulate(cfg, run_dir)
    parallel = min(cfg.federation.clients, os.cpu_count() or 2)
    rows = overhead_rows(run_dir, parallel)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary.pop("weights", None)
    return {"summary": summary, "rounds": rows, "records": records, "parallel": parallel}


# -- analysis --------------------------------------------------------------------------------------

def _driver_seconds(epoch: dict[str, Any]) -> float:
    """The driver's own time per batch: making a packet (gaps between its sends, median)."""
    sends = epoch.get("driver_timeline") or []
    gaps = [b[0] - a[1] for a, b in zip(sends, sends[1:], strict=False)]
    return median(gaps) if gaps else 0.0


def analyse_pipeline(p: Point, cfg: ExperimentConfig, epoch: dict[str, Any], flops: list[float],
                     ceilings: dict[str, float]) -> dict[str, Any]:
    from bench.model import PipelineModel
    from bench.timeline import bubble_fraction, segments

    st = epoch["stages"]
    n, wall = epoch["batches"], epoch["seconds"]
    busy = [s["busy_seconds"] for s in st]
    per_batch = [b / max(s["train_batches"], 1) for b, s in zip(busy, st, strict=True)]
    # link 0: driver -> stage 0; link i: stage i-1 -> stage i (bytes as they crossed the socket)
    link_bytes = [st[0]["bytes_in"]] + [s["bytes_in"] for s in st[1:]]
    driver = _driver_seconds(epoch)
    model = PipelineModel(compute=(driver, *per_batch), link_bytes=tuple(b / n for b in link_bytes),
                          bandwidth=ceilings["stream_bytes_per_s"], window=p.window)
    cpu = [x / n for x in epoch.get("cpu_seconds", [])]
    cores = os.cpu_count() or 1
    predicted = predict(model, n, p.batch_size, cpu, cores)
    measured = epoch["samples_per_second"]
    b = max(range(len(st)), key=lambda i: busy[i])        # the bottleneck stage
    coordination = max(epoch.get("call_seconds", wall) - wall, 0.0)
    gflops = [f / t / 1e9 if t > 0 else 0.0 for f, t in zip(flops, per_batch, strict=True)]
    return {
        **dataclasses.asdict(p), "kind": "pipeline", "batches": n, "samples": epoch["samples"],
        "epoch_seconds": wall, "samples_per_s": measured, "predicted_samples_per_s": predicted,
        "model_error": predicted / measured - 1 if measured else float("nan"),
        "model_only_samples_per_s": model.throughput(n, p.batch_size),   # without the core bound
        **replay_columns(epoch, model.transfer(), p.window, epoch["samples"], measured),
        "model_period_ms": model.period() * 1e3, "cores_bound_ms": sum(cpu) / cores * 1e3,
        "cpu_ms_per_batch": [x * 1e3 for x in cpu],   # driver, stage 0, ... (compute + gRPC)
        "busy_s": busy, "idle_s": [s["idle_seconds"] for s in st],
        "blocked_s": [s["blocked_seconds"] for s in st],
        "compute_ms_per_batch": [t * 1e3 for t in per_batch], "driver_ms_per_batch": driver * 1e3,
        "bubble_fraction": 1 - sum(busy) / (len(st) * wall) if wall else 0.0,
        "timeline_bubble_fraction": bubble_fraction(segments(epoch), len(st)),
        "link_bytes_per_batch": [x / n for x in link_bytes],
        "link_bytes_per_s": [x / wall for x in link_bytes],
        "link_vs_grpc_raw": max(link_bytes) / wall / ceilings["grpc_raw_bytes_per_s"],
        "gflops_per_stage": gflops,
        "compute_vs_matmul": max(gflops) / ceilings["matmul_gflops_per_core"],
        "flops_per_batch": sum(flops),
        # one "round" = one epoch here: the bottleneck stage's compute, its waits on links and on
        # the other stages (fill/drain included), and the control RPCs around the epoch
        "round_seconds": wall + coordination, "round_compute_s": busy[b],
        "round_communication_s": max(wall - busy[b], 0.0), "round_coordination_s": coordination,
        "load_1min": load_average()[0],
    }


def replay_columns(epoch: dict[str, Any], transfer: list[float], window: int, samples: int,
                   measured: float) -> dict[str, float]:
    """The trace-driven prediction (bench/timeline.replay: per-batch step times, same rules)."""
    from bench.timeline import replay

    seconds = replay(epoch, transfer, window)
    rate = samples / seconds if seconds > 0 else float("nan")
    return {"replay_samples_per_s": rate,
            "replay_error": rate / measured - 1 if measured else float("nan")}


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


def analyse_federated(p: Point, cfg: ExperimentConfig, fed: dict[str, Any], flops: list[float],
                      ref: dict[str, Any] | None, ceilings: dict[str, float]) -> dict[str, Any]:
    """K > 1: rounds split with bench/federated.py's accounting; model = K pipelines sharing cores."""
    rows = fed["rounds"][1:] or fed["rounds"]          # round 1 pays for first connections
    r = min(rows, key=lambda x: x["round_wall"])
    rec = next(x for x in fed["records"] if x["round"] == r["round"])
    examples = sum(c["num_examples"] for c in rec["client_metrics"].values())
    from bpfree_core.federated import stack_template  # torch: imported only when it runs

    params = sum(v.numel() for v in stack_template(cfg).values())
    weight_bytes = 2 * cfg.federation.clients * params * 4            # down + up, float32
    coordination = r["aggregate"] + r["checkpoint"] + r["evaluate"]
    measured = examples / r["round_wall"]
    predicted = float("nan")
    if ref is not None:
        # K client pipelines at once on `cpus` cores: the K = 1 rate times K, unless the cores run
        # out (all CPU work per sample / cores), plus the measured coordination per round.
        cpus = os.cpu_count() or 1
        cpu_per_sample = sum(ref["cpu_ms_per_batch"]) / 1e3 / ref["batch_size"]
        rate = min(p.clients * ref["predicted_samples_per_s"], cpus / cpu_per_sample)
        predicted = examples / (examples / rate + coordination)
    return {
        **dataclasses.asdict(p), "kind": "federated", "batches": examples // p.batch_size,
        "samples": examples, "epoch_seconds": r["clients_wall"], "samples_per_s": measured,
        "predicted_samples_per_s": predicted,
        "model_error": predicted / measured - 1 if measured else float("nan"),
        "busy_s": [], "idle_s": [], "blocked_s": [], "compute_ms_per_batch": [],
        "bubble_fraction": float("nan"), "timeline_bubble_fraction": float("nan"),
        "link_bytes_per_batch": [], "link_bytes_per_s": [weight_bytes / r["round_wall"]],
        "link_vs_grpc_raw": float("nan"), "gflops_per_stage": [], "compute_vs_matmul": float("nan"),
        "flops_per_batch": sum(flops),
        "round_seconds": r["round_wall"], "round_compute_s": r["client_makespan"],
        "round_communication_s": r["transport"], "round_coordination_s": coordination,
        "federated_rounds": fed["rounds"], "load_1min": load_average()[0],
    }


# -- extrapolation on paper ------------------------------------------------------------------------

H100_FP32_FLOPS = 50e12          # dense float32 (TF32 off), order of magnitude
LINKS = {"loopback (measured)": None, "10 Gbit/s": 10e9 / 8, "100 Gbit/s": 100e9 / 8}


def extrapolate(base: dict[str, Any], ceilings: dict[str, float]) -> list[dict[str, Any]]:
    """The model for S = 4 and 8 stages of one `width` layer each, per link speed and device.

    Per-stage compute = one layer's FLOPs per batch / the rate measured at the baseline (CPU) or
    that rate scaled to an H100 by the same fraction of peak matmul as measured here (GPU); bytes
    per batch as measured on the baseline's first stage-to-stage link (halved for 16-bit wires).
    """
    from bench.model import PipelineModel

    layers = base["layers"]
    per_layer_flops = base["flops_per_batch"] / layers
    cpu_rate = sum(base["gflops_per_stage"]) / len(base["gflops_per_stage"]) * 1e9
    frac = cpu_rate / (ceilings["matmul_gflops_per_core"] * 1e9)
    inner = base["link_bytes_per_batch"][1] if len(base["link_bytes_per_batch"]) > 1 else \
        base["link_bytes_per_batch"][0]
    fp32_bytes = inner * (2 if base["wire"] != "float32" else 1)
    devices = {"CPU core (measured rate)": cpu_rate, "H100 (~50 TFLOP/s fp32)": H100_FP32_FLOPS * frac}
    rows = []
    for (device, rate), stages, (link, bw), wire in itertools.product(
            devices.items(), (4, 8), LINKS.items(), ("float32", "bfloat16")):
        bw = bw or ceilings["stream_bytes_per_s"]
        compute = per_layer_flops / rate
        nbytes = fp32_bytes * (1 if wire == "float32" else 0.5)
        model = PipelineModel(compute=(compute,) * stages, link_bytes=(nbytes,) * (stages - 1),
                              bandwidth=bw, window=base["window"])
        period = model.period()
        rows.append({"device": device, "stages": stages, "link": link, "wire": wire,
                     "compute_ms": compute * 1e3, "transfer_ms": model.transfer()[0] * 1e3,
                     "samples_per_s": base["batch_size"] / period,
                     "efficiency": compute / period,
                     "bound": "compute" if compute >= model.transfer()[0] else "link"})
    return rows


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
    logging.getLogger("client.pipeline").setLevel(logging.WARNING)   # one line per point is enough
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


# -- outputs -----------------------------------------------------------------------------------------

CSV_FIELDS = [
    "kind", "stages", "clients", "batch_size", "width", "wire", "window", "samples_per_s",
    "predicted_samples_per_s", "model_error", "replay_samples_per_s", "replay_error",
    "model_only_samples_per_s", "cores_bound_ms",
    "cpu_ms_per_batch", "bubble_fraction", "busy_s", "idle_s", "blocked_s",
    "compute_ms_per_batch", "driver_ms_per_batch", "link_bytes_per_batch", "link_bytes_per_s",
    "link_vs_grpc_raw", "gflops_per_stage", "compute_vs_matmul", "round_seconds", "round_compute_s",
    "round_communication_s", "round_coordination_s", "epoch_seconds", "batches", "samples",
    "load_1min"]


def _cell(v: Any) -> str:
    if isinstance(v, list):
        return "/".join(_cell(x) for x in v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_outputs(res: dict[str, Any], out: Path) -> list[Path]:
    from bench.plots import plot_all

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "throughput.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_FIELDS)
        for r in res["rows"]:
            w.writerow([_cell(r.get(k, "")) for k in CSV_FIELDS])
    (out / "throughput.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    pngs = plot_all(res, out)
    res["plots"] = [str(p) for p in pngs]
    (out / "throughput.md").write_text(markdown(res, pngs))
    return pngs


def summary_rows(res: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["S", "K", "B", "W", "wire", "win", "samples/s", "model", "err", "replay", "err", "bubble",
            "busy s/stage", "MiB/s per link", "link/gRPC", "GFLOP/s/stage", "cmp/matmul",
            "round s: compute/comm/coord"]
    rows = []
    for r in res["rows"]:
        rows.append([
            str(r["stages"]), str(r["clients"]), str(r["batch_size"]), str(r["width"]),
            {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[r["wire"]], str(r["window"]),
            f"{r['samples_per_s']:.0f}", f"{r['predicted_samples_per_s']:.0f}",
            f"{r['model_error']:+.0%}", _num(r.get("replay_samples_per_s")),
            _signed(r.get("replay_error")), _pct(r["bubble_fraction"]),
            "/".join(f"{x:.2f}" for x in r["busy_s"]) or "-",
            "/".join(f"{x / MIB:.0f}" for x in r["link_bytes_per_s"]) or "-",
            _pct(r["link_vs_grpc_raw"]),
            "/".join(f"{x:.0f}" for x in r["gflops_per_stage"]) or "-",
            _pct(r["compute_vs_matmul"]),
            f"{r['round_compute_s']:.2f}/{r['round_communication_s']:.2f}/"
            f"{r['round_coordination_s']:.2f}"])
    return head, rows


def _num(x: float | None) -> str:
    return "-" if x is None or x != x else f"{x:.0f}"


def _signed(x: float | None) -> str:
    return "-" if x is None or x != x else f"{x:+.0%}"


def _pct(x: float) -> str:
    return "-" if x != x else f"{x:.0%}"   # NaN -> "-"


def text_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = "  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True))
    body = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join([line, "-" * len(line), *body])


def markdown(res: dict[str, Any], pngs: list[Path]) -> str:
    m, c = res["machine"], res["ceilings"]
    plan = res["plan"]
    head, rows = summary_rows(res)
    lines = [
        "# Throughput sweep", "",
        f"Command: `{res['command']}`  ",
        f"Machine: {m['cpus']} CPU cores, {m['platform']}, torch {m['torch']}, grpcio {m['grpc']}"
        f"{', GPU ' + m['gpu'] if m['gpu'] else ''}; load average (1/5/15 min) before "
        f"{res['load_before']}, after {res['load_after']} (other work shared these cores: compare "
        "rows as ratios within this run).  ",
        *([f"Note: {res['note']}  "] if res.get("note") else []),
        f"Net: ff, {plan['layers']} hidden layers of W units, MNIST, {plan['images']} training images "
        f"per epoch and client; 1 torch thread per process; best of {plan['epochs']} measured "
        "epoch(s) after a warm-up; K > 1 rows are real `bpfree simulate` runs "
        f"({plan['rounds']} rounds, fastest round after the first).", "",
        "## Ceilings of this machine (same run)", "",
        "| float32 matmul, 1 core | raw TCP loopback | raw-bytes gRPC stream | activation stream "
        "(bpfree wire, fp32) |", "|---|---|---|---|",
        f"| {c['matmul_gflops_per_core']:.1f} GFLOP/s | {c['tcp_bytes_per_s'] / 2**30:.2f} GiB/s "
        f"| {c['grpc_raw_bytes_per_s'] / 2**30:.2f} GiB/s | {c['stream_bytes_per_s'] / 2**30:.2f} "
        "GiB/s |"]
    if c.get("matmul_gflops_per_gpu"):
        lines[-1] += f" GPU matmul {c['matmul_gflops_per_gpu']:.0f} GFLOP/s |"
    lines += [
        "", "## Points", "",
        "`model` = bench/model.py fed with this row's measured mean per-stage compute per batch, "
        "the driver's packet time, bytes per batch per link and the activation stream's bytes/s, "
        "plus a shared-core bound (all processes' CPU seconds per batch / cores); `replay` = the "
        "same rules applied batch by batch to the measured per-batch step times "
        "(bench/timeline.replay), which captures their variance; `err` = prediction / measured - 1. "
        "`bubble` = 1 - sum(busy) / (S x epoch wall). Links: "
        "driver->stage 0, stage 0->1, ... (K > 1: Flower weight traffic, down + up). "
        "`link/gRPC` = busiest link / raw gRPC ceiling; `cmp/matmul` = fastest stage's achieved "
        "GFLOP/s / the one-core matmul ceiling. Round (K = 1: one epoch) = compute of the "
        "bottleneck stage / its waits on links and other stages, fill and drain included / "
        "control RPCs; K > 1: client makespan / Flower transport / aggregation + checkpoint + "
        "evaluation.", "",
        "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    if res.get("extrapolation"):
        lines += [
            "", "## Extrapolation on paper (bench/model.py; not measured)", "",
            "S stages of one W-wide layer each at the baseline's batch size; compute per stage = one "
            "layer's FLOPs per batch / the rate measured here (CPU), or that rate scaled to an H100 "
            "by the same fraction of peak matmul; bytes per batch as measured on a stage-to-stage "
            "link (halved for bf16). Efficiency = compute / period.", "",
            "| device | S | link | wire | compute ms/stage | transfer ms/link | samples/s | efficiency "
            "| bound |", "|---|---|---|---|---|---|---|---|---|"]
        for e in res["extrapolation"]:
            lines.append(f"| {e['device']} | {e['stages']} | {e['link']} | {e['wire']} "
                         f"| {e['compute_ms']:.3f} | {e['transfer_ms']:.3f} | {e['samples_per_s']:.0f} "
                         f"| {e['efficiency']:.0%} | {e['bound']} |")
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in pngs] + [""]
    return "\n".join(lines)
