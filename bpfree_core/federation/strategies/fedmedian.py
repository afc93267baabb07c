"""FedMedian (Yin et al. 2018, arXiv:1803.01498): the coordinate-wise median of the clients.

Flower takes numpy's median, which averages the two middle values for an even count; torch's
median returns the lower one, so the middle pair is averaged here too. Unweighted.
"""

from __future__ import annotations

import torch

from bpfree_core.federation.aggregate import Weights
from bpfree_core.federation.strategies import Strategy, register


@register("fedmedian")
class FedMedian(Strategy):
    def combine(self, rnd: int, current: Weights, replies: list[tuple[int, Weights]]) -> Weights:
        out: Weights = {}
        n = len(replies)
        for key, like in current.items():
            stacked = torch.stack([w[key].to(torch.float64) for _, w in replies]).sort(dim=0).values
            middle = stacked[(n - 1) // 2] if n % 2 else (stacked[n // 2 - 1] + stacked[n // 2]) / 2
            out[key] = middle.to(like.dtype)
        return out
