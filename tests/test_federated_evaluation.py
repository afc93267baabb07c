"""Federated evaluation: sampled clients score each round's global model on their own test data,
and the coordinator records each one and the example-weighted mean."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bpfree.server.coordinator import Coordinator
from bpfree.server.reference import InProcessTransport
from bpfree_core.config import load_config
from bpfree_core.errors import ConfigError
from bpfree_core.federation.client_evaluation import sampled_evaluators

SMALL = ["train.train_limit=2000", "train.test_limit=600", "model.hidden=100,100",
         "model.algorithm=symba", "train.threads=1", "federation.clients=4", "federation.rounds=2",
         "federation.executor=inprocess", "train.batch_size=100", "train.jitter=0"]


def _cfg(data_dir: Path | None, *extra: str):
    return load_config(None, [*([f"train.data_dir={data_dir}"] if data_dir else []), *SMALL, *extra])


def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_every_client_scores_its_test_share_and_the_weighted_mean_is_the_global_accuracy(
        data_dir: Path, tmp_path: Path) -> None:
    """The clients' test shares cover the test set once, so their example-weighted accuracy
    after the last round (scored on the whole test set) is the coordinator's own."""
    cfg = _cfg(data_dir, "federation.fraction_evaluate=1", "federation.partition=dirichlet:0.5")
    summary = Coordinator(cfg, tmp_path / "run").run(InProcessTransport(cfg))
    last = _records(tmp_path / "run")[-1]
    fed = last["federated_evaluation"]
    assert sorted(fed["clients"]) == ["0", "1", "2", "3"]
    assert sum(c["num_examples"] for c in fed["clients"].values()) == 600
    assert fed["accuracy"] == pytest.approx(last["test_accuracy_headline"], abs=1e-9)
    assert summary["federated_accuracy"] == fed["accuracy"]
    assert len({round(c["softmax"], 6) for c in fed["clients"].values()}) > 1   # non-IID: they differ


def test_evaluators_are_sampled_by_the_seed_rule_and_off_by_default(data_dir: Path, tmp_path: Path) -> None:
    cfg = _cfg(data_dir, "federation.fraction_evaluate=0.5", "federation.min_evaluate_clients=1")
    Coordinator(cfg, tmp_path / "run").run(InProcessTransport(cfg))
    for rnd, rec in enumerate(_records(tmp_path / "run")):
        assert sorted(int(k) for k in rec["federated_evaluation"]["clients"]) == sampled_evaluators(cfg, rnd)
        assert len(rec["federated_evaluation"]["clients"]) == 2
    assert sampled_evaluators(_cfg(None), 0) == []
    Coordinator(_cfg(data_dir), tmp_path / "off").run(InProcessTransport(_cfg(data_dir)))
    assert all("federated_evaluation" not in r for r in _records(tmp_path / "off"))


def test_a_bad_fraction_evaluate_is_one_sentence() -> None:
    with pytest.raises(ConfigError, match=r"fraction_evaluate = 1.5 must be in \[0, 1\]"):
        _cfg(None, "federation.fraction_evaluate=1.5")


def test_a_flower_simulation_evaluates_on_the_clients_as_the_reference_does(data_dir: Path,
                                                                             tmp_path: Path) -> None:
    """Sampled training and sampled evaluation under Flower (@app.evaluate on every ClientApp):
    the same clients report the same accuracies as the in-process reference's."""
    from bpfree.server.simulate import simulate

    cfg = _cfg(data_dir, "federation.fraction_evaluate=0.5", "federation.fraction_train=0.5",
               "federation.partition=dirichlet:0.5")
    simulate(cfg, tmp_path / "flower")
    Coordinator(cfg, tmp_path / "reference").run(InProcessTransport(cfg))
    flower, reference = _records(tmp_path / "flower"), _records(tmp_path / "reference")
    assert [r["federated_evaluation"] for r in flower] == [r["federated_evaluation"] for r in reference]
