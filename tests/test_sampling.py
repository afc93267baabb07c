"""Client sampling (federation.fraction_train): who trains is drawn by the seed rule, recorded,
and the Flower run that samples ends on the weights of the in-process reference that samples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bpfree.server.coordinator import Coordinator
from bpfree.server.reference import InProcessTransport, federated_reference
from bpfree.server.simulate import simulate
from bpfree_core.config import load_config, train_sample_size
from bpfree_core.data.partition import partition_indices
from bpfree_core.errors import ConfigError
from bpfree_core.federation.client import sampled_clients

SMALL = ["train.train_limit=2000", "train.test_limit=500", "model.hidden=100,100",
         "model.algorithm=symba", "train.threads=1", "federation.clients=5", "federation.rounds=3",
         "federation.executor=inprocess", "train.batch_size=100", "train.jitter=0"]


def _cfg(data_dir: Path | None, *extra: str):
    base = [f"train.data_dir={data_dir}"] if data_dir else []
    return load_config(None, [*base, *SMALL, *extra])


@pytest.mark.parametrize(("k", "fraction", "minimum", "size"),
                         [(10, 0.1, 2, 2), (10, 0.5, 2, 5), (1000, 0.1, 2, 100), (3, 0.1, 2, 2),
                          (1, 0.5, 2, 1), (7, 1.0, 2, 7), (10, 0.25, 1, 2)])
def test_the_sample_size_is_flowers(k: int, fraction: float, minimum: int, size: int) -> None:
    # Flower's FedAvg: max(int(num_nodes * fraction_train), min_train_nodes); capped at K here
    assert train_sample_size(k, fraction, minimum) == size


def test_the_draw_is_seeded_per_round_and_the_same_in_every_process() -> None:
    cfg = _cfg(None, "federation.clients=100", "federation.fraction_train=0.1")
    rounds = [sampled_clients(cfg, r) for r in range(5)]
    assert all(len(r) == 10 and r == sorted(set(r)) and 0 <= r[0] and r[-1] < 100 for r in rounds)
    assert len({tuple(r) for r in rounds}) == 5, "every round draws afresh"
    assert rounds == [sampled_clients(cfg, r) for r in range(5)]
    other = _cfg(None, "federation.clients=100", "federation.fraction_train=0.1", "train.seed=1")
    assert sampled_clients(other, 0) != rounds[0]
    assert sampled_clients(_cfg(None), 2) == [0, 1, 2, 3, 4]   # fraction 1: everyone, no draw


def test_bad_sampling_settings_are_one_sentence() -> None:
    with pytest.raises(ConfigError, match=r"fraction_train = 0.0 must be in \(0, 1\]"):
        _cfg(None, "federation.fraction_train=0")
    with pytest.raises(ConfigError, match="min_clients = 3 exceeds the 2 clients sampled"):
        _cfg(None, "federation.fraction_train=0.2", "federation.min_clients=3")


def test_only_sampled_clients_train_and_the_record_says_which(data_dir: Path, tmp_path: Path) -> None:
    cfg = _cfg(data_dir, "federation.fraction_train=0.4")
    summary = Coordinator(cfg, tmp_path / "run").run(InProcessTransport(cfg))
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for rnd, line in enumerate(lines):
        assert line["sampled"] == sampled_clients(cfg, rnd)
        assert sorted(int(k) for k in line["client_metrics"]) == line["sampled"]
        assert line["clients"]["sent"] == line["clients"]["accepted"] == 2
    full = federated_reference(_cfg(data_dir))
    assert any(not torch.equal(full[k], summary["weights"][k]) for k in full), \
        "sampling 2 of 5 clients trained the same weights as all 5"


def test_a_sampled_flower_simulation_equals_the_sampled_reference(data_dir: Path, tmp_path: Path) -> None:
    cfg = _cfg(data_dir, "federation.fraction_train=0.4", "federation.rounds=2")
    summary = simulate(cfg, tmp_path / "run")
    reference = federated_reference(cfg)
    assert [k for k in reference if not torch.equal(summary["weights"][k], reference[k])] == []
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["sampled"] for x in lines] == [sampled_clients(cfg, r) for r in range(2)]
    assert [sorted(int(k) for k in x["client_metrics"]) for x in lines] == [x["sampled"] for x in lines]


def test_a_thousand_clients_split_once_and_small_ones_train_on_what_they_hold(
        data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """K = 1000 on a Dirichlet split: most clients hold fewer samples than a batch; they train
    on batches of their own size, the split is drawn once, and 10 clients train per round."""
    from bpfree_core.federation import client as federated

    drawn = []
    monkeypatch.setattr(federated, "partition_indices",
                        lambda *a, **k: drawn.append(1) or partition_indices(*a, **k))
    cfg = _cfg(data_dir, "federation.clients=1000", "federation.fraction_train=0.01",
               "federation.partition=dirichlet:0.5", "federation.min_partition_size=2",
               "train.train_limit=20000", "federation.rounds=6")
    summary = Coordinator(cfg, tmp_path / "run").run(InProcessTransport(cfg))
    assert len(drawn) == 1, f"the split was drawn {len(drawn)} times"
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    sizes = [m["num_examples"] for x in lines for m in x["client_metrics"].values()]
    assert len(sizes) == 60 and min(sizes) < cfg.train.batch_size, sizes
    assert summary["test_accuracy"] > 0.3
