"""FedYogi (Reddi et al. 2020): v = v - (1 - beta_2) * delta^2 * sign(v - delta^2); Flower's
defaults (eta 1e-2, eta_l 0.0316)."""

from __future__ import annotations

import dataclasses

import torch

from bpfree_core.federation.strategies import register
from bpfree_core.federation.strategies.fedopt import FedOpt, check_fedopt


@dataclasses.dataclass(frozen=True)
class FedYogiParams:
    eta: float = 1e-2
    eta_l: float = 0.0316
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        check_fedopt(self)


@register("fedyogi")
class FedYogi(FedOpt):
    Params = FedYogiParams

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        sq = delta**2
        return v - (1 - self.params.beta_2) * sq * torch.sign(v - sq)
