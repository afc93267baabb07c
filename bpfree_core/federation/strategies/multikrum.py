"""MultiKrum (Blanchard et al. 2017, arXiv:1703.02757): average the updates of the
num_nodes_to_select clients whose n - f - 2 nearest neighbours (squared L2 over every floating
tensor) are closest, f = num_malicious_nodes; Flower's select_multikrum."""

from __future__ import annotations

import dataclasses

import torch

from bpfree_core.federation.aggregate import Weights
from bpfree_core.federation.strategies import Strategy, register, weighted_mean


@dataclasses.dataclass(frozen=True)
class MultiKrumParams:
    num_malicious_nodes: int = 0
    num_nodes_to_select: int = 1

    def __post_init__(self) -> None:
        if self.num_malicious_nodes < 0 or self.num_nodes_to_select < 1:
            raise ValueError("num_malicious_nodes must be >= 0 and num_nodes_to_select >= 1")


def krum_selection(replies: list[tuple[int, Weights]], malicious: int, keep: int) -> list[int]:
    """Indices (into `replies`) of the `keep` lowest Krum scores, best first."""
    flat = torch.stack([torch.cat([t.reshape(-1).to(torch.float64) for t in w.values()])
                        for _, w in replies])
    distance = torch.cdist(flat, flat).pow(2)
    closest = max(1, len(replies) - malicious - 2)
    scores = [float(row.sort(stable=True).values[1:closest + 1].sum()) for row in distance]
    return sorted(range(len(replies)), key=lambda i: scores[i])[:keep]


@register("multikrum")
class MultiKrum(Strategy):
    Params = MultiKrumParams

    def combine(self, rnd: int, current: Weights, replies: list[tuple[int, Weights]]) -> Weights:
        p = self.params
        chosen = krum_selection(replies, p.num_malicious_nodes, p.num_nodes_to_select)
        return weighted_mean([replies[i] for i in sorted(chosen)], current)
