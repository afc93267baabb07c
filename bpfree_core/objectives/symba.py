"""SymBa (Lee & Song 2023, arXiv 2303.08418): symmetric loss plus an intrinsic class pattern.

Loss = softplus(-alpha * (G+ - G-)) on the goodness gap of each positive/negative pair, with
G = mean of squared activities and alpha = 4: positive and negative terms get equal gradients.

Intrinsic class pattern (ICP): the paper's exact construction could not be confirmed. We use a
fixed random binary pattern per class (Bernoulli(0.1), 100 bits, as SFFA's code does) appended
to the input of *every* layer (`objective.icp = true`), so class identity survives the per-layer
normalisation; the neutral input carries the mean pattern. With `icp = false` the label is a
one-hot in the first pixels, as FF. The accuracy benchmark runs both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bpfree_core.objectives import register
from bpfree_core.objectives.goodness import GoodnessLayer, GoodnessObjective, LossOut


class SymBaLayer(GoodnessLayer):
    def goodness(self, y: torch.Tensor) -> torch.Tensor:
        return y.pow(2).mean(dim=1)                                         # (B,)

    def loss(self, y_pos: torch.Tensor, y_neg: torch.Tensor) -> LossOut:
        g_pos, g_neg = self.goodness(y_pos), self.goodness(y_neg)
        loss = F.softplus(-self.cfg.objective.alpha * (g_pos - g_neg)).mean()
        return loss, {"ff_acc": (g_pos > g_neg).float().mean(),
                      "g_pos": g_pos.detach().mean(), "g_neg": g_neg.detach().mean()}


@register("symba")
class SymBa(GoodnessObjective):
    layer_cls = SymBaLayer

    @property
    def uses_patterns(self) -> bool:  # type: ignore[override]
        return self.cfg.objective.icp

    def injects_at(self, index: int) -> bool:
        return True  # the ICP goes into every layer
