"""Krum (Blanchard et al. 2017): MultiKrum keeping the single best-scored client."""

from __future__ import annotations

import dataclasses

from bpfree_core.federation.strategies import register
from bpfree_core.federation.strategies.multikrum import MultiKrum


@dataclasses.dataclass(frozen=True)
class KrumParams:
    num_malicious_nodes: int = 0

    def __post_init__(self) -> None:
        if self.num_malicious_nodes < 0:
            raise ValueError("num_malicious_nodes must be >= 0")

    @property
    def num_nodes_to_select(self) -> int:
        return 1


@register("krum")
class Krum(MultiKrum):
    Params = KrumParams
