"""FedAvg (McMahan et al. 2017): the example-weighted mean of every tensor (Flower's FedAvg)."""

from __future__ import annotations

from bpfree_core.federation.aggregate import Weights
from bpfree_core.federation.strategies import Strategy, register


@register("fedavg")
class FedAvg(Strategy):
    streams = True

    def from_mean(self, rnd: int, current: Weights, mean: Weights) -> Weights:
        return mean
