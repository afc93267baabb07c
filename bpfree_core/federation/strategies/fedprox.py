"""FedProx (Li et al. 2020): FedAvg's aggregate, and each client minimises its local loss plus
(mu / 2) ||w - w_global||^2 (Flower's FedProx: `proximal_mu`, sent as "proximal-mu" in every train
message). The term is per layer: each layer is pulled towards its own global weights."""

from __future__ import annotations

import dataclasses

from bpfree_core.federation.aggregate import Weights
from bpfree_core.federation.strategies import ClientTerms, Strategy, register


@dataclasses.dataclass(frozen=True)
class FedProxParams:
    proximal_mu: float = 0.0

    def __post_init__(self) -> None:
        if not self.proximal_mu >= 0:
            raise ValueError(f"proximal_mu = {self.proximal_mu} must be >= 0 (0 is FedAvg)")


@register("fedprox")
class FedProx(Strategy):
    Params = FedProxParams
    streams = True

    def from_mean(self, rnd: int, current: Weights, mean: Weights) -> Weights:
        return mean

    def client_terms(self, rnd: int) -> ClientTerms:
        return {"proximal-mu": float(self.params.proximal_mu)}
