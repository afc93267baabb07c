"""The training step is GPU-ready: no host sync per batch, batched optimiser kernels, same numbers."""

from __future__ import annotations

import pytest
import torch

from bpfree_core.config import load_config
from bpfree_core.data.batches import train_packets
from bpfree_core.metrics import RunningMeans
from bpfree_core.model import Stage, build_layers, build_objective

ALGORITHMS = [("ff", []), ("symba", ["objective.negatives=hard"]), ("sffa", []), ("ffcl", []),
              ("uff", []), ("cwc", ["model.hidden=60,30"]), ("bp", []), ("ff", ["optim.optimizer=sgd"])]


def _packets(cfg, n: int):
    objective = build_objective(cfg)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n * cfg.train.batch_size, 784, generator=gen)
    y = torch.randint(0, 10, (x.shape[0],), generator=gen)
    from bpfree_core.data.datasets import Split

    return objective, list(train_packets(objective, Split(x, y), cfg, epoch=0))


def _train(cfg, kernels: str, packets) -> tuple[Stage, list]:
    stage = Stage(build_layers(cfg))
    for layer in stage.layers:
        layer.place(torch.device("cpu"), kernels)
    metrics = [stage.train_step(p)[1] for p in packets]
    return stage, metrics


@pytest.mark.parametrize("algorithm,extra", ALGORITHMS)
def test_foreach_kernels_equal_the_per_tensor_loop_and_steps_return_device_tensors(algorithm, extra):
    cfg = load_config(None, [f"model.algorithm={algorithm}", "model.hidden=64,32", "train.threads=1",
                             "train.batch_size=32", *extra])
    _, packets = _packets(cfg, 4)
    single, _ = _train(cfg, "single", packets)
    foreach, metrics = _train(cfg, "foreach", packets)
    a, b = single.state_dict(), foreach.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    # Every statistic is a 0-dim tensor: nothing was read back to the host inside the step.
    values = [v for step in metrics for layer in step.values() for v in layer.values()]
    assert values and all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in values)


def test_fused_kernels_train_to_nearly_the_same_weights():
    cfg = load_config(None, ["model.algorithm=symba", "model.hidden=64,32", "train.batch_size=32"])
    _, packets = _packets(cfg, 4)
    foreach, _ = _train(cfg, "foreach", packets)
    fused, _ = _train(cfg, "fused", packets)
    a, b = foreach.state_dict(), fused.state_dict()
    assert all(torch.allclose(a[k].double(), b[k].double(), atol=1e-5) for k in a)


def test_running_means_read_tensors_once_and_match_python_floats():
    means = RunningMeans()
    for v in (0.25, 0.5, 1.0):
        means.add({0: {"loss": torch.tensor(v)}, 1: {"acc": v}})
    assert means.means() == {"0": {"loss": pytest.approx(1.75 / 3)}, "1": {"acc": pytest.approx(1.75 / 3)}}


def test_uff_noise_step_follows_loaded_weights():
    cfg = load_config(None, ["model.algorithm=uff", "model.hidden=32", "train.batch_size=16"])
    _, packets = _packets(cfg, 3)
    trained = Stage(build_layers(cfg))
    for p in packets[:2]:
        trained.train_step(p)
    assert trained.layers[0].host_steps() == int(trained.layers[0].steps) == 2
    # `stale` counted a step of its own before loading; `clean` only loads. Both must draw the
    # noise of step 2 next, so with the same optimiser state they end identical.
    stale, clean = Stage(build_layers(cfg)), Stage(build_layers(cfg))
    stale.train_step(packets[0])
    assert stale.layers[0].host_steps() == 1
    for stage in (stale, clean):
        stage.load_state_dict(trained.state_dict())
    stale.load_optimizer_state(clean.optimizer_state())
    assert stale.layers[0].host_steps() == 2
    for stage in (stale, clean):
        stage.train_step(packets[2])
    a, b = stale.state_dict(), clean.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_optim_kernels_choose_the_kernels_and_survive_a_weight_load():
    cfg = load_config(None, ["model.algorithm=ff", "model.hidden=32", "optim.kernels=fused"])
    stage = Stage(build_layers(cfg))
    groups = lambda: [g for layer in stage.layers for o in (layer.optimizer, layer.head_optimizer)  # noqa: E731
                      for g in o.param_groups]
    assert all(g["fused"] and not g["foreach"] for g in groups())
    for layer in stage.layers:
        layer.finish_init()   # what a stage worker's LoadWeights does
    assert all(g["fused"] and not g["foreach"] for g in groups())
    auto = Stage(build_layers(load_config(None, ["model.algorithm=ff", "model.hidden=32"])))
    assert all(g["foreach"] for layer in auto.layers for g in layer.optimizer.param_groups)
