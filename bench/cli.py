"""`bpfree bench`: the project's benchmarks behind one command.

    bpfree bench sweep --preset readme --data-dir ../shared/datasets --out bench/results
    bpfree bench sweep --stages 1,2 --batch-size 50,100 --wire float32,bfloat16 --grid
    bpfree bench pipeline --data-dir ../shared/datasets      # = python -m bpfree.bench.pipeline ...
    bpfree bench federated --data-dir ../shared/datasets     # = python -m bpfree.bench.federated ...
    bpfree bench accuracy --data-dir ../shared/datasets      # = python -m bpfree.bench.accuracy ...
    bpfree bench gpu-grid --data-dir DIR --budget 500        # = python -m bpfree.bench.gpu_grid ...
    bpfree bench step --data-dir ../shared/datasets          # = python -m bpfree.bench.step ...
    bpfree bench links --quick --data-dir ../shared/datasets # = python -m bpfree.bench.links ...
    bpfree bench overhead --data-dir ../shared/datasets      # = python -m bpfree.bench.overhead ...
    bpfree bench step --ceiling --data-dir ../shared/datasets # each objective vs the matmul ceiling
    bpfree bench precision --data-dir ../shared/datasets     # train.precision = bf16 vs float32
    bpfree bench gpu-check                                   # on a CUDA machine: bench/gpu_check.sh
    bpfree bench fashion --data FILE.npz deploy/recipes/fashion-cpu.toml  # recipes on F-MNIST dev

`sweep` (bench/sweep.py) measures throughput, per-stage timelines and the machine's ceilings and
prints the model's prediction beside every measurement; the other subcommands run the existing
benchmark modules with the arguments that follow them (`bpfree bench pipeline --help`).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import shlex
import sys
import time
from pathlib import Path

from bpfree_core.errors import ConfigError

# subcommand -> (module with main(argv), help)
FORWARDED = {
    "accuracy": ("bpfree.bench.accuracy", "test accuracy of every algorithm (table + json)"),
    "pipeline": ("bpfree.bench.pipeline", "S stage processes vs the reference; stream vs raw transports"),
    "federated": ("bpfree.bench.federated", "K pipelined Flower clients vs the in-process references"),
    "gpu-grid": ("bpfree.bench.gpu_grid", "many accuracy runs at once on one GPU, sized to a time budget"),
    "step": ("bpfree.bench.step", "training-step throughput: optimiser kernels, host syncs (CPU)"),
    "links": ("bpfree.bench.links", "a pipeline across separate hosts (namespaces) on shaped links"),
    "overhead": ("bpfree.bench.overhead", "bpfree simulate's wall outside training, beside plain Flower"),
    "precision": ("bpfree.bench.precision", "train.precision = bf16 beside float32: accuracy, samples/s"),
    "fashion": ("bpfree.bench.fashion", "recipes and variants on F-MNIST dev (deploy/recipes/*.toml)"),
    "gpu-check": ("bpfree.bench.gpu_check", "the GPU rows: step vs the GPU's roofline, S = 1, 2 on one GPU"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    s = sub.add_parser("sweep", help="throughput sweep over S, K, batch, width, wire, window",
                       description="Throughput sweep: samples/s, per-stage busy/idle/blocked, "
                       "bubble, bytes/s per link, round split, model prediction, ceilings.")
    s.add_argument("--preset", default="readme", help="readme (the committed table, ~5-10 min on "
                   "2 cores) | tiny (seconds); the options below override its values")
    s.add_argument("--data-dir", default=os.environ.get("BPFREE_DATA_DIR", ""),
                   help="directory with the MNIST IDX .gz files")
    s.add_argument("--out", type=Path, default=Path("bench/results"),
                   help="where throughput.{csv,json,md} and throughput_*.png go")
    s.add_argument("--run-dir", type=Path, help="metrics.jsonl (+ TensorBoard) of this run "
                   "(default runs/bench-sweep-<time>)")
    for flag, help_text in (("stages", "S values, e.g. 1,2,4"), ("clients", "K values, e.g. 1,2"),
                            ("batch-size", "batch sizes"), ("width", "layer widths"),
                            ("wire", "wire dtypes: float32,bfloat16,float16"),
                            ("window", "in-flight windows")):
        s.add_argument(f"--{flag}", help=help_text + " (comma-separated)")
    s.add_argument("--layers", type=int, help="hidden layers of WIDTH units (S must divide into them)")
    s.add_argument("--images", type=int, help="training images per epoch (per client at K > 1)")
    s.add_argument("--epochs", type=int, help="measured epochs per point after a warm-up")
    s.add_argument("--rounds", type=int, help="federated rounds at K > 1")
    s.add_argument("--grid", action="store_true", help="every combination of the values instead "
                   "of one factor at a time around the baseline (the first value of each)")
    s.add_argument("--config", help="TOML config the points start from (model.hidden, batch size, "
                   "S, wire and window are set per point)")
    s.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="other config overrides, e.g. model.algorithm=symba")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--render-only", action="store_true", help="rewrite OUT's table, CSV and plots "
                   "from OUT/throughput.json (derived columns recomputed); measure nothing")
    s.set_defaults(_bench_run=run_sweep_cli)
    for name, (module, help_text) in FORWARDED.items():
        p = sub.add_parser(name, help=help_text, description=f"{help_text} (runs `python -m "
                           f"{module}` with the arguments that follow)", add_help=False,
                           prefix_chars="\x01")   # every following word, --help too, goes on
        p.add_argument("args", nargs=argparse.REMAINDER)
        p.set_defaults(_bench_module=module)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "_bench_run", None):
        return args._bench_run(args)
    module = importlib.import_module(args._bench_module)
    return int(module.main(list(args.args)) or 0)


_FIELDS = {"stages": int, "clients": int, "batch_size": int, "width": int, "wire": str, "window": int}


def plan_from_args(args: argparse.Namespace):  # noqa: ANN201 - bench.sweep.Plan
    from bpfree.bench.sweep import PRESETS

    if args.preset not in PRESETS:
        raise ConfigError(f"--preset {args.preset!r} is unknown; choose one of {', '.join(PRESETS)}")
    plan = PRESETS[args.preset]
    values = dict(plan.values)
    baseline = plan.baseline
    given = {}
    for key, kind in _FIELDS.items():
        raw = getattr(args, key, None)
        if raw is None:
            continue
        try:
            vals = tuple(kind(v.strip()) for v in raw.split(",") if v.strip())
        except ValueError:
            raise ConfigError(f"--{key.replace('_', '-')} {raw!r}: expected comma-separated "
                              f"{'integers' if kind is int else 'names'}") from None
        if not vals:
            raise ConfigError(f"--{key.replace('_', '-')} needs at least one value")
        given[key] = vals
    if given:
        # The given factors' first values become the baseline; only given factors are swept.
        baseline = dataclasses.replace(baseline, **{k: v[0] for k, v in given.items()})
        values = {k: v for k, v in given.items() if len(v) > 1} if not args.grid else given
    changes = {k: getattr(args, k) for k in ("layers", "images", "epochs", "rounds")
               if getattr(args, k) is not None}
    return dataclasses.replace(plan, baseline=baseline, values=values,
                               grid=args.grid or plan.grid, **changes)


def run_sweep_cli(args: argparse.Namespace) -> int:
    from bpfree.bench.sweep import run_sweep
    from bpfree.bench.sweep_report import summary_rows, text_table
    from bpfree_core.config import load_config

    if args.render_only:
        from bpfree.bench.sweep import rerender

        res = rerender(args.out)
        print(text_table(*summary_rows(res)))
        return 0
    plan = plan_from_args(args)
    if not args.data_dir:
        raise ConfigError("--data-dir is needed: the directory holding the MNIST IDX .gz files "
                          "(or set BPFREE_DATA_DIR)")
    base = load_config(args.config, [f"train.data_dir={args.data_dir}", *args.set])
    run_dir = args.run_dir or Path("runs") / time.strftime("bench-sweep-%Y%m%d-%H%M%S")
    command = "bpfree " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    res = run_sweep(plan, base, args.out, run_dir, progress=not args.no_progress, command=command)
    head, rows = summary_rows(res)
    print()
    print(text_table(head, rows))
    print(f"\nload average before {res['load_before']}, after {res['load_after']} on "
          f"{res['machine']['cpus']} cores; wrote {args.out / 'throughput.md'}, .csv, .json, "
          + ", ".join(Path(p).name for p in res["plots"]) + f"; metrics in {run_dir / 'metrics.jsonl'}")
    return 0
