"""A PNG of test accuracy per round, drawn from a run directory's metrics.jsonl."""

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
