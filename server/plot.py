"""PNGs of a run directory: test accuracy per round (federated), each layer's loss and accuracy
over epochs or rounds, and the accuracy matrix and per-task curves of a continual run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bpfree_core.run.rundir import read_records


def plot_accuracy(run_dir: Path, out: Path | None = None) -> Path:
    """Write RUN_DIR/accuracy.png (or `out`): headline test accuracy after each round."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    rounds = [r["round"] for r in records]
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    methods = sorted({m for r in records for m in r["test_accuracy"]})
    for method in methods:
        ax.plot(rounds, [r["test_accuracy"].get(method, float("nan")) for r in records],
                marker="o", label=method)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_xticks(rounds)
    ax.grid(alpha=0.3)
    if len(methods) > 1:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False)
    first = records[0] if records else {}
    clients = first.get("clients", {}).get("sent", "?")
    ax.set_title(f"{run_dir.name}: {clients} clients")
    fig.tight_layout()
    path = out or run_dir / "accuracy.png"
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_continual(run_dir: Path) -> list[Path]:
    """RUN_DIR/accuracy_matrix.png (heatmap: row = after task i, column = tested on task j) and
    RUN_DIR/task_accuracy.png (each task's accuracy as tasks arrive), from summary.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = json.loads((run_dir / "summary.json").read_text())
    s = {**s, **s.get("continual", {})}   # a federated run keeps its task results under "continual"
    matrix, tasks = s["accuracy_matrix"], s["tasks"]
    names = ["".join(map(str, t)) if len(t) < 4 else f"{t[0]}..{t[-1]}" for t in tasks]
    title = f"{s['algorithm']}, {s['scenario']}-incremental, {s['strategy']} ({s['method']})"
    fig, ax = plt.subplots(figsize=(5.2, 4.4), dpi=120)
    im = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center",
                    color="white" if v < 0.6 else "black", fontsize=8)
    ax.set_xticks(range(len(tasks)), [f"task {j + 1}\n{n}" for j, n in enumerate(names)], fontsize=7)
    ax.set_yticks(range(len(tasks)), [f"after {i + 1}" for i in range(len(tasks))], fontsize=7)
    ax.set_xlabel("tested on")
    ax.set_title(f"{title}\naverage {100 * s['average_accuracy']:.1f}%, forgetting "
                 f"{100 * s['forgetting']:.1f} pt", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    heat = run_dir / "accuracy_matrix.png"
    fig.savefig(heat)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.2, 3.6), dpi=120)
    steps = range(1, len(matrix) + 1)
    for j in range(len(tasks)):
        ax.plot(steps[j:], [matrix[i][j] for i in range(j, len(matrix))], marker="o",
                label=f"task {j + 1} ({names[j]})")
    ax.plot(steps, s["seen_accuracy"], "k--", label="mean over seen tasks")
    ax.set_xlabel("tasks trained")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_xticks(list(steps))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False)   # off the data
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    curve = run_dir / "task_accuracy.png"
    fig.savefig(curve, bbox_inches="tight")
    plt.close(fig)
    return [heat, curve]


def _layer_series(records: list[dict[str, Any]], metric: str) -> dict[str, list[float]]:
    """{layer: [value per record]} from an epoch run's `layers` (train-step means)."""
    layers = sorted({k for r in records for k in r.get("layers", {})}, key=int)
    return {layer: [r.get("layers", {}).get(layer, {}).get(metric, float("nan")) for r in records]
            for layer in layers}


def _client_series(records: list[dict[str, Any]], metric: str) -> dict[tuple[str, str], list[float]]:
    """{(client, layer): [value per round]} from a federated run's client_metrics ("train/L/metric")."""
    out: dict[tuple[str, str], list[float]] = {}
    for i, r in enumerate(records):
        for client, values in r.get("client_metrics", {}).items():
            for key, value in values.items():
                parts = key.split("/")
                if len(parts) == 3 and parts[0] == "train" and parts[2] == metric:
                    series = out.setdefault((client, parts[1]), [float("nan")] * len(records))
                    series[i] = value
    return out


def plot_layers(run_dir: Path, out: Path | None = None) -> Path | None:
    """RUN_DIR/layers.png: each layer's training loss and accuracy (its own local readout) over
    the epochs, or over the rounds for every client (thin) and their mean (thick). None when the
    rule reports neither."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_records(run_dir)
    federated = bool(records) and "round" in records[0]
    steps = [r["round" if federated else "epoch"] for r in records]
    panels = [m for m in ("loss", "layer_acc") if _has(records, m, federated)]
    if not records or not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.6), dpi=120, squeeze=False)
    for ax, metric in zip(axes[0], panels, strict=True):
        if federated:
            _draw_clients(ax, steps, _client_series(records, metric))
        else:
            for layer, values in _layer_series(records, metric).items():
                ax.plot(steps, values, marker="o", label=f"layer {layer}")
        ax.set_xlabel("round" if federated else "epoch")
        ax.set_ylabel({"loss": "training loss", "layer_acc": "layer's own accuracy"}[metric])
        ax.set_xticks(steps if len(steps) <= 12 else steps[:: max(len(steps) // 10, 1)])
        ax.grid(alpha=0.3)
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8, frameon=False)
    fig.suptitle(f"{run_dir.name}: per layer" + (", per client (thin) and mean" if federated else ""))
    fig.tight_layout()
    path = out or run_dir / "layers.png"
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def _has(records: list[dict[str, Any]], metric: str, federated: bool) -> bool:
    if federated:
        return any(k.endswith("/" + metric) for r in records for c in r.get("client_metrics", {}).values()
                   for k in c)
    return any(metric in v for r in records for v in r.get("layers", {}).values())


def _draw_clients(ax: Any, steps: list[int], series: dict[tuple[str, str], list[float]]) -> None:
    import math

    layers = sorted({layer for _, layer in series}, key=int)
    for n, layer in enumerate(layers):
        colour = f"C{n % 10}"
        mine = [v for (_, lay), v in series.items() if lay == layer]
        for values in mine:
            ax.plot(steps, values, color=colour, alpha=0.35, linewidth=0.8)
        mean = [sum(x for x in col if not math.isnan(x)) / max(sum(not math.isnan(x) for x in col), 1)
                for col in zip(*mine, strict=True)]
        ax.plot(steps, mean, color=colour, marker="o", linewidth=2, label=f"layer {layer}")
