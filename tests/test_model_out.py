"""A trained model leaves bpfree: predict, evaluate and a torch.export program (or TorchScript).

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
from bpfree_core.data.datasets import load_dataset
from bpfree_core.evaluation import EVAL_BATCH, prediction_modes
from bpfree_core.model import Stage, build_layers, build_objective
from bpfree_core.run.trainer import train_reference

RULES = [("ff", []), ("ff", ["train.predict=goodness"]), ("symba", ["train.predict=goodness"]),
         ("sffa", []), ("ffcl", []), ("uff", []), ("bp", []), ("mono", []),
         ("cwc", ["model.conv=10,20", "model.hidden=[]", "optim.lr=1e-2"]),
         ("deeper", ["model.conv=10,10", "model.hidden=[]", "optim.lr=1e-2"]),
         ("asge", ["model.conv=8,16", "model.hidden=[]", "train.predict=goodness"])]
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
path = sys.argv[1]
model = torch.export.load(path).module() if path.endswith(".pt2") else torch.jit.load(path)
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
    assert main(["export", str(run), "--out", str(tmp_path / "model.pt2")]) == 0
    said = capsys.readouterr().out
    assert "(batch, 784)" in said and "torch.export.load" in said
    test = load_dataset("mnist", data_dir).test.subset(slice(0, 300))
    torch.save(test.images, tmp_path / "x.pt")
    _predicts_without_bpfree(tmp_path / "model.pt2", tmp_path, cfg, weights, test)
    if algorithm == "mono":   # TorchScript, where asked
        assert main(["export", str(run), "--out", str(tmp_path / "model.pt"), "--format",
                     "torchscript"]) == 0
        _predicts_without_bpfree(tmp_path / "model.pt", tmp_path, cfg, weights, test)
    capsys.readouterr()


def test_the_printed_check_runs_as_printed_for_a_run_on_feature_rows(tmp_path, capsys) -> None:  # noqa: ANN001
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(300, 12)).astype(np.float32), rng.integers(0, 3, 300)
    np.savez(tmp_path / "rows.npz", x_train=x, y_train=y, x_test=x[:50], y_test=y[:50])
    assert main(["train", "--dataset", f"npz:{tmp_path / 'rows.npz'}", "--epochs", "1", "--layers",
                 "20", "--out", str(tmp_path / "run"), "--quiet", "--no-plot"]) == 0
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "m.pt2")]) == 0
    out = capsys.readouterr().out
    check = out.split("check: ", 1)[1].strip()
    assert "(batch, 12)" in out and "feature rows" in out and check.startswith("python -c")
    done = subprocess.run(check, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().startswith("tensor("), done.stderr[-2000:]


def _predicts_without_bpfree(model, tmp_path, cfg, weights, test) -> None:  # noqa: ANN001
    done = subprocess.run([sys.executable, "-I", "-c", NO_BPFREE, str(model),
                           str(tmp_path / "x.pt"), str(tmp_path / "pred.pt")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    exported = torch.load(tmp_path / "pred.pt")
    assert torch.equal(exported, _bpfree_predictions(cfg, weights, test))
    assert exported.unique().numel() > 1   # not a constant answer


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


@pytest.fixture(scope="module")
def finished(data_dir, tmp_path_factory):  # noqa: ANN001, ANN201
    run = tmp_path_factory.mktemp("finished") / "run"
    cfg = load_config(None, [f"train.data_dir={data_dir}", "model.algorithm=mono", *BASE])
    train_reference(cfg, run, progress=False)
    return run


def _copy_run(finished, tmp_path):  # noqa: ANN001, ANN202
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    return run


def test_a_run_directory_never_runs_the_code_its_config_names(finished, tmp_path, capsys) -> None:  # noqa: ANN001
    """Issue 38, case 2: config.json's model.algorithm edited to a file of an attacker's."""
    run = _copy_run(finished, tmp_path)
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.py"
    evil.write_text(f"open({str(marker)!r}, 'w').write('pwned')\nclass Evil:\n    pass\n")
    cfg = json.loads((run / "config.json").read_text())
    cfg["model"]["algorithm"] = f"{evil}:Evil"
    (run / "config.json").write_text(json.dumps(cfg))
    np.savez(tmp_path / "x.npz", x=np.zeros((3, 784), np.float32))
    for argv in (["predict", str(run), "--input", str(tmp_path / "x.npz")], ["evaluate", str(run)],
                 ["export", str(run), "--out", str(tmp_path / "m.pt2")], ["simulate", "--resume", str(run)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "does not run the code it names" in err, err
        assert f"--algorithm {evil}:Evil" in err and not marker.exists()
    # naming the same code yourself is consent: now it is imported (and refused as no rule)
    assert main(["predict", str(run), "--input", str(tmp_path / "x.npz"), "--algorithm",
                 f"{evil}:Evil"]) == 2
    assert marker.exists() and "not a subclass" in capsys.readouterr().err


@pytest.mark.parametrize(("damage", "says"), [
    (lambda c: c["model"].update(hidden=[80, 40]), "do not fit the model"),
    (lambda c: c["model"].update(algorithm="ff"), "do not fit the model"),
    (None, "is not a config bpfree wrote"),
])
def test_a_damaged_config_is_one_sentence(damage, says, finished, tmp_path, capsys) -> None:  # noqa: ANN001
    run = _copy_run(finished, tmp_path)
    if damage is None:
        (run / "config.json").write_text('{"model": {"hidden": [40, 40')
    else:
        cfg = json.loads((run / "config.json").read_text())
        damage(cfg)
        (run / "config.json").write_text(json.dumps(cfg))
    assert main(["export", str(run), "--out", str(tmp_path / "m.pt2")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and says in err and "config.json" in err, err


@pytest.mark.parametrize(("rows", "says"), [
    (np.zeros((0, 784), np.float32), "holds no rows"),
    (np.array([["a"] * 784] * 2), "holds <U1 values; give numbers"),
    (np.full((2, 784), np.nan, np.float32), "2 of 2 rows hold NaN"),
    (np.array([[object()] * 784] * 2, dtype=object), "is not a numeric .npz"),
])
def test_inputs_that_cannot_be_scored_are_one_sentence(rows, says, finished, tmp_path, capsys) -> None:  # noqa: ANN001
    path = tmp_path / "in.npz"
    np.savez(path, x=rows)
    assert main(["predict", str(finished), "--input", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and says in err, err
    assert not (finished / "predictions.csv").exists()   # nothing half-written
