"""`import bpfree`: the README's example runs as written; callbacks see every record and stop a
run; arrays and torch Datasets become the same cached npz; the Python runs equal the CLI's."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import bpfree
from bpfree.api import dataset_reference
from bpfree.client.supervisor import REPO_ROOT


def _readme_example() -> str:
    text = (REPO_ROOT / "README.md").read_text()
    section = text[text.index("## From Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs_as_written(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    done = subprocess.run([sys.executable, "-c", _readme_example()], cwd=tmp_path, text=True,
                          capture_output=True, timeout=300,
                          env={**__import__("os").environ, "BPFREE_CACHE_DIR": str(tmp_path / "cache"),
                               "PYTHONPATH": str(REPO_ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    first, second = done.stdout.strip().splitlines()[-2:]
    acc, trained, rows = first.split()
    assert float(acc) > 0.9 and int(trained) < 40 and int(rows) == int(trained)   # stopped early
    assert float(second.split()[-1]) == pytest.approx(float(acc))   # predict agrees with the run
    assert (tmp_path / "runs" / "python" / "summary.json").is_file()


def _blobs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(7).normal(0, 2, (3, 8))
    y = rng.integers(0, 3, n)
    return (centers[y] + rng.normal(0, 1.0, (n, 8))).astype(np.float32), y


def test_callbacks_see_every_record_and_can_stop_the_run(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("BPFREE_CACHE_DIR", str(tmp_path / "cache"))
    (x, y), (xt, yt) = _blobs(400), _blobs(100, 1)
    seen: list[int] = []
    run = bpfree.train(data=(x, y, xt, yt), algorithm="mono", layers="50", epochs=10,
                       batch_size=50, callbacks=[lambda r: seen.append(r["epoch"]),
                                                 lambda r: r["epoch"] == 3])
    assert seen == [1, 2, 3] and [r["epoch"] for r in run.metrics] == [1, 2, 3]
    assert run.summary["epochs_trained"] == 3 and run.summary["stopped_early"]
    with pytest.raises(Exception, match="EarlyStopping watches 'val_accuracy'"):
        bpfree.train(data=(x, y, xt, yt), algorithm="mono", layers="50", epochs=2, batch_size=50,
                     callbacks=[bpfree.EarlyStopping()])


def test_arrays_and_torch_datasets_become_the_same_cached_file(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("BPFREE_CACHE_DIR", str(tmp_path / "cache"))
    (x, y), (xt, yt) = _blobs(200), _blobs(50, 1)
    by_arrays = dataset_reference((x, y, xt, yt))
    train = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    test = torch.utils.data.TensorDataset(torch.from_numpy(xt), torch.from_numpy(yt))
    by_datasets = dataset_reference((train, test))
    assert by_arrays.startswith(f"npz:{tmp_path / 'cache' / 'arrays'}")
    a, b = (np.load(r.split(":", 1)[1]) for r in (by_arrays, by_datasets))
    assert all(np.array_equal(a[k], b[k]) for k in ("x_train", "y_train", "x_test", "y_test"))
    with pytest.raises(Exception, match="unknown keyword"):
        bpfree.train(data=(x, y, xt, yt), epoch=3)


def test_a_python_run_equals_the_command_line_run(data_dir: Path, tmp_path: Path) -> None:
    from bpfree.cli import main
    from bpfree_core.run.checkpoint import load_checkpoint

    flags = ["model.algorithm=mono", "model.hidden=60", "train.train_limit=1000",
             "train.test_limit=200", "train.epochs=2", "train.threads=1", f"train.data_dir={data_dir}"]
    run = bpfree.train(set=flags, out=tmp_path / "py")
    assert main(["train", "--config", str(_toml(tmp_path)), *sum((["--set", f] for f in flags), []),
                 "--out", str(tmp_path / "cli"), "--no-progress"]) == 0
    cli = load_checkpoint(tmp_path / "cli" / "checkpoint.pt")["weights"]
    assert all(torch.equal(run.weights[k], cli[k]) for k in cli)


def _toml(tmp_path: Path) -> Path:
    path = tmp_path / "plain.toml"   # --config: the plain field defaults, as the library uses
    path.write_text("[train]\nseed = 0\n")
    return path
