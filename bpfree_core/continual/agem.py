"""A-GEM (Chaudhry et al. 2019), made local: each layer projects its own update against its own
gradient on the replay memory.

Before every training batch the memory sends a *reference* batch down the same stream (a packet
marked REFERENCE, drawn by bpfree_core.data.batches). Each layer runs its local loss on it, keeps the
gradient g_ref of each parameter list it steps (body, head) and does not step. On the training
batch that follows, where the layer's own gradient g points against it (g . g_ref < 0):

  g  <-  g - (g . g_ref / g_ref . g_ref) g_ref

so the step does not raise the layer's loss on the memory, to first order. The dot products run
over one parameter list, never across layers: a stage needs nothing from any other stage, and the
pipeline ends bit-identical to the single process. For the bp baseline the whole network is one
layer unit, so it gets standard A-GEM (one projection over every parameter).
"""

from __future__ import annotations

import torch
from torch import nn


class GradientProjector:
    """The A-GEM state of one parameter list: the reference gradient of the last reference batch."""

    def __init__(self) -> None:
        self.reference: list[torch.Tensor | None] | None = None
        self._projected: torch.Tensor | int = 0   # a device counter: no sync per step
        self.steps = 0

    def remember(self, params: list[nn.Parameter]) -> None:
        """After backward on a reference batch: keep its gradient (the caller does not step)."""
        self.reference = [None if p.grad is None else p.grad.detach().clone() for p in params]

    def project(self, params: list[nn.Parameter]) -> torch.Tensor | None:
        """After backward on a training batch: project the gradient in place where it conflicts
        with the last reference gradient (used once). Returns a 0-d bool tensor, true when it
        projected (None without a reference). No host sync: the conflict test is a tensor, the
        scale min(dot, 0) / norm is zero where the gradients agree, so g is left as it was."""
        reference, self.reference = self.reference, None
        if reference is None:
            return None
        self.steps += 1
        pairs = [(p.grad, r) for p, r in zip(params, reference, strict=True)
                 if p.grad is not None and r is not None]
        if not pairs:
            return None
        dot = sum((g * r).sum() for g, r in pairs)
        norm = sum((r * r).sum() for _, r in pairs)
        conflict = dot < 0
        scale = torch.where(conflict, dot / norm, torch.zeros_like(dot))
        for g, r in pairs:
            g.sub_(r * scale)
        self._projected = self._projected + conflict.to(torch.int64)
        return conflict

    @property
    def projected(self) -> int:
        """Training steps whose gradient was projected (diagnostics: reading it syncs)."""
        return int(self._projected)
