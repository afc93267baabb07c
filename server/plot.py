"""PNGs of a run directory: test accuracy per round (federated), and the accuracy matrix and
per-task curves of a continual run."""

from __future__ import annotations

import json
from pathlib import Path


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
        ax.legend()
    first = records[0] if records else {}
    clients = first.get("clients", {}).get("sent", "?")
    ax.set_title(f"{run_dir.name}: {clients} clients")
    fig.tight_layout()
    path = out or run_dir / "accuracy.png"
    fig.savefig(path)
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
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    curve = run_dir / "task_accuracy.png"
    fig.savefig(curve)
    plt.close(fig)
    return [heat, curve]
