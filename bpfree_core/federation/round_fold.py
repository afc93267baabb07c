"""One round's replies folded into running sums as they arrive: the coordinator's memory stays one
model's worth of float64 sums however many clients reply (strategies that need every reply, such
as the median, keep them and say so: `Strategy.streams`).

Float addition is not associative, so replies are folded in partition order whatever order they
arrive in: a reply that arrives before its predecessors waits until they have been folded (or
until the round ends), and every launcher, fed the same replies, ends with the same bits.

What the fold keeps, per floating tensor: sum_k n_k * w_k in float64 (n_k * w_k is exact for
float32 weights and counts below 2^29, so a mean of identical copies is that copy) and whether
any reply changed it; per integer tensor (counters): the sum of every client's increment; per
layer: sum_k n_k ||w_k - g||^2 against the round's global weights g, from which the clients'
spread around the new weights follows without holding them (`stats`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from bpfree_core.errors import AggregationError
from bpfree_core.federation.aggregate import ClientUpdate, Weights, layer_of

if TYPE_CHECKING:
    from bpfree_core.federation.strategies import Strategy


class RoundFold:
    """Round `rnd`'s aggregate under `strategy`, built one reply at a time (`add`, then `result`)."""

    def __init__(self, strategy: Strategy, rnd: int, current: Weights, expected: Iterable[int] = ()):
        """`expected`: the partitions that were asked to reply (their order is the folding order;
        a reply from any other partition is folded after them, in partition order)."""
        self.strategy, self.rnd, self.current = strategy, rnd, current
        self.order = sorted(expected)
        self.position = 0
        self.pending: dict[int, ClientUpdate] = {}      # arrived early: waits for its turn
        self.floats = [k for k, v in current.items() if v.is_floating_point()]
        self.layer = {k: layer_of(k) for k in self.floats}   # parsed once, not per reply
        self.sums = {k: torch.zeros(current[k].shape, dtype=torch.float64) for k in self.floats}
        self.changed: set[str] = set()
        self.increments = {k: torch.zeros_like(v) for k, v in current.items()
                           if not v.is_floating_point()}
        self.squares: dict[int, float] = {}             # layer -> sum_k n_k ||w_k - g||^2
        self.kept: list[tuple[int, Weights]] = []       # strategies that need every reply
        self.total = 0                                  # sum_k n_k
        self.count = 0
        strategy.begin(rnd)

    @property
    def held(self) -> int:
        """Replies whose weights this fold still holds (0 for a streaming strategy fed in order)."""
        return len(self.pending) + len(self.kept)

    def add(self, update: ClientUpdate) -> None:
        """Fold `update` (validated beforehand), now or once its predecessors have been."""
        self.pending[update.client] = update
        while self.position < len(self.order) and self.order[self.position] in self.pending:
            self._fold(self.pending.pop(self.order[self.position]))
            self.position += 1

    def _fold(self, update: ClientUpdate) -> None:
        weights = self.strategy.arrived(self.current, update.weights)   # e.g. DP clipping
        n = update.num_examples
        for key in self.floats:
            got, old = weights[key], self.current[key]
            if key not in self.changed and not torch.equal(got, old):
                self.changed.add(key)
            self.sums[key].add_(got.to(torch.float64), alpha=n)
            layer = self.layer[key]
            self.squares[layer] = self.squares.get(layer, 0.0) + n * _squared(got - old)
        for key, acc in self.increments.items():
            acc += weights[key] - self.current[key]
        if not self.strategy.streams:
            self.kept.append((n, {k: weights[k] for k in self.floats}))
        self.total += n
        self.count += 1

    def result(self) -> Weights:
        """The next global weights: counters by their increments, tensors no reply changed as
        they were, the rest by the strategy (from the weighted mean, or from every reply)."""
        for client in sorted(self.pending):   # waited for partitions that never replied
            self._fold(self.pending.pop(client))
        if not self.count:
            raise AggregationError("no client updates to aggregate")
        out = {k: self.current[k] + acc for k, acc in self.increments.items()}
        keys = [k for k in self.floats if k in self.changed]
        out.update({k: self.current[k].clone() for k in self.floats if k not in self.changed})
        if keys:
            current = {k: self.current[k] for k in keys}
            if self.strategy.streams:
                mean = {k: (self.sums[k] / self.total).to(self.current[k].dtype) for k in keys}
                out.update(self.strategy.from_mean(self.rnd, current, mean))
            else:
                out.update(self.strategy.combine(
                    self.rnd, current, [(n, {k: w[k] for k in keys}) for n, w in self.kept]))
        self.kept.clear()
        return {k: out[k] for k in self.current}

    def stats(self, new: Weights) -> dict[str, dict[str, float]]:
        """Per layer: the norm of the global update, and the clients' example-weighted RMS
        distance from the new weights, from the running sums (float64):
        sum_k n_k ||w_k - new||^2 = sum_k n_k ||d_k||^2 - 2 u.(S - N g) + N ||u||^2,
        d_k = w_k - g, u = new - g, S = sum_k n_k w_k."""
        update: dict[int, float] = {}
        cross: dict[int, float] = {}
        for key in self.floats:
            layer = self.layer[key]
            g = self.current[key].to(torch.float64)
            u = new[key].to(torch.float64) - g
            update[layer] = update.get(layer, 0.0) + float(u.pow(2).sum())
            cross[layer] = cross.get(layer, 0.0) + float((u * (self.sums[key] - self.total * g)).sum())
        return {str(i): {"update_norm": math.sqrt(update[i]),
                         "client_spread": math.sqrt(max(0.0, (
                             self.squares[i] - 2 * cross[i] + self.total * update[i]) / self.total))}
                for i in sorted(update)}


def _squared(delta: torch.Tensor) -> float:
    return float(delta.pow_(2).sum(dtype=torch.float64))
