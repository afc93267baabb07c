"""Server strategies: the same client replies, fed to Flower 1.41's strategy class and to bpfree's,
give the same aggregate over several rounds (state included); state checkpoints and resumes
bit-identically; and bad names or hyper-parameters are one sentence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import strategy as flwr_strategy

from bpfree.server.coordinator import Coordinator
from bpfree.server.reference import InProcessTransport
from bpfree_core.config import load_config
from bpfree_core.errors import ConfigError
from bpfree_core.federation.aggregate import ClientUpdate, fedavg
from bpfree_core.federation.strategies import build_strategy, registered

# bpfree name, Flower class, hyper-parameters (Flower's names, given to both)
CASES = [
    ("fedavg", "FedAvg", {}),
    ("fedprox", "FedProx", {"proximal_mu": 0.3}),
    ("fedavgm", "FedAvgM", {"server_learning_rate": 0.7, "server_momentum": 0.9}),
    ("fedadam", "FedAdam", {"eta": 0.05, "beta_1": 0.8, "beta_2": 0.95, "tau": 1e-3}),
    ("fedyogi", "FedYogi", {}),
    ("fedadagrad", "FedAdagrad", {"eta": 0.2}),
    ("fedmedian", "FedMedian", {}),
    ("fedtrimmedavg", "FedTrimmedAvg", {"beta": 0.2}),
    ("krum", "Krum", {"num_malicious_nodes": 1}),
    ("multikrum", "MultiKrum", {"num_malicious_nodes": 1, "num_nodes_to_select": 3}),
]
ROUNDS, CLIENTS = 3, 6
COUNTER = "layers.0.steps"   # an integer buffer: bpfree's counter rule, not Flower's maths


class _Nodes:
    """The one thing Flower's configure_train asks of a Grid here: which nodes are connected."""

    def get_node_ids(self) -> list[int]:
        return list(range(1, CLIENTS + 1))


def _replies(rnd: int, current: dict[str, torch.Tensor]) -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(100 + rnd)
    out = []
    for k in range(CLIENTS):
        spread = 0.05 if k else 1.0   # client 0 is an outlier: the robust rules must notice
        weights = {key: v + spread * torch.randn(v.shape, generator=g) for key, v in current.items()
                   if v.is_floating_point()}
        weights[COUNTER] = current[COUNTER] + 10
        out.append(ClientUpdate(client=k, num_examples=int(torch.randint(20, 200, (), generator=g)),
                                weights=weights))
    return out


def _message(update: ClientUpdate) -> Message:
    arrays = ArrayRecord({k: v.clone() for k, v in update.weights.items() if v.is_floating_point()})
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": update.num_examples})})
    return Message(content, dst_node_id=update.client + 1, message_type=MessageType.TRAIN)


@pytest.fixture
def flower_task(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower builds Messages only inside a run (a ServerApp sets these): give it one."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def _same_rounds(ours, theirs, also=lambda: None) -> None:  # noqa: ANN001
    """ROUNDS rounds of the same replies to both strategies: the same aggregates (and `also`)."""
    g = torch.Generator().manual_seed(0)
    current = {"layers.0.body.weight": torch.randn(8, 5, generator=g),
               "layers.0.body.bias": torch.randn(5, generator=g), COUNTER: torch.tensor(7)}
    for rnd in range(ROUNDS):
        floats = {k: v for k, v in current.items() if v.is_floating_point()}
        sent = list(theirs.configure_train(rnd + 1, ArrayRecord({k: v.clone() for k, v in floats.items()}),
                                           ConfigRecord(), _Nodes()))
        for key, value in ours.client_terms(rnd).items():   # what a client adds to its loss
            assert all(m.content["config"][key] == value for m in sent), key
        assert "proximal-mu" in ours.client_terms(rnd) or "proximal-mu" not in sent[0].content["config"]
        updates = _replies(rnd, current)
        flower, _ = theirs.aggregate_train(rnd + 1, [_message(u) for u in updates])
        new = ours.aggregate(rnd, current, updates)
        for key in floats:   # Flower's FedAdam hands back float64 (NumPy's scalar rules); ours keeps float32
            theirs_now = torch.from_numpy(np.asarray(flower[key].numpy())).to(new[key].dtype)
            torch.testing.assert_close(new[key], theirs_now, rtol=1e-5, atol=1e-6)
            assert new[key].dtype == current[key].dtype
        assert int(new[COUNTER]) == int(current[COUNTER]) + 10 * CLIENTS
        also()
        current = new


@pytest.mark.parametrize(("name", "flower_class", "params"), CASES, ids=[c[0] for c in CASES])
def test_the_aggregate_is_flowers_round_after_round(name: str, flower_class: str, params: dict,
                                                     flower_task: None) -> None:
    ours = build_strategy(name, ",".join(f"{k}={v}" for k, v in params.items()))
    theirs = getattr(flwr_strategy, flower_class)(**params, min_train_nodes=CLIENTS,
                                                  min_available_nodes=CLIENTS)
    _same_rounds(ours, theirs)


DP_CASES = [("fixed", "DifferentialPrivacyServerSideFixedClipping", {"clipping_norm": 1.5}),
            ("adaptive", "DifferentialPrivacyServerSideAdaptiveClipping",
             {"initial_clipping_norm": 1.5, "target_clipped_quantile": 0.3, "clip_norm_lr": 0.5})]


@pytest.mark.parametrize(("dp", "flower_class", "params"), DP_CASES, ids=[c[0] for c in DP_CASES])
@pytest.mark.parametrize("inner", ["fedavg", "fedadam"])
def test_dp_clipping_is_flowers_and_its_noise_has_flowers_scale(dp: str, flower_class: str, params: dict,
                                                                inner: str, flower_task: None) -> None:
    """Without noise, the clipped aggregate (and the adaptive norm) equal Flower's round after
    round; with noise_multiplier z, the noise has Flower's std z * clipping_norm / sampled."""
    args = ",".join(f"{k}={v}" for k, v in params.items())
    ours = build_strategy(inner, "", dp, f"noise_multiplier=0,{args}", num_sampled_clients=CLIENTS)
    theirs = getattr(flwr_strategy, flower_class)(
        getattr(flwr_strategy, "FedAvg" if inner == "fedavg" else "FedAdam")(
            min_train_nodes=CLIENTS, min_available_nodes=CLIENTS),
        noise_multiplier=0.0, num_sampled_clients=CLIENTS, **params)

    def same_norm() -> None:
        if dp == "adaptive":
            assert ours.clipping_norm == pytest.approx(theirs.clipping_norm, rel=1e-9)

    _same_rounds(ours, theirs, same_norm)
    noisy = build_strategy(inner, "", dp, f"noise_multiplier=0.05,{args}", seed=3,
                           num_sampled_clients=CLIENTS)
    quiet = build_strategy(inner, "", dp, f"noise_multiplier=0,{args}", num_sampled_clients=CLIENTS)
    big = {"layers.0.w": torch.zeros(200, 100), COUNTER: torch.tensor(0)}
    updates = _replies(0, big)
    diff = noisy.aggregate(0, big, updates)["layers.0.w"] - quiet.aggregate(0, big, updates)["layers.0.w"]
    norm = params.get("clipping_norm", getattr(noisy, "clipping_norm", 0.0))
    if dp == "adaptive":   # Flower's effective multiplier at the updated norm
        norm = noisy.clipping_norm * noisy.noise_multiplier / 0.05
    assert float(diff.std()) == pytest.approx(0.05 * norm / CLIENTS, rel=0.05)


@pytest.mark.parametrize("dp", ["", "fixed", "adaptive"])
def test_fedprox_sends_its_term_with_or_without_a_dp_wrapper(dp: str) -> None:
    strategy = build_strategy("fedprox", "proximal_mu=0.3", dp, "noise_multiplier=0" if dp else "")
    assert strategy.client_terms(0) == {"proximal-mu": 0.3}


def test_fedavg_is_bit_identical_to_the_aggregate_it_replaces() -> None:
    g = torch.Generator().manual_seed(1)
    current = {"layers.0.w": torch.randn(30, 20, generator=g), "layers.0.steps": torch.tensor(3),
               "layers.0.pattern": torch.randn(4, generator=g)}
    updates = [ClientUpdate(k, 10 + 7 * k, {"layers.0.w": torch.randn(30, 20, generator=g),
                                            "layers.0.steps": torch.tensor(5 + k),
                                            "layers.0.pattern": current["layers.0.pattern"].clone()})
               for k in range(4)]
    new, old = build_strategy("fedavg").aggregate(0, current, updates), fedavg(current, updates)
    assert all(torch.equal(new[k], old[k]) for k in old)


def test_every_registered_strategy_has_a_flower_comparison() -> None:
    assert set(registered()) == {name for name, _, _ in CASES}


def _cfg(data_dir: Path, *extra: str):
    return load_config(None, [f"train.data_dir={data_dir}", "train.train_limit=1500", "train.test_limit=300",
                              "model.hidden=60,60", "train.threads=1", "federation.clients=3",
                              "federation.rounds=3", "federation.executor=inprocess", *extra])


@pytest.mark.parametrize("name", ["fedadam", "fedavgm"])
def test_a_resumed_run_keeps_the_strategy_state_and_ends_bit_identical(name: str, data_dir: Path,
                                                                        tmp_path: Path) -> None:
    args = "server_momentum=0.9" if name == "fedavgm" else "eta=0.02"
    cfg = _cfg(data_dir, f"federation.strategy={name}", f"federation.strategy_args={args}")
    whole = Coordinator(cfg, tmp_path / "whole").run(InProcessTransport(cfg))["weights"]
    Coordinator(cfg, tmp_path / "cut").run(InProcessTransport(cfg), rounds=2)
    resumed = Coordinator(cfg, tmp_path / "cut", resume=True).run(InProcessTransport(cfg))["weights"]
    assert [k for k in whole if not torch.equal(whole[k], resumed[k])] == []
    plain = Coordinator(_cfg(data_dir), tmp_path / "fedavg").run(InProcessTransport(_cfg(data_dir)))
    assert any(not torch.equal(whole[k], plain["weights"][k]) for k in whole), f"{name} is FedAvg"
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert summary["strategy"] == name and summary["rounds"] == 3


@pytest.mark.parametrize(("overrides", "words"), [
    (["federation.strategy=fedsgd"], "not a known strategy; valid: fedadagrad, fedadam"),
    (["federation.strategy=fedadam", "federation.strategy_args=lr=0.1"], "fedadam takes: eta, eta_l"),
    (["federation.strategy=fedadam", "federation.strategy_args=eta=fast"], "eta = 'fast' is not a number"),
    (["federation.strategy=fedtrimmedavg", "federation.strategy_args=beta=0.6"], "beta = 0.6 must be in"),
    (["federation.dp=gaussian"], "'gaussian' is not a known DP wrapper; valid: adaptive, fixed"),
    (["federation.dp=adaptive", "federation.dp_args=noise_multiplier=2", "federation.clients=10"],
     "needs clipped_count_stddev > 1.0"),
])
def test_bad_strategy_settings_are_one_sentence(overrides: list[str], words: str) -> None:
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        load_config(None, overrides)


def test_a_flower_simulation_with_fedadam_and_central_dp_equals_the_reference(data_dir: Path,
                                                                             tmp_path: Path) -> None:
    """FedAdam inside fixed-clipping central DP: the noise comes from the run's seed, so the
    Flower run still ends on the in-process reference's weights."""
    from bpfree.server.reference import federated_reference
    from bpfree.server.simulate import simulate

    cfg = _cfg(data_dir, "federation.strategy=fedadam", "federation.strategy_args=eta=0.02,beta_1=0.8",
               "federation.rounds=2", "federation.dp=fixed",
               "federation.dp_args=noise_multiplier=0.01,clipping_norm=3")
    summary = simulate(cfg, tmp_path / "run")
    reference = federated_reference(cfg)
    assert [k for k in reference if not torch.equal(summary["weights"][k], reference[k])] == []
    assert summary["strategy"] == "fedadam" and summary["dp"] == "fixed"
    plain = federated_reference(_cfg(data_dir, "federation.strategy=fedadam",
                                     "federation.strategy_args=eta=0.02,beta_1=0.8", "federation.rounds=2"))
    assert any(not torch.equal(plain[k], reference[k]) for k in plain), "dp changed nothing"


def test_a_flower_simulation_with_fedprox_sends_its_term_and_equals_the_reference(
        data_dir: Path, tmp_path: Path) -> None:
    """FedProx's proximal-mu travels in every train message (as Flower's FedProx sends it); the
    clients' layers are pulled to the global weights exactly as in the reference."""
    from bpfree.server.reference import federated_reference
    from bpfree.server.simulate import simulate

    cfg = _cfg(data_dir, "federation.strategy=fedprox", "federation.strategy_args=proximal_mu=5",
               "federation.rounds=2")
    summary = simulate(cfg, tmp_path / "run")
    reference = federated_reference(cfg)
    assert [k for k in reference if not torch.equal(summary["weights"][k], reference[k])] == []
    plain = federated_reference(_cfg(data_dir, "federation.rounds=2"))
    assert any(not torch.equal(plain[k], reference[k]) for k in plain), "the term changed nothing"


def test_flowers_local_dp_mod_runs_on_bpfree_replies(data_dir: Path, tmp_path: Path) -> None:
    """LocalDpMod scales and noises every array of a reply: the integer step counters travel
    outside the ArrayRecord, so it sees only floating weights and the run completes."""
    from bpfree.server.simulate import simulate

    cfg = _cfg(data_dir, "federation.rounds=2")
    summary = simulate(cfg, tmp_path / "run", client_mods=["tests.flower_mods:local_dp"])
    ref = Coordinator(cfg).run(InProcessTransport(cfg))
    reference = ref["weights"]
    floats = [k for k in reference if reference[k].is_floating_point()]
    counters = [k for k in reference if not reference[k].is_floating_point()]
    assert counters and all(torch.equal(summary["weights"][k], reference[k]) for k in counters)
    assert any(not torch.equal(summary["weights"][k], reference[k]) for k in floats), "no noise added"
    assert abs(summary["test_accuracy"] - ref["test_accuracy"]) < 0.1   # noise std ~0.005: small
