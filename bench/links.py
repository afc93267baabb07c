"""`bpfree bench links`: a real pipeline across separate hosts, on shaped links.

    bpfree bench links --data-dir ../shared/datasets --out bench/results     # the committed table
    bpfree bench links --quick --data-dir ../shared/datasets --out /tmp/l   # < 2 min, both regimes
    bpfree bench links --accuracy --data-dir ../shared/datasets             # lossy wires, full MNIST

Hosts (bench/testbed.py): `driver`, `s0` ... `s{S-1}`, each a network namespace with its own
link to a private switch. The stage workers start once, one per host. The driver runs inside its
host (this module as a child process, `--drive`), and for every point (link rate x wire dtype x
batch size) it re-shapes every link in both directions, configures the pipeline, trains a short
warm-up epoch and a measured one, and reads what crossed each link from the switch's qdisc
counters (Ethernet frames, the bytes tbf paces). Per point it reports samples/s, bytes per batch
per link, link utilisation, stage busy/idle/blocked and bench/model.py's prediction, fed with the
same run's per-batch compute and CPU and the shaped rate.

Latency is not shaped (netem is missing from this kernel); the links only limit bandwidth.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bpfree.bench.model import PipelineModel
from bpfree.bench.sweep_analysis import driver_seconds, predict
from bpfree.bench.testbed import Testbed, payload_fraction, shape_device, unavailable
from bpfree_core.errors import BpfreeError, ConfigError

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
# The bench net: the project's best MLP objective (SymBa, hard negatives), 2 stages of 1000 units.
NET = ("model.algorithm=symba", "objective.negatives=hard", "model.hidden=1000,1000",
       "train.threads=1", "train.predict=softmax")


@dataclass(frozen=True)
class LinkPlan:
    rates: tuple[float | None, ...]     # Mbit/s per direction of every link; None = unshaped
    wires: tuple[str, ...]
    batches: tuple[int, ...]
    stages: int = 2
    window: int = 4
    seconds: float = 3.0                # aim for measured epochs this long
    min_batches: int = 12               # ... but at least this many batches
    warmup_batches: int = 4
    max_images: int = 30000


PRESETS = {
    "full": LinkPlan(rates=(None, 10000, 1000, 200, 100, 20), wires=("float32", "bfloat16",
                     "float16", "int8"), batches=(50, 200)),
    "quick": LinkPlan(rates=(None, 100, 20), wires=("float32", "bfloat16", "int8"), batches=(100,),
                      seconds=1.5, min_batches=8, warmup_batches=2),
}


def rate_label(rate: float | None) -> str:
    if rate is None:
        return "unshaped"
    return f"{rate / 1000:g} Gbit/s" if rate >= 1000 else f"{rate:g} Mbit/s"


# -- hosts ----------------------------------------------------------------------------------------

def host_certs(tb: Testbed, hosts: list[str], out: Path) -> Path:
    """A CA in out/ca and, per host, out/<host>/server.{crt,key} naming its address
    (deploy/make-certs.sh, as an operator would make them)."""
    for h in hosts:
        subprocess.run(["bash", str(REPO / "deploy" / "make-certs.sh"), "--ca", str(out / "ca"),
                        str(out / h), f"IP:{tb.address(h)}"], check=True, capture_output=True,
                       timeout=120)
    return out


def start_workers(tb: Testbed, hosts: list[str], work: Path, *, certs: Path | None = None,
                  token: str = "", threads: int = 1,
                  timeout: float = 60.0) -> tuple[list[subprocess.Popen], list[str]]:
    """One `bpfree worker` per host, listening on the host's address; returns the processes and
    their addresses in host order. They stop with the testbed (or by PID)."""
    from bpfree.client.supervisor import stop_processes, wait_port, worker_command, worker_env

    env = worker_env(threads)
    if token:
        env["BPFREE_TOKEN"] = token
    procs, addresses = [], []
    try:
        for h in hosts:
            port_file, log_file = work / f"{h}.port", work / f"{h}.log"
            port_file.unlink(missing_ok=True)
            cmd = worker_command(f"{tb.address(h)}:0", port_file, threads=threads)
            if certs is not None:
                cmd += ["--tls-cert", str(certs / h / "server.crt"), "--tls-key",
                        str(certs / h / "server.key"), "--tls-ca", str(certs / h / "ca.crt")]
            with open(log_file, "ab") as log:
                procs.append(tb.popen(h, cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                      cwd=REPO, start_new_session=True))
        for h, proc in zip(hosts, procs, strict=True):
            port = wait_port(proc, work / f"{h}.port", work / f"{h}.log", timeout)
            addresses.append(f"{tb.address(h)}:{port}")
    except BaseException:
        stop_processes(procs)
        raise
    return procs, addresses


def qdisc_bytes(ns: str, dev: str) -> int:
    """Bytes the root qdisc of `dev` in namespace `ns` has sent (tbf counts Ethernet frames)."""
    out = subprocess.run(["tc", "-n", ns, "-s", "-j", "qdisc", "show", "dev", dev],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return sum(int(q.get("bytes", 0)) for q in json.loads(out) if q.get("root"))


# -- the driver's side (runs inside the driver host) ---------------------------------------------

def drive(spec: dict[str, Any], rows_path: Path) -> None:
    """Measure every point of `spec`; append one JSON row per point to `rows_path`."""
    from bpfree.bench.sweep import cpu_seconds
    from bpfree.client.pipeline import Pipeline
    from bpfree_core.config import ExperimentConfig
    from bpfree_core.data.batches import train_packets
    from bpfree_core.data.datasets import load_dataset
    from bpfree_core.data.splits import limited
    from bpfree_core.model import build_objective
    from bpfree_core.runtime import set_threads

    set_threads(1)
    plan = LinkPlan(**{**spec["plan"], "rates": tuple(spec["plan"]["rates"]),
                       "wires": tuple(spec["plan"]["wires"]), "batches": tuple(spec["plan"]["batches"])})
    links = spec["links"]          # per host: [(namespace, device), ...] both directions
    ports = spec["switch_ports"]   # link i (into stage i): the switch port towards stage i's host
    base = ExperimentConfig().with_overrides([*NET, f"train.data_dir={spec['data_dir']}",
                                              f"pipeline.stages={plan.stages}",
                                              f"pipeline.window={plan.window}", *spec["sets"]])
    train = load_dataset(base.model.dataset, base.train.data_dir or None).train
    objective = build_objective(base)
    cores = os.cpu_count() or 1
    for rate in plan.rates:
        for ns, dev in links:
            shape_device(ns, dev, rate)
        for batch in plan.batches:
            for wire in plan.wires:
                cfg = base.with_overrides([f"train.batch_size={batch}", f"pipeline.wire_dtype={wire}"])
                warm = limited(train, plan.warmup_batches * batch)
                with Pipeline.connect(cfg, spec["addresses"]) as pipe:
                    t0 = time.perf_counter()
                    pipe.train_epoch(train_packets(objective, warm, cfg, 0), 0, 2)
                    rate_guess = len(warm) / (time.perf_counter() - t0)
                    images = int(min(plan.max_images, max(plan.min_batches * batch,
                                                          rate_guess * plan.seconds)))
                    split = limited(train, images // batch * batch)
                    sent0 = [qdisc_bytes(spec["switch"], p) for p in ports]
                    cpu0 = [time.process_time(), *map(cpu_seconds, spec["pids"])]
                    epoch = pipe.train_epoch(train_packets(objective, split, cfg, 1), 1, 2)
                    cpu = [b - a for a, b in zip(cpu0, [time.process_time(),
                                                        *map(cpu_seconds, spec["pids"])], strict=True)]
                    sent = [qdisc_bytes(spec["switch"], p) - s for p, s in zip(ports, sent0, strict=True)]
                row = analyse(epoch, rate, wire, batch, plan.window, sent, cpu, cores)
                with open(rows_path, "a") as f:
                    f.write(json.dumps(row) + "\n")


def analyse(epoch: dict[str, Any], rate: float | None, wire: str, batch: int, window: int,
            sent: list[int], cpu: list[float], cores: int) -> dict[str, Any]:
    """One point's row: the measurement beside the model's prediction for it."""
    st = epoch["stages"]
    n, wall = epoch["batches"], epoch["seconds"]
    samples = epoch["samples"]
    measured = samples / wall
    busy = [s["busy_seconds"] for s in st]
    per_batch = [b / max(s["train_batches"], 1) for b, s in zip(busy, st, strict=True)]
    payload = [st[0]["bytes_in"]] + [s["bytes_in"] for s in st[1:]]   # bpfree frames into stage i
    on_link = [max(b, p) for b, p in zip(sent, payload, strict=True)]   # Ethernet frames into stage i
    bandwidth = math.inf if rate is None else rate * 1e6 / 8
    driver = driver_seconds(epoch)
    cpu_per_batch = [c / n for c in cpu]
    model = PipelineModel(compute=(driver, *per_batch), link_bytes=tuple(b / n for b in on_link),
                      bandwidth=bandwidth, window=window)
    predicted = predict(model, n, batch, cpu_per_batch, cores)
    compute_only = predict(dataclasses.replace(model, bandwidth=math.inf), n, batch, cpu_per_batch,
                           cores)
    transfer = model.transfer()
    link_bound_rate = batch / max(transfer) if max(transfer) > 0 else math.inf
    bound = "link" if link_bound_rate < compute_only else "compute"
    b = max(range(len(on_link)), key=lambda i: on_link[i])     # the busiest link
    steady = steady_rate(st[b].get("timeline") or [], payload[b] / n)
    return {
        "link_mbit": rate, "link": rate_label(rate), "wire": wire, "batch": batch, "window": window,
        "batches": n, "samples": samples, "epoch_seconds": wall,
        "samples_per_s": measured, "model_samples_per_s": predicted,
        "model_error": predicted / measured - 1,
        "compute_bound_samples_per_s": compute_only,
        "link_bound_samples_per_s": link_bound_rate if math.isfinite(link_bound_rate) else None,
        "of_bound": measured / min(compute_only, link_bound_rate),
        "bound": bound, "busiest_link": b,
        "bytes_per_batch": [x / n for x in payload], "link_bytes_per_batch": [x / n for x in on_link],
        "bytes_per_sample": payload[b] / samples,
        "payload_utilisation": payload[b] / wall / bandwidth if rate else None,
        "link_utilisation": on_link[b] / wall / bandwidth if rate else None,
        "steady_payload_utilisation": steady / bandwidth if rate and steady else None,
        "payload_mbit_per_s": payload[b] * 8 / wall / 1e6,
        "busy_s": busy, "idle_s": [s["idle_seconds"] for s in st],
        "blocked_s": [s["blocked_seconds"] for s in st],
        "compute_ms_per_batch": [t * 1e3 for t in per_batch], "driver_ms_per_batch": driver * 1e3,
        "cpu_ms_per_batch": [c * 1e3 for c in cpu_per_batch],
        "transfer_ms_per_batch": [t * 1e3 for t in transfer],
    }


def steady_rate(timeline: list[list[float]], bytes_per_batch: float) -> float | None:
    """Payload bytes/s into a stage between its first and last step start (fill/drain excluded):
    a stage fed by a saturated link starts each step as soon as the batch has arrived."""
    starts = [t[0] for t in timeline]
    if len(starts) < 3 or starts[-1] <= starts[0]:
        return None
    return bytes_per_batch * (len(starts) - 1) / (starts[-1] - starts[0])


# -- the sweep (this process: builds the hosts, starts the workers, runs the driver) -------------

def run_links(plan: LinkPlan, data_dir: str, out: Path, *, sets: list[str], progress: bool = True,
              command: str = "") -> dict[str, Any]:
    from bpfree.bench.links_report import write_outputs
    from bpfree_core.data.datasets import load_dataset
    from bpfree_core.runtime import progress_bar

    reason = unavailable()
    if reason:
        raise ConfigError(f"bpfree bench links needs separate hosts (network namespaces): {reason}")
    stages = [f"s{i}" for i in range(plan.stages)]
    total = len(plan.rates) * len(plan.wires) * len(plan.batches)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    load_dataset("mnist", data_dir)   # a missing dataset fails here, in one sentence
    with Testbed(["driver", *stages]) as tb:
        work = tb.scratch   # removed with the hosts, also if this process is killed
        procs, addresses = start_workers(tb, stages, work)
        spec = {"plan": dataclasses.asdict(plan), "addresses": addresses, "data_dir": data_dir,
                "sets": sets, "pids": [p.pid for p in procs], "switch": tb.switch,
                "switch_ports": [f"p{tb.hosts.index(h)}" for h in stages],
                "links": [end for h in tb.hosts for end in tb.link_ends(h)]}
        (work / "spec.json").write_text(json.dumps(spec))
        rows_path = work / "rows.jsonl"
        rows_path.touch()
        from bpfree.client.supervisor import worker_env

        with open(work / "driver.log", "wb") as log:
            driver = tb.popen("driver", [sys.executable, "-m", "bpfree.bench.links", "--drive",
                                         str(work / "spec.json"), "--rows", str(rows_path)],
                              stdout=log, stderr=subprocess.STDOUT, env=worker_env(1), cwd=REPO)
        bar = progress_bar(total=total, enabled=progress, desc="links", unit="point")
        done = 0
        while driver.poll() is None or done < _count(rows_path):
            now = _count(rows_path)
            if now > done:
                bar.update(now - done)
                done = now
            try:
                driver.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
        bar.close()
        if driver.returncode != 0:
            tail = (work / "driver.log").read_text(errors="replace").strip().splitlines()[-1:]
            raise BpfreeError(f"the links driver failed (exit {driver.returncode}): "
                              f"{tail[0] if tail else 'no output'}")
        rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    res = {"command": command, "plan": dataclasses.asdict(plan), "net": list(NET), "sets": sets,
           "rows": rows, "seconds": time.time() - t_start, "payload_fraction": payload_fraction(),
           "machine": {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                       "kernel": platform.release()}}
    res["files"] = [str(p) for p in write_outputs(res, out)]
    return res


def _count(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip())


# -- accuracy of the lossy wires (full MNIST, loopback: the link does not change the numbers) ----

def wire_accuracy(data_dir: str, wires: list[str], epochs: int, seeds: list[int], out: Path,
                  sets: list[str], progress: bool = True, command: str = "") -> dict[str, Any]:
    """Test accuracy of the bench net trained through a 2-stage pipeline with each wire dtype,
    on all of MNIST, same seeds and epochs."""
    from bpfree.bench.links_report import write_accuracy
    from bpfree.client.executor import PipelineExecutor
    from bpfree.client.pipeline import Pipeline
    from bpfree_core.config import ExperimentConfig
    from bpfree_core.run.trainer import train_epochs

    rows = []
    for seed in seeds:
        for wire in wires:
            cfg = ExperimentConfig().with_overrides([
                *NET, f"train.data_dir={data_dir}", "pipeline.stages=2", f"train.epochs={epochs}",
                f"train.seed={seed}", f"pipeline.wire_dtype={wire}", *sets])
            t0 = time.time()
            with Pipeline.launch_local(cfg, threads=1) as pipe:
                summary = train_epochs(cfg, PipelineExecutor.from_pipeline(pipe), None,
                                       progress=progress)
            rows.append({"wire": wire, "seed": seed, "epochs": epochs,
                         "test_accuracy": summary["test_accuracy"], "seconds": time.time() - t0})
    res = {"command": command, "net": list(NET), "sets": sets, "rows": rows}
    write_accuracy(res, out)
    return res


# -- command line -------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="3 rates x 3 wires, one batch size "
                        "(under 2 minutes on 2 cores); default: the full sweep of the committed table")
    parser.add_argument("--data-dir", default=os.environ.get("BPFREE_DATA_DIR", ""),
                        help="directory with the MNIST IDX .gz files")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where links.{md,csv,json,png} go")
    parser.add_argument("--rates", help="Mbit/s per link, comma-separated; 0 = unshaped")
    parser.add_argument("--wire", help="wire dtypes, comma-separated (float32,bfloat16,float16,int8)")
    parser.add_argument("--batch-size", help="batch sizes, comma-separated")
    parser.add_argument("--stages", type=int, help="stage hosts (default 2)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config overrides on top of the bench net")
    parser.add_argument("--accuracy", action="store_true", help="instead: test accuracy of each "
                        "wire dtype on full MNIST (2-stage pipeline on loopback)")
    parser.add_argument("--epochs", type=int, default=3, help="--accuracy: epochs per run")
    parser.add_argument("--seeds", default="0", help="--accuracy: seeds, comma-separated")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _list(raw: str | None, kind: type, flag: str) -> tuple | None:
    if raw is None:
        return None
    try:
        return tuple(kind(v) for v in raw.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"--{flag} {raw!r}: expected comma-separated numbers") from None


def run(args: argparse.Namespace) -> int:
    if not args.data_dir:
        raise ConfigError("--data-dir is needed: the directory holding the MNIST IDX .gz files "
                          "(or set BPFREE_DATA_DIR)")
    argv = sys.argv[sys.argv.index("links") + 1:] if "links" in sys.argv else sys.argv[1:]
    command = "bpfree bench links " + " ".join(shlex.quote(a) for a in argv)
    wires = _list(args.wire, str, "wire")
    if args.accuracy:
        res = wire_accuracy(args.data_dir, list(wires or ("float32", "bfloat16", "float16", "int8")),
                            args.epochs, list(_list(args.seeds, int, "seeds")), args.out, args.set,
                            progress=not args.no_progress, command=command)
        for r in res["rows"]:
            print(f"{r['wire']:>9} seed {r['seed']}: test accuracy {r['test_accuracy']:.4f}")
        return 0
    plan = PRESETS["quick" if args.quick else "full"]
    rates = _list(args.rates, float, "rates")
    batches = _list(args.batch_size, int, "batch-size")
    plan = dataclasses.replace(plan, **{k: v for k, v in (
        ("rates", tuple(r or None for r in rates) if rates else None), ("wires", wires),
        ("batches", batches), ("stages", args.stages)) if v})
    res = run_links(plan, args.data_dir, args.out, sets=args.set, progress=not args.no_progress,
                    command=command)
    from bpfree.bench.links_report import text_table

    print(text_table(res))
    print(f"wrote {', '.join(Path(f).name for f in res['files'])} to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bpfree.bench.links", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drive", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=Path, help=argparse.SUPPRESS)
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.drive:
        try:
            drive(json.loads(args.drive.read_text()), args.rows)
        except BpfreeError as exc:
            print(f"error: {exc}", file=sys.stderr)   # run_links reports this last line
            return 2
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
