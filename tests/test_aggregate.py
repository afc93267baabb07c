"""Layer-wise FedAvg: the example-weighted mean, order-free, counters added, bad updates refused."""

from __future__ import annotations

import random

import pytest
import torch

from bpfree_core.config import load_config
from bpfree_core.errors import AggregationError, ProtocolError
from bpfree_core.federation.aggregate import ClientUpdate, fedavg, layer_of, layer_stats, validate_update
from bpfree_core.federation.client import stack_template


def _template() -> dict[str, torch.Tensor]:
    cfg = load_config(None, ["model.algorithm=symba", "model.hidden=16,8"])
    return stack_template(cfg)


def _client(template, client: int, n: int) -> ClientUpdate:
    gen = torch.Generator().manual_seed(client)
    weights = {}
    for key, t in template.items():
        if key.endswith("patterns"):
            weights[key] = t.clone()                          # a constant buffer
        elif t.is_floating_point():
            weights[key] = t + torch.randn(t.shape, generator=gen)
        else:
            weights[key] = t + 5 + client                     # a step counter
    return ClientUpdate(client=client, num_examples=n, weights=weights)


def test_fedavg_is_the_example_weighted_mean_of_every_layer():
    template = _template()
    updates = [_client(template, k, n) for k, n in enumerate([100, 300, 600])]
    out = fedavg(template, updates)
    assert out.keys() == template.keys()
    for key, old in template.items():
        if old.is_floating_point():
            want = sum(u.num_examples * u.weights[key].double() for u in updates) / 1000
            assert torch.allclose(out[key].double(), want, rtol=0, atol=1e-6), key
            assert out[key].dtype == old.dtype
        else:  # counters: the old value plus every client's increment
            assert torch.equal(out[key], old + sum(5 + k for k in range(3))), key
    patterns = [k for k in template if k.endswith("patterns")]
    assert patterns and all(torch.equal(out[k], template[k]) for k in patterns)


def test_fedavg_does_not_depend_on_reply_order():
    template = _template()
    updates = [_client(template, k, n) for k, n in enumerate([70, 130, 200, 400])]
    shuffled = updates[:]
    random.Random(1).shuffle(shuffled)
    a, b = fedavg(template, updates), fedavg(template, shuffled)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fedavg_of_one_client_is_that_client():
    template = _template()
    only = _client(template, 0, 50)
    out = fedavg(template, [only])
    for key, old in template.items():
        if old.is_floating_point():
            assert torch.equal(out[key], only.weights[key]), key


def test_fedavg_of_nothing_is_an_error():
    with pytest.raises(AggregationError):
        fedavg(_template(), [])


@pytest.mark.parametrize("corrupt, message", [
    (lambda w: w.pop(next(iter(w))), "missing"),
    (lambda w: w.__setitem__("layers.9.linear.weight", torch.zeros(2)), "unexpected"),
    (lambda w: w.__setitem__("layers.1.linear.weight", torch.zeros(3, 3)), "expected"),
    (lambda w: w.__setitem__("layers.0.linear.bias", w["layers.0.linear.bias"].double()), "float64"),
    (lambda w: w["layers.1.linear.bias"].fill_(float("nan")), "non-finite"),
])
def test_malformed_updates_are_refused_with_the_reason(corrupt, message):
    template = _template()
    update = _client(template, 2, 10)
    corrupt(update.weights)
    with pytest.raises(ProtocolError, match=message):
        validate_update(update, template)


def test_update_without_examples_is_refused():
    template = _template()
    good = _client(template, 0, 10)
    validate_update(good, template)
    with pytest.raises(ProtocolError, match="num_examples"):
        validate_update(ClientUpdate(0, 0, good.weights), template)


def test_layer_stats_and_keys():
    template = _template()
    updates = [_client(template, k, 10) for k in range(2)]
    stats = layer_stats(template, fedavg(template, updates), updates)
    assert set(stats) == {"0", "1"}
    assert all(s["update_norm"] > 0 and s["client_spread"] > 0 for s in stats.values())
    assert layer_of("layers.12.head.weight") == 12
    with pytest.raises(ProtocolError):
        layer_of("head.weight")
