"""A trained model leaves bpfree: predict, evaluate and a TorchScript export.

For every objective, the exported module, loaded in a process where bpfree cannot be imported,
predicts exactly what bpfree predicts on the test set; `bpfree predict` writes a class and
scores per input; `bpfree evaluate` scores another dataset with the run's weights.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from bpfree.cli import main
from bpfree_core.config import load_config
from bpfree_core.data import load_dataset
from bpfree_core.evaluation import EVAL_BATCH, prediction_modes
from bpfree_core.model import Stage, build_layers, build_objective
from bpfree_core.trainer import train_reference

RULES = [("ff", []), ("ff", ["train.predict=goodness"]), ("symba", ["train.predict=goodness"]),
         ("sffa", []), ("ffcl", []), ("uff", []), ("bp", []), ("mono", []),
         ("cwc", ["model.conv=10,20", "model.hidden=[]", "optim.lr=1e-2"]),
         ("deeper", ["model.conv=10,10", "model.hidden=[]", "optim.lr=1e-2"])]
BASE = ["model.hidden=40,40", "train.train_limit=1000", "train.test_limit=300", "train.epochs=1",
        "train.threads=1", "train.batch_size=100"]

# Run the export where bpfree (and the project's generic top-level names) cannot be imported.
NO_BPFREE = """
import sys, torch
OURS = {"bpfree", "bpfree_core", "bpfree_cli", "client", "server", "protos", "bench"}
class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in OURS:
            raise ImportError(f"{name} is blocked")
sys.meta_path.insert(0, Blocked())
model = torch.jit.load(sys.argv[1])
x = torch.load(sys.argv[2])
torch.save(torch.cat([model(x[i:i + 1000]) for i in range(0, len(x), 1000)]).argmax(1), sys.argv[3])
"""


def _bpfree_predictions(cfg, weights, test) -> torch.Tensor:  # noqa: ANN001
    objective = build_objective(cfg)
    stage = Stage(build_layers(cfg, objective=objective))
    stage.load_state_dict(weights)
    _, goodness = prediction_modes(objective, cfg)
    method = cfg.train.predict if cfg.train.predict != "both" else "softmax"
    return torch.cat([objective.predict(stage.eval_step(objective.encode_eval(
        test.images[i:i + EVAL_BATCH], goodness)))[method] for i in range(0, len(test), EVAL_BATCH)])


@pytest.mark.parametrize(("algorithm", "extra"), RULES, ids=[f"{a}-{'-'.join(e)}" for a, e in RULES])
def test_the_export_predicts_what_bpfree_predicts_without_bpfree(algorithm, extra, data_dir, tmp_path,  # noqa: ANN001
                                                                 capsys) -> None:  # noqa: ANN001
    run = tmp_path / "run"
    cfg = load_config(None, [f"train.data_dir={data_dir}", f"model.algorithm={algorithm}", *BASE,
                             *extra])
    weights = train_reference(cfg, run, progress=False)["weights"]
    assert main(["export", str(run), "--out", str(tmp_path / "model.pt")]) == 0
    test = load_dataset("mnist", data_dir).test.subset(slice(0, 300))
    torch.save(test.images, tmp_path / "x.pt")
    done = subprocess.run([sys.executable, "-I", "-c", NO_BPFREE, str(tmp_path / "model.pt"),
                           str(tmp_path / "x.pt"), str(tmp_path / "pred.pt")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    exported = torch.load(tmp_path / "pred.pt")
    assert torch.equal(exported, _bpfree_predictions(cfg, weights, test))
    assert exported.unique().numel() > 1   # not a constant answer
    capsys.readouterr()


def test_predict_writes_class_and_scores_and_evaluate_scores_another_dataset(data_dir, tmp_path,  # noqa: ANN001
                                                                             capsys) -> None:  # noqa: ANN001
    run = tmp_path / "run"
    cfg = load_config(None, [f"train.data_dir={data_dir}", "model.algorithm=mono", *BASE,
                             "train.epochs=2", "train.train_limit=3000"])
    summary = train_reference(cfg, run, progress=False)
    test = load_dataset("mnist", data_dir).test
    x = (test.images[:300].numpy() * 255).round().astype(np.uint8)   # as a user would save them
    np.savez(tmp_path / "new.npz", x=x)
    assert main(["predict", str(run), "--input", str(tmp_path / "new.npz")]) == 0
    rows = (run / "predictions.csv").read_text().splitlines()
    assert rows[0].split(",")[:3] == ["index", "class", "score_0"] and len(rows) == 301
    classes = torch.tensor([int(r.split(",")[1]) for r in rows[1:]])
    assert float((classes == test.labels[:300]).float().mean()) == pytest.approx(
        summary["test_accuracy"], abs=0.06)
    # the same weights scored on another dataset of the same shape: your own npz of MNIST images
    np.savez(tmp_path / "other.npz", x_train=x, y_train=test.labels[:300].numpy(), x_test=x,
             y_test=test.labels[:300].numpy())
    capsys.readouterr()
    assert main(["evaluate", str(run), "--dataset", f"npz:{tmp_path / 'other.npz'}", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["test_images"] == 300
    assert result["test_accuracy"] == pytest.approx(float((classes == test.labels[:300]).float().mean()))
    assert main(["predict", str(tmp_path), "--input", "x.npz"]) == 2   # not a run directory
    assert "has no config.json" in capsys.readouterr().err
