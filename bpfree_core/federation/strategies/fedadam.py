"""FedAdam (Reddi et al. 2020): v = beta_2 * v + (1 - beta_2) * delta^2, with Adam's bias
correction of the step as Flower writes it: eta * sqrt(1 - beta_2^t) / (1 - beta_1^t) with
t = server_round + 1 (Flower's rounds count from 1, so t = 2 in the first round)."""

from __future__ import annotations

import math

import torch

from bpfree_core.federation.strategies import register
from bpfree_core.federation.strategies.fedopt import FedOpt


@register("fedadam")
class FedAdam(FedOpt):
    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return self.params.beta_2 * v + (1 - self.params.beta_2) * delta**2

    def step_size(self, rnd: int) -> float:
        p, t = self.params, rnd + 2.0   # Flower's exponent: server_round (1-based) + 1.0
        return p.eta * math.sqrt(1 - p.beta_2**t) / (1 - p.beta_1**t)
