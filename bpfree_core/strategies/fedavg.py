"""FedAvg (McMahan et al. 2017): the example-weighted mean of every tensor (Flower's FedAvg)."""

from __future__ import annotations

import torch

from bpfree_core.aggregate import Weights
from bpfree_core.strategies import Strategy, register, weighted_mean


def mean_of(replies: list[tuple[int, Weights]], current: Weights) -> Weights:
    """Per tensor: the weighted mean, or the copy itself when every client sent the same one (so
    rounding never perturbs it); bit-identical to bpfree_core.aggregate.fedavg."""
    out: Weights = {}
    for key, like in current.items():
        first = replies[0][1][key]
        same = all(torch.equal(first, w[key]) for _, w in replies[1:])
        out[key] = first.clone() if same else weighted_mean(replies, key, like)
    return out


@register("fedavg")
class FedAvg(Strategy):
    def combine(self, rnd: int, current: Weights, replies: list[tuple[int, Weights]]) -> Weights:
        return mean_of(replies, current)
