"""Continual learning (bpfree continual): the metrics on hand-made matrices, tasks and the replay
memory, the local EWC / SI penalties, and short real SplitMNIST runs: naive forgets, replay forgets
less, task-IL masks, a pipeline equals the single process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from bpfree.cli.continual import QUICK
from bpfree.server.continual import continual
from bpfree_core.config import ExperimentConfig
from bpfree_core.continual.consolidation import Consolidator
from bpfree_core.continual.stream import ReplayMemory, cl_metrics, continual_config, split_tasks
from bpfree_core.data.datasets import Split, load_dataset
from bpfree_core.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _cfg(data_dir: Path, *extra: str) -> ExperimentConfig:
    return continual_config(ExperimentConfig().with_overrides(
        [*QUICK, f"train.data_dir={data_dir}", "model.algorithm=sffa", "train.threads=1", *extra]))


# -- the measures --------------------------------------------------------------------------------

def test_cl_metrics_on_a_hand_made_matrix() -> None:
    r = [[0.9, 0.1, 0.0],
         [0.5, 0.8, 0.2],
         [0.3, 0.6, 0.7]]
    m = cl_metrics(r, before=[0.1, 0.1, 0.1])
    assert m["average_accuracy"] == pytest.approx((0.3 + 0.6 + 0.7) / 3)
    # task 0 peaked at 0.9 and ends at 0.3; task 1 peaked at 0.8 and ends at 0.6
    assert m["forgetting"] == pytest.approx(((0.9 - 0.3) + (0.8 - 0.6)) / 2)
    assert m["backward_transfer"] == pytest.approx(((0.3 - 0.9) + (0.6 - 0.8)) / 2)
    # before training task j: 0.1 on task 1 (after task 0), 0.2 on task 2; chance was 0.1
    assert m["forward_transfer"] == pytest.approx(((0.1 - 0.1) + (0.2 - 0.1)) / 2)
    assert m["seen_accuracy"] == pytest.approx([0.9, 0.65, (0.3 + 0.6 + 0.7) / 3])
    # forgetting takes the best earlier accuracy, not the first one
    assert cl_metrics([[0.5, 0.0], [0.4, 0.9]], [0, 0])["forgetting"] == pytest.approx(0.1)
    single = cl_metrics([[0.7]], [0.1])
    assert single["forgetting"] == single["backward_transfer"] == single["forward_transfer"] == 0.0


# -- tasks and memory ------------------------------------------------------------------------------

def test_split_tasks_partitions_the_classes(data_dir: Path) -> None:
    data = load_dataset("mnist", data_dir)
    tasks = split_tasks(data, _cfg(data_dir))
    assert [t.classes for t in tasks] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    for t in tasks:
        assert set(t.train.labels.tolist()) == set(t.classes) and len(t.train) == 600
        assert set(t.test.labels.tolist()) == set(t.classes) and len(t.test) == 200
    shuffled = split_tasks(data, _cfg(data_dir, "continual.class_order=shuffled"))
    assert sorted(c for t in shuffled for c in t.classes) == list(range(10))
    assert [t.classes for t in shuffled] != [t.classes for t in tasks]
    assert [t.classes for t in shuffled] == [t.classes for t in split_tasks(
        data, _cfg(data_dir, "continual.class_order=shuffled"))]          # the seed decides
    domain = split_tasks(data, _cfg(data_dir, "continual.scenario=domain"))
    assert all(set(t.train.labels.tolist()) == {0, 1} for t in domain)
    assert _cfg(data_dir, "continual.scenario=domain").model.num_classes == 2
    with pytest.raises(ConfigError, match="does not divide"):
        split_tasks(data, _cfg(data_dir, "continual.tasks=3"))


def test_replay_memory_is_bounded_balanced_and_deterministic() -> None:
    def task(label: int) -> Split:
        return Split(torch.full((1000, 4), float(label)), torch.full((1000,), label))

    mem = ReplayMemory(500, seed=3)
    for t in range(5):
        mem.add_task(t, task(t))
        assert len(mem) <= 500
        counts = [len(p) for p in mem.parts]
        assert counts == [500 // (t + 1)] * (t + 1)   # an equal share per task seen
    again = ReplayMemory(500, seed=3)
    for t in range(5):
        again.add_task(t, task(t))
    drawn = mem.sample(64, torch.Generator().manual_seed(0))
    assert torch.equal(drawn.labels, again.sample(64, torch.Generator().manual_seed(0)).labels)
    assert set(drawn.labels.tolist()) <= set(range(5)) and len(drawn) == 64
    assert torch.equal(drawn.images[:, 0], drawn.labels.float())    # images stay with labels


# -- local EWC / SI ---------------------------------------------------------------------------------

def test_consolidation_gradient_is_the_penalty_gradient() -> None:
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(5))
    ewc = Consolidator([w], "ewc", strength=3.0)
    ewc.collecting = True
    grads = [torch.randn(5) for _ in range(4)]
    for g in grads:                       # Fisher: mean squared minibatch gradient
        w.grad = g.clone()
        ewc.before_step()
    ewc.end_task()
    fisher = torch.stack([g * g for g in grads]).mean(0)
    assert torch.allclose(ewc.importance()[0], fisher)
    anchor = w.detach().clone()
    with torch.no_grad():
        w.add_(torch.randn(5))
    w.grad = torch.zeros(5)
    ewc.before_step()
    wt = w.detach().clone().requires_grad_(True)
    (3.0 * (fisher * (wt - anchor) ** 2).sum()).backward()
    assert torch.allclose(w.grad, wt.grad)
    assert ewc.penalty() == pytest.approx(float(3.0 * (fisher * (w.detach() - anchor) ** 2).sum()))


def test_si_importance_is_the_path_integral() -> None:
    """Plain SGD on L = 0.5 * a * w^2 from w0: omega = -sum g * dw, Omega = omega / (dw^2 + xi)."""
    a, lr, xi = torch.tensor([1.0, 4.0]), 0.1, 1e-3
    w = nn.Parameter(torch.tensor([1.0, 1.0]))
    si = Consolidator([w], "si", strength=1.0, damping=xi)
    opt = torch.optim.SGD([w], lr=lr)
    omega = torch.zeros(2)
    for _ in range(5):
        opt.zero_grad()
        (0.5 * a * w * w).sum().backward()
        g, before = w.grad.clone(), w.detach().clone()
        si.before_step()
        opt.step()
        si.after_step()
        omega -= g * (w.detach() - before)
    si.end_task()
    delta = w.detach() - torch.tensor([1.0, 1.0])
    assert torch.allclose(si.importance()[0], omega / (delta ** 2 + xi))
    assert (si.importance()[0] > 0).all()


# -- real SplitMNIST runs (in process, tiny subset) ----------------------------------------------

@pytest.fixture(scope="module")
def runs(data_dir: Path) -> dict[str, dict]:
    out = {}
    for strategy in ("naive", "replay"):
        out[strategy] = continual(_cfg(data_dir, f"continual.strategy={strategy}"), progress=False)
    return out


def test_naive_forgets_and_replay_forgets_less(runs: dict[str, dict]) -> None:
    naive, replay = runs["naive"], runs["replay"]
    r = naive["accuracy_matrix"]
    assert r[0][0] > 0.9                         # task 1 was learnt ...
    assert r[-1][0] < r[0][0] - 0.5              # ... and forgotten after task 5
    assert naive["forgetting"] > 0.5
    assert replay["forgetting"] < naive["forgetting"] - 0.2
    assert replay["average_accuracy"] > naive["average_accuracy"] + 0.2
    assert replay["memory"] == 100 and naive["memory"] == 0
    for s in (naive, replay):
        assert len(s["accuracy_matrix"]) == 5 and all(len(row) == 5 for row in s["accuracy_matrix"])
        layers = s["activity"]
        assert set(layers) == {"0", "1"}
        assert all(0 <= v["sparsity"] <= 1 and 0 <= v["specialised_units"] <= 1 for v in layers.values())


def test_task_incremental_masks_to_the_tasks_classes(data_dir: Path, runs: dict[str, dict]) -> None:
    """The naive run's weights scored with the task id known: the same net, far higher accuracy
    (the scenario changes only the test)."""
    from bpfree_core.continual.stream import task_accuracy
    from bpfree_core.model import Stage, build_layers, build_objective

    cfg = _cfg(data_dir, "continual.scenario=task")
    objective = build_objective(cfg)
    stage = Stage(build_layers(cfg, objective=objective))
    stage.load_state_dict(runs["naive"]["weights"])
    tasks = split_tasks(load_dataset("mnist", data_dir), cfg)
    task_il = [task_accuracy(stage.eval_step, objective, t, cfg)["softmax"] for t in tasks]
    assert sum(task_il) / 5 > runs["naive"]["average_accuracy"] + 0.3
    assert all(a >= c for a, c in zip(task_il, runs["naive"]["accuracy_matrix"][-1], strict=True))


def test_ewc_and_si_run_and_penalise(data_dir: Path, tmp_path: Path) -> None:
    for strategy in ("ewc", "si"):
        s = continual(_cfg(data_dir, f"continual.strategy={strategy}", "continual.tasks=2",
                           "continual.ewc_lambda=100"), run_dir=tmp_path / strategy, progress=False)
        records = [json.loads(line) for line in (tmp_path / strategy / "metrics.jsonl").open()]
        assert records[0]["penalty"] == 0 and records[1]["penalty"] > 0, strategy
        assert len(s["accuracy_matrix"]) == 2


@pytest.mark.parametrize("strategy", ["ewc", "si"])
def test_pipeline_ewc_and_si_equal_the_single_process(strategy: str, data_dir: Path,
                                                      tmp_path: Path) -> None:
    """EWC / SI on two stage workers: each stage keeps its own layers' importance, consolidated
    by an EndTask call at each task boundary; weights and penalties end as in one process."""
    cfg = _cfg(data_dir, f"continual.strategy={strategy}", "continual.ewc_lambda=100",
               "continual.si_c=10")
    ref = continual(cfg, run_dir=tmp_path / "ref", progress=False)
    piped = continual(cfg.with_overrides(["pipeline.stages=2"]), "pipeline",
                      run_dir=tmp_path / "piped", progress=False)
    assert all(torch.equal(piped["weights"][k], v) for k, v in ref["weights"].items())
    assert piped["accuracy_matrix"] == ref["accuracy_matrix"]
    penalties = [[json.loads(line)["penalty"] for line in (tmp_path / r / "metrics.jsonl").open()]
                 for r in ("ref", "piped")]
    assert penalties[0] == penalties[1] and penalties[0][0] == 0 and min(penalties[0][1:]) > 0
    naive = continual(_cfg(data_dir), progress=False)
    assert any(not torch.equal(naive["weights"][k], v) for k, v in ref["weights"].items())


def test_pipeline_replay_equals_the_single_process(data_dir: Path, runs: dict[str, dict]) -> None:
    cfg = _cfg(data_dir, "continual.strategy=replay", "pipeline.stages=2")
    piped = continual(cfg, "pipeline", progress=False)
    ref = runs["replay"]["weights"]
    assert piped["weights"].keys() == ref.keys()
    assert all(torch.equal(piped["weights"][k], ref[k]) for k in ref), \
        [k for k in ref if not torch.equal(piped["weights"][k], ref[k])]
    assert piped["accuracy_matrix"] == runs["replay"]["accuracy_matrix"]


def test_agem_bp_forgets_less_than_naive(data_dir: Path) -> None:
    """Standard A-GEM on the bp baseline (one layer unit): the memory's gradient keeps the old
    tasks from being overwritten (quick SplitMNIST: 11% naive, 35% A-GEM)."""
    naive, agem = (continual(_cfg(data_dir, "model.algorithm=bp", f"continual.strategy={s}"),
                             progress=False) for s in ("naive", "agem"))
    assert agem["average_accuracy"] > naive["average_accuracy"] + 0.1
    assert agem["forgetting"] < naive["forgetting"] and agem["memory"] == 100


def test_pipeline_agem_equals_the_single_process(data_dir: Path) -> None:
    """Local A-GEM on two stage workers: the reference packets travel the stream, each stage
    projects its own layer's update, and the weights end bit-identical to one process."""
    cfg = _cfg(data_dir, "continual.strategy=agem", "continual.tasks=2")
    ref = continual(cfg, progress=False)
    piped = continual(cfg.with_overrides(["pipeline.stages=2"]), "pipeline", progress=False)
    assert piped["weights"].keys() == ref["weights"].keys()
    assert all(torch.equal(piped["weights"][k], v) for k, v in ref["weights"].items())
    assert piped["accuracy_matrix"] == ref["accuracy_matrix"]
    naive = continual(_cfg(data_dir, "continual.tasks=2"), progress=False)
    assert any(not torch.equal(naive["weights"][k], v) for k, v in ref["weights"].items())


def test_cli_quick_writes_everything_and_refuses_a_memoryless_agem(data_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "bpfree", "continual", "--quick", "--tasks", "2",
                           "--strategy", "replay", "--data-dir", str(data_dir), "--out", str(run),
                           "--no-progress"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["strategy"] == "replay" and len(summary["accuracy_matrix"]) == 2
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert (run / "accuracy_matrix.png").stat().st_size > 0 and (run / "task_accuracy.png").stat().st_size > 0
    assert json.loads((run / "config.json").read_text())["continual"]["strategy"] == "replay"
    bad = subprocess.run([sys.executable, "-m", "bpfree", "continual", "--quick", "--strategy", "agem",
                          "--set", "continual.memory=0", "--clients", "2", "--data-dir", str(data_dir),
                          "--out", str(tmp_path / "bad")], capture_output=True, text=True, cwd=REPO,
                         timeout=300)
    assert bad.returncode != 0 and bad.stderr.strip().count("\n") == 0
    assert "continual.strategy = 'agem' needs continual.memory > 0" in bad.stderr


# -- federated continual learning -------------------------------------------------------------------

def test_client_task_orders(data_dir: Path) -> None:
    from bpfree_core.continual.stream import client_tasks

    same = _cfg(data_dir, "continual.federated=true", "federation.clients=4", "federation.rounds=5")
    assert {tuple(client_tasks(same, k, 10)) for k in range(4)} == {((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))}
    own = same.with_overrides(["continual.client_order=shuffled"])
    orders = [client_tasks(own, k, 10) for k in range(4)]
    assert all(sorted(o) == sorted(orders[0]) for o in orders)      # the same tasks ...
    assert len({tuple(o) for o in orders}) > 1                     # ... in each client's own order
    assert orders == [client_tasks(own, k, 10) for k in range(4)]  # fixed by the seed
    with pytest.raises(ConfigError, match="multiple of the tasks"):
        from bpfree_core.continual.stream import check_federated

        check_federated(same.with_overrides(["federation.rounds=7"]))


def test_federated_continual_on_flower_pipelines_equals_the_reference(data_dir: Path,
                                                                     tmp_path: Path) -> None:
    """`bpfree continual --clients 2 --stages 2 --executor pipeline --tasks 2`: Flower's
    simulation, two pipelined clients with their own replay memories (the second task replays the
    first); the global weights equal the in-process federated reference, and the summary carries
    the accuracy matrix."""
    from bpfree.server.reference import federated_reference
    from bpfree_core.run.checkpoint import load_checkpoint

    run = tmp_path / "fed"
    done = subprocess.run(
        [sys.executable, "-m", "bpfree", "continual", "--quick", "--clients", "2", "--stages", "2",
         "--executor", "pipeline", "--strategy", "replay", "--epochs-per-task", "1", "--tasks", "2",
         "--set", "train.train_limit=3000", "--set", "train.threads=1", "--data-dir", str(data_dir),
         "--out", str(run),
         "--no-progress"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    c = summary["continual"]
    assert summary["rounds"] == 2 and summary["replies"]["accepted"] == 4
    assert len(c["accuracy_matrix"]) == 2 and c["strategy"] == "replay"
    assert c["accuracy_matrix"][0][0] > 0.5          # the first task (5 classes) was learnt
    assert (run / "accuracy_matrix.png").is_file()
    cfg = ExperimentConfig.from_dict(json.loads((run / "config.json").read_text()))
    assert cfg.continual.federated and cfg.federation.executor == "pipeline"
    reference = federated_reference(cfg)
    final = load_checkpoint(run / "checkpoints" / "round-0002.pt")["weights"]
    assert all(torch.equal(final[k], reference[k]) for k in reference)


@pytest.mark.parametrize("strategy", ["agem", "ewc"])
def test_federated_agem_and_ewc_on_flower_equal_the_reference(strategy: str, data_dir: Path,
                                                              tmp_path: Path) -> None:
    """A-GEM and EWC in a Flower simulation: each client keeps its own memory (A-GEM) or its
    own importance and anchors (EWC, in Flower's node state between rounds, never sent); the
    coordinator aggregates weights only, and the global weights equal the in-process federated
    reference."""
    from bpfree.server.reference import federated_reference
    from bpfree_core.run.checkpoint import load_checkpoint

    run = tmp_path / "fed"
    done = subprocess.run(
        [sys.executable, "-m", "bpfree", "continual", "--quick", "--clients", "2", "--executor",
         "inprocess", "--strategy", strategy, "--epochs-per-task", "1", "--tasks", "2",
         "--set", "train.train_limit=2000", "--set", "train.threads=1",
         "--set", "continual.ewc_lambda=100", "--data-dir", str(data_dir),
         "--out", str(run), "--no-progress"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["continual"]["strategy"] == strategy and summary["replies"]["accepted"] == 4
    if strategy == "ewc":   # task 1's importance was still with each client at the end of task 2
        records = [json.loads(line) for line in (run / "metrics.jsonl").open()]
        assert [sorted(m["penalty"] > 0 for m in r["client_metrics"].values())
                for r in records] == [[False, False], [True, True]]
    cfg = ExperimentConfig.from_dict(json.loads((run / "config.json").read_text()))
    reference = federated_reference(cfg)
    final = load_checkpoint(run / "checkpoints" / "round-0002.pt")["weights"]
    assert all(torch.equal(final[k], reference[k]) for k in reference)


def test_federated_si_keeps_each_clients_state_between_rounds(data_dir: Path) -> None:
    """SI's path integral runs over a task's rounds on each client: the in-process federated
    reference with the clients' state kept differs from naive (which is what dropping the state
    every round would give, bit for bit: no stored penalty, no extra gradient)."""
    from bpfree.server.reference import federated_reference

    cfg = _cfg(data_dir, "continual.federated=true", "continual.strategy=si", "continual.tasks=2",
               "continual.si_c=10", "federation.clients=2", "federation.rounds=4",
               "federation.executor=inprocess")
    kept = federated_reference(cfg)
    naive = federated_reference(cfg.with_overrides(["continual.strategy=naive"]))
    assert any(not torch.equal(kept[k], v) for k, v in naive.items())


def test_shuffled_client_orders_report_forgetting_per_client(data_dir: Path, tmp_path: Path) -> None:
    """continual.client_order = shuffled: the summary carries each client's measures in its own
    task order; the final accuracies are the global ones, the forgetting depends on the order."""
    from bpfree.server.coordinator import Coordinator
    from bpfree.server.reference import InProcessTransport

    cfg = _cfg(data_dir, "continual.federated=true", "continual.strategy=replay",
               "continual.client_order=shuffled", "federation.clients=4", "federation.rounds=5",
               "federation.executor=inprocess")
    c = Coordinator(cfg, tmp_path / "run", evaluate=False).run(InProcessTransport(cfg))["continual"]
    clients = c["by_client"]
    assert sorted(clients) == ["0", "1", "2", "3"]
    assert all(abs(v["average_accuracy"] - c["average_accuracy"]) < 1e-12 for v in clients.values())
    assert len({round(v["forgetting"], 9) for v in clients.values()}) > 1
