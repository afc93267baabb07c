"""Server strategies, one module each, behind one registry by name (federation.strategy).

A strategy turns a round's accepted client updates into the next global weights. Each one is
the maths of the Flower 1.41 strategy of the same name (flwr/serverapp/strategy/), written over
torch tensors so that a run is deterministic and its state (server momentum, Adam moments)
checkpoints with the round; tests/test_strategies.py feeds the same replies to Flower's class
and to ours and compares the aggregates. Hyper-parameters are Flower's names and defaults,
given as `federation.strategy_args = "eta=0.01,beta_1=0.9"`. `federation.dp = fixed | adaptive`
wraps any of them in Flower's server-side DP clipping (`federation.dp_args`, Flower's names).

Every strategy shares two rules with FedAvg (bpfree_core.federation.aggregate): integer tensors are
counters (old value plus every client's increment) and a tensor no client changed is kept as
is; the strategy's own maths sees the other floating tensors.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Iterable
from typing import Any, ClassVar

import torch

from bpfree_core.errors import ConfigError
from bpfree_core.federation.aggregate import ClientUpdate, Weights
from bpfree_core.federation.round_fold import RoundFold

_REGISTRY: dict[str, type[Strategy]] = {}
_DP: dict[str, type[Strategy]] = {}   # federation.dp: wrappers around any strategy
State = dict[str, Any]   # tensors and plain numbers only: checkpoints load with weights_only
ClientTerms = dict[str, float]   # a client's local regularisers, by Flower's config keys


@dataclasses.dataclass(frozen=True)
class Params:
    """No hyper-parameters; a strategy with some declares its own dataclass (Flower's names)."""


class Strategy:
    """The next global weights from one round's updates; state survives rounds and resumes.

    A strategy whose maths needs only the example-weighted mean of the replies (FedAvg, FedProx,
    FedAvgM, FedOpt's family) sets `streams` and writes `from_mean`: the coordinator then folds
    replies into running sums as they arrive (bpfree_core.federation.round_fold) and holds none of them. One
    that needs every reply (median, trimmed mean, Krum) writes `combine` and keeps them."""

    name: ClassVar[str] = ""
    Params: ClassVar[type] = Params
    streams: ClassVar[bool] = False

    def __init__(self, params: Any):
        self.params = params

    def fold(self, rnd: int, global_weights: Weights, expected: Iterable[int] = ()) -> RoundFold:
        """Round `rnd`'s (0-based) aggregate, fed one reply at a time: `add(update)`, `result()`.
        `expected`: the partitions asked to reply (their order is the order replies are folded in)."""
        return RoundFold(self, rnd, global_weights, expected)

    def aggregate(self, rnd: int, global_weights: Weights, updates: list[ClientUpdate]) -> Weights:
        """Round `rnd`'s aggregate of `updates`, in any order (see `fold`)."""
        fold = self.fold(rnd, global_weights, [u.client for u in updates])
        for update in updates:
            fold.add(update)
        return fold.result()

    def begin(self, rnd: int) -> None:
        """A round's first reply is about to arrive (per-round counters start here)."""

    def arrived(self, current: Weights, weights: Weights) -> Weights:
        """A reply's weights as the strategy aggregates them (a DP wrapper clips them here)."""
        return weights

    def from_mean(self, rnd: int, current: Weights, mean: Weights) -> Weights:
        """A streaming strategy's new floating tensors from the current ones and the replies'
        example-weighted mean."""
        raise NotImplementedError

    def combine(self, rnd: int, current: Weights, replies: list[tuple[int, Weights]]) -> Weights:
        """The new floating tensors from the current ones and (num_examples, weights) replies in
        partition order (strategies that do not stream)."""
        raise NotImplementedError

    def client_terms(self, rnd: int) -> ClientTerms:
        """What each client adds to its local loss in round `rnd` (sent in the train message's
        config, as Flower's strategies put theirs in configure_train): FedProx's "proximal-mu"."""
        return {}

    def state_dict(self) -> State:
        return {}

    def load_state_dict(self, state: State) -> None:
        if state:
            raise ConfigError(f"federation.strategy = {self.name} keeps no state, but the checkpoint "
                              f"holds some ({', '.join(sorted(state)[:3])}); resume with the "
                              "strategy that wrote it")


def register(name: str):  # noqa: ANN201 - decorator
    def wrap(cls: type[Strategy]) -> type[Strategy]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"strategy {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def register_dp(name: str):  # noqa: ANN201 - decorator
    def wrap(cls: type[Strategy]) -> type[Strategy]:
        cls.name = f"dp-{name}"
        _DP[name] = cls
        return cls

    return wrap


def _load_all() -> None:
    for module in pkgutil.iter_modules(__path__):   # each module here registers its own
        importlib.import_module(f"{__name__}.{module.name}")


def registered() -> dict[str, type[Strategy]]:
    """Every strategy by name."""
    _load_all()
    return dict(_REGISTRY)


def registered_dp() -> dict[str, type[Strategy]]:
    """Every differential-privacy wrapper by name (federation.dp)."""
    _load_all()
    return dict(_DP)


def parse_params(name: str, args: str, field: str = "strategy") -> Any:
    """The strategy's (or DP wrapper's) Params from "key=value,key=value" (its Flower defaults
    for the rest)."""
    known = registered() if field == "strategy" else registered_dp()
    if name not in known:
        kind = "strategy" if field == "strategy" else "DP wrapper"
        raise ConfigError(f"federation.{field} = {name!r} is not a known {kind}; "
                          f"valid: {', '.join(sorted(known))}")
    cls = known[name].Params
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for part in (p.strip() for p in args.replace(";", ",").split(",")):
        if not part:
            continue
        key, sep, raw = part.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            valid = ", ".join(fields) or "none"
            raise ConfigError(f"federation.{field}_args: {part!r} is not a {name} hyper-parameter "
                              f"(key=value); {name} takes: {valid}")
        kind = type(fields[key].default)
        try:
            values[key] = kind(raw.strip())
        except ValueError:
            raise ConfigError(f"federation.{field}_args: {key} = {raw.strip()!r} is not "
                              f"{'an integer' if kind is int else 'a number'}") from None
    try:
        return cls(**values)
    except ValueError as exc:
        raise ConfigError(f"federation.{field}_args for {name}: {exc}") from None


def build_strategy(name: str, args: str = "", dp: str = "", dp_args: str = "", seed: int = 0,
                   num_sampled_clients: int = 1) -> Strategy:
    """The strategy `name`, wrapped in DP wrapper `dp` unless that is "" (noise drawn from `seed`)."""
    params = parse_params(name, args)
    inner = registered()[name](params)
    if not dp:
        return inner
    dp_params = parse_params(dp, dp_args, "dp")
    try:
        return registered_dp()[dp](dp_params, inner, seed, num_sampled_clients)
    except ValueError as exc:
        raise ConfigError(f"federation.dp_args for {dp}: {exc}") from None


def weighted_mean(replies: list[tuple[int, Weights]], current: Weights) -> Weights:
    """FedAvg of every tensor of `current` over `replies`, as RoundFold computes it: sum_k n_k w_k
    accumulated in float64 in the replies' order, divided by N once (a mean of identical float32
    copies is that copy: each n_k w_k and their sum are exact)."""
    total = sum(n for n, _ in replies)
    out: Weights = {}
    for key, like in current.items():
        acc = torch.zeros(like.shape, dtype=torch.float64)
        for n, w in replies:
            acc.add_(w[key].to(torch.float64), alpha=n)
        out[key] = (acc / total).to(like.dtype)
    return out


__all__ = ["ClientTerms", "Params", "State", "Strategy", "build_strategy", "parse_params", "register",
           "register_dp", "registered", "registered_dp", "weighted_mean"]
