"""Reference trainer: deterministic by seed, resumable after a real crash, clear CLI errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bpfree_core.config import load_config
from bpfree_core.run.checkpoint import load_checkpoint
from bpfree_core.run.trainer import train_reference

SMALL = ["train.train_limit=2000", "train.test_limit=500", "model.hidden=64,64",
         "train.threads=1", "train.batch_size=100"]


def _cfg(data_dir: Path, *extra: str):
    return load_config(None, [f"train.data_dir={data_dir}", *SMALL, *extra])


def test_same_seed_same_weights_other_seed_other_weights(data_dir):
    a = train_reference(_cfg(data_dir, "train.epochs=1"), progress=False)["weights"]
    b = train_reference(_cfg(data_dir, "train.epochs=1"), progress=False)["weights"]
    c = train_reference(_cfg(data_dir, "train.epochs=1", "train.seed=1"), progress=False)["weights"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def _bpfree(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "bpfree", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_killed_run_resumes_to_the_same_weights(data_dir, tmp_path):
    flags = ["--data-dir", str(data_dir), "--epochs", "4", *sum((["--set", s] for s in SMALL), [])]
    whole = _bpfree("train", *flags, "--out", str(tmp_path / "whole"))
    assert whole.wait(timeout=300) == 0, whole.stderr.read()

    crashed = _bpfree("train", *flags, "--out", str(tmp_path / "crashed"))
    ckpt = tmp_path / "crashed" / "checkpoint.pt"
    deadline = time.monotonic() + 300
    while not ckpt.exists() and crashed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # polling for a file the run writes, with a deadline
    crashed.send_signal(signal.SIGKILL)
    crashed.wait(timeout=30)
    epochs_done = load_checkpoint(ckpt)["epoch"] + 1
    assert epochs_done < 4, "the run finished before it could be killed: nothing was tested"

    resumed = _bpfree("train", *flags, "--out", str(tmp_path / "crashed"), "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    a = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")["weights"]
    b = load_checkpoint(ckpt)["weights"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    summary = json.loads((tmp_path / "crashed" / "summary.json").read_text())
    assert summary["epochs"] == 4 and summary["test_accuracy"] > 0.3


def test_cli_errors_are_one_clear_sentence(tmp_path):
    cases = [
        (["train", "--algorithm", "nope"], "is not a known rule; valid: asge, bp, cwc, deeper, ff"),
        (["train", "--layers", "100,1"], "model.hidden[1]"),
        (["train", "--data-dir", str(tmp_path / "missing")], "does not exist"),
    ]
    for args, words in cases:
        proc = _bpfree(*args)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (args, err)
        assert words in err and "Traceback" not in err


def test_jitter_shifts_each_image_within_bounds_and_is_reproducible():
    import pytest

    from bpfree_core.data.batches import batch_generator, jitter
    from bpfree_core.errors import ConfigError

    x = torch.zeros(400, 28 * 28)
    x[:, 14 * 28 + 14] = 1.0                                     # one lit pixel at (14, 14)
    out = jitter(x, (1, 28, 28), 2, batch_generator(0, 0, 0))
    assert out.shape == x.shape and torch.equal(out.sum(1), torch.ones(400))   # moved, not lost
    rows, cols = out.view(400, 28, 28).nonzero()[:, 1:].T
    offsets = set(zip((rows - 14).tolist(), (cols - 14).tolist(), strict=True))
    assert offsets == {(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)}  # all 25, no more
    assert torch.equal(out, jitter(x, (1, 28, 28), 2, batch_generator(0, 0, 0)))
    assert not torch.equal(out, jitter(x, (1, 28, 28), 2, batch_generator(0, 0, 1)))
    with pytest.raises(ConfigError, match="train.jitter"):
        load_config(None, ["train.jitter=9"])


def test_jitter_changes_training_only_when_asked(data_dir):
    plain = train_reference(_cfg(data_dir, "train.epochs=1"), progress=False)
    off = train_reference(_cfg(data_dir, "train.epochs=1", "train.jitter=0"), progress=False)
    on = train_reference(_cfg(data_dir, "train.epochs=1", "train.jitter=2"), progress=False)
    assert all(torch.equal(plain["weights"][k], off["weights"][k]) for k in plain["weights"])
    assert not all(torch.equal(plain["weights"][k], on["weights"][k]) for k in plain["weights"])
    assert on["test_accuracy"] > 0.25             # still learns (chance: 0.1; 1 short epoch)


def test_a_layer_stuck_for_two_epochs_is_named_with_the_fix(data_dir, tmp_path):
    # lr 0.5 blows every FF layer up: goodness no longer depends on the label.
    train_reference(_cfg(data_dir, "train.epochs=2", "optim.lr=0.5", "train.train_limit=1000"),
                    tmp_path / "bad", progress=False)
    records = [json.loads(line) for line in (tmp_path / "bad" / "metrics.jsonl").open()]
    assert records[0]["warnings"] == []                 # one epoch is not enough to judge
    assert records[1]["warnings"] and all("optim.lr" in w for w in records[1]["warnings"])
    train_reference(_cfg(data_dir, "train.epochs=2"), tmp_path / "good", progress=False)
    records = [json.loads(line) for line in (tmp_path / "good" / "metrics.jsonl").open()]
    assert [r["warnings"] for r in records] == [[], []]


def test_validation_images_are_held_out_and_scored_every_epoch(data_dir, tmp_path):
    held = load_config(None, [*SMALL, f"train.data_dir={data_dir}", "train.validation=500"])
    plain = load_config(None, [*SMALL, f"train.data_dir={data_dir}", "train.train_limit=1500"])
    out = train_reference(held, tmp_path, progress=False)
    # the last 500 of the 2000 images are never trained on: the weights equal a 1500-image run
    ref = train_reference(plain, None, progress=False)
    assert all(torch.equal(out["weights"][k], ref["weights"][k]) for k in ref["weights"])
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(0.2 < r["val_accuracy"]["softmax"] <= 1 for r in records)   # chance: 0.1
    assert out["val_accuracy"] == records[-1]["val_accuracy"]["softmax"]
    assert "val_accuracy" not in ref


def test_eval_limit_scores_a_subset_per_epoch_and_the_whole_test_set_at_the_end(data_dir, tmp_path):
    cheap = load_config(None, [*SMALL, f"train.data_dir={data_dir}", "train.eval_limit=100",
                               "train.epochs=3"])
    out = train_reference(cheap, tmp_path, progress=False)
    full = train_reference(cheap.with_overrides(["train.eval_limit=0"]), None, progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["test_images"] for r in records] == [100, 100, 500]
    assert out["test_accuracy_by_method"] == full["test_accuracy_by_method"]   # runtime only


def test_layer_diagnostics_score_each_layer_on_its_own(data_dir, tmp_path):
    from bpfree_core.data.splits import run_splits
    from bpfree_core.diagnostics import layer_diagnostics, separation
    from bpfree_core.model import build_objective

    cfg = load_config(None, [*SMALL, f"train.data_dir={data_dir}", "model.algorithm=mono",
                             "train.validation=500"])
    out = train_reference(cfg, tmp_path, progress=False)
    table = out["layer_diagnostics"]
    assert list(table) == ["0", "1"]
    # only the last layer votes here, so its own accuracy is the model's
    assert table["1"]["softmax"] == round(out["val_accuracy"], 4)
    assert table["0"]["softmax"] > 0.5 and 0 <= table["0"]["dead_units"] <= 1
    weights = {k: v.clone() for k, v in out["weights"].items()}
    weights["layers.1.body.bias"].fill_(-1e6)                 # every unit of layer 1 is dead
    _, val, _ = run_splits(cfg)
    dead = layer_diagnostics(weights, cfg, build_objective(cfg), val)
    assert dead["1"]["dead_units"] == 1.0 and dead["1"]["sparsity"] == 1.0
    assert dead["0"] == table["0"]
    g = torch.tensor([[3.0, 1.0, 1.0], [1.0, 3.0, 1.0]])
    assert separation(g, torch.tensor([0, 1])) == pytest.approx(2.0 / float(g.std()))
    assert separation(g, torch.tensor([1, 0])) < 0


def test_layer_diagnostics_every_n_epochs_and_always_the_last(data_dir, tmp_path) -> None:  # noqa: ANN001
    train_reference(_cfg(data_dir, "train.epochs=3", "train.diagnostics_every=2"), tmp_path / "run",
                    progress=False)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert ["layer_diagnostics" in r for r in records] == [False, True, True]
    assert set(records[-1]["layer_diagnostics"]) == {"0", "1"}
