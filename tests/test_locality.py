"""Locality: a layer's step touches only that layer, and nothing it hands on carries autograd history.

This is the contract the pipeline relies on: stages can be cut at any layer boundary because no
gradient ever crosses one.
"""

from __future__ import annotations

import pytest
import torch

from bpfree_core.config import load_config
from bpfree_core.layers import LocalLayer, Packet
from bpfree_core.model import Stage, build_layers, build_objective
from bpfree_core.objectives import BUILTIN as ALGORITHMS

LOCAL = [a for a in ALGORITHMS if a not in ("bp", "cwc", "deeper")]
CASES = [(a, ()) for a in LOCAL] + [("symba", ("objective.icp=false",)),
                                    ("uff", ("model.conv=3", "model.hidden=8,8")),
                                    ("cwc", ("model.hidden=20,20,20",)),   # 10 class groups
                                    ("cwc", ("model.conv=10,20", "model.hidden=20")),
                                    ("deeper", ("model.hidden=20,20,20",)),
                                    ("deeper", ("model.conv=10,10,20", "model.hidden=[]"))]


def setup(algorithm: str, extra: tuple[str, ...]):  # noqa: ANN201
    cfg = load_config(None, [f"model.algorithm={algorithm}", "model.hidden=8,8,8", *extra])
    objective = build_objective(cfg)
    layers = build_layers(cfg, objective=objective)
    gen = torch.Generator().manual_seed(0)
    packet = objective.encode_train(torch.rand(6, 784), torch.arange(6) % 10, gen)
    return objective, layers, packet


def snapshot(layer: LocalLayer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in layer.state_dict().items()}


def assert_detached(packet: Packet, where: str) -> None:
    for key, value in packet.items():
        assert not value.requires_grad, f"{where}: {key} requires grad"
        assert value.grad_fn is None, f"{where}: {key} has a grad_fn"


@pytest.mark.parametrize(("algorithm", "extra"), CASES, ids=lambda v: str(v))
def test_step_of_one_layer_changes_no_other_layer(algorithm: str, extra: tuple[str, ...]):
    objective, layers, packet = setup(algorithm, extra)
    assert len(layers) == 3
    packet, _ = layers[0].train_step(packet)
    before = [snapshot(layer) for layer in layers]
    # Inputs that *could* take a gradient: if layer 1 backpropagated into its input, they would.
    leaves = {k: (v.clone().requires_grad_(True) if v.is_floating_point() else v)
              for k, v in packet.items()}
    out, metrics = layers[1].train_step(leaves)
    assert metrics
    for k, v in leaves.items():
        assert v.grad is None, f"layer 1's step sent a gradient into its input {k!r}"
    for i in (0, 2):
        after = layers[i].state_dict()
        for name, value in before[i].items():
            assert torch.equal(after[name], value), f"layer {i}'s {name} changed"
    changed = [name for name, p in layers[1].named_parameters()
               if not torch.equal(p.detach(), before[1][name])]
    assert changed, "layer 1's step changed none of its own parameters"
    assert_detached(out, f"{algorithm} train output")


@pytest.mark.parametrize(("algorithm", "extra"), CASES, ids=lambda v: str(v))
def test_outputs_carry_no_autograd_history(algorithm: str, extra: tuple[str, ...]):
    objective, layers, packet = setup(algorithm, extra)
    for layer in layers:
        packet, _ = layer.train_step(packet)
        assert_detached(packet, f"{algorithm} layer {layer.index} train output")
    evaluation = objective.encode_eval(torch.rand(4, 784), goodness=objective.supports_goodness)
    for layer in layers:
        evaluation = layer.eval_step(evaluation)
        assert_detached(evaluation, f"{algorithm} layer {layer.index} eval output")
    assert objective.predict(evaluation)


def test_bp_is_a_single_unit_with_detached_outputs():
    cfg = load_config(None, ["model.algorithm=bp", "model.hidden=8,8,8"])
    objective = build_objective(cfg)
    stage = Stage(build_layers(cfg, objective=objective))
    assert stage.indices == [0] and objective.pipelinable is False
    before = stage.state_dict()
    packet = objective.encode_train(torch.rand(6, 784), torch.arange(6), torch.Generator())
    out, metrics = stage.train_step(packet)
    assert_detached(out, "bp train output")
    assert 0 in metrics
    # backprop: every layer of the network moved in one step (the opposite of locality)
    after = stage.state_dict()
    weights = [k for k in before if k.endswith("weight")]
    assert len(weights) == 4 and all(not torch.equal(before[k], after[k]) for k in weights)
    assert_detached(stage.eval_step(objective.encode_eval(torch.rand(3, 784), False)), "bp eval")
