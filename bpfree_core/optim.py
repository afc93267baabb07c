"""Adam and SGD for one layer's parameters: torch.optim's maths, kernel for kernel, without its wrapper.

torch.optim.Optimizer imports torch._dynamo the first time it builds or steps (2.5 s of CPU in
every stage worker, ClientApp and coordinator process) and regroups its tensors on every step. A
layer owns a few tensors on one device, so this calls the same torch kernels in the same order
(per-tensor ops, `_foreach_*` ops, or `torch._fused_adam_`) and nothing else: the weights are
torch.optim's bits (tests/test_optim.py checks every kernel against torch.optim), and
state_dict() has torch.optim's layout, so checkpoints read the same.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

KERNELS = ("single", "foreach", "fused")


class LayerOptimizer:
    """One parameter group of Adam (kind "adam") or SGD with momentum (kind "sgd")."""

    def __init__(self, params: Iterable[torch.nn.Parameter], kind: str, lr: float,
                 momentum: float = 0.0, weight_decay: float = 0.0, kernels: str = "foreach"):
        if kind not in ("adam", "sgd"):
            raise ValueError(f"optimizer {kind!r}; one of adam, sgd")
        group: dict[str, Any] = {"lr": lr, "weight_decay": weight_decay, "foreach": True}
        if kind == "adam":
            group.update(betas=(0.9, 0.999), eps=1e-8, fused=None)
        else:
            group.update(momentum=momentum, dampening=0.0, nesterov=False)
        self.kind, self.params = kind, list(params)
        if not self.params:
            raise ValueError("optimizer got an empty parameter list")
        self.param_groups = [{"params": self.params, **group}]
        self.state: dict[Tensor, dict[str, Any]] = {}
        self._scratch: dict[Tensor, Tensor] = {}
        set_kernels(self, kernels)

    # -- what torch.optim callers use ---------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.detach_().zero_()

    @torch.no_grad()
    def step(self) -> None:
        group = self.param_groups[0]
        params = [p for p in self.params if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        kernels = "fused" if group.get("fused") else "foreach" if group["foreach"] else "single"
        if self.kind == "sgd":
            _sgd(self, group, params, grads, kernels)
        else:
            _adam(self, group, params, grads, kernels)

    def scratch(self, params: list[Tensor]) -> list[Tensor]:
        """A work buffer per parameter, reused every step (never saved)."""
        bufs = self._scratch
        for p in params:
            buf = bufs.get(p)
            if buf is None or buf.shape != p.shape or buf.device != p.device or buf.dtype != p.dtype:
                bufs[p] = torch.empty_like(p, memory_format=torch.preserve_format)
        return [bufs[p] for p in params]

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's layout: per-parameter state by index, the group without its tensors."""
        index = {id(p): i for i, p in enumerate(self.params)}
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        return {"state": {index[id(p)]: dict(s) for p, s in self.state.items()},
                "param_groups": [{**copy.deepcopy(group), "params": list(range(len(self.params)))}]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups = state_dict["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.params):
            raise ValueError("loaded state dict has a different number of parameters")
        ours = self.param_groups[0]
        for key, value in groups[0].items():
            if key != "params" and key in ours:
                ours[key] = value
        self.state = {}
        for i, entry in state_dict["state"].items():
            p = self.params[int(i)]
            self.state[p] = {k: _like(v, p, k) for k, v in entry.items()}


def _like(value: Any, param: Tensor, key: str) -> Any:
    """A loaded state tensor on the parameter's device and dtype; step stays a float32 where it
    was (_adam moves it beside the parameter for the fused kernels)."""
    if not isinstance(value, Tensor):
        return value
    if key == "step":
        return value.to(dtype=torch.float32)
    return value.to(device=param.device, dtype=param.dtype)


def set_kernels(optimizer: LayerOptimizer, kernels: str) -> None:
    """Switch between per-tensor, foreach and fused kernels (same maths; fused only for Adam)."""
    if kernels not in KERNELS:
        raise ValueError(f"optimizer kernels {kernels!r}; one of {', '.join(KERNELS)}")
    for group in optimizer.param_groups:
        group["foreach"] = kernels == "foreach"
        if "fused" in group:
            group["fused"] = kernels == "fused" or None


def _adam(opt: LayerOptimizer, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
          kernels: str) -> None:
    lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    for p in params:   # step lives beside the parameter for fused, on the CPU otherwise
        home = p.device if kernels == "fused" else torch.device("cpu")
        s = opt.state.get(p)
        if s is None:
            opt.state[p] = {"step": torch.tensor(0.0, dtype=torch.float32, device=home),
                            "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                            "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
        elif s["step"].device != home:   # loaded, or the kernels changed since
            s["step"] = s["step"].to(home)
    states = [opt.state[p] for p in params]
    avgs, sqs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
    steps = [s["step"] for s in states]
    if kernels == "fused":   # torch.optim.adam._fused_adam
        torch._foreach_add_(steps, 1)
        torch._fused_adam_(params, grads, avgs, sqs, [], steps, amsgrad=False, lr=lr, beta1=beta1,
                           beta2=beta2, weight_decay=wd, eps=eps, maximize=False,
                           grad_scale=None, found_inf=None)
        return
    # sqrt(v) goes into a buffer kept between steps: the same kernels as torch.optim's fresh
    # tensor, so the same bits, without faulting in new pages every step (~3x on that pass, CPU)
    roots = opt.scratch(params)
    if kernels == "single":   # torch.optim.adam._single_tensor_adam
        for p, g, avg, sq, step, root in zip(params, grads, avgs, sqs, steps, roots, strict=True):
            step += 1
            if wd != 0:
                g = g.add(p, alpha=wd)
            avg.lerp_(g, 1 - beta1)
            sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            t = step.item()
            torch.sqrt(sq, out=root).div_((1 - beta2 ** t) ** 0.5).add_(eps)
            p.addcdiv_(avg, root, value=-(lr / (1 - beta1 ** t)))
        return
    # torch.optim.adam._multi_tensor_adam (CPU steps, not capturable)
    torch._foreach_add_(steps, torch.tensor(1.0, device="cpu"), alpha=1.0)
    if wd != 0:
        grads = torch._foreach_add(grads, params, alpha=wd)
    torch._foreach_lerp_(avgs, grads, 1 - beta1)
    torch._foreach_mul_(sqs, beta2)
    torch._foreach_addcmul_(sqs, grads, grads, 1 - beta2)
    del grads
    ts = [s.item() for s in steps]
    step_size = [(lr / (1 - beta1 ** t)) * -1 for t in ts]
    for sq, root in zip(sqs, roots, strict=True):   # _foreach_sqrt is this loop on CPU
        torch.sqrt(sq, out=root)
    torch._foreach_div_(roots, [(1 - beta2 ** t) ** 0.5 for t in ts])
    torch._foreach_add_(roots, eps)
    torch._foreach_addcdiv_(params, avgs, roots, step_size)


def _sgd(opt: LayerOptimizer, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
         kernels: str) -> None:
    """torch.optim.sgd's _single_tensor_sgd / _multi_tensor_sgd (no nesterov, dense grads)."""
    lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
    keep = 1 - group["dampening"]
    if wd != 0:
        grads = (torch._foreach_add(grads, params, alpha=wd) if kernels != "single"
                 else [g.add(p, alpha=wd) for g, p in zip(grads, params, strict=True)])
    if momentum != 0:
        states = [opt.state.setdefault(p, {}) for p in params]
        bufs = [s.get("momentum_buffer") for s in states]
        if kernels != "single" and all(b is not None for b in bufs):
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, grads, alpha=keep)
        else:
            for i, (state, g) in enumerate(zip(states, grads, strict=True)):
                if bufs[i] is None:
                    bufs[i] = state["momentum_buffer"] = g.detach().clone()
                else:
                    bufs[i].mul_(momentum).add_(g, alpha=keep)
        grads = bufs
    if kernels == "single":
        for p, g in zip(params, grads, strict=True):
            p.add_(g, alpha=-lr)
    else:
        torch._foreach_add_(params, grads, alpha=-lr)
