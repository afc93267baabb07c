"""asge: spatial goodness by hand, a projection that is fixed and the same in every process, the
patch rule, and the golden rule across a stage split."""

from __future__ import annotations

import pytest
import torch

from bpfree_core.config import load_config
from bpfree_core.model import Stage, build_layers, build_objective
from bpfree_core.objectives.asge import rms_pool, spatial_goodness
from tests.support import assert_two_stages_equal_one, synthetic_packets


def _cfg(*extra: str):  # noqa: ANN202
    return load_config(None, ["model.algorithm=asge", "model.conv=8,16", "model.hidden=[]",
                              "train.batch_size=16", *extra])


def test_spatial_goodness_is_each_patchs_sum_of_squares_by_hand() -> None:
    a = torch.arange(32, dtype=torch.float32).reshape(1, 2, 4, 4)   # 2 channels of 4x4
    g = spatial_goodness(a, 2)                                       # 2x2 patches of 2x2 pixels
    want = [sum(float(a[0, c, i + di, j + dj]) ** 2 for di in (0, 1) for dj in (0, 1))
            for c in (0, 1) for i in (0, 2) for j in (0, 2)]          # order: channel, row, column
    assert g.shape == (1, 8) and g[0].tolist() == pytest.approx(want)
    assert spatial_goodness(a, 1)[0].tolist() == pytest.approx([float(a[0, c].square().sum())
                                                               for c in (0, 1)])
    flat = torch.tensor([[1.0, -2.0, 3.0]])
    assert spatial_goodness(flat, 1).tolist() == [[1.0, 4.0, 9.0]]   # a linear layer: P = 1
    assert rms_pool(torch.full((1, 1, 2, 2), 3.0), 2).item() == pytest.approx(3.0)


def test_the_class_projection_is_fixed_seeded_and_scores_are_goodness_times_it() -> None:
    cfg = _cfg()
    layers = build_layers(cfg)
    again = build_layers(cfg)   # another process builds the same projection from the seed
    assert all(torch.equal(x.projection, y.projection) for x, y in zip(layers, again, strict=True))
    other = build_layers(_cfg("train.seed=1"))[0].projection
    assert not torch.equal(layers[0].projection, other)
    before = layers[0].projection.clone()
    Stage(layers).train_step(synthetic_packets(cfg, 1)[0])
    assert torch.equal(layers[0].projection, before)   # never trained
    a = torch.rand(3, 8, 28, 28)
    torch.testing.assert_close(layers[0].scores(a),
                               spatial_goodness(a, layers[0].patches) @ before.T)


def test_patches_follow_the_channel_ratio_within_the_map() -> None:
    objective = build_objective(load_config(None, ["model.algorithm=asge", "model.conv=32,64,128",
                                                   "model.hidden=[]"]))
    assert [objective.patches(i) for i in range(3)] == [2, 1, 1]   # round(sqrt(128 / C))
    flat = build_objective(load_config(None, ["model.algorithm=asge", "model.conv=32,64,128",
                                              "model.hidden=[]", "objective.patch_alpha=0"]))
    assert [flat.patches(i) for i in range(3)] == [1, 1, 1]
    wide = build_objective(load_config(None, ["model.algorithm=asge", "model.conv=1,4096",
                                              "model.hidden=[]"]))
    assert wide.patches(0) == 28   # 64 patches a side asked for; the map has 28 rows
    assert [s[1:] for s in objective.shapes()[1:]] == [(28, 28), (14, 14), (7, 7)]


def test_two_stages_equal_one() -> None:
    cfg = _cfg()
    assert_two_stages_equal_one(cfg, synthetic_packets(cfg, 3))
