"""Federation at scale: seconds per round, coordinator memory and bytes per round for K clients,
beside a plain Flower app measured in the same run.

    python -m bpfree.bench.scale --data-dir ../shared/datasets --out bench/results

For each K in --clients and each fraction in --fractions: `bpfree simulate` (in-process clients,
Flower's simulation runtime, SymBa 2x500) for --rounds rounds, and the Flower floor
(bench/flower_floor: Flower's FedAvg, ClientApps that reply with what they got, float32 arrays
of the model's sizes) with the same K, fraction and rounds. Steady rounds are rounds 2..R
(round 1 also starts the ClientApp actors). The floor trains nothing, so bpfree's round is
compared with it after taking out its training: the clients' summed training seconds over the
ClientApp actors that run at once (simulate.client_actors: one per core for in-process clients),
or the slowest client's if that is longer. The columns after it say where the rest goes (the
coordinator's aggregation and evaluation, the ClientApp handlers' time outside training).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bpfree.bench.accuracy import machine_summary

HERE = Path(__file__).resolve().parent
BASE = ["model.algorithm=symba", "model.hidden=500,500", "train.threads=1", "train.jitter=0",
        "train.batch_size=50", "federation.executor=inprocess", "federation.local_epochs=1",
        "federation.min_train_clients=2"]


def _steady(values: list[float]) -> float:
    rest = values[1:] or values
    return sum(rest) / len(rest)


def bpfree_row(k: int, fraction: float, rounds: int, data_dir: str, extra: list[str]) -> dict[str, Any]:
    from bpfree.server.simulate import simulate
    from bpfree_core.config import load_config

    cfg = load_config(None, [f"train.data_dir={data_dir}", *BASE, f"federation.clients={k}",
                             f"federation.fraction_train={fraction}", f"federation.rounds={rounds}",
                             *extra])
    with tempfile.TemporaryDirectory(prefix="bpfree-scale-") as tmp:
        t0 = time.perf_counter()
        summary = simulate(cfg, Path(tmp) / "run")
        wall = time.perf_counter() - t0
        lines = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    from bpfree.server.simulate import client_actors

    actors = client_actors(cfg)
    secs = [x["seconds"] for x in lines]
    clients = [list(x["client_metrics"].values()) for x in lines]
    per_round = [sum(v for key, v in s.items() if key != "slowest_client_training") for s in secs]
    return {"wall_s": wall, "round_s": [round(x, 3) for x in per_round],
            "steady_round_s": _steady(per_round),
            "slowest_training_s": _steady([s["slowest_client_training"] for s in secs]),
            "training_s": _steady([max(s["slowest_client_training"],
                                       sum(m.get("train_seconds", 0.0) for m in c) / min(actors, len(c)))
                                   for s, c in zip(secs, clients, strict=True)]),
            "handlers_s": _steady([sum(m.get("handler_seconds", 0.0) - m.get("train_seconds", 0.0)
                                       for m in c) / min(actors, len(c)) for c in clients]),
            "actors": actors,
            "aggregate_s": _steady([s["aggregate"] for s in secs]),
            "evaluate_s": _steady([s["evaluate"] + s.get("checkpoint", 0.0) for s in secs]),
            "clients_s": _steady([s["clients"] for s in secs]),
            "rss_mb": [round(x.get("rss_mb", 0.0)) for x in lines],
            "bytes_per_round": _steady([x["bytes"]["sent"] + x["bytes"]["received"] for x in lines]),
            "sampled": len(lines[-1]["sampled"]), "accuracy": summary["test_accuracy"]}


def floor_row(k: int, fraction: float, rounds: int, sizes: list[int]) -> dict[str, Any]:
    from bpfree.server.flower_run import FlowerRun
    from bpfree.server.simulate import toml_table

    with tempfile.TemporaryDirectory(prefix="bpfree-floor-") as tmp:
        out = Path(tmp) / "floor.json"
        engine = FlowerRun(Path(tmp) / "logs")
        t0 = time.perf_counter()
        try:
            engine.start()
            engine.run(toml_table({"sizes": ",".join(map(str, sizes)), "out-file": str(out)})
                       + f"\nrounds = {rounds}\nfraction-train = {float(fraction)}\n",
                       f"num-supernodes={k} client-resources-num-cpus=1 init-args-num-cpus=2",
                       app_dir=HERE / "flower_floor")
        finally:
            engine.close()
        wall = time.perf_counter() - t0
        marks = json.loads(out.read_text())["marks"]   # round 0 = before round 1
    per_round = [b["t"] - a["t"] for a, b in zip(marks, marks[1:], strict=False)]
    sampled = min(k, max(int(k * fraction), 2))
    return {"wall_s": wall, "round_s": [round(x, 3) for x in per_round],
            "steady_round_s": _steady(per_round), "rss_mb": [round(m["rss_mb"]) for m in marks[1:]],
            "bytes_per_round": 2 * 4 * sum(sizes) * sampled}


def model_sizes(data_dir: str, extra: list[str]) -> list[int]:
    from bpfree_core.config import load_config
    from bpfree_core.federation.client import stack_template

    cfg = load_config(None, [f"train.data_dir={data_dir}", *BASE, *extra])
    return [t.numel() for t in stack_template(cfg).values() if t.is_floating_point()]


def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = model_sizes(args.data_dir, args.set)
    rows = []
    for k in args.clients:
        for fraction in args.fractions:
            print(f"K = {k}, fraction {fraction}: bpfree ...", file=sys.stderr, flush=True)
            ours = bpfree_row(k, fraction, args.rounds, args.data_dir, args.set)
            print(f"K = {k}, fraction {fraction}: plain Flower ...", file=sys.stderr, flush=True)
            floor = floor_row(k, fraction, args.rounds, sizes)
            rows.append({"clients": k, "fraction": fraction, "bpfree": ours, "flower": floor})
    return {"rows": rows, "settings": [*BASE, *args.set], "rounds": args.rounds,
            "model_floats": sum(sizes), "machine": machine_summary()}


def table(res: dict[str, Any], command: str) -> str:
    out = [f"# Federation at scale: bpfree beside plain Flower\n\n`{command}`\n\n{res['machine']}; "
           f"{res['rounds']} rounds, steady = mean of rounds 2..{res['rounds']}; model "
           f"{res['model_floats'] / 1e6:.2f} M floats; settings `{' '.join(res['settings'])}`.\n",
           "| K | fraction | sampled | bpfree round s | training s (summed / actors) | round - training s | "
           "Flower floor round s | (round - training) / floor | aggregate s | evaluate+checkpoint s | "
           "handlers - training s | bpfree wall s | floor wall s | coordinator RSS MB (per round) | "
           "floor RSS MB | MB moved / round | accuracy |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        b, f = r["bpfree"], r["flower"]
        rest = b["steady_round_s"] - b["training_s"]
        rss_b, rss_f = (" / ".join(map(str, x["rss_mb"])) for x in (b, f))
        out.append(
            f"| {r['clients']} | {r['fraction']:g} | {b['sampled']} | {b['steady_round_s']:.2f} | "
            f"{b['training_s']:.2f} ({b.get('actors', '?')}) | {rest:.2f} | {f['steady_round_s']:.2f} | "
            f"{rest / f['steady_round_s']:.2f}x | {b['aggregate_s']:.2f} | {b['evaluate_s']:.2f} | "
            f"{b.get('handlers_s', float('nan')):.2f} | {b['wall_s']:.0f} | "
            f"{f['wall_s']:.0f} | {rss_b} | {rss_f} | "
            f"{b['bytes_per_round'] / 2**20:.0f} | {b['accuracy']:.4f} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 1.0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--out", type=Path, default=None, help="folder for scale.json and scale.md")
    args = parser.parse_args(argv)
    res = run(args)
    command = "python -m bpfree.bench.scale " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    text = table(res, command)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "scale.json").write_text(json.dumps(res, indent=1))
        (args.out / "scale.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
