"""Federation through real Flower simulation, real stage workers over gRPC, real MNIST.

The single-process federated reference (server.reference) is the oracle: the Flower run with
pipeline clients must end with identical weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bpfree.server.coordinator import Coordinator, RoundReplies
from bpfree.server.reference import federated_reference
from bpfree.server.simulate import simulate
from bpfree_core.config import load_config
from bpfree_core.errors import AggregationError, ProtocolError
from bpfree_core.federation.aggregate import ClientUpdate
from bpfree_core.run.checkpoint import load_checkpoint

RECORD = "tests.flower_mods:record_replies"   # client mods run in the simulation's processes
SMALL = ["train.train_limit=3000", "train.test_limit=1000", "model.hidden=200,200",
         "model.algorithm=symba", "train.threads=1", "federation.clients=3", "pipeline.stages=2",
         "federation.local_epochs=1", "train.batch_size=100", "train.jitter=0",
         "objective.vote_first=false"]   # not simulate's default recipe


def _cfg(data_dir: Path, *extra: str):
    return load_config(None, [f"train.data_dir={data_dir}", *SMALL, *extra])


def test_pipeline_federation_learns_averages_replies_and_equals_the_reference(data_dir, tmp_path,
                                                                             monkeypatch):
    cfg = _cfg(data_dir, "federation.rounds=2", "federation.executor=pipeline")
    replies = tmp_path / "replies"
    monkeypatch.setenv("BPFREE_TEST_REPLIES", str(replies))
    summary = simulate(cfg, tmp_path / "run", client_mods=[RECORD])

    # It learns: well above chance after one round, better after two.
    acc = summary["accuracy_per_round"]
    assert len(acc) == 2 and 0.3 < acc[0] < acc[1], acc
    assert summary["replies"] == {"accepted": 6, "failed": 0, "timed_out": 0, "rejected": 0}

    # The aggregate of round 2 is the example-weighted mean of the three replies of round 2.
    final = load_checkpoint(tmp_path / "run" / "checkpoints" / "round-0002.pt")["weights"]
    got = [torch.load(replies / f"round1-client{k}.pt") for k in range(3)]
    total = sum(r["num_examples"] for r in got)
    assert total == 3000
    for key, value in final.items():
        if value.is_floating_point():
            mean = sum(r["num_examples"] * r["weights"][key].double() for r in got) / total
            assert torch.allclose(value.double(), mean, rtol=0, atol=1e-6), key

    # Identical to the single-process federated reference, bit for bit.
    reference = federated_reference(cfg)
    assert final.keys() == reference.keys()
    assert all(torch.equal(final[k], reference[k]) for k in final), \
        [k for k in final if not torch.equal(final[k], reference[k])]

    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text())["federation"]["clients"] == 3
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2]
    assert set(lines[0]["layers"]) == {"0", "1"}
    assert json.loads((run / "summary.json").read_text())["rounds"] == 2


class _Replies:
    """A transport double for the coordinator's own decision: too few usable replies."""

    def __init__(self, updates: list[ClientUpdate]):
        self.updates = updates

    def train_round(self, rnd, weights, clients, terms, receive):
        for update in self.updates:
            receive(update)
        return RoundReplies(failed={"node 7": "boom"}, sent=3, timed_out=1)


def test_too_few_usable_replies_stops_the_run_and_names_the_setting(data_dir, tmp_path):
    cfg = _cfg(data_dir, "federation.min_clients=2")
    coordinator = Coordinator(cfg, tmp_path / "run")
    one = ClientUpdate(0, 10, {k: v.clone() for k, v in coordinator.weights.items()})
    with pytest.raises(AggregationError, match="federation.min_clients = 2"):
        coordinator.run(_Replies([one]))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_resume_refuses_a_changed_experiment(data_dir, tmp_path):
    cfg = _cfg(data_dir, "federation.rounds=1", "federation.executor=inprocess")
    Coordinator(cfg, tmp_path / "run").run(_InProcess(cfg))
    changed = _cfg(data_dir, "federation.rounds=1", "optim.lr=0.5")
    with pytest.raises(Exception, match="optim.lr"):
        Coordinator(changed, tmp_path / "run", resume=True)


class _InProcess:
    """Clients trained in this process (the reference executor), without Flower."""

    def __init__(self, cfg):
        from bpfree_core.federation.client import client_split, train_split

        self.cfg = cfg
        train = train_split(cfg)
        self.parts = [client_split(cfg, train, k) for k in range(cfg.federation.clients)]

    def train_round(self, rnd, weights, clients, terms, receive):
        from bpfree_core.federation.client import InProcessExecutor, local_round

        for k in clients:
            receive(local_round(InProcessExecutor(self.cfg), self.cfg, self.parts[k], k, rnd, weights, terms))
        return RoundReplies(sent=len(clients))


def test_fedprox_pulls_toward_the_global_weights_and_pipelines_match_the_reference(data_dir):
    import grpc

    from bpfree.client.executor import PipelineExecutor
    from bpfree.protos import stage_pb2 as pb
    from bpfree_core.federation.client import (
        InProcessExecutor,
        client_split,
        local_round,
        stack_template,
        train_split,
    )

    def rounds(executor, cfg, n: int) -> tuple[dict, dict]:  # noqa: ANN001
        start = weights = stack_template(cfg)
        part = client_split(cfg, train_split(cfg), 0)
        for rnd in range(n):
            weights = local_round(executor, cfg, part, 0, rnd, weights,
                                  {"proximal-mu": cfg.federation.proximal_mu}).weights
        return start, weights

    def drift(mu: float) -> float:
        cfg = _cfg(data_dir, f"federation.proximal_mu={mu}", "federation.executor=inprocess")
        start, out = rounds(InProcessExecutor(cfg), cfg, 1)
        return sum(float((out[k] - start[k]).pow(2).sum()) for k in start
                   if start[k].is_floating_point()) ** 0.5

    plain, prox = drift(0.0), drift(5.0)
    assert prox < 0.8 * plain, (plain, prox)

    # The term inside 2 stage workers: equal to in process over 2 rounds (round 2 re-anchors it
    # at the new global weights; a stale term left from round 1 would change the weights).
    cfg = _cfg(data_dir, "federation.proximal_mu=5.0", "train.train_limit=1000",
               "federation.rounds=2")
    _, want = rounds(InProcessExecutor(cfg), cfg, 2)
    executor = PipelineExecutor(cfg)
    try:
        _, got = rounds(executor, cfg, 2)
        with pytest.raises(grpc.RpcError) as bad:
            executor.pipeline._stubs[0].SetProximal(pb.ProximalRequest(mu=-1.0), timeout=30)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "mu" in bad.value.details()
        with pytest.raises(ProtocolError, match="SetProximal on .* finite mu"):
            executor.pipeline.load_weights(got, proximal_mu=float("inf"))
        assert executor.pipeline._stubs[1].Health(pb.HealthRequest(), timeout=30)  # still serving
    finally:
        executor.close()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_simulate_cli_names_the_bad_field(data_dir, capsys):
    from bpfree.cli import main

    code = main(["simulate", "--data-dir", str(data_dir), "--partition", "dirichlet:-1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "federation.partition" in err and "dirichlet:ALPHA" in err


def test_resume_restores_a_lost_metrics_line_and_skips_a_torn_one(data_dir, tmp_path):
    cfg = _cfg(data_dir, "federation.rounds=2", "federation.executor=inprocess")
    run = tmp_path / "run"
    whole = Coordinator(cfg, run).run(_InProcess(cfg))
    # A crash after round 1's checkpoint, before its metrics line was complete:
    (run / "checkpoints" / "round-0002.pt").unlink()
    (run / "metrics.jsonl").write_text('{"round": 1, "test_acc')
    resumed = Coordinator(cfg, run, resume=True).run(_InProcess(cfg))
    rounds = [json.loads(x)["round"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2]
    assert all(torch.equal(whole["weights"][k], resumed["weights"][k]) for k in whole["weights"])
