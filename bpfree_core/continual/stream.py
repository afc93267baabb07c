"""Continual learning: the dataset split into tasks that arrive one after another (SplitMNIST).

After each task the model is tested on every task, giving the accuracy matrix R (R[i][j] =
accuracy on task j's test set after training on tasks 0..i), and from it the usual measures
(Lopez-Paz & Ranzato 2017; Chaudhry et al. 2018):

  average accuracy   mean_j R[T-1][j]
  forgetting         mean_{j<T-1} (max_{j<=i<T-1} R[i][j] - R[T-1][j])
  backward transfer  mean_{j<T-1} (R[T-1][j] - R[j][j])
  forward transfer   mean_{j>0} (R[j-1][j] - b_j), b_j = task j's accuracy before any training

Scenarios (van de Ven & Tolias 2019): `class` (one prediction over every class), `domain` (the
within-task label: a 2-way problem shared by all tasks), `task` (the task id is known at test:
the prediction is restricted to that task's classes).

Strategies, all local to whoever holds the data or the layer: `replay` keeps a small memory of
past tasks' samples (with the data, on the driver or client: it never leaves it) and mixes a
batch of it into every training batch; `agem` sends a batch of that memory ahead of every
training batch, and each layer projects its own update against its own gradient on it
(bpfree_core.continual.agem: works on every executor, nothing but packets crosses a stage); `ewc` and `si`
(bpfree_core.continual.consolidation) make each layer protect its own parameters. `naive` does nothing
(the lower bound).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bpfree_core.config import ExperimentConfig
from bpfree_core.data.batches import train_packets
from bpfree_core.data.datasets import Dataset, Split, bind_data, load_dataset, run_spec
from bpfree_core.diagnostics import eval_with_units
from bpfree_core.errors import ConfigError
from bpfree_core.evaluation import EVAL_BATCH
from bpfree_core.layers import GOODNESS, LOGITS, Packet
from bpfree_core.model import Stage, build_layers, build_objective
from bpfree_core.objectives import Objective
from bpfree_core.run.callbacks import Callback
from bpfree_core.run.executor import Executor
from bpfree_core.run.restarts import rerun_from
from bpfree_core.run.rundir import RunDir, open_run_dir
from bpfree_core.run.runlog import RunLog
from bpfree_core.runtime import progress_bar
from bpfree_core.seeds import generator

log = logging.getLogger(__name__)

SCORES = {"softmax": LOGITS, "goodness": GOODNESS}   # prediction method -> packet key of its scores
MEMORY_STRATEGIES = ("replay", "agem")   # keep a memory of past tasks' samples


@dataclass(frozen=True)
class Task:
    index: int
    classes: tuple[int, ...]    # dataset labels in this task
    train: Split                # labels as the scenario sees them (within-task for `domain`)
    test: Split


def class_order(cfg: ExperimentConfig, num_classes: int) -> list[int]:
    if cfg.continual.class_order == "fixed":
        return list(range(num_classes))
    return torch.randperm(num_classes, generator=generator(cfg.train.seed, "tasks")).tolist()


def task_classes(cfg: ExperimentConfig, num_classes: int) -> list[tuple[int, ...]]:
    """The classes of each task, in the run's task order: the classes split evenly."""
    t = cfg.continual.tasks
    if num_classes % t:
        raise ConfigError(f"continual.tasks = {t} does not divide {cfg.model.dataset}'s "
                          f"{num_classes} classes evenly; choose a divisor of {num_classes}")
    order, per = class_order(cfg, num_classes), num_classes // t
    return [tuple(order[i * per:(i + 1) * per]) for i in range(t)]


def split_tasks(data: Dataset, cfg: ExperimentConfig) -> list[Task]:
    """The dataset split into cfg.continual.tasks tasks (train_limit and test_limit apply per
    task)."""
    return [Task(i, classes, _task_split(data.train, classes, cfg.train.train_limit, cfg),
                 _task_split(data.test, classes, cfg.train.test_limit, cfg))
            for i, classes in enumerate(task_classes(cfg, data.spec.num_classes))]


def _task_split(split: Split, classes: tuple[int, ...], limit: int, cfg: ExperimentConfig) -> Split:
    idx = torch.nonzero(torch.isin(split.labels, torch.tensor(classes))).squeeze(1)
    if limit:
        idx = idx[:limit]
    labels = split.labels[idx]
    if cfg.continual.scenario == "domain":   # the position within the task: 0 or 1
        labels = torch.searchsorted(torch.tensor(sorted(classes)), labels)
    return Split(split.images[idx], labels)


def model_classes(cfg: ExperimentConfig, dataset_classes: int) -> int:
    """Labels the model tells apart: the task's for `domain`, every class otherwise."""
    return dataset_classes // cfg.continual.tasks if cfg.continual.scenario == "domain" else 0


def _check_classes(cfg: ExperimentConfig, dataset_classes: int) -> None:
    want = model_classes(cfg, dataset_classes)
    if want != cfg.model.num_classes:
        raise ConfigError(f"continual.scenario = {cfg.continual.scenario!r} needs model.num_classes "
                          f"= {want} but it is {cfg.model.num_classes}; set it (0 = the dataset's)")


class ReplayMemory:
    """At most `size` training samples of past tasks, an equal share per task (Avalanche's
    experience-balanced buffer), chosen with the run's seed. It lives with the data: on the
    driver or the federated client, never sent anywhere."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self.parts: list[Split] = []
        self._pool = Split(torch.empty(0), torch.empty(0, dtype=torch.int64))   # the parts, joined

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def add_task(self, task: int, split: Split) -> None:
        share = self.size // (len(self.parts) + 1)
        self.parts = [p.subset(slice(0, share)) for p in self.parts]   # keep a prefix: random already
        pick = torch.randperm(len(split), generator=generator(self.seed, "memory", task))[:share]
        self.parts.append(split.subset(pick))
        self._pool = Split(torch.cat([p.images for p in self.parts]),
                           torch.cat([p.labels for p in self.parts]))

    def sample(self, n: int, gen: torch.Generator) -> Split:
        """n samples drawn uniformly (with replacement) from the memory."""
        return self._pool.subset(torch.randint(0, len(self._pool), (n,), generator=gen))

    def replay(self) -> Callable[[int, torch.Generator], Split] | None:
        """`sample`, for train_packets' replay, once the memory holds anything."""
        return self.sample if len(self) else None


def methods(objective: Objective, cfg: ExperimentConfig) -> list[str]:
    mode = cfg.train.predict
    if mode == "both":
        return ["softmax", "goodness"] if objective.supports_goodness else ["softmax"]
    if mode == "goodness" and not objective.supports_goodness:
        raise ConfigError(f"train.predict = 'goodness' but {objective.name} has no goodness; "
                          "use softmax")
    return [mode]


def headline_method(want: list[str]) -> str:
    """The method a run reports: goodness where measured (the SFFA paper's), else softmax."""
    return "goodness" if "goodness" in want else want[0]


def task_accuracy(forward: Callable[[Packet], Packet], objective: Objective, task: Task,
                  cfg: ExperimentConfig) -> dict[str, float]:
    """Accuracy on one task's test set by each prediction method (task-IL: its classes only),
    running packets through `forward` (an executor's eval_forward, a Stage's eval_step)."""
    want = methods(objective, cfg)
    correct = dict.fromkeys(want, 0)
    for start in range(0, len(task.test), EVAL_BATCH):
        x = task.test.images[start:start + EVAL_BATCH]
        y = task.test.labels[start:start + EVAL_BATCH]
        out = forward(objective.encode_eval(x, "goodness" in want))
        for m in want:
            scores = out[SCORES[m]].float().cpu()                       # (B, C)
            if cfg.continual.scenario == "task":
                mask = torch.full_like(scores, -math.inf)
                mask[:, list(task.classes)] = 0.0
                scores = scores + mask
            correct[m] += int((scores.argmax(1) == y).sum())
    return {m: c / max(len(task.test), 1) for m, c in correct.items()}


def stream_summary(cfg: ExperimentConfig, objective: Objective, tasks: list[Task],
                   matrices: dict[str, list[list[float]]], before: dict[str, list[float]],
                   weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What a task stream's summary.json reports: the headline method's matrix and CL measures,
    every method's, and the per-layer activity of the final weights."""
    h = headline_method(list(matrices))
    return {"scenario": cfg.continual.scenario, "strategy": cfg.continual.strategy,
            "tasks": [list(t.classes) for t in tasks], "method": h,
            "accuracy_matrix": matrices[h], **cl_metrics(matrices[h], before[h]),
            "by_method": {m: {"accuracy_matrix": mat, **cl_metrics(mat, before[m])}
                          for m, mat in matrices.items()},
            "before_training": before[h],
            "activity": layer_activity(weights, cfg, objective, tasks)}


def cl_metrics(matrix: list[list[float]], before: list[float]) -> dict[str, Any]:
    """Average accuracy, forgetting, backward and forward transfer of an accuracy matrix
    (row i: after training task i; column j: tested on task j), and the per-step curve."""
    t = len(matrix)
    final = matrix[-1]
    old = range(t - 1)
    return {
        "average_accuracy": sum(final) / t,
        "forgetting": (sum(max(matrix[i][j] for i in range(j, t - 1)) - final[j] for j in old)
                       / (t - 1)) if t > 1 else 0.0,
        "backward_transfer": sum(final[j] - matrix[j][j] for j in old) / (t - 1) if t > 1 else 0.0,
        "forward_transfer": (sum(matrix[j - 1][j] - before[j] for j in range(1, t)) / (t - 1)
                             if t > 1 else 0.0),
        "seen_accuracy": [sum(matrix[i][:i + 1]) / (i + 1) for i in range(t)],
    }


# -- EWC / SI: their state lives with whoever owns the layer ----------------------------------

def consolidates(cfg: ExperimentConfig) -> bool:
    return cfg.continual.strategy in ("ewc", "si")


def end_task(executor: Executor, cfg: ExperimentConfig) -> float:
    """The task boundary: every layer, wherever it runs, stores its EWC / SI importance (the
    stage workers by an EndTask call). The penalty the weights carried at the task's end, summed
    in layer order (the same number on every executor)."""
    if not consolidates(cfg):
        return 0.0
    ending = getattr(executor, "end_task", None)
    if ending is None:
        raise ConfigError(f"continual.strategy = {cfg.continual.strategy!r} needs an executor "
                          f"that ends tasks; {type(executor).__name__} does not (use inprocess "
                          "or pipeline)")
    penalties = ending()
    return float(sum(penalties[i] for i in sorted(penalties)))


def _task_line(task: Task, tasks: int, row: list[float]) -> str:
    seen = row[:task.index + 1]
    return (f"task {task.index + 1}/{tasks} classes {list(task.classes)}: accuracy on tasks seen "
            f"{sum(seen) / len(seen):.4f} (" + " ".join(f"{a:.3f}" for a in seen) + ")")


def _epoch_with_restarts(executor: Executor, packets: Callable[[], Iterator[Packet]], k: int,
                         cfg: ExperimentConfig, what: str) -> dict[str, Any]:
    """One epoch of a task; on a pipeline, a stage failure is survived up to pipeline.restarts
    times: the stages are recovered, the epoch's starting snapshot (weights, optimiser and EWC /
    SI state) restored, and the epoch rerun, ending as an undisturbed one would."""
    total = cfg.continual.epochs_per_task
    def run() -> dict[str, Any]:
        return executor.train_epoch(packets(), k, total)

    if not executor.recovers or cfg.pipeline.restarts == 0:
        return run()
    stats, events = rerun_from(executor, executor.snapshot(), cfg.pipeline.restarts, run, what)
    return {**stats, "restarts": len(events)}


# -- the run ------------------------------------------------------------------------------------

def run_continual(cfg: ExperimentConfig, executor: Executor, run_dir: Path | None = None,
                  progress: bool = True, overwrite: bool = False,
                  callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Train the task stream through `executor`; RUN_DIR (bpfree_core.run.rundir: locked, an earlier
    run refused unless `overwrite`) gets config.json, metrics.jsonl (one record per task) and
    summary.json (the accuracy matrix and every CL measure). Callbacks see each task's record
    (they observe: the accuracy matrix needs every task, so a stream is not stopped early)."""
    cfg = bind_data(cfg)
    with open_run_dir(run_dir, overwrite=overwrite) as rd:
        return _stream(cfg, executor, rd, progress, callbacks)


def _stream(cfg: ExperimentConfig, executor: Executor, rd: RunDir | None, progress: bool,
            callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    data = load_dataset(cfg.model.dataset, cfg.train.data_dir or None, cfg.model.data_fingerprint)
    _check_classes(cfg, data.spec.num_classes)
    tasks = split_tasks(data, cfg)
    objective = build_objective(cfg)
    want = methods(objective, cfg)
    headline = headline_method(want)
    c = cfg.continual
    memory = ReplayMemory(c.memory, cfg.train.seed) if c.strategy in MEMORY_STRATEGIES else None
    runlog = RunLog(cfg, rd, callbacks)
    before = [task_accuracy(executor.eval_forward, objective, task, cfg) for task in tasks]
    matrices: dict[str, list[list[float]]] = {m: [] for m in want}
    total = len(tasks) * c.epochs_per_task
    bar = progress_bar(total=total, enabled=progress, unit="epoch", desc="tasks", leave=False)
    for task in tasks:
        epochs = []
        for k in range(c.epochs_per_task):
            # batch draws numbered across the whole stream; the lr schedule restarts per task
            def packets(task: Task = task, k: int = k) -> Iterator[Packet]:
                return train_packets(objective, task.train, cfg, task.index * c.epochs_per_task + k,
                                     memory.replay() if memory is not None else None)
            epochs.append(_epoch_with_restarts(executor, packets, k, cfg,
                                               f"task {task.index + 1} epoch {k + 1}"))
            bar.update(1)
        penalty = end_task(executor, cfg)   # EWC's Fisher came from the task's last epoch
        if memory is not None:
            memory.add_task(task.index, task.train)
        rows = [task_accuracy(executor.eval_forward, objective, other, cfg) for other in tasks]
        for m in want:
            matrices[m].append([r[m] for r in rows])
        line = _task_line(task, len(tasks), matrices[headline][-1])
        if progress and not bar.disable:
            bar.write(line)
        else:
            log.info("%s", line)
        record = {"task": task.index + 1, "classes": list(task.classes),
                  "accuracy": {m: matrices[m][-1] for m in want},
                  "epochs": [{k: e[k] for k in ("layers", "seconds", "samples_per_second")}
                             for e in epochs],
                  "memory": len(memory) if memory is not None else 0,
                  "penalty": penalty}
        runlog.commit(task.index + 1, record)   # callbacks observe: the matrix needs every task
    bar.close()
    weights = executor.get_weights()
    return runlog.finish({
        **stream_summary(cfg, objective, tasks, matrices, {m: [b[m] for b in before] for m in want},
                         weights),
        "memory": len(memory) if memory is not None else 0, **executor.describe()}, weights)


# -- federated continual learning: every client sees the task stream --------------------------

def check_federated(cfg: ExperimentConfig) -> None:
    """Refuse a federated task stream that cannot run, before anything starts."""
    rounds_per_task(cfg)
    _check_classes(cfg, run_spec(cfg).num_classes)


def rounds_per_task(cfg: ExperimentConfig) -> int:
    rounds, tasks = cfg.federation.rounds, cfg.continual.tasks
    if rounds % tasks:
        raise ConfigError(f"continual.federated = true splits federation.rounds = {rounds} evenly over "
                          f"continual.tasks = {tasks}; make the rounds a multiple of the tasks")
    return rounds // tasks


def client_tasks(cfg: ExperimentConfig, client: int, num_classes: int) -> list[tuple[int, ...]]:
    """Client `client`'s task order (the classes of each task): the run's, or its own
    (continual.client_order = shuffled: the same tasks, in an order drawn per client)."""
    tasks = task_classes(cfg, num_classes)
    if cfg.continual.client_order == "shuffled":
        perm = torch.randperm(len(tasks), generator=generator(cfg.train.seed, "tasks", client + 1))
        tasks = [tasks[i] for i in perm.tolist()]
    return tasks


def client_round_data(cfg: ExperimentConfig, data: Split, client: int, rnd: int,
                      client_seed: int) -> tuple[Split, ReplayMemory | None]:
    """What client `client` (`data`: its partition) trains on in round `rnd` of the run `cfg`: its
    share of the current task, and (replay) a memory of its own earlier tasks, rebuilt from its
    data with its own seed every round: it never leaves the client."""
    check_federated(cfg)
    tasks = client_tasks(cfg, client, run_spec(cfg).num_classes)
    current = rnd // rounds_per_task(cfg)
    split = _task_split(data, tasks[current], 0, cfg)
    memory = None
    if cfg.continual.strategy in MEMORY_STRATEGIES:
        memory = ReplayMemory(cfg.continual.memory, client_seed)
        for i in range(current):
            memory.add_task(i, _task_split(data, tasks[i], 0, cfg))
    return split, memory


class TaskEvaluator:
    """The coordinator's view of a federated task stream: every task's test accuracy of a set
    of global weights (the rows of the accuracy matrix)."""

    def __init__(self, cfg: ExperimentConfig):
        data = load_dataset(cfg.model.dataset, cfg.train.data_dir or None, cfg.model.data_fingerprint)
        check_federated(cfg)
        self.cfg, self.tasks = cfg, split_tasks(data, cfg)
        self.objective = build_objective(cfg)
        self.methods = methods(self.objective, cfg)

    def row(self, weights: dict[str, torch.Tensor]) -> dict[str, list[float]]:
        stage = Stage(build_layers(self.cfg, objective=self.objective), self.cfg.train.device)
        stage.load_state_dict(weights)
        accs = [task_accuracy(stage.eval_step, self.objective, t, self.cfg) for t in self.tasks]
        return {m: [a[m] for a in accs] for m in self.methods}

    def summary(self, rows: list[dict[str, list[float]]], before: dict[str, list[float]],
                weights: dict[str, torch.Tensor]) -> dict[str, Any]:
        matrices = {m: [r[m] for r in rows] for m in self.methods}
        out = stream_summary(self.cfg, self.objective, self.tasks, matrices, before, weights)
        if self.cfg.continual.client_order == "shuffled":
            out["by_client"] = self.by_client(out["accuracy_matrix"], before[out["method"]])
        return out

    def by_client(self, matrix: list[list[float]], before: list[float]) -> dict[str, dict[str, float]]:
        """Each client's CL measures in its own task order (continual.client_order = shuffled):
        the global matrix (row i: after the i-th block of rounds; column j: the run's task j)
        with its columns in the order that client met the tasks."""
        classes = [t.classes for t in self.tasks]
        out = {}
        for k in range(self.cfg.federation.clients):
            order = [classes.index(t) for t in client_tasks(self.cfg, k, len(sum(classes, ())))]
            own = cl_metrics([[row[j] for j in order] for row in matrix], [before[j] for j in order])
            out[str(k)] = {m: own[m] for m in ("average_accuracy", "forgetting", "backward_transfer")}
        return out


def continual_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """cfg with what the scenario implies: domain-incremental tells 2 labels apart."""
    n = model_classes(cfg, run_spec(cfg).num_classes)
    return cfg if n == cfg.model.num_classes else cfg.with_overrides([f"model.num_classes={n}"])


# -- what the SFFA paper suggests is the mechanism: sparse, specialised units ------------------

def layer_activity(weights: dict[str, torch.Tensor], cfg: ExperimentConfig, objective: Objective,
                   tasks: list[Task], samples: int = 1000) -> dict[str, dict[str, float]]:
    """Per layer, on each task's test images (neutral label): the share of zero activations
    (sparsity), and how many units are specialised: a unit is, when more than half its mean
    activity over the tasks comes from one task (uniform would be 1 / tasks)."""
    stage = Stage(build_layers(cfg, objective=objective), "cpu")
    stage.load_state_dict(weights)
    per_task: list[dict[str, torch.Tensor]] = []
    zeros: dict[str, list[float]] = {}
    for task in tasks:
        acts = _activations(stage, objective, task.test.images[:samples])
        per_task.append({k: a.mean(0) for k, a in acts.items()})             # (D,) mean per unit
        for k, a in acts.items():
            zeros.setdefault(k, []).append(float((a <= 0).float().mean()))
    out = {}
    for k in per_task[0]:
        m = torch.stack([t[k] for t in per_task])                            # (tasks, D)
        total = m.sum(0)
        alive = total > 0
        share = m.max(0).values[alive] / total[alive]
        out[k] = {"sparsity": sum(zeros[k]) / len(zeros[k]), "dead_units": float((~alive).float().mean()),
                  "specialised_units": float((share > 0.5).float().mean()) if alive.any() else 0.0,
                  "mean_top_task_share": float(share.mean()) if alive.any() else 0.0}
    return out


@torch.no_grad()
def _activations(stage: Stage, objective: Objective, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each layer's activations (B, D) on the neutral input: the ReLU modules' outputs where a
    layer has them (bp), else the activations it hands on."""
    captured: dict[str, torch.Tensor] = {}
    packet = objective.encode_eval(x, False)
    for layer in stage.layers:
        packet, relus, handed = eval_with_units(layer, packet)
        captured.update({f"{layer.index}.{j}": r for j, r in enumerate(relus)})
        if not relus and handed is not None:
            captured[str(layer.index)] = handed
    return captured
