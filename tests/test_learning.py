"""Every objective learns real MNIST: short runs of the reference trainer, far above chance (10%).

Small on purpose (a few thousand images, 2 epochs, narrow nets, 1 thread): these show each
algorithm *learns*; the full-MNIST accuracy claims live in bench/results/accuracy.md.
"""

from __future__ import annotations

import json

import pytest

from bpfree_core.config import load_config
from bpfree_core.run.trainer import train_reference

SMALL = ("train.train_limit=6000", "train.test_limit=1000", "train.epochs=2", "train.threads=1",
         "model.hidden=200,200")
ONE_LAYER = "model.hidden=300"   # goodness voting skips the first layer unless it is the only one

# (algorithm + extra overrides, minimum test accuracy per prediction method); chance is 0.1.
CASES = [
    (("model.algorithm=ff", ONE_LAYER), {"goodness": 0.7, "softmax": 0.75}),
    (("model.algorithm=ff",), {"softmax": 0.7}),
    (("model.algorithm=symba", ONE_LAYER), {"goodness": 0.75, "softmax": 0.75}),
    (("model.algorithm=symba", "objective.icp=false", ONE_LAYER), {"goodness": 0.75}),
    (("model.algorithm=symba", "objective.negatives=hard"), {"goodness": 0.8}),
    # Hard negatives slow the start (120 steps here: goodness 0.60 vs 0.78 uniform); they pay off later.
    (("model.algorithm=ff", "objective.negatives=hard", ONE_LAYER), {"goodness": 0.5, "softmax": 0.75}),
    (("model.algorithm=sffa", ONE_LAYER), {"goodness": 0.75, "softmax": 0.7}),
    (("model.algorithm=ffcl",), {"softmax": 0.8}),
    (("model.algorithm=uff",), {"softmax": 0.8}),
    (("model.algorithm=uff", "model.conv=8", "model.hidden=100"), {"softmax": 0.8}),
    (("model.algorithm=bp",), {"softmax": 0.85}),
    (("model.algorithm=cwc", "model.conv=10,20,40", "model.hidden=[]", "optim.lr=1e-2"),
     {"goodness": 0.6, "softmax": 0.85}),
    (("model.algorithm=mono",), {"softmax": 0.88}),
    (("model.algorithm=deeper", "model.conv=10,20,40,80", "model.hidden=[]", "optim.lr=1e-2"),
     {"goodness": 0.6, "softmax": 0.85}),
    # asge's goodness starts slowly (a fixed random projection of patch energies): 2 epochs of 6000
    (("model.algorithm=asge", "model.conv=16,32", "model.hidden=[]"), {"goodness": 0.3, "softmax": 0.85}),
]


@pytest.mark.parametrize(("extra", "minimum"), CASES,
                         ids=[" ".join(extra) for extra, _ in CASES])
def test_objective_learns_real_mnist(data_dir, extra: tuple[str, ...], minimum: dict[str, float]):
    predict = "both" if "goodness" in minimum else "softmax"
    cfg = load_config(None, [*SMALL, *extra, f"train.data_dir={data_dir}", f"train.predict={predict}"])
    summary = train_reference(cfg, None, progress=False)
    for method, floor in minimum.items():
        acc = summary["test_accuracy_by_method"][method]
        assert acc > floor, f"{' '.join(extra)}: {method} accuracy {acc:.3f} <= {floor}"


def test_accuracy_benchmark_writes_table_and_json(data_dir, tmp_path):
    from bpfree.bench.accuracy import main

    out = tmp_path / "results"
    assert main(["--data-dir", str(data_dir), "--out", str(out), "--runs-dir", str(tmp_path / "runs"),
                 "--only", "bp,uff", "--epochs", "1", "--train-limit", "1000",
                 "--set", "train.test_limit=500", "--set", "model.hidden=[200,200]"]) == 0
    rows = json.loads((out / "accuracy.json").read_text())
    assert [r["name"] for r in rows] == ["uff", "bp"]            # table order, not finish order
    assert all(r["softmax"] > 0.2 and r["epochs"] == 1 for r in rows)   # above chance: it trained
    table = (out / "accuracy.md").read_text()
    assert "| Backprop baseline (same MLP) | 784-200-200 | 1 (1000 train imgs) |" in table
    # a later `--only` run refreshes its rows and keeps the others
    assert main(["--data-dir", str(data_dir), "--out", str(out), "--runs-dir", str(tmp_path / "runs"),
                 "--only", "bp", "--epochs", "1", "--train-limit", "600",
                 "--set", "train.test_limit=500", "--set", "model.hidden=[200,200]"]) == 0
    rows = json.loads((out / "accuracy.json").read_text())
    assert [(r["name"], r["train_images"]) for r in rows] == [("uff", 1000), ("bp", 600)]
    # --reuse takes a finished run of the same config from its run directory, and only that
    metrics = tmp_path / "runs" / "bp" / "metrics.jsonl"
    stamp = metrics.stat().st_mtime_ns
    for limit, reused in (("600", True), ("500", False)):
        assert main(["--data-dir", str(data_dir), "--out", str(out), "--runs-dir",
                     str(tmp_path / "runs"), "--only", "bp", "--epochs", "1", "--train-limit", limit,
                     "--set", "train.test_limit=500", "--set", "model.hidden=[200,200]", "--reuse"]) == 0
        assert (metrics.stat().st_mtime_ns == stamp) is reused
        assert json.loads((out / "accuracy.json").read_text())[1]["train_images"] == int(limit)
