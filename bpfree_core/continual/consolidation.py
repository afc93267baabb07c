"""EWC and SI, made local: each layer protects its own parameters with its own loss's statistics.

Both add a quadratic penalty that pulls parameters back towards where earlier tasks left them,
weighted by how much each parameter mattered (Avalanche's conventions, no 1/2):

  EWC (Kirkpatrick et al. 2017):  lambda * sum_tasks sum_i F_t,i (w_i - w*_t,i)^2
  SI  (Zenke et al. 2017):        c * sum_i Omega_i (w_i - w*_i)^2

The penalty's gradient is added to the parameters' gradients after the layer's own backward pass
(no autograd graph for it), so it applies to any LocalLayer's step_body / step_head unchanged and
needs nothing from any other layer.

Where this differs from the backprop versions (which bpfree's bp baseline gets exactly, since the
whole network is one layer unit there): the importance comes from the layer's *local* loss (its
goodness loss, or its head's cross-entropy), not from the network's output log-likelihood. The
EWC Fisher is the mean squared minibatch gradient over the task's last epoch, collected while
training (Avalanche takes the same squared minibatch gradients in a separate pass at the final
weights); SI's path integral is exact per step. SI's Omega is clamped at 0 so that a parameter
whose loss rose never gets pushed away from its anchor.
"""

from __future__ import annotations

import torch
from torch import nn


class Consolidator:
    """The EWC or SI state of one parameter list (a layer's body or its head)."""

    def __init__(self, params: list[nn.Parameter], kind: str, strength: float, damping: float = 1e-3):
        if kind not in ("ewc", "si"):
            raise ValueError(f"consolidation kind {kind!r}: ewc or si")
        self.params = params
        self.kind, self.strength, self.damping = kind, strength, damping
        self.collecting = False     # ewc: add squared gradients to the Fisher estimate
        self._fisher = [torch.zeros_like(p) for p in params]
        self._batches = 0
        self._penalties: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []  # (F or Omega, w*)
        self._start = [p.detach().clone() for p in params]     # si: weights at the task's start
        self._omega = [torch.zeros_like(p) for p in params]    # si: path integral this task
        self._grad: list[torch.Tensor | None] = []
        self._before: list[torch.Tensor] = []

    def before_step(self) -> None:
        """After backward, before the optimiser step: record, then add the penalty's gradient."""
        grads = [p.grad for p in self.params]
        if self.kind == "ewc" and self.collecting:
            for f, g in zip(self._fisher, grads, strict=True):
                if g is not None:
                    f.add_(g.detach() * g.detach())
            self._batches += 1
        if self.kind == "si":
            self._grad = [None if g is None else g.detach().clone() for g in grads]
            self._before = [p.detach().clone() for p in self.params]
        for importance, anchor in self._penalties:
            for p, imp, a in zip(self.params, importance, anchor, strict=True):
                if p.grad is not None:
                    p.grad.add_(2 * self.strength * imp * (p.detach() - a))

    def after_step(self) -> None:
        if self.kind == "si":
            for om, g, p, w in zip(self._omega, self._grad, self.params, self._before, strict=True):
                if g is not None:
                    om.sub_(g * (p.detach() - w))   # -g . delta: positive where the loss fell

    def end_task(self) -> None:
        """The task is learnt: store its importance and anchor (EWC: one penalty per task)."""
        anchor = [p.detach().clone() for p in self.params]
        if self.kind == "ewc":
            n = max(self._batches, 1)
            self._penalties.append(([f / n for f in self._fisher], anchor))
            self._fisher = [torch.zeros_like(p) for p in self.params]
            self._batches = 0
            self.collecting = False
            return
        old = self._penalties[0][0] if self._penalties else [torch.zeros_like(p) for p in self.params]
        omega = [o + (om / ((a - s).pow(2) + self.damping)).clamp(min=0)
                 for o, om, a, s in zip(old, self._omega, anchor, self._start, strict=True)]
        self._penalties = [(omega, anchor)]
        self._start = anchor
        self._omega = [torch.zeros_like(p) for p in self.params]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything end_task and the next steps need, as named tensors (a stage's checkpoint,
        the wire): `fisher.<j>`, `batches` (ewc), `start.<j>`, `omega.<j>` (si), and each stored
        penalty's `penalty.<t>.importance.<j>`, `penalty.<t>.anchor.<j>`."""
        out: dict[str, torch.Tensor] = {}
        live = ({"fisher": self._fisher} if self.kind == "ewc"
                else {"start": self._start, "omega": self._omega})
        for name, tensors in live.items():
            out.update({f"{name}.{j}": t.detach().cpu().clone() for j, t in enumerate(tensors)})
        if self.kind == "ewc":
            out["batches"] = torch.tensor(self._batches)
        for t, (importance, anchor) in enumerate(self._penalties):
            for part, tensors in (("importance", importance), ("anchor", anchor)):
                out.update({f"penalty.{t}.{part}.{j}": v.detach().cpu().clone()
                            for j, v in enumerate(tensors)})
        return out

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what state_tensors() gave, onto these parameters' devices."""
        n = len(self.params)
        try:
            def tensors(prefix: str) -> list[torch.Tensor]:
                out = [state[f"{prefix}.{j}"].to(p.device, p.dtype)
                       for j, p in zip(range(n), self.params, strict=True)]
                for j, (t, p) in enumerate(zip(out, self.params, strict=True)):
                    if t.shape != p.shape:
                        raise ValueError(f"{self.kind} tensor {prefix}.{j} is {list(t.shape)} "
                                         f"but its parameter is {list(p.shape)}")
                return out

            if self.kind == "ewc":
                self._fisher, self._batches = tensors("fisher"), int(state["batches"])
            else:
                self._start, self._omega = tensors("start"), tensors("omega")
            count = len({k.split(".")[1] for k in state if k.startswith("penalty.")})
            self._penalties = [(tensors(f"penalty.{t}.importance"), tensors(f"penalty.{t}.anchor"))
                               for t in range(count)]
        except KeyError as exc:
            raise ValueError(f"{self.kind} state lacks tensor {exc}") from None

    def penalty(self) -> float:
        """The penalty's current value (for metrics)."""
        return float(sum(self.strength * (imp * (p.detach() - a).pow(2)).sum()
                         for importance, anchor in self._penalties
                         for p, imp, a in zip(self.params, importance, anchor, strict=True)))

    def importance(self) -> list[torch.Tensor]:
        """Total importance per parameter over the stored penalties (tests, diagnostics)."""
        total = [torch.zeros_like(p) for p in self.params]
        for importance, _ in self._penalties:
            for t, imp in zip(total, importance, strict=True):
                t.add_(imp)
        return total
