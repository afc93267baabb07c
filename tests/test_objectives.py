"""Each local objective's loss on small hand-made tensors, checked against numpy arithmetic.

The expected values are computed here from the published formulas, never by calling the code
under test, so a wrong sign, a sum-for-mean or a missing term fails.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bpfree_core.config import ExperimentConfig, load_config
from bpfree_core.data.datasets import SPECS
from bpfree_core.errors import ConfigError
from bpfree_core.model import build_layers, build_objective
from bpfree_core.objectives import BUILTIN as ALGORITHMS
from bpfree_core.objectives import get_objective, registered
from bpfree_core.objectives.ffcl import cosine_pair_loss
from bpfree_core.objectives.goodness import draw_hard_labels

Y_POS = np.array([[1.0, 2.0, 0.0, 1.0], [0.5, 0.0, 0.0, 0.5]], dtype=np.float32)
Y_NEG = np.array([[0.0, 1.0, 1.0, 0.0], [2.0, 0.0, 1.0, 0.0]], dtype=np.float32)


def softplus(u: np.ndarray) -> np.ndarray:
    return np.log1p(np.exp(u))


def cfg_for(algorithm: str, *overrides: str) -> ExperimentConfig:
    return load_config(None, [f"model.algorithm={algorithm}", "model.hidden=4,4", *overrides])


def layer(algorithm: str, *overrides: str):  # noqa: ANN201
    cfg = cfg_for(algorithm, *overrides)
    return build_layers(cfg, range(1))[0]


def t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a)


def test_ff_loss_is_softplus_around_threshold_on_sum_of_squares():
    lay = layer("ff", "objective.threshold=3.0")
    loss, metrics = lay.loss(t(Y_POS), t(Y_NEG))
    g_pos = (Y_POS ** 2).sum(1)            # [6, 0.5]
    g_neg = (Y_NEG ** 2).sum(1)            # [2, 5]
    expected = softplus(3.0 - g_pos).mean() + softplus(g_neg - 3.0).mean()
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert metrics["ff_acc"] == pytest.approx(0.5 * (0.5 + 0.5))


def test_ff_default_threshold_is_the_layer_width():
    lay = layer("ff")  # threshold < 0 -> width 4 (mean-square threshold 1)
    loss, _ = lay.loss(t(Y_POS), t(Y_NEG))
    g_pos, g_neg = (Y_POS ** 2).sum(1), (Y_NEG ** 2).sum(1)
    expected = softplus(4.0 - g_pos).mean() + softplus(g_neg - 4.0).mean()
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_ff_temperature_divides_the_logit():
    lay = layer("ff", "objective.threshold=3.0", "objective.temperature=2.5")
    loss, _ = lay.loss(t(Y_POS), t(Y_NEG))
    g_pos, g_neg = (Y_POS ** 2).sum(1), (Y_NEG ** 2).sum(1)
    expected = softplus((3.0 - g_pos) / 2.5).mean() + softplus((g_neg - 3.0) / 2.5).mean()
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_ff_mean_goodness_is_mean_of_squares_with_threshold_one():
    lay = layer("ff", "objective.goodness=mean")
    loss, _ = lay.loss(t(Y_POS), t(Y_NEG))
    g_pos, g_neg = (Y_POS ** 2).mean(1), (Y_NEG ** 2).mean(1)
    expected = softplus(1.0 - g_pos).mean() + softplus(g_neg - 1.0).mean()
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_symba_loss_is_softplus_of_minus_alpha_times_mean_square_gap():
    lay = layer("symba", "objective.alpha=4.0")
    loss, metrics = lay.loss(t(Y_POS), t(Y_NEG))
    gap = (Y_POS ** 2).mean(1) - (Y_NEG ** 2).mean(1)    # [1.5 - 0.5, 0.125 - 1.25]
    expected = softplus(-4.0 * gap).mean()
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert metrics["ff_acc"] == pytest.approx(0.5)


def test_sffa_loss_is_bce_on_positive_half_energy_ratio():
    lay = layer("sffa")
    loss, _ = lay.loss(t(Y_POS), t(Y_NEG))
    sq_p, sq_n = Y_POS ** 2, Y_NEG ** 2
    g_pos = sq_p[:, :2].sum(1) / sq_p.sum(1)             # [5/6, 1/2]
    g_neg = sq_n[:, :2].sum(1) / sq_n.sum(1)             # [1/2, 4/5]
    expected = -(np.log(g_pos).mean() + np.log(1 - g_neg).mean())
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_cwc_loss_is_cross_entropy_over_class_group_mean_squares():
    lay = layer("cwc", "model.hidden=20,20")           # 10 class groups of 2 units
    y = np.arange(40, dtype=np.float32).reshape(2, 20) / 20.0
    labels = np.array([3, 9])
    loss, metrics = lay.loss(t(y), torch.from_numpy(labels))
    g = (y ** 2).reshape(2, 10, 2).mean(2)               # (B, C): group c = units 2c, 2c+1
    logp = g - np.log(np.exp(g).sum(1, keepdims=True))
    expected = -logp[np.arange(2), labels].mean()
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert metrics["cwc_acc"] == pytest.approx(0.5)       # the last group is largest: 9 right, 3 wrong


@pytest.mark.parametrize(("overrides", "field"), [
    (("model.hidden=25",), "model.hidden[0] = 25"),
    (("model.conv=20,15", "model.hidden=[]"), "model.conv[1] = 15"),
    (("model.conv=10,10,10,10,10,10,10,10,10,10", "model.hidden=[]"), "use at most 9 conv layers"),
])
def test_cwc_sizes_that_cannot_split_into_class_groups_are_named(overrides, field):
    with pytest.raises(ConfigError, match=re.escape(field)):
        build_layers(cfg_for("cwc", *overrides))


def test_ffcl_cosine_loss_pulls_matching_and_pushes_rolled_pairs():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]], dtype=np.float32)
    b = np.array([[1.0, 1.0], [0.0, 1.0], [3.0, 0.0]], dtype=np.float32)

    def cos(u: np.ndarray, v: np.ndarray) -> float:
        return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))

    pos = [cos(a[i], b[i]) for i in range(3)]
    neg = [cos(a[i], b[(i - 1) % 3]) for i in range(3)]   # partner = B's batch rolled by one
    for margin in (0.0, 0.5):
        expected = np.mean([1 - c for c in pos]) + np.mean([max(0.0, c - margin) for c in neg])
        loss, _ = cosine_pair_loss(t(a), t(b), margin)
        assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_uff_cell_loss_is_reconstruction_mse_of_rms_normalised_input():
    cfg = cfg_for("uff", "objective.noise_std=0", "model.hidden=2")
    cell = build_layers(cfg, range(1))[0]
    rng = np.random.default_rng(0)
    w_enc = rng.normal(size=(2, 784)).astype(np.float32) * 0.05
    b_enc = rng.normal(size=2).astype(np.float32)
    w_dec = rng.normal(size=(784, 2)).astype(np.float32)
    b_dec = rng.normal(size=784).astype(np.float32) * 0.1
    with torch.no_grad():
        cell.encoder.weight.copy_(t(w_enc))
        cell.encoder.bias.copy_(t(b_enc))
        cell.decoder.weight.copy_(t(w_dec))
        cell.decoder.bias.copy_(t(b_dec))
    x = rng.uniform(size=(3, 784)).astype(np.float32)
    h = x / (np.sqrt((x ** 2).mean(1, keepdims=True)) + 1e-8)
    z = np.maximum(h @ w_enc.T + b_enc, 0)
    expected = ((z @ w_dec.T + b_dec - h) ** 2).mean()
    out, metrics = cell.train_step({"x": t(x), "y": torch.tensor([0, 1, 2])})
    assert metrics["recon_mse"] == pytest.approx(float(expected), rel=1e-4)
    assert out["x"].shape == (3, 2)


def test_uff_denoising_noise_is_reproducible_and_changes_every_step():
    cfg = cfg_for("uff", "objective.noise_std=0.5")
    x, y = torch.rand(8, 784), torch.arange(8) % 10
    first, second = build_layers(cfg, range(1))[0], build_layers(cfg, range(1))[0]
    _, m1 = first.train_step({"x": x, "y": y})
    _, m2 = second.train_step({"x": x, "y": y})
    assert m1["recon_mse"] == m2["recon_mse"]              # same seed, step -> same noise
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)
    plain = build_layers(cfg.with_overrides(["objective.noise_std=0"]), range(1))[0]
    _, m0 = plain.train_step({"x": x, "y": y})
    assert m0["recon_mse"] != m1["recon_mse"]              # the noise is really applied


def test_uff_conv_cells_keep_spatial_layout_and_restore_input_size():
    cfg = cfg_for("uff", "model.conv=4,6", "model.hidden=8")
    objective = build_objective(cfg)
    assert objective.layer_sizes() == [4 * 14 * 14, 6 * 7 * 7, 8]
    cells = build_layers(cfg)
    packet = objective.encode_train(torch.rand(5, 784), torch.arange(5), torch.Generator())
    shapes = []
    for cell in cells:
        packet, metrics = cell.train_step(packet)
        shapes.append(tuple(packet["x"].shape))
        assert math.isfinite(metrics["recon_mse"])
    assert shapes == [(5, 4, 14, 14), (5, 6, 7, 7), (5, 8)]


def test_bp_loss_is_cross_entropy_of_the_network_logits():
    cfg = cfg_for("bp", "model.hidden=3")
    (net,) = build_layers(cfg)
    rng = np.random.default_rng(1)
    w1 = rng.normal(size=(3, 784)).astype(np.float32) * 0.1
    b1 = rng.normal(size=3).astype(np.float32)
    w2 = rng.normal(size=(10, 3)).astype(np.float32)
    b2 = rng.normal(size=10).astype(np.float32)
    lin1, lin2 = net.mlp[0], net.mlp[2]
    with torch.no_grad():
        lin1.weight.copy_(t(w1))
        lin1.bias.copy_(t(b1))
        lin2.weight.copy_(t(w2))
        lin2.bias.copy_(t(b2))
    x = rng.uniform(size=(4, 784)).astype(np.float32)
    y = np.array([3, 0, 9, 3])
    logits = np.maximum(x @ w1.T + b1, 0) @ w2.T + b2
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    expected = -logp[np.arange(4), y].mean()
    _, metrics = net.train_step({"x": t(x), "y": torch.from_numpy(y)})
    assert metrics["loss"] == pytest.approx(float(expected), rel=1e-5)


def test_bp_is_one_unpipelinable_unit_also_with_convs():
    cfg = cfg_for("bp", "model.conv=4", "model.hidden=16")
    objective = build_objective(cfg)
    assert objective.pipelinable is False
    assert len(objective.layer_sizes()) == 1
    (net,) = build_layers(cfg)
    out = net.eval_step(objective.encode_eval(torch.rand(2, 784), goodness=False))
    assert out["logits"].shape == (2, 10)
    assert torch.allclose(out["logits"].exp().sum(1), torch.ones(2))


# -- negatives ----------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(labels=st.lists(st.integers(0, 9), min_size=1, max_size=64), seed=st.integers(0, 2**31))
def test_negatives_never_carry_the_true_label(labels: list[int], seed: int):
    y = torch.tensor(labels)
    for algorithm in ("ff", "symba", "sffa"):
        objective = build_objective(cfg_for(algorithm))
        gen = torch.Generator().manual_seed(seed)
        assert not (objective.wrong_labels(y, gen) == y).any()
        packet = objective.encode_train(torch.rand(len(labels), 784), y, gen)
        assert not (packet["y_neg"] == y).any()
        if "neg" in packet:  # label one-hot in the first pixels: the hot pixel is never the true
            assert (packet["neg"][:, :10].argmax(1) == packet["y_neg"]).all()
            assert (packet["pos"][:, :10].argmax(1) == y).all()


def test_wrong_labels_cover_every_other_class():
    objective = build_objective(cfg_for("ff"))
    y = torch.full((5000,), 4)
    drawn = objective.wrong_labels(y, torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == set(range(10)) - {4}


@settings(max_examples=40, deadline=None)
@given(labels=st.lists(st.integers(0, 9), min_size=1, max_size=64), seed=st.integers(0, 2**31),
       scale=st.floats(0.0, 50.0))
def test_hard_negatives_never_carry_the_true_label(labels: list[int], seed: int, scale: float):
    # Confident heads (scale 50) put ~all the mass on one label: the draw must still avoid y.
    y = torch.tensor(labels)
    gen = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(len(labels), 10, generator=gen)
    logits[torch.arange(len(labels)), y] += scale           # the head believes the true label
    drawn = draw_hard_labels(logits, y, 1.0 - torch.rand(len(labels), generator=gen))
    assert not (drawn == y).any() and ((drawn >= 0) & (drawn < 10)).all()


def test_hard_negatives_follow_the_heads_wrong_label_belief():
    # p = (0.5, 0.3, 0.15, 0.05), true label 0 -> wrong labels 1, 2, 3 in ratio 0.6 : 0.3 : 0.1.
    n = 100_000
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(n, -1)
    u = 1.0 - torch.rand(n, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draw_hard_labels(logits, torch.zeros(n, dtype=torch.long), u),
                          minlength=4).double() / n
    assert torch.allclose(freq, torch.tensor([0.0, 0.6, 0.3, 0.1], dtype=torch.float64), atol=0.01)


@pytest.mark.parametrize("algorithm", ["ff", "symba", "sffa"])
def test_first_layer_redraws_hard_negatives_and_later_layers_keep_them(algorithm: str):
    cfg = cfg_for(algorithm, "objective.negatives=hard")
    objective = build_objective(cfg)
    first, second = build_layers(cfg)
    y = torch.arange(10).repeat(3)
    packet = objective.encode_train(torch.rand(30, 784), y, torch.Generator().manual_seed(1))
    torch.nn.init.normal_(first.head.weight, std=5.0)       # a confident, opinionated head
    redrawn = first.redraw_negatives(dict(packet))
    assert "u" not in redrawn and not (redrawn["y_neg"] == y).any()
    assert not torch.equal(redrawn["y_neg"], packet["y_neg"])  # redrawn, not the uniform draw
    if "neg" in packet:  # label pixels: the negative input is rebuilt with the new label
        assert torch.equal(redrawn["neg"][:, :10].argmax(1), redrawn["y_neg"])
        assert torch.equal(redrawn["neg"][:, 10:], packet["neg"][:, 10:])
    out, _ = first.train_step(dict(packet))                 # redraws before its own step
    assert torch.equal(out["y_neg"], redrawn["y_neg"])
    out2, _ = second.train_step(out)
    assert torch.equal(out2["y_neg"], out["y_neg"])


@pytest.mark.parametrize("vote_first", [False, True])
def test_first_layer_votes_only_when_asked(vote_first: bool):
    cfg = cfg_for("symba", f"objective.vote_first={str(vote_first).lower()}")
    first, second = build_layers(cfg)
    packet = build_objective(cfg).encode_eval(torch.rand(3, 784), goodness=True)
    out1 = first.eval_step(packet)
    out2 = second.eval_step(out1)
    g0 = first.goodness(out1["cand"]).view(3, 10)
    g1 = second.goodness(out2["cand"]).view(3, 10)
    assert torch.allclose(out2["goodness"], g0 + g1 if vote_first else g1)
    assert ("logits" in out1) == vote_first and ("goodness" in out1) == vote_first


@pytest.mark.parametrize(("algorithm", "extra", "needle"), [
    ("ffcl", (), "uses no negative data"),
    ("cwc", ("model.hidden=10",), "uses no negative data"),
    ("ff", ("objective.head=false",), "turn the head on"),
])
def test_hard_negatives_config_errors_say_what_to_change(algorithm: str, extra: tuple[str, ...],
                                                         needle: str):
    with pytest.raises(ConfigError, match=needle):
        build_objective(cfg_for(algorithm, "objective.negatives=hard", *extra))
    with pytest.raises(ConfigError, match="objective.negatives"):
        cfg_for("ff", "objective.negatives=hardest")


def test_mono_forward_loss_is_cross_entropy_of_the_layer_projection():
    lay = layer("mono", "model.hidden=4,4")
    x = np.array([[1.0, -2.0, 0.5, 3.0], [0.0, 1.0, -1.0, 2.0]], dtype=np.float32)
    labels = np.array([2, 7])
    w, b = lay.body.weight.detach().numpy(), lay.body.bias.detach().numpy()
    with torch.no_grad():
        lay.proj.weight.copy_(torch.randn(10, 4))                          # init is not zero
    m = lay.proj.weight.detach().numpy()                                   # (C, D)
    x784 = np.zeros((2, 784), dtype=np.float32)
    x784[:, :4] = x
    a = np.maximum(x784 @ w.T + b, 0.0)                                    # (B, D)
    scores = a @ m.T                                                       # (B, C)
    logp = scores - np.log(np.exp(scores).sum(1, keepdims=True))
    loss, metrics = lay.loss(lay.forward_body(t(x784)), torch.from_numpy(labels))
    assert float(loss.detach()) == pytest.approx(-logp[np.arange(2), labels].mean(), rel=1e-5)
    assert float(metrics["layer_acc"]) == pytest.approx((scores.argmax(1) == labels).mean())


def test_mono_forward_trains_the_projection_and_predicts_by_summed_log_softmax():
    cfg = cfg_for("mono", "objective.vote_first=true")
    first, second = build_layers(cfg)
    packet = build_objective(cfg).encode_train(torch.rand(5, 784), torch.arange(5), torch.Generator())
    before = first.proj.weight.detach().clone()
    first.train_step(packet)
    assert not torch.equal(first.proj.weight, before), "the projection M is trained by the local CE"
    x = torch.rand(3, 784)
    out = second.eval_step(first.eval_step({"x": x}))
    a0 = first.forward_body(x)
    a1 = second.forward_body(a0)
    want = (torch.log_softmax(first.proj(a0), 1) + torch.log_softmax(second.proj(a1), 1)).detach()
    assert torch.allclose(out["logits"], want) and "goodness" not in out


def test_deeper_loss_is_cross_entropy_over_class_group_means():
    lay = layer("deeper", "model.hidden=20,20")           # 10 class groups of 2 units
    a = np.arange(40, dtype=np.float32).reshape(2, 20) / 20.0
    labels = np.array([3, 9])
    loss, metrics = lay.loss(t(a), torch.from_numpy(labels))
    g = a.reshape(2, 10, 2).mean(2)                      # mean, not mean square (DeeperForward)
    logp = g - np.log(np.exp(g).sum(1, keepdims=True))
    assert float(loss) == pytest.approx(-logp[np.arange(2), labels].mean(), rel=1e-5)
    assert float(metrics["layer_acc"]) == pytest.approx(0.5)


def test_deeper_hands_on_group_normalised_activity_plus_the_residual():
    cfg = cfg_for("deeper", "model.conv=10,10,20", "model.hidden=[]")
    objective = build_objective(cfg)
    assert objective.shapes() == [(1, 28, 28), (10, 28, 28), (10, 28, 28), (20, 14, 14)]
    layers = build_layers(cfg, objective=objective)
    assert [lay.residual for lay in layers] == [False, True, False]
    assert [lay.body.stride for lay in layers] == [(1, 1), (1, 1), (2, 2)]
    h = torch.randn(4, 10, 28, 28)
    _, a = layers[1].activity(h)
    out = layers[1].hand_on(h, a) - h                    # the residual is exactly the input
    groups = out.reshape(4, 10, -1)                      # one channel per class group here
    assert torch.allclose(groups.mean(2), torch.zeros(4, 10), atol=1e-4)   # g is removed
    assert torch.allclose(groups.var(2, unbiased=False), torch.ones(4, 10), atol=1e-2)
    with pytest.raises(ConfigError, match=r"model.conv\[1\] = 15: deeper splits channels"):
        build_objective(cfg_for("deeper", "model.conv=10,15", "model.hidden=[]")).shapes()


def test_colour_images_carry_the_label_in_every_colour_plane():
    from bpfree_core.objectives.goodness import embed_label

    x = torch.rand(2, 3 * 16)                                      # 3 planes of 16 pixels
    out = embed_label(x, torch.tensor([1, 4]), 5, channels=3).view(2, 3, 16)
    want = torch.zeros(2, 5)
    want[0, 1] = want[1, 4] = 1.0
    for plane in range(3):
        assert torch.equal(out[:, plane, :5], want)
        assert torch.equal(out[:, plane, 5:], x.view(2, 3, 16)[:, plane, 5:])
    gray = embed_label(x, torch.tensor([1, 4]), 5)                 # MNIST: the first C pixels only
    assert torch.equal(gray[:, 5:], x[:, 5:]) and torch.equal(gray[:, :5], want)


# -- registry -----------------------------------------------------------------------------------

def test_every_configured_algorithm_is_registered():
    reg = registered()
    assert set(ALGORITHMS) <= set(reg)
    for name in ALGORITHMS:
        assert reg[name].name == name
        sizes = ["model.hidden=20,20"] if name in ("cwc", "deeper") else []  # 10 class groups
        objective = get_objective(cfg_for(name, *sizes), SPECS["mnist"])
        assert objective.layer_sizes()


def test_unknown_algorithm_lists_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.algorithm=nope"])
    for name in ALGORITHMS:
        assert name in str(err.value)
    cfg = cfg_for("ff")
    object.__setattr__(cfg.model, "algorithm", "nope")  # bypass validation: registry checks too
    with pytest.raises(ConfigError, match="'nope' is not a known rule; valid: asge, bp, cwc, deeper, ff"):
        get_objective(cfg, SPECS["mnist"])
