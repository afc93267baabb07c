"""The analysis of `bpfree bench sweep`: each measured point beside the model's prediction, a
replay of its timelines, and the extrapolation on paper to GPUs and faster links.

bench/sweep.py measures; this module explains the measurements; bench/sweep_report.py writes.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from statistics import median
from typing import TYPE_CHECKING, Any

from bpfree_core.config import ExperimentConfig

if TYPE_CHECKING:
    from bpfree.bench.sweep import Point


def predict(model: Any, batches: int, batch_size: int, cpu_per_batch: list[float],
            cores: int) -> float:
    """bench/model.py's samples/s, with one more bound: all processes' CPU work per batch shared
    by `cores` cores (the model gives every stage a core of its own; here S + 1 processes and
    their gRPC threads share 2)."""
    period = max(model.period(), sum(cpu_per_batch) / cores)
    return batches * batch_size / (model.fill() + max(batches - 1, 0) * period)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]

def driver_seconds(epoch: dict[str, Any]) -> float:
    """The driver's own time per batch: making a packet (gaps between its sends, median)."""
    sends = epoch.get("driver_timeline") or []
    gaps = [b[0] - a[1] for a, b in zip(sends, sends[1:], strict=False)]
    return median(gaps) if gaps else 0.0


def analyse_pipeline(p: Point, cfg: ExperimentConfig, epoch: dict[str, Any], flops: list[float],
                     ceilings: dict[str, float]) -> dict[str, Any]:
    from bpfree.bench.model import PipelineModel
    from bpfree.bench.timeline import bubble_fraction, segments

    st = epoch["stages"]
    n, wall = epoch["batches"], epoch["seconds"]
    busy = [s["busy_seconds"] for s in st]
    per_batch = [b / max(s["train_batches"], 1) for b, s in zip(busy, st, strict=True)]
    # link 0: driver -> stage 0; link i: stage i-1 -> stage i (bytes as they crossed the socket)
    link_bytes = [st[0]["bytes_in"]] + [s["bytes_in"] for s in st[1:]]
    driver = driver_seconds(epoch)
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
    from bpfree.bench.timeline import replay

    seconds = replay(epoch, transfer, window)
    rate = samples / seconds if seconds > 0 else float("nan")
    return {"replay_samples_per_s": rate,
            "replay_error": rate / measured - 1 if measured else float("nan")}


def analyse_federated(p: Point, cfg: ExperimentConfig, fed: dict[str, Any], flops: list[float],
                      ref: dict[str, Any] | None, ceilings: dict[str, float]) -> dict[str, Any]:
    """K > 1: rounds split with bench/federated.py's accounting; model = K pipelines sharing cores."""
    rows = fed["rounds"][1:] or fed["rounds"]          # round 1 pays for first connections
    r = min(rows, key=lambda x: x["round_wall"])
    rec = next(x for x in fed["records"] if x["round"] == r["round"])
    examples = sum(c["num_examples"] for c in rec["client_metrics"].values())
    from bpfree_core.federation.client import stack_template  # torch: imported only when it runs

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
    from bpfree.bench.model import PipelineModel

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


