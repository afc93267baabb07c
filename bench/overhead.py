"""Fixed costs: how much of `bpfree simulate`'s wall is client training, beside a plain Flower app.

    python -m bpfree.bench.overhead --data-dir ../shared/datasets --out bench/results

Each case runs `bpfree simulate` as a user does (a fresh process, the default recipe plus the
case's --set options) and then the Flower floor (bench/flower_floor: Flower's FedAvg, no-op
ClientApps exchanging float32 arrays of the model's sizes) with the same K and rounds, in the same
run. From RUN_DIR/metrics.jsonl: training = the slowest client's training summed over rounds;
per round, bpfree's round minus its training is what a round costs beyond training, and the
floor's round is what Flower alone costs; per run, the wall outside every round is start-up and
shutdown (SuperLink, stage workers, Flower's simulation runtime, Ray, teardown).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bpfree.bench.accuracy import machine_summary
from bpfree_core.run.checkpoint import atomic_write_json

CASES = {"default": [], "1 round, 1000 images": ["federation.rounds=1", "train.train_limit=1000"]}


def bpfree_case(data_dir: str, extra: list[str]) -> dict[str, Any]:
    """One `bpfree simulate` in a fresh process: wall, per-round seconds, training."""
    with tempfile.TemporaryDirectory(prefix="bpfree-overhead-") as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "bpfree", "simulate", "--data-dir", data_dir, "--out",
               str(run_dir), "--no-plot", "--no-progress", *[a for x in extra for a in ("--set", x)]]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            raise SystemExit(f"bench.overhead: `{' '.join(cmd)}` failed: "
                             f"{(done.stderr or done.stdout).strip().splitlines()[-1:]}")
        rounds = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
        config = json.loads((run_dir / "config.json").read_text())
        # every stage worker logs one line per Configure it serves (client.worker)
        configures = sum(log.read_text().count("configured run")
                         for log in (run_dir / "logs").glob("client*/stage*.log"))
    secs = [r["seconds"] for r in rounds]
    round_s = [sum(v for k, v in s.items() if k != "slowest_client_training") for s in secs]
    return {"wall_s": wall, "round_s": round_s, "training_s": [s["slowest_client_training"] for s in secs],
            "clients": config["federation"]["clients"], "rounds": len(rounds),
            "stages": config["pipeline"]["stages"], "configures": configures,
            "accuracy": rounds[-1]["test_accuracy_headline"], "config": config}


def model_sizes(config: dict[str, Any]) -> list[int]:
    from bpfree_core.config import ExperimentConfig
    from bpfree_core.federation.client import stack_template

    weights = stack_template(ExperimentConfig.from_dict(config))
    return [t.numel() for t in weights.values() if t.is_floating_point()]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bpfree.bench.scale import floor_row

    rows = []
    for name, extra in CASES.items():
        print(f"{name}: bpfree simulate ...", file=sys.stderr, flush=True)
        ours = bpfree_case(args.data_dir, [*extra, *args.set])
        print(f"{name}: plain Flower ...", file=sys.stderr, flush=True)
        floor = floor_row(ours["clients"], 1.0, ours["rounds"], model_sizes(ours.pop("config")))
        rows.append({"case": name, "settings": [*extra, *args.set], "bpfree": ours, "flower": floor})
    return {"rows": rows, "machine": machine_summary()}


def summarise(row: dict[str, Any]) -> dict[str, float]:
    b, f = row["bpfree"], row["flower"]
    training, rounds = sum(b["training_s"]), sum(b["round_s"])
    beyond = [r - t for r, t in zip(b["round_s"], b["training_s"], strict=True)]
    return {"wall": b["wall_s"], "training": training, "share": training / b["wall_s"],
            "run": b["wall_s"] - rounds, "floor_run": f["wall_s"] - sum(f["round_s"]),
            "first": beyond[0], "steady": sum(beyond[1:]) / max(len(beyond) - 1, 1),
            "floor_first": f["round_s"][0],
            "floor_steady": sum(f["round_s"][1:]) / max(len(f["round_s"]) - 1, 1),
            "floor_wall": f["wall_s"], "accuracy": b["accuracy"],
            "configures": b.get("configures", -1), "stage_workers": b["clients"] * b.get("stages", 0)}


def table(res: dict[str, Any], command: str) -> str:
    out = [f"# Fixed costs: bpfree simulate beside plain Flower\n\n`{command}`\n\n{res['machine']}. "
           "training = the slowest client's training summed over rounds; outside rounds = wall "
           "minus every round (start-up and shutdown); beyond training = a round minus its "
           "training (round 1 also waits for Ray and the ClientApp actors to start); Configure calls "
           "= what the stage workers served over the whole run (one per worker: configured once "
           "per run, rounds 2..N attach).\n",
           "| case | wall s | training s | training share | outside rounds s | Flower floor "
           "outside rounds s | round 1 beyond training s | Flower floor round 1 s | later rounds "
           "beyond training s | Flower floor later round s | Flower floor wall s | Configure calls "
           "(stage workers) | accuracy |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in res["rows"]:
        s = summarise(row)
        out.append(f"| {row['case']} | {s['wall']:.1f} | {s['training']:.1f} | {s['share']:.0%} | "
                   f"{s['run']:.1f} | {s['floor_run']:.1f} | {s['first']:.1f} | "
                   f"{s['floor_first']:.2f} | {s['steady']:.2f} | {s['floor_steady']:.2f} | "
                   f"{s['floor_wall']:.1f} | {s['configures']} ({s['stage_workers']}) | "
                   f"{s['accuracy']:.4f} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="added to every case (e.g. federation.executor=inprocess)")
    parser.add_argument("--out", type=Path, default=None, help="folder for overhead.json/.md")
    args = parser.parse_args(argv)
    res = run(args)
    command = "python -m bpfree.bench.overhead " + " ".join(argv if argv is not None else sys.argv[1:])
    text = table(res, command)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.out / "overhead.json", res)
        (args.out / "overhead.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
