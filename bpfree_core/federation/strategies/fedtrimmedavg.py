"""FedTrimmedAvg (Yin et al. 2018): per coordinate, drop the int(beta * n) lowest and highest
client values and average the rest (unweighted), as Flower's trim_mean."""

from __future__ import annotations

import dataclasses

import torch

from bpfree_core.federation.aggregate import Weights
from bpfree_core.federation.strategies import Strategy, register


@dataclasses.dataclass(frozen=True)
class FedTrimmedAvgParams:
    beta: float = 0.2   # fraction cut from each end

    def __post_init__(self) -> None:
        if not 0 <= self.beta < 0.5:
            raise ValueError(f"beta = {self.beta} must be in [0, 0.5)")


@register("fedtrimmedavg")
class FedTrimmedAvg(Strategy):
    Params = FedTrimmedAvgParams

    def combine(self, rnd: int, current: Weights, replies: list[tuple[int, Weights]]) -> Weights:
        n = len(replies)
        cut = int(self.params.beta * n)
        out: Weights = {}
        for key, like in current.items():
            stacked = torch.stack([w[key].to(torch.float64) for _, w in replies]).sort(dim=0).values
            out[key] = stacked[cut:n - cut].mean(dim=0).to(like.dtype)
        return out
