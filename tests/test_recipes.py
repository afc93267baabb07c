"""Every committed recipe (deploy/recipes/*.toml) loads, builds and takes a few training and
evaluation steps on the CPU (random images of its dataset's shape, small batches): the smoke
test of configs whose full runs need a GPU (bench/gpu_check.sh times them there) or 20 CPU
minutes (bench/fashion.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bpfree.bench.fashion import main as fashion_bench
from bpfree_core.config import load_config
from bpfree_core.data.batches import train_packets
from bpfree_core.data.datasets import Split, run_spec
from bpfree_core.evaluation import prediction_modes
from bpfree_core.model import Stage, build_layers, build_objective

RECIPES = sorted((Path(__file__).parent.parent / "deploy" / "recipes").glob("*.toml"))


def test_there_are_recipes() -> None:
    names = {r.stem for r in RECIPES}
    assert {"fashion-cpu", "asge-cifar10-gpu", "deeper-cifar10-gpu"} <= names, names


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_a_recipe_trains_a_few_batches(recipe: Path) -> None:
    cfg = load_config(recipe, ["train.batch_size=4", "train.validation=0"])
    if cfg.model.dataset.startswith("npz:"):   # a recipe on your own data: its shape, not its file
        cfg = cfg.with_overrides(["model.dataset=fashion-mnist"])
    c, h, w = run_spec(cfg).shape
    gen = torch.Generator().manual_seed(0)
    split = Split(torch.rand(8, c * h * w, generator=gen), torch.randint(0, 10, (8,), generator=gen))
    objective = build_objective(cfg)
    stage = Stage(build_layers(cfg, objective=objective))
    before = stage.state_dict()
    for epoch in range(2):   # a staged recipe freezes its first layers after epoch 1
        stage.set_epoch(epoch, cfg.train.epochs)
        for packet in train_packets(objective, split, cfg, epoch):
            stage.train_step(packet)
    assert any(not torch.equal(before[k], v) for k, v in stage.state_dict().items())
    out = stage.eval_step(objective.encode_eval(split.images[:4], prediction_modes(objective, cfg)[1]))
    scores = out.get("logits", out.get("goodness"))
    assert scores is not None and scores.shape == (4, 10) and torch.isfinite(scores).all()


def test_the_fashion_bench_checks_every_variant_before_training(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A typo in the third variant stops the benchmark at once, in one sentence, having trained
    nothing (not after the first two have run for minutes)."""
    data = tmp_path / "dev.npz"
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (20, 28, 28), generator=gen, dtype=torch.uint8).numpy()
    labels = torch.arange(20).remainder(10).numpy()
    np.savez(data, x_train=images, y_train=labels, x_test=images, y_test=labels)
    fashion = str(next(r for r in RECIPES if r.stem == "fashion-cpu"))
    rc = fashion_bench([fashion, "--data", str(data), "--out", str(tmp_path / "out"), "--runs-dir",
               str(tmp_path / "runs"), "--variant", "a:train.epochs=1,train.layer_epochs=[]",
               "--variant", "b:model.conv=[32,32]"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "model.conv[0] = 32" in err and "multiple of 10" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()
    assert fashion_bench([fashion, "--data", str(tmp_path / "missing.npz")]) == 2
    assert "no such file" in capsys.readouterr().err
