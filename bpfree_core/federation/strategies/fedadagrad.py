"""FedAdagrad (Reddi et al. 2020): m = delta (beta_1 = 0), v = v + delta^2."""

from __future__ import annotations

import dataclasses

import torch

from bpfree_core.federation.strategies import register
from bpfree_core.federation.strategies.fedopt import FedOpt, check_fedopt


@dataclasses.dataclass(frozen=True)
class FedAdagradParams:
    eta: float = 1e-1
    eta_l: float = 1e-1
    tau: float = 1e-3

    def __post_init__(self) -> None:
        check_fedopt(self)


@register("fedadagrad")
class FedAdagrad(FedOpt):
    Params = FedAdagradParams

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return v + delta**2
