"""FedOpt (Reddi et al. 2020, arXiv:2003.00295): the shared part of FedAdagrad, FedAdam, FedYogi.

Flower's FedOpt: delta = mean - current; m = beta_1 * m + (1 - beta_1) * delta (m starts at 0);
each subclass updates v and steps current + eta * m / (sqrt(v) + tau). Not a strategy itself.
"""

from __future__ import annotations

import dataclasses

import torch

from bpfree_core.federation.aggregate import Weights
from bpfree_core.federation.strategies import State, Strategy


@dataclasses.dataclass(frozen=True)
class FedOptParams:
    eta: float = 1e-1     # server learning rate
    eta_l: float = 1e-1   # client learning rate in Flower's signature; bpfree's is optim.lr (unused)
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        check_fedopt(self)


def check_fedopt(p: object) -> None:
    betas = [getattr(p, b) for b in ("beta_1", "beta_2") if hasattr(p, b)]
    if not (p.eta > 0 and p.tau > 0 and all(0 <= b < 1 for b in betas)):   # type: ignore[attr-defined]
        raise ValueError("need eta > 0, tau > 0 and beta_1, beta_2 in [0, 1)")


class FedOpt(Strategy):
    Params = FedOptParams
    streams = True

    def __init__(self, params: FedOptParams):
        super().__init__(params)
        self.m: Weights = {}
        self.v: Weights = {}

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def step_size(self, rnd: int) -> float:
        return self.params.eta

    def from_mean(self, rnd: int, current: Weights, mean: Weights) -> Weights:
        p = self.params
        eta = self.step_size(rnd)
        beta_1 = getattr(p, "beta_1", 0.0)   # FedAdagrad has none: its m is delta
        out: Weights = {}
        for key, x in current.items():
            delta = mean[key] - x
            m = self.m.get(key, torch.zeros_like(x))
            self.m[key] = beta_1 * m + (1 - beta_1) * delta
            self.v[key] = self.second_moment(self.v.get(key, torch.zeros_like(x)), delta)
            out[key] = x + eta * self.m[key] / (self.v[key].sqrt() + p.tau)
        return out

    def state_dict(self) -> State:
        return {**{f"m.{k}": v for k, v in self.m.items()}, **{f"v.{k}": v for k, v in self.v.items()}}

    def load_state_dict(self, state: State) -> None:
        self.m = {k[2:]: v for k, v in state.items() if k.startswith("m.")}
        self.v = {k[2:]: v for k, v in state.items() if k.startswith("v.")}
