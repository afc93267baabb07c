"""DeeperForward's options (objective.shortcut, objective.vote_layers): the hand-on of each
shortcut by hand, and prediction summed over exactly the chosen layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bpfree_core.config import load_config
from bpfree_core.errors import ConfigError
from bpfree_core.layers import GOODNESS
from bpfree_core.model import Stage, build_layers, build_objective


def _layers(*extra: str):  # noqa: ANN202
    return build_layers(load_config(None, ["model.algorithm=deeper", "model.conv=10,20,20",
                                           "model.hidden=[]", *extra]))


def _normalised(a: torch.Tensor) -> torch.Tensor:
    groups = a.reshape(a.shape[0], 10, -1)
    return F.layer_norm(groups, groups.shape[2:]).reshape_as(a)


@pytest.mark.parametrize("shortcut", ["add", "pad", "none"])
def test_each_shortcut_hands_on_what_it_says(shortcut: str) -> None:
    layers = _layers(f"objective.shortcut={shortcut}")
    h = torch.randn(3, 10, 28, 28)
    down, same = layers[1], layers[2]                     # 10x28x28 -> 20x14x14 -> 20x14x14
    _, a = down.activity(h)
    want = _normalised(a)
    if shortcut == "pad":   # mean of each 2x2 block into the first 10 channels, zeros after
        pooled = h.reshape(3, 10, 14, 2, 14, 2).mean((3, 5))
        want = want + torch.cat([pooled, torch.zeros(3, 10, 14, 14)], dim=1)
    torch.testing.assert_close(down.hand_on(h, a), want)
    h2 = torch.randn(3, 20, 14, 14)
    _, a2 = same.activity(h2)
    residual = h2 if shortcut != "none" else 0
    torch.testing.assert_close(same.hand_on(h2, a2), _normalised(a2) + residual)


def test_only_the_chosen_layers_vote() -> None:
    cfg = load_config(None, ["model.algorithm=deeper", "model.conv=10,20,20", "model.hidden=[]",
                             "objective.vote_layers=1,2"])
    stage = Stage(build_layers(cfg))
    x = torch.rand(4, 784)
    total = stage.eval_step({"x": x})[GOODNESS]
    by_hand, packet = torch.zeros(4, 10), {"x": x}
    for layer in stage.layers:
        h, a = layer.activity(packet["x"])
        if layer.index in (1, 2):
            by_hand += layer.goodness(a)
        packet = {"x": layer.hand_on(h, a)}
    torch.testing.assert_close(total, by_hand)
    assert [layer.votes() for layer in stage.layers] == [False, True, True]


def test_bad_options_say_what_to_do() -> None:
    with pytest.raises(ConfigError, match="model has 3 layers"):
        _layers("objective.vote_layers=1,5")
    with pytest.raises(ConfigError, match="objective.shortcut = 'pad' but mono has no residual"):
        build_objective(load_config(None, ["model.algorithm=mono", "objective.shortcut=pad"]))
    with pytest.raises(ConfigError, match="objective.shortcut"):
        load_config(None, ["objective.shortcut=concat"])
