"""Central DP with fixed clipping (Flower's DifferentialPrivacyServerSideFixedClipping; McMahan
et al. 2018, arXiv:1710.06963): every client's update (its weights minus the current global
ones, over all its learned tensors at once) is scaled to L2 norm <= clipping_norm, the inner
strategy aggregates the clipped replies, and Gaussian noise of standard deviation
noise_multiplier * clipping_norm / num_sampled_clients is added to every learned tensor.

The noise is drawn from the run's seed (derive(seed, "dp", round)), so a resumed run and the
in-process reference add the same noise as the Flower run: the golden rule still holds.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from bpfree_core.federation.aggregate import Weights
from bpfree_core.federation.strategies import ClientTerms, State, Strategy, register_dp
from bpfree_core.seeds import generator


@dataclasses.dataclass(frozen=True)
class FixedClippingParams:
    noise_multiplier: float = 1.0
    clipping_norm: float = 10.0

    def __post_init__(self) -> None:
        if self.noise_multiplier < 0 or not self.clipping_norm > 0:
            raise ValueError("noise_multiplier must be >= 0 and clipping_norm > 0")


def clipped(update_of: Weights, current: Weights, norm: float) -> tuple[Weights, bool]:
    """`update_of` moved back toward `current` so that the update's L2 norm is <= norm; and
    whether it had to be (Flower's FlatClip: one norm over every tensor)."""
    delta = {k: update_of[k].to(torch.float64) - current[k].to(torch.float64) for k in current}
    total = math.sqrt(sum(float(d.pow(2).sum()) for d in delta.values()))
    scale = min(1.0, norm / total) if total > 0 else 1.0
    return ({k: (current[k].to(torch.float64) + scale * d).to(current[k].dtype)
             for k, d in delta.items()}, scale < 1.0)


def noised(weights: Weights, std: float, seed: int, rnd: int) -> Weights:
    if std == 0:
        return weights
    g = generator(seed, "dp", rnd)
    return {k: v + std * torch.randn(v.shape, generator=g, dtype=torch.float64).to(v.dtype)
            for k, v in weights.items()}


class DPWrapper(Strategy):
    """Clips each reply as it arrives for an inner strategy and noises its aggregate; it streams
    when the inner strategy does."""

    def __init__(self, params: object, inner: Strategy, seed: int, num_sampled_clients: int):
        super().__init__(params)
        self.inner, self.seed, self.num_sampled = inner, seed, num_sampled_clients
        self.streams = inner.streams   # type: ignore[misc]

    def clipping_norm_now(self) -> float:
        raise NotImplementedError

    def clipped_reply(self, current: Weights, weights: Weights) -> tuple[Weights, bool]:
        floats = {k: v for k, v in current.items() if v.is_floating_point()}
        moved, was_clipped = clipped(weights, floats, self.clipping_norm_now())
        return {**weights, **moved}, was_clipped

    def begin(self, rnd: int) -> None:
        self.inner.begin(rnd)

    def arrived(self, current: Weights, weights: Weights) -> Weights:
        return self.inner.arrived(current, self.clipped_reply(current, weights)[0])

    def noise_std(self, rnd: int) -> float:
        """The aggregate's noise (called once per round, after every reply arrived)."""
        raise NotImplementedError

    def from_mean(self, rnd: int, current: Weights, mean: Weights) -> Weights:
        std = self.noise_std(rnd)
        return noised(self.inner.from_mean(rnd, current, mean), std, self.seed, rnd)

    def combine(self, rnd: int, current: Weights, replies: list[tuple[int, Weights]]) -> Weights:
        std = self.noise_std(rnd)
        return noised(self.inner.combine(rnd, current, replies), std, self.seed, rnd)

    def client_terms(self, rnd: int) -> ClientTerms:
        return self.inner.client_terms(rnd)   # clipping is server-side; FedProx's term still travels

    def state_dict(self) -> State:
        return {f"inner.{k}": v for k, v in self.inner.state_dict().items()}

    def load_state_dict(self, state: State) -> None:
        self.inner.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("inner.")})


@register_dp("fixed")
class FixedClipping(DPWrapper):
    Params = FixedClippingParams

    def clipping_norm_now(self) -> float:
        return self.params.clipping_norm

    def noise_std(self, rnd: int) -> float:
        return self.params.noise_multiplier * self.params.clipping_norm / self.num_sampled
