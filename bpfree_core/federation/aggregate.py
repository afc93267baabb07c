"""Client updates: their checks (validate_update), and FedAvg and the per-layer round statistics
in their plainest form over a list of updates (`fedavg`, `layer_stats`): the references that the
running fold (bpfree_core.federation.round_fold, which never holds the list) is tested against.

FedAvg (McMahan et al. 2017, arXiv:1602.05629), applied layer by layer: every round, every
tensor of every layer (`layers.<i>.<name>`: weights, biases, readout heads, running-statistic
buffers) is replaced by the example-weighted mean of the clients' copies. Layers are averaged
independently, so a later backend can aggregate a layer as soon as its owners reply.

Rules, all deterministic (the same inputs give bit-identical outputs in any process):
- Updates are taken in client (partition id) order, whatever order the replies arrived in.
- Floating tensors: (sum_k n_k * w_k) / N, accumulated in float64 in client order, divided
  once, cast back to the dtype (each n_k * w_k is exact, so identical copies average to the copy).
- A tensor that every client sent back bit-identical (fixed buffers, e.g. class patterns) is
  kept as is, so rounding never perturbs a constant.
- Integer tensors are counters (e.g. `steps`): the new value is the old global one plus every
  client's increment.

Rounds aggregate through a strategy (bpfree_core/federation/strategies: fedavg and the rest, one module
each, the same maths as Flower's classes), folding each reply as it arrives; every coordinator
(Flower, Ray, the in-process reference) validates replies here first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from bpfree_core.errors import AggregationError, ProtocolError
from bpfree_core.run.checkpoint import all_finite

Weights = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ClientUpdate:
    """What one client sends back after its local round."""

    client: int                    # partition id
    num_examples: int              # training examples it used this round (its FedAvg weight)
    weights: Weights               # keys "layers.<i>.<name>", as Stage.state_dict()
    metrics: dict[str, float] = field(default_factory=dict)
    # what the client keeps for its next round and never sends (EWC / SI state, keyed as
    # Stage.optimizer_tensors): the caller stores it with the client
    state: Weights = field(default_factory=dict)


def layer_of(key: str) -> int:
    """`layers.3.linear.weight` -> 3."""
    parts = key.split(".")
    if len(parts) < 3 or parts[0] != "layers" or not parts[1].isdigit():
        raise ProtocolError(f"weight key {key!r} is not of the form layers.<index>.<name>")
    return int(parts[1])


def validate_update(update: ClientUpdate, template: Weights) -> None:
    """Raise ProtocolError unless `update` has exactly the template's tensors, shapes and dtypes."""
    who = f"client {update.client}"
    if not isinstance(update.num_examples, int) or update.num_examples <= 0:
        raise ProtocolError(f"{who} reported num_examples = {update.num_examples!r}; need an int > 0")
    missing = sorted(set(template) - set(update.weights))
    extra = sorted(set(update.weights) - set(template))
    if missing or extra:
        raise ProtocolError(f"{who} sent the wrong layer tensors: missing {missing[:5]}"
                            f"{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]}")
    for key, ref in template.items():
        got = update.weights[key]
        if tuple(got.shape) != tuple(ref.shape) or got.dtype != ref.dtype:
            raise ProtocolError(f"{who} sent {key} as {got.dtype} {tuple(got.shape)}; expected "
                                f"{ref.dtype} {tuple(ref.shape)}")
        if not all_finite(got):
            raise ProtocolError(f"{who} sent non-finite values in {key}")


def fedavg(global_weights: Weights, updates: Sequence[ClientUpdate]) -> Weights:
    """The example-weighted mean of every tensor across `updates` (validated beforehand)."""
    if not updates:
        raise AggregationError("no client updates to aggregate")
    ordered = sorted(updates, key=lambda u: u.client)
    total = sum(u.num_examples for u in ordered)
    out: Weights = {}
    for key, old in global_weights.items():
        copies = [u.weights[key] for u in ordered]
        if all(torch.equal(copies[0], c) for c in copies[1:]) and (
                old.is_floating_point() or torch.equal(copies[0], old)):
            out[key] = copies[0].clone()
        elif old.is_floating_point():
            acc = torch.zeros(old.shape, dtype=torch.float64)
            for u, c in zip(ordered, copies, strict=True):
                acc += u.num_examples * c.to(torch.float64)
            out[key] = (acc / total).to(old.dtype)
        else:  # integer counters: add up every client's increment
            out[key] = old + sum((c - old for c in copies), torch.zeros_like(old))
    return out


def layer_stats(global_weights: Weights, new_weights: Weights,
                updates: Sequence[ClientUpdate]) -> dict[str, dict[str, float]]:
    """Per layer: norm of the global update, and the mean distance of clients from the average
    (differences in the tensors' own dtype, squares summed in float64: one scratch tensor per
    key, not three float64 copies per client)."""
    total = sum(u.num_examples for u in updates)
    sq_update: dict[int, float] = {}
    sq_spread: dict[int, float] = {}
    for key, new in new_weights.items():
        if not new.is_floating_point():
            continue
        i = layer_of(key)
        scratch = torch.empty_like(new)
        sq_update[i] = sq_update.get(i, 0.0) + _squared_distance(new, global_weights[key], scratch)
        for u in updates:
            d = _squared_distance(u.weights[key], new, scratch)
            sq_spread[i] = sq_spread.get(i, 0.0) + d * u.num_examples / total
    return {str(i): {"update_norm": math.sqrt(sq_update[i]), "client_spread": math.sqrt(sq_spread[i])}
            for i in sorted(sq_update)}


def _squared_distance(a: torch.Tensor, b: torch.Tensor, scratch: torch.Tensor) -> float:
    torch.sub(a, b, out=scratch)
    return float(scratch.pow_(2).sum(dtype=torch.float64))
