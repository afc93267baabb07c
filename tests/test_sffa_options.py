"""SFFA's authors' layer as options: sigmoid units and the top k of each half (SFFA_CoLLAS)."""

from __future__ import annotations

import pytest
import torch

from bpfree_core.config import load_config
from bpfree_core.errors import ConfigError
from bpfree_core.model import Stage, build_layers
from bpfree_core.objectives.sffa import top_k_per_half
from tests.test_precision import _packets


def test_top_k_per_half_keeps_the_k_largest_of_each_half_and_their_gradient():
    y = torch.tensor([[0.1, 0.9, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4]], requires_grad=True)
    out = top_k_per_half(y, 2)
    assert torch.equal(out, torch.tensor([[0.0, 0.9, 0.5, 0.0, 0.7, 0.0, 0.8, 0.0]]))
    out.sum().backward()
    assert y.grad.tolist() == [[0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0]]


def test_the_authors_layer_is_sparse_sigmoid_and_trains():
    cfg = load_config(None, ["model.algorithm=sffa", "model.hidden=40,40", "train.batch_size=16",
                             "objective.activation=sigmoid", "objective.top_k=5"])
    stage = Stage(build_layers(cfg))
    packets = _packets(cfg, 6)
    before = {k: v.clone() for k, v in stage.state_dict().items()}
    for p in packets:
        out, _ = stage.train_step(p)
    active = (out["pos"] > 0).sum(1)
    assert torch.equal(active, torch.full_like(active, 10))        # 5 per half, sigmoid > 0
    assert float(out["pos"].max()) < 1.0                          # sigmoid units
    after = stage.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))


def test_top_k_larger_than_half_a_layer_is_a_clear_error():
    with pytest.raises(ConfigError, match="objective.top_k = 30"):
        build_layers(load_config(None, ["model.algorithm=sffa", "model.hidden=40",
                                        "objective.top_k=30"]))
    with pytest.raises(ConfigError, match="objective.activation"):
        load_config(None, ["objective.activation=tanh"])


def test_the_committed_sffa_paper_recipe_is_the_benchmarked_row() -> None:
    """deploy/continual-sffa-paper.toml is what bench/results/continual.md's sffa-paper row ran."""
    from pathlib import Path

    from bpfree.bench.continual import ROWS
    from bpfree_core.config import ExperimentConfig, load_config

    recipe = load_config(Path(__file__).resolve().parents[1] / "deploy/continual-sffa-paper.toml")
    row = next(r for r in ROWS if r.name == "sffa-paper-class-replay")
    assert recipe == ExperimentConfig().with_overrides(row.overrides(0))
    assert (recipe.objective.activation, recipe.objective.top_k) == ("sigmoid", 15)


def test_input_skip_feeds_the_image_and_code_to_later_layers() -> None:
    """objective.input_skip: layer 1 reads [layer 0's output, image, class code] (the authors'
    FF_Layer(1400 + 784 + 100, 1400)); its output moves with the image even when layer 0's
    output is held fixed, and without the skip it does not."""
    def layer1_outputs(skip: bool) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = load_config(None, ["model.algorithm=sffa", "model.hidden=40,30",
                                 f"objective.input_skip={str(skip).lower()}"])
        layer = build_layers(cfg)[1]
        assert layer.linear.in_features == 40 + (784 + 100 if skip else 0)
        gen = torch.Generator().manual_seed(0)
        packet = {"neutral": torch.rand(4, 40, generator=gen), "x": torch.rand(4, 784, generator=gen)}
        a = layer.eval_step(dict(packet))["neutral"]
        packet["x"] = torch.rand(4, 784, generator=gen)
        return a, layer.eval_step(packet)["neutral"]

    a, b = layer1_outputs(True)
    assert not torch.equal(a, b)
    a, b = layer1_outputs(False)
    assert torch.equal(a, b)


def test_input_skip_is_refused_where_the_label_lives_in_the_pixels() -> None:
    for algorithm in ("ff", "symba", "mono"):
        with pytest.raises(ConfigError, match="objective.input_skip = true but"):
            build_layers(load_config(None, [f"model.algorithm={algorithm}", "objective.input_skip=true"]))


def test_seen_negatives_score_every_class_seen_so_far() -> None:
    """objective.negatives = seen: the first layer's candidates are the classes its labels have
    shown (they grow as tasks arrive); each layer's loss is the BCE of its goodness for every
    candidate against the one-hot label; the candidates travel on to the next layer."""
    from bpfree_core.model import build_objective

    cfg = load_config(None, ["model.algorithm=sffa", "model.hidden=40,30", "objective.negatives=seen"])
    objective, stage = build_objective(cfg), Stage(build_layers(cfg))
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(6, 784, generator=gen)
    first = stage.layers[0]
    for labels, seen in (([0, 1, 1, 0, 0, 1], [0, 1]), ([2, 3, 2, 3, 0, 1], [0, 1, 2, 3])):
        y = torch.tensor(labels)
        packet = objective.encode_train(x, y, gen)
        g = first.goodness(first.forward_role(
            x.repeat_interleave(len(seen), 0), first.patterns[torch.tensor(seen).repeat(6)])).view(6, -1)
        target = (torch.tensor(seen)[None, :] == y[:, None]).float()
        want = torch.nn.functional.binary_cross_entropy(g, target)
        out, metrics = stage.train_step(packet)
        assert out["y_cand"].tolist() == seen * 6 and out["cand"].shape == (6 * len(seen), 30)
        assert torch.allclose(metrics[0]["loss"], want)
        assert (first.seen > 0).nonzero().squeeze(1).tolist() == seen


def test_input_norm_none_feeds_the_layer_its_raw_input() -> None:
    cfg = load_config(None, ["model.algorithm=sffa", "model.hidden=40,30", "objective.input_norm=none"])
    layer = build_layers(cfg)[0]
    x = torch.rand(3, 784)
    codes = layer.patterns[torch.tensor([0, 1, 2])]
    want = layer.activate(layer.linear(torch.cat([x, codes], 1)))
    assert torch.equal(layer.forward_role(x, codes), want)
    assert not torch.equal(build_layers(load_config(None, ["model.algorithm=sffa", "model.hidden=40,30"]))[0]
                           .forward_role(x, codes), want)


def test_seen_negatives_are_sffas() -> None:
    for algorithm in ("ff", "symba"):
        with pytest.raises(ConfigError, match="objective.negatives = 'seen'"):
            build_layers(load_config(None, [f"model.algorithm={algorithm}", "objective.negatives=seen"]))
