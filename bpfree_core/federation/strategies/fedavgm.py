"""FedAvgM (Hsu et al. 2019, arXiv:1909.06335): server SGD with momentum on the FedAvg step.

Flower's FedAvgM: pseudo-gradient g = current - mean; with momentum, v = g in the first round,
then v = server_momentum * v + g; new = current - server_learning_rate * v.
"""

from __future__ import annotations

import dataclasses

from bpfree_core.federation.aggregate import Weights
from bpfree_core.federation.strategies import State, Strategy, register


@dataclasses.dataclass(frozen=True)
class FedAvgMParams:
    server_learning_rate: float = 1.0
    server_momentum: float = 0.0

    def __post_init__(self) -> None:
        if not self.server_learning_rate > 0 or not 0 <= self.server_momentum < 1:
            raise ValueError("server_learning_rate must be > 0 and server_momentum in [0, 1)")


@register("fedavgm")
class FedAvgM(Strategy):
    Params = FedAvgMParams
    streams = True

    def __init__(self, params: FedAvgMParams):
        super().__init__(params)
        self.momentum: Weights = {}

    def from_mean(self, rnd: int, current: Weights, mean: Weights) -> Weights:
        p = self.params
        out: Weights = {}
        for key, old in current.items():
            g = old - mean[key]
            if p.server_momentum > 0:
                g = self.momentum[key] * p.server_momentum + g if key in self.momentum else g
                self.momentum[key] = g
            out[key] = old - p.server_learning_rate * g
        return out

    def state_dict(self) -> State:
        return {f"momentum.{k}": v for k, v in self.momentum.items()}

    def load_state_dict(self, state: State) -> None:
        self.momentum = {k.removeprefix("momentum."): v for k, v in state.items()}
