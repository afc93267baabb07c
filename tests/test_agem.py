"""A-GEM, local to each layer (bpfree_core.continual.agem): the projection's maths, a reference packet that
changes nothing but the reference gradient on every objective, the bp baseline's standard A-GEM
checked against torch.optim by hand, and the marker on the wire. The real SplitMNIST runs, the
pipeline and Flower golden rules are in test_continual.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bpfree_core.config import load_config
from bpfree_core.continual.agem import GradientProjector
from bpfree_core.data.batches import train_packets
from bpfree_core.data.datasets import Split
from bpfree_core.errors import ProtocolError
from bpfree_core.layers import REFERENCE
from bpfree_core.model import Stage, build_layers, build_objective

PLUGIN = str(Path(__file__).resolve().parents[1] / "examples/fixed_random_classifier.py")
ALGORITHMS = [("ff", []), ("symba", ["objective.negatives=hard"]), ("sffa", []), ("ffcl", []),
              ("uff", []), ("cwc", ["model.hidden=60,30"]), ("mono", []), ("deeper", []),
              ("bp", []), ("ff", ["objective.peer_weight=0.03"]),
              ("sffa", ["objective.negatives=seen", "objective.input_skip=true"]),
              (f"{PLUGIN}:FixedRandomClassifier", [])]   # a plug-in rule gets it too


def _grads(*values: list[float]) -> list[nn.Parameter]:
    params = []
    for v in values:
        p = nn.Parameter(torch.zeros(len(v)))
        p.grad = torch.tensor(v)
        params.append(p)
    return params


def test_the_projection_removes_only_a_conflicting_component() -> None:
    proj = GradientProjector()
    proj.remember(_grads([-1.0, 1.0], [0.0]))
    params = _grads([1.0, 0.0], [2.0])                          # g . g_ref = -1 < 0
    assert proj.project(params)
    assert torch.allclose(params[0].grad, torch.tensor([0.5, 0.5])) and params[1].grad.item() == 2.0
    assert proj.reference is None and proj.project(params) is None   # a reference is used once
    proj.remember(_grads([1.0, 1.0], [0.0]))
    same = _grads([1.0, 0.0], [2.0])                            # g . g_ref = 1 >= 0: untouched
    assert not proj.project(same) and same[0].grad.tolist() == [1.0, 0.0]
    assert (proj.projected, proj.steps) == (1, 2)


def _agem_packets(algorithm: str, extra: list[str], strategy: str = "agem"):
    cfg = load_config(None, [f"model.algorithm={algorithm}", "model.hidden=40,30",
                             "train.batch_size=16", f"continual.strategy={strategy}", *extra])
    objective = build_objective(cfg)
    gen = torch.Generator().manual_seed(0)
    split = Split(torch.rand(32, 784, generator=gen), torch.randint(0, 10, (32,), generator=gen))
    memory = Split(torch.rand(20, 784, generator=gen), torch.randint(0, 10, (20,), generator=gen))

    def replay(n: int, g: torch.Generator) -> Split:
        return memory.subset(torch.randint(0, len(memory), (n,), generator=g))

    return cfg, list(train_packets(objective, split, cfg, 0, replay))


@pytest.mark.parametrize(("algorithm", "extra"), ALGORITHMS)
def test_a_reference_packet_changes_nothing_but_the_reference(algorithm: str, extra: list[str]) -> None:
    cfg, packets = _agem_packets(algorithm, extra)
    assert [bool(p[REFERENCE]) for p in packets] == [True, False, True, False]
    stage = Stage(build_layers(cfg))
    stage.train_step(packets[1])                               # optimiser state exists
    weights, opt = stage.state_dict(), stage.optimizer_tensors()
    out, metrics = stage.train_step(packets[2])
    assert metrics == {} and bool(out[REFERENCE])              # the marker travels on
    after = stage.state_dict()
    assert all(torch.equal(weights[k], after[k]) for k in weights), algorithm   # buffers too
    assert all(torch.equal(opt[k], v) for k, v in stage.optimizer_tensors().items())
    projectors = [p for layer in stage.layers for p in layer.projectors.values()]
    assert projectors and all(p.reference is not None for p in projectors)
    _, metrics = stage.train_step(packets[3])
    assert set(metrics) == {layer.index for layer in stage.layers}
    assert all(p.reference is None and p.steps == 1 for p in projectors)
    assert not all(torch.equal(after[k], v) for k, v in stage.state_dict().items())


def test_a_reference_packet_outside_agem_is_refused() -> None:
    _, packets = _agem_packets("ff", [])
    cfg = load_config(None, ["model.hidden=40,30", "continual.strategy=replay"])
    with pytest.raises(ProtocolError, match="continual.strategy = 'replay'"):
        Stage(build_layers(cfg)).train_step(packets[0])


def test_bp_gets_standard_agem_over_the_whole_network() -> None:
    """The bp baseline is one layer unit: its projection is A-GEM's, over every parameter at once
    (rebuilt here with torch.optim.SGD and one flat dot product)."""
    cfg, packets = _agem_packets("bp", ["optim.optimizer=sgd", "optim.lr=0.05"])
    stage = Stage(build_layers(cfg))
    net = build_layers(cfg)[0]
    net.load_state_dict(stage.layers[0].state_dict())
    sgd = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)   # linear in g: no roundoff blown up
    projected = 0
    for ref, batch in zip(packets[::2], packets[1::2], strict=True):
        stage.train_step(ref)
        stage.train_step(batch)
        g_ref = _flat_grad(net, ref)
        g = _flat_grad(net, batch)
        if g @ g_ref < 0:
            g = g - (g @ g_ref) / (g_ref @ g_ref) * g_ref
            projected += 1
        torch.nn.utils.vector_to_parameters(g, [p.grad for p in net.parameters()])
        sgd.step()
    assert projected >= 1                                      # the check saw a projection
    ours = stage.layers[0].state_dict()
    assert int(ours.pop("steps")) == 2                         # reference passes are not steps
    for k, v in net.state_dict().items():
        if k != "steps":
            assert (ours[k] - v).abs().max() < 1e-6, (k, float((ours[k] - v).abs().max()))


def _flat_grad(net: nn.Module, packet: dict[str, torch.Tensor]) -> torch.Tensor:
    for p in net.parameters():
        p.grad = None
    F.cross_entropy(net(packet["x"]), packet["y"]).backward()
    return torch.cat([p.grad.reshape(-1) for p in net.parameters()])


def test_an_agem_stage_admits_the_marker_on_the_wire() -> None:
    from bpfree.client.compute import packet_schema
    from bpfree.client.wire import schema_of
    from bpfree.protos import stage_pb2 as pb

    cfg, packets = _agem_packets("ff", [])
    objective = build_objective(cfg)
    for first in (0, 1):
        schema = packet_schema(cfg, objective, first)[pb.TRAIN]
        assert REFERENCE in schema
        packet = packets[0]
        if first:
            packet, _ = Stage(build_layers(cfg, range(1))).train_step(packet)
        assert schema_of(packet) == schema
