"""bpfree_core.optim: torch.optim's bits, its state_dict layout, and no torch._dynamo import."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from bpfree_core.optim import LayerOptimizer


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in ((7, 5), (5,), (3, 7))]


def _torch_optimizer(params, kind: str, kernels: str, lr: float, momentum: float, wd: float):
    flags = {"foreach": kernels == "foreach"}
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd, fused=kernels == "fused" or None,
                                **flags)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd, **flags)


def _train(opt, params, steps: int, seed: int = 1, start: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for i in range(start + steps):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        if i < start:
            continue
        for j, (p, g) in enumerate(zip(params, grads, strict=True)):
            p.grad = None if (i == 2 and j == 1) else g   # a parameter without a gradient
        if i == 3:
            opt.param_groups[0]["lr"] *= 0.5                # a schedule changes lr mid-run
        opt.step()
        opt.zero_grad(set_to_none=True)


CASES = [("adam", k, 0.0, wd) for k in ("single", "foreach", "fused") for wd in (0.0, 0.01)] + \
        [("sgd", k, m, wd) for k in ("single", "foreach") for m in (0.0, 0.9) for wd in (0.0, 0.01)]


@pytest.mark.parametrize("kind,kernels,momentum,wd", CASES)
def test_every_kernel_gives_torch_optims_bits(kind, kernels, momentum, wd):
    ours, theirs = _params(), _params()
    _train(LayerOptimizer(ours, kind, 1e-2, momentum, wd, kernels=kernels), ours, 8)
    _train(_torch_optimizer(theirs, kind, kernels, 1e-2, momentum, wd), theirs, 8)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


@pytest.mark.parametrize("kind,momentum", [("adam", 0.0), ("sgd", 0.9)])
def test_state_dict_round_trips_with_torch_optim_both_ways(kind, momentum):
    """A checkpoint torch.optim wrote resumes here bit for bit, and ours resumes in torch.optim."""
    ref = _params()
    _train(_torch_optimizer(ref, kind, "foreach", 1e-2, momentum, 0.0), ref, 10)
    for first, then in ((_torch_optimizer, LayerOptimizer), (LayerOptimizer, _torch_optimizer)):
        params = _params()
        make = (lambda ps, cls: cls(ps, kind, "foreach", 1e-2, momentum, 0.0)  # noqa: E731
                if cls is _torch_optimizer else cls(ps, kind, 1e-2, momentum, 0.0))
        opt = make(params, first)
        _train(opt, params, 5)
        saved = opt.state_dict()   # carries the lr the schedule halved at step 3
        resumed = make(params, then)
        resumed.load_state_dict(saved)
        _train(resumed, params, 5, start=5)
        assert all(torch.equal(a, b) for a, b in zip(params, ref, strict=True)), first.__name__


def test_a_layer_trains_without_importing_torch_dynamo():
    """torch.optim imports torch._dynamo (seconds of CPU) in every process; ours must not."""
    code = ("import sys, torch\n"
            "from bpfree_core.config import load_config\n"
            "from bpfree_core.model import Stage, build_layers, build_objective\n"
            "cfg = load_config(None, ['model.algorithm=mono', 'model.hidden=16,16', 'train.batch_size=8'])\n"
            "stage = Stage(build_layers(cfg))\n"
            "x = torch.rand(8, 784); y = torch.randint(0, 10, (8,))\n"
            "from bpfree_core.data.batches import train_packets\n"
            "from bpfree_core.data.datasets import Split\n"
            "for p in train_packets(build_objective(cfg), Split(x, y), cfg, epoch=0):\n"
            "    stage.train_step(p)\n"
            "stage.optimizer_state()\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
