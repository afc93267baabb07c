"""Forward-Forward (Hinton 2022, arXiv 2212.13345), following the loeweX reproduction.

Goodness G = sum of squared ReLU activities; p(positive) = sigmoid((G - theta) / tau) with
theta = layer width by default (the same as mean-square threshold 1) and tau = 1 (Hinton);
loss = softplus((theta - G+) / tau) + softplus((G- - theta) / tau). Label one-hot in the first
10 pixels; negatives carry a uniformly drawn *wrong* label (or a hard one, objective.negatives);
unit-RMS normalisation between layers; peer normalisation against dead units.

tau = width / 4 gives the logistic the slope of SymBa's alpha = 4 on mean goodness: with
tau = 1 a 1000-wide layer's G moves by hundreds, so p saturates and most samples stop teaching.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bpfree_core.objectives import register
from bpfree_core.objectives.goodness import GoodnessLayer, GoodnessObjective, LossOut


class FFLayer(GoodnessLayer):
    def threshold(self) -> float:
        o = self.cfg.objective
        if o.threshold >= 0:
            return o.threshold
        return float(self.linear.out_features) if o.goodness == "sum" else 1.0

    def goodness(self, y: torch.Tensor) -> torch.Tensor:
        sq = y.pow(2)                                                       # (B, D)
        return sq.sum(dim=1) if self.cfg.objective.goodness == "sum" else sq.mean(dim=1)  # (B,)

    def loss(self, y_pos: torch.Tensor, y_neg: torch.Tensor) -> LossOut:
        theta, tau = self.threshold(), self.cfg.objective.temperature
        g_pos, g_neg = self.goodness(y_pos), self.goodness(y_neg)
        loss = F.softplus((theta - g_pos) / tau).mean() + F.softplus((g_neg - theta) / tau).mean()
        ff_acc = 0.5 * ((g_pos > theta).float().mean() + (g_neg < theta).float().mean())
        return loss, {"ff_acc": ff_acc, "g_pos": g_pos.detach().mean(), "g_neg": g_neg.detach().mean()}


@register("ff")
class ForwardForward(GoodnessObjective):
    layer_cls = FFLayer
