"""Aggregation as replies arrive (bpfree_core.federation.round_fold): whatever order replies come in, every
strategy's aggregate is the one over the whole list, bit for bit (FedAvg's is the plain reference
`aggregate.fedavg`); a streaming strategy holds no reply once folded (the coordinator's memory
does not grow with K); the per-layer statistics from the running sums match the direct ones."""

from __future__ import annotations

import gc
import random
import weakref
from pathlib import Path

import pytest
import torch

from bpfree.server.coordinator import Coordinator, RoundReplies
from bpfree.server.reference import InProcessTransport
from bpfree_core.config import load_config
from bpfree_core.federation.aggregate import ClientUpdate, fedavg, layer_stats
from bpfree_core.federation.strategies import build_strategy, registered

CLIENTS = 7
STREAMING = {"fedavg", "fedprox", "fedavgm", "fedadam", "fedadagrad", "fedyogi"}


def _current() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"layers.0.body.weight": torch.randn(12, 9, generator=g),
            "layers.0.pattern": torch.randn(5, generator=g),          # no client changes it
            "layers.0.steps": torch.tensor(4),
            "layers.1.body.weight": torch.randn(9, 3, generator=g), "layers.1.steps": torch.tensor(2)}


def _updates(current: dict[str, torch.Tensor], seed: int = 1) -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(CLIENTS):
        w = {key: (v + 0.1 * torch.randn(v.shape, generator=g) if key.endswith("weight") else v + 3)
             if key != "layers.0.pattern" else v.clone() for key, v in current.items()}
        out.append(ClientUpdate(k, int(torch.randint(5, 90, (), generator=g)), w))
    return out


def _strategy(name: str, dp: str = ""):  # noqa: ANN202
    args = {"fixed": "clipping_norm=0.5,noise_multiplier=0.3",
            "adaptive": "initial_clipping_norm=0.5,noise_multiplier=0.3"}.get(dp, "")
    return build_strategy(name, "", dp, args, seed=5, num_sampled_clients=CLIENTS)


CASES = [(name, "") for name in sorted(registered())] + [("fedavg", "fixed"), ("fedadam", "adaptive"),
                                                         ("fedmedian", "fixed")]


@pytest.mark.parametrize(("name", "dp"), CASES, ids=[f"{n}{'-' + d if d else ''}" for n, d in CASES])
def test_any_arrival_order_gives_the_aggregate_of_the_whole_list(name: str, dp: str) -> None:
    current = _current()
    whole, folded = _strategy(name, dp), _strategy(name, dp)
    for rnd in range(3):   # state (momentum, moments, the adaptive norm) carries over rounds too
        updates = _updates(current, seed=rnd)
        expected = whole.aggregate(rnd, current, sorted(updates, key=lambda u: u.client))
        fold = folded.fold(rnd, current, range(CLIENTS))
        for update in random.Random(rnd).sample(updates, len(updates)):
            fold.add(update)
        got = fold.result()
        assert [k for k in expected if not torch.equal(expected[k], got[k])] == []
        assert torch.equal(got["layers.0.pattern"], current["layers.0.pattern"])
        assert int(got["layers.0.steps"]) == int(current["layers.0.steps"]) + 3 * CLIENTS
        current = got


def test_fedavg_folded_out_of_order_is_the_plain_reference_bit_for_bit() -> None:
    current = _current()
    updates = _updates(current)
    fold = build_strategy("fedavg").fold(0, current, range(CLIENTS))
    for update in reversed(updates):
        fold.add(update)
    got, reference = fold.result(), fedavg(current, updates)
    assert [k for k in reference if not torch.equal(reference[k], got[k])] == []


@pytest.mark.parametrize("name", sorted(registered()))
def test_a_streaming_strategy_holds_no_reply_once_folded(name: str) -> None:
    """Fed in partition order, a streaming strategy keeps no reply's tensors alive (weak
    references die at once); one that needs every reply keeps them all, as it says."""
    current = _current()
    strategy = build_strategy(name)
    assert strategy.streams == (name in STREAMING)
    fold = strategy.fold(0, current, range(CLIENTS))
    alive, updates = [], _updates(current)
    while updates:
        update = updates.pop(0)
        probe = weakref.ref(update.weights["layers.0.body.weight"])
        fold.add(update)
        del update
        gc.collect()
        alive.append(probe() is not None)
    assert fold.held == (0 if strategy.streams else CLIENTS)
    assert alive == [not strategy.streams] * CLIENTS
    fold.result()
    assert fold.held == 0


def test_an_early_reply_waits_for_its_predecessors_then_all_are_folded() -> None:
    current = _current()
    updates = _updates(current)
    fold = build_strategy("fedavg").fold(0, current, [u.client for u in updates])
    for update in updates[3:]:
        fold.add(update)
    assert fold.held == CLIENTS - 3   # 0, 1, 2 have not arrived: nothing can be added yet
    for update in updates[:3]:
        fold.add(update)
    assert fold.held == 0
    missing = build_strategy("fedavg").fold(0, current, range(CLIENTS + 2))   # two never reply
    for update in updates:
        missing.add(update)
    assert [k for k, v in fedavg(current, updates).items() if not torch.equal(v, missing.result()[k])] == []


def test_layer_statistics_from_running_sums_match_the_direct_ones() -> None:
    current = _current()
    updates = _updates(current)
    fold = build_strategy("fedavg").fold(0, current, range(CLIENTS))
    for update in updates:
        fold.add(update)
    new = fold.result()
    got, direct = fold.stats(new), layer_stats(current, new, updates)
    assert set(got) == set(direct) == {"0", "1"}
    for layer, values in direct.items():
        for key, value in values.items():
            assert got[layer][key] == pytest.approx(value, rel=1e-6)


class _ReversedReplies:
    """Trains every client in this process, then delivers the replies last client first."""

    def __init__(self, cfg):  # noqa: ANN001
        self.inner = InProcessTransport(cfg)

    def train_round(self, rnd, weights, clients, terms, receive):  # noqa: ANN001, ANN201
        updates = []
        self.inner.train_round(rnd, weights, clients, terms, updates.append)
        for update in reversed(updates):
            receive(update)
        return RoundReplies(sent=len(clients))


def test_a_coordinator_fed_replies_in_reverse_ends_with_the_references_weights(data_dir: Path) -> None:
    cfg = load_config(None, [f"train.data_dir={data_dir}", "train.train_limit=900", "train.test_limit=200",
                             "model.hidden=40,40", "train.threads=1", "federation.clients=3",
                             "federation.rounds=2", "federation.executor=inprocess",
                             "federation.strategy=fedadam"])
    ordered = Coordinator(cfg, evaluate=False).run(InProcessTransport(cfg))["weights"]
    backwards = Coordinator(cfg, evaluate=False).run(_ReversedReplies(cfg))["weights"]
    assert [k for k in ordered if not torch.equal(ordered[k], backwards[k])] == []


def test_a_flower_coordinator_keeps_the_held_out_images_only(data_dir: Path) -> None:
    """What the ServerApp does: copies of validation and test, the dataset memo forgotten (the
    training images' storage freed), and the same scores from the copies."""
    from bpfree_core.data import datasets as data

    cfg = load_config(None, [f"train.data_dir={data_dir}", "train.test_limit=300", "train.validation=200",
                             "model.hidden=20", "train.threads=1", "federation.clients=2"])
    coordinator = Coordinator(cfg)
    before = coordinator.evaluate(coordinator.weights), coordinator.evaluate(coordinator.weights,
                                                                              coordinator.val)
    source = weakref.ref(coordinator.test.images.untyped_storage())
    coordinator.release_training_data()
    gc.collect()
    assert data._CACHE == {} and source() is None
    assert (len(coordinator.val), len(coordinator.test)) == (200, 300)
    assert (coordinator.evaluate(coordinator.weights),
            coordinator.evaluate(coordinator.weights, coordinator.val)) == before
