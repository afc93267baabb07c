"""Continual-learning benchmark: the SFFA paper's SplitMNIST protocol for every objective and BP.

    python -m bpfree.bench.continual --data-dir ../shared/datasets --out bench/results
    python -m bpfree.bench.continual --only sffa-replay,bp-replay --seeds 0,1,2 ...

writes bench/results/continual.md (the table, with the command of every row) and continual.json
after every finished run, so a stopped benchmark keeps what it finished (`--reuse` skips rows
already in continual.json). Run directories go to runs/bench-continual/ (git-ignored).

The protocol (SFFA authors' code, arXiv 2409.07387): 5 tasks of 2 classes, 2 layers of 1400
units, Adam lr 1e-3 (constant), batch 512, 2 epochs per task, replay memory of 500 samples. The
hyper-parameters are the paper's, not tuned here (nothing was chosen by looking at test data).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bpfree.bench.accuracy import machine_summary
from bpfree_core.config import ExperimentConfig
from bpfree_core.continual.stream import continual_config
from bpfree_core.run.checkpoint import atomic_write_json

RESULTS = Path(__file__).resolve().parent / "results"
PAPER = ("model.hidden=1400,1400", "optim.lr=1e-3", "optim.cooldown=false", "train.batch_size=512",
         "continual.epochs_per_task=2", "continual.memory=500", "train.threads=1")
PUBLISHED = {  # SFFA paper, SplitMNIST (from the issue; the paper's tables are not retrievable here)
    ("sffa", "class", "replay"): "90.03%", ("bp", "class", "replay"): "87.75%",
    ("sffa", "domain", "replay"): "95.17%", ("bp", "domain", "replay"): "94.16%",
    ("sffa-paper", "class", "replay"): "90.03%",
    ("sffa", "class", "naive"): "~20%", ("bp", "class", "naive"): "~20%",
}
ALGOS = {"sffa": ("model.algorithm=sffa", "train.predict=both"),
         "symba": ("model.algorithm=symba", "train.predict=both"),
         "ff": ("model.algorithm=ff", "train.predict=both"),
         "bp": ("model.algorithm=bp", "train.predict=softmax"),
         # the authors' SFFA layer (bench/results/continual_ablation.md): what
         # deploy/continual-sffa-paper.toml holds, beside PAPER
         "sffa-paper": ("model.algorithm=sffa", "train.predict=both",
                        "objective.pattern_density=0.2", "objective.activation=sigmoid",
                        "objective.top_k=15")}


@dataclass(frozen=True)
class Row:
    algorithm: str
    scenario: str
    strategy: str
    clients: int = 0     # > 0: federated, K clients with IID shares of every task, 2 rounds per task
                         # of 1 local epoch, batch 512 / K (as many steps per round as the single
                         # process makes per epoch); each client replays its own 500-sample memory
    order: str = "same"  # federated: continual.client_order (shuffled: each client its own order)

    @property
    def name(self) -> str:
        fed = f"-fed{self.clients}" if self.clients else ""
        fed += "-shuffled" if self.order == "shuffled" else ""
        return f"{self.algorithm}-{self.scenario}-{self.strategy}{fed}"

    def overrides(self, seed: int) -> list[str]:
        fed = ["continual.federated=true", f"federation.clients={self.clients}",
               "federation.rounds=10", "federation.local_epochs=1",
               f"train.batch_size={512 // self.clients}",
               f"continual.client_order={self.order}"] if self.clients else []
        return [*PAPER, *ALGOS[self.algorithm], f"continual.scenario={self.scenario}",
                f"continual.strategy={self.strategy}", f"train.seed={seed}", *fed]


ROWS = ([Row(a, "class", "replay") for a in ALGOS] + [Row("sffa", "class", "replay", clients=4)]
        + [Row(a, "class", "naive") for a in ("sffa", "bp")]
        + [Row(a, "domain", "replay") for a in ("sffa", "bp")]
        + [Row(a, "class", s) for s in ("ewc", "si", "agem") for a in ("sffa", "bp")]
        + [Row("sffa-paper", "class", "agem")]
        + [Row("sffa-paper", "class", "replay", clients=4, order="shuffled")])


def run_row(row: Row, seed: int, data_dir: str, sets: list[str], run_root: Path) -> dict[str, Any]:
    from bpfree.server.continual import continual

    cfg = continual_config(ExperimentConfig().with_overrides(
        [*row.overrides(seed), f"train.data_dir={data_dir}", *sets]))
    torch.set_num_threads(cfg.train.threads)
    run_dir = run_root / f"{row.name}-s{seed}"
    if row.clients:
        # The in-process federated reference: by the golden rule (tests/test_continual.py) it ends
        # with the weights of the same federation on Flower with pipelined clients.
        from bpfree.server.coordinator import Coordinator
        from bpfree.server.reference import InProcessTransport

        t0 = time.time()
        fed = Coordinator(cfg, run_dir, evaluate=False, overwrite=True).run(InProcessTransport(cfg))
        s = {**fed["continual"], "wall_seconds": time.time() - t0}
    else:
        s = continual(cfg, run_dir=run_dir, progress=False, overwrite=True)
    keep = ("method", "average_accuracy", "forgetting", "backward_transfer", "forward_transfer",
            "accuracy_matrix", "activity", "wall_seconds")
    return {"row": row.name, "seed": seed, **{k: s[k] for k in keep},
            **({"by_client": s["by_client"]} if "by_client" in s else {}),
            "by_method": {m: {k: v[k] for k in ("average_accuracy", "forgetting")}
                          for m, v in s["by_method"].items()}}


def _pm(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.2f}%"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}%"


def markdown(res: dict[str, Any]) -> str:
    lines = [
        "# Continual learning on SplitMNIST (5 tasks x 2 classes)",
        "",
        "Generated by " + ", ".join(f"`{c}`" for c in dict.fromkeys(r["command"] for r in res["runs"]))
        + f" on {res['machine']}. Protocol of the SFFA paper's code "
        "(arXiv 2409.07387): 2 x 1400 units, Adam lr 1e-3 constant, batch 512, 2 epochs per task, "
        "replay memory 500 (an equal share per past task; each training batch gets as many memory "
        "samples), EWC lambda 1e5, SI c 1. Hyper-parameters are the paper's, not tuned here. "
        "FF-family rows predict by goodness (the paper's method); the softmax column is their "
        "local heads. Accuracy = mean over the 5 tasks' test sets after the last task; forgetting "
        "= mean drop from each task's best accuracy; mean ± std over the seeds shown. FWT compares "
        "a task's accuracy just before it is trained with its accuracy at initialisation: in "
        "class-IL an unseen class is never predicted, so it is negative by construction. Sparsity "
        "(share of zero activations) and specialised units (more than half of a unit's mean "
        "activity from one task) are per layer, on the neutral input, from the first seed's run. "
        "The federated row: 4 clients with IID shares of every task, 2 rounds of 1 local epoch per "
        "task, batch 128 (as many steps per round as the single process makes per epoch), each "
        "client replaying its own 500-sample memory; numbers from the in-process federated "
        "reference, which the tests show equal to Flower with pipelined clients. `sffa-paper` rows "
        "use the authors' layer (sigmoid units, the 15 largest of each half, Bernoulli(0.2) codes: "
        "deploy/continual-sffa-paper.toml); `agem` is A-GEM made local (each layer projects its "
        "own update against its own gradient on a memory batch; bp: standard A-GEM), memory 500; "
        "`-shuffled` rows give every client its own task order, and the line under the table its "
        "forgetting in that order.",
        "",
        "One row again: `python -m bpfree.bench.continual --only ROW --seeds 0,1,2 --data-dir DIR` (its "
        "overrides are in continual.json).",
        "",
        "| row | algorithm | scenario | strategy | seeds | accuracy | softmax | forgetting | BWT | "
        "FWT | sparsity L0/L1 | specialised L0/L1 | published | wall/run |",
        "|" + "---|" * 14,
    ]
    by_row: dict[str, list[dict[str, Any]]] = {}
    for r in res["runs"]:
        by_row.setdefault(r["row"], []).append(r)
    for row in ROWS:
        rs = by_row.get(row.name)
        if not rs:
            continue
        act = rs[0]["activity"]
        keys = sorted(act)[:2]
        soft = [r["by_method"]["softmax"]["average_accuracy"] for r in rs if "softmax" in r["by_method"]]
        lines.append(
            f"| {row.name} | {row.algorithm}{f' ({row.clients} clients)' if row.clients else ''} | "
            f"{row.scenario}-IL | {row.strategy} | "
            f"{','.join(str(r['seed']) for r in rs)} | {_pm([r['average_accuracy'] for r in rs])} | "
            f"{_pm(soft) if soft and rs[0]['method'] != 'softmax' else '—'} | "
            f"{_pm([r['forgetting'] for r in rs])} | "
            f"{100 * statistics.mean(r['backward_transfer'] for r in rs):+.1f} pt | "
            f"{100 * statistics.mean(r['forward_transfer'] for r in rs):+.1f} pt | "
            + "/".join(f"{100 * act[k]['sparsity']:.0f}%" for k in keys) + " | "
            + "/".join(f"{100 * act[k]['specialised_units']:.0f}%" for k in keys) + " | "
            f"{PUBLISHED.get((row.algorithm, row.scenario, row.strategy), '—')} | "
            f"{statistics.mean(r['wall_seconds'] for r in rs) / 60:.1f} min |")
    lines.append("")
    for row in ROWS:   # federated rows with each client's own task order
        rs = [r for r in by_row.get(row.name, []) if "by_client" in r]
        if rs:
            per = [v["forgetting"] for r in rs for v in r["by_client"].values()]
            lines.append(f"{row.name}: forgetting per client, in its own task order, "
                         f"{_pm(per)} over {len(per)} (client, seed) pairs "
                         f"(min {100 * min(per):.2f}%, max {100 * max(per):.2f}%); global "
                         f"{_pm([r['forgetting'] for r in rs])}.")
    if any("by_client" in r for r in res["runs"]):
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bpfree.bench.continual", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("BPFREE_DATA_DIR", ""))
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--only", help="comma-separated row names (default: every row)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--set", action="append", default=[], help="extra overrides for every run")
    p.add_argument("--reuse", action="store_true", help="keep rows already in OUT/continual.json")
    args = p.parse_args(argv)
    rows = [r for r in ROWS if not args.only or r.name in args.only.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    path = args.out / "continual.json"
    res = json.loads(path.read_text()) if args.reuse and path.exists() else {"runs": []}
    command = "python -m bpfree.bench.continual " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    res.update(machine=machine_summary(), protocol=list(PAPER))
    done = {(r["row"], r["seed"]) for r in res["runs"]}
    for row in rows:
        for seed in seeds:
            if (row.name, seed) in done:
                continue
            t0 = time.time()
            res["runs"].append({**run_row(row, seed, args.data_dir, args.set,
                                          Path("runs/bench-continual")), "command": command,
                                "overrides": row.overrides(seed) + args.set})
            last = res["runs"][-1]
            print(f"{row.name} seed {seed}: accuracy {last['average_accuracy']:.4f}, forgetting "
                  f"{last['forgetting']:.4f} ({time.time() - t0:.0f} s)", flush=True)
            args.out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, res)
            (args.out / "continual.md").write_text(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
