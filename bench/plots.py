"""Plots of a throughput sweep (matplotlib, Agg: no display needed).

throughput_vs_stages.png   measured and predicted samples/s against S (one line per wire dtype)
throughput_timeline.png    per-stage Gantt chart of one measured epoch per S (baseline settings)
throughput_bytes.png       bytes/s on every link against batch size, with the machine's ceilings
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend

from bpfree.bench.timeline import BLOCKED, BUSY, SEND, segments, span  # noqa: E402

MIB = 2**20
_COLORS = {BUSY: "tab:blue", BLOCKED: "tab:orange", SEND: "tab:green"}


def _baseline(res: dict[str, Any]) -> dict[str, Any]:
    return res["plan"]["baseline"]


def _pipeline_rows(res: dict[str, Any], vary: str) -> list[dict[str, Any]]:
    """K = 1 rows equal to the baseline in everything except `vary` (and the wire for S)."""
    base = _baseline(res)
    keep = [k for k in ("stages", "batch_size", "width", "wire", "window") if k != vary]
    if vary == "stages":
        keep.remove("wire")
    return [r for r in res["rows"] if r["kind"] == "pipeline" and r["clients"] == 1
            and all(r[k] == base[k] for k in keep)]


def plot_stages(res: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    rows = _pipeline_rows(res, "stages")
    for wire in sorted({r["wire"] for r in rows}):
        rs = sorted((r for r in rows if r["wire"] == wire), key=lambda r: r["stages"])
        s = [r["stages"] for r in rs]
        (line,) = ax.plot(s, [r["samples_per_s"] for r in rs], "o-", label=f"measured, {wire}")
        ax.plot(s, [r["predicted_samples_per_s"] for r in rs], "x--", color=line.get_color(),
                label=f"model (means), {wire}")
        if all("replay_samples_per_s" in r for r in rs):
            ax.plot(s, [r["replay_samples_per_s"] for r in rs], "s:", color=line.get_color(),
                    mfc="none", label=f"replay (per-batch times), {wire}")
    one = [r for r in rows if r["stages"] == 1 and r["wire"] == "float32"]
    if one:
        top = max(r["stages"] for r in rows)
        ax.plot([1, top], [one[0]["samples_per_s"], top * one[0]["samples_per_s"]], ":", color="grey",
                label="ideal (S x the S = 1 rate)")
    cpus = res["machine"]["cpus"]
    ax.axvline(cpus - 0.5, color="red", lw=0.8, alpha=0.5)
    ax.text(cpus - 0.45, ax.get_ylim()[1] * 0.95, f"S + driver > {cpus} cores", color="red",
            fontsize=8, va="top")
    ax.set_xlabel("pipeline stages S (1 process each)")
    ax.set_ylabel("training samples / s")
    ax.set_xticks(sorted({r["stages"] for r in rows}) or [1])
    b = _baseline(res)
    ax.set_title(f"Throughput vs stages (B={b['batch_size']}, W={b['width']}, "
                 f"window {b['window']})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False)   # off the data
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_timeline(res: dict[str, Any], path: Path) -> Path:
    base = _baseline(res)
    rows = sorted((r for r in _pipeline_rows(res, "stages") if r["wire"] == base["wire"]),
                  key=lambda r: r["stages"])
    wanted = [f"S={r['stages']} K=1 B={r['batch_size']} W={r['width']} {r['wire']} win={r['window']}"
              for r in rows]
    labels = [k for k in wanted if k in res["timelines"]]
    labels = labels or list(res["timelines"])[:1]
    height = 0.8 + sum(0.7 + 0.45 * (1 + len(res["timelines"][k]["stages"])) for k in labels)
    fig, axes = plt.subplots(len(labels), 1, figsize=(9, height), squeeze=False)
    for ax, label in zip(axes[:, 0], labels, strict=True):
        segs = segments(res["timelines"][label])
        lanes = ["driver"] + [f"stage {s}" for s in range(len(res["timelines"][label]["stages"]))]
        for y, lane in enumerate(lanes):
            for kind in (SEND, BUSY, BLOCKED):
                bars = [(g.start, g.seconds) for g in segs if g.lane == lane and g.kind == kind]
                if bars:
                    ax.broken_barh(bars, (y - 0.35, 0.7), color=_COLORS[kind], label=kind)
        ax.set_yticks(range(len(lanes)), lanes)
        ax.invert_yaxis()
        ax.set_xlim(0, span(segs) * 1.01 or 1)
        ax.set_title(f"{label}: one epoch, {span(segs):.2f} s", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    uniq: dict[str, Any] = {}
    for ax in axes[:, 0]:
        handles, names = ax.get_legend_handles_labels()
        uniq.update(zip(names, handles, strict=True))
    axes[0, 0].legend(uniq.values(), [{"busy": "train_step", "blocked": "hand-off downstream",
                                       "send": "driver handing a batch to stage 0"}[n]
                                      for n in uniq], fontsize=7, loc="lower right",
                      bbox_to_anchor=(1.0, 1.12), ncol=3, frameon=False)
    axes[-1, 0].set_xlabel("seconds since the epoch's first event (gaps = idle, waiting for input)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_bytes(res: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    rows = sorted(_pipeline_rows(res, "batch_size"), key=lambda r: r["batch_size"])
    if rows:
        links = len(rows[0]["link_bytes_per_s"])
        for i in range(links):
            name = "driver -> stage 0" if i == 0 else f"stage {i - 1} -> stage {i}"
            ax.plot([r["batch_size"] for r in rows], [r["link_bytes_per_s"][i] / MIB for r in rows],
                    "o-", label=name)
    c = res["ceilings"]
    for key, name, style in (("tcp_bytes_per_s", "raw TCP ceiling", "--"),
                             ("grpc_raw_bytes_per_s", "raw gRPC ceiling", "-."),
                             ("stream_bytes_per_s", "activation stream ceiling", ":")):
        ax.axhline(c[key] / MIB, ls=style, color="grey", lw=1)
        ax.text(rows[0]["batch_size"] if rows else 1, c[key] / MIB * 1.08, name, fontsize=7,
                color="grey")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("MiB / s on the link (wire bytes)")
    b = _baseline(res)
    ax.set_title(f"Link traffic vs batch size (S={b['stages']}, W={b['width']}, {b['wire']})",
                 fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_all(res: dict[str, Any], out: Path) -> list[Path]:
    return [plot_stages(res, out / "throughput_vs_stages.png"),
            plot_timeline(res, out / "throughput_timeline.png"),
            plot_bytes(res, out / "throughput_bytes.png")]
