"""Central DP with adaptive clipping (Flower's DifferentialPrivacyServerSideAdaptiveClipping;
Andrew et al. 2019, arXiv:1905.03871): as fixed clipping, but the clipping norm follows the
target quantile of the update norms. Each round it is multiplied by
exp(-clip_norm_lr * (clipped fraction - target_clipped_quantile)), the clipped count noised
with clipped_count_stddev (default num_sampled_clients / 20 when noise_multiplier > 0), and
the aggregate is noised with Flower's effective noise multiplier at the updated norm. The norm
is state: it checkpoints with the round. Noise comes from the run's seed, as in fixed clipping.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from bpfree_core.federation.aggregate import Weights
from bpfree_core.federation.strategies import State, Strategy, register_dp
from bpfree_core.federation.strategies.dp_fixed_clipping import DPWrapper
from bpfree_core.seeds import generator


@dataclasses.dataclass(frozen=True)
class AdaptiveClippingParams:
    noise_multiplier: float = 1.0
    initial_clipping_norm: float = 0.1
    target_clipped_quantile: float = 0.5
    clip_norm_lr: float = 0.2
    clipped_count_stddev: float = -1.0   # -1: Flower's default (num_sampled_clients / 20)

    def __post_init__(self) -> None:
        if self.noise_multiplier < 0 or not self.initial_clipping_norm > 0 or self.clip_norm_lr < 0:
            raise ValueError("need noise_multiplier >= 0, initial_clipping_norm > 0, clip_norm_lr >= 0")
        if not 0 <= self.target_clipped_quantile <= 1:
            raise ValueError("target_clipped_quantile must be in [0, 1]")


def adaptive_noise(noise_multiplier: float, sampled: int, count_std: float) -> tuple[float, float]:
    """(clipped-count stddev, effective noise multiplier): Flower's compute_adaptive_noise_params."""
    if noise_multiplier <= 0:
        return (max(count_std, 0.0), 0.0)
    count_std = sampled / 20 if count_std < 0 else count_std
    if noise_multiplier >= 2 * count_std:
        raise ValueError(f"noise_multiplier = {noise_multiplier} needs clipped_count_stddev > "
                         f"{noise_multiplier / 2} (the default is num_sampled_clients / 20 = {sampled / 20})")
    return count_std, (noise_multiplier**-2 - (2 * count_std) ** -2) ** -0.5


@register_dp("adaptive")
class AdaptiveClipping(DPWrapper):
    Params = AdaptiveClippingParams

    def __init__(self, params: AdaptiveClippingParams, inner: Strategy, seed: int, num_sampled_clients: int):
        super().__init__(params, inner, seed, num_sampled_clients)
        self.clipping_norm = params.initial_clipping_norm
        self.replies, self.clipped_count = 0, 0   # this round's, as they arrive
        self.count_std, self.noise_multiplier = adaptive_noise(
            params.noise_multiplier, num_sampled_clients, params.clipped_count_stddev)

    def clipping_norm_now(self) -> float:
        return self.clipping_norm

    def begin(self, rnd: int) -> None:
        super().begin(rnd)
        self.replies, self.clipped_count = 0, 0

    def arrived(self, current: Weights, weights: Weights) -> Weights:
        moved, was_clipped = self.clipped_reply(current, weights)
        self.replies += 1
        self.clipped_count += was_clipped
        return self.inner.arrived(current, moved)

    def noise_std(self, rnd: int) -> float:
        """Moves the clipping norm by this round's clipped fraction first (Flower's order)."""
        p = self.params
        count = float(self.clipped_count)
        if self.count_std > 0:
            count += self.count_std * float(torch.randn((), generator=generator(self.seed, "dp", rnd, 1),
                                                        dtype=torch.float64))
        fraction = count / self.replies
        self.clipping_norm *= math.exp(-p.clip_norm_lr * (fraction - p.target_clipped_quantile))
        return self.noise_multiplier * self.clipping_norm / self.num_sampled

    def state_dict(self) -> State:
        return {**super().state_dict(), "clipping_norm": self.clipping_norm}

    def load_state_dict(self, state: State) -> None:
        super().load_state_dict(state)
        self.clipping_norm = float(state.get("clipping_norm", self.params.initial_clipping_norm))
