"""The outputs of `bpfree bench sweep`: throughput.{csv,json,md}, plots, and the terminal table.

bench/sweep.py measures and analyses; this module only writes what it found.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

MIB = 2**20

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
    from bpfree.bench.plots import plot_all

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
