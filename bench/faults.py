"""Fault, bad-input and security report: what was done to a real run, and what happened.

    python -m bpfree.bench.faults                      # -> bench/results/faults.md (+ faults.json)
    python -m bpfree.bench.faults --fuzz-scale 2       # twice the fuzz cases

Stage faults run here, for real: a client's round on 2 `bpfree worker` processes whose stage is
SIGKILLed (or SIGSTOPped: hung) while the epoch streams; the round is recovered and compared with
an undisturbed round (exact weights, test accuracy). Client, coordinator, checkpoint, fuzz and
security faults are the tests in tests/test_faults.py, test_fuzz.py and test_security.py, run as
pytest subprocesses; their assertions are the "nothing lost" checks, and the fuzz tests report
how many cases got which status code.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bpfree_core.config import ExperimentConfig, load_config
from bpfree_core.data.datasets import load_dataset
from bpfree_core.data.splits import limited
from bpfree_core.errors import BpfreeError
from bpfree_core.evaluation import evaluate, headline
from bpfree_core.model import Stage, build_layers, build_objective

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DATA = REPO.parent / "shared" / "datasets"

CASES = ["model.algorithm=symba", "model.hidden=300,300", "train.batch_size=100",
         "train.train_limit=6000", "train.test_limit=2000", "train.threads=1", "train.seed=11",
         "federation.clients=2", "federation.rounds=3", "federation.local_epochs=2",
         "pipeline.stages=2", "pipeline.window=2", "pipeline.rpc_timeout=6",
         "pipeline.connect_timeout=30"]

TESTS = {
    "client (Flower ClientApp actor) SIGKILLed mid-round":
        "tests/test_faults.py::test_a_killed_client_app_is_left_out_and_the_run_goes_on",
    "coordinator (`bpfree simulate`) SIGKILLed after round 1, then --resume":
        "tests/test_faults.py::test_coordinator_killed_mid_run_workers_exit_and_resume_matches",
    "checkpoint writer killed by the kernel (SIGXFSZ) 16 MB into a 40 MB write":
        "tests/test_faults.py::test_a_checkpoint_write_killed_part_way_leaves_the_old_one_intact",
    "checkpoint write failing with ENOSPC after 1000 bytes":
        "tests/test_faults.py::test_a_failing_write_raises_and_leaves_nothing_behind",
    "bad simulate input (7 cases: data dir, partition, stages > layers, ...)":
        "tests/test_faults.py::test_bad_simulate_input_fails_fast_with_one_clear_sentence",
    "every RPC without / with a wrong token, over TLS (real worker process)":
        "tests/test_security.py::test_every_rpc_needs_the_token_over_tls",
    "plaintext client and a client trusting another CA":
        "tests/test_security.py::test_tls_worker_refuses_plaintext_and_strangers",
    "oversized message / batch / header / tensor count":
        "tests/test_security.py::test_oversized_messages_are_resource_exhausted",
    "token in run dirs (bpfree pipeline) and in Flower messages":
        "tests/test_security.py::test_the_token_is_never_written_to_a_run_dir",
}


class Fault:
    """Wraps a PipelineExecutor: on the first attempt, signal stage `stage` after `after` batches."""

    def __init__(self, executor: Any, stage: int, after: int, sig: int):
        self.inner, self.stage, self.after, self.sig = executor, stage, after, sig
        self.t_fault: float | None = None
        self.noticed: float | None = None
        self.error = ""

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def train_epoch(self, packets, epoch: int, total_epochs: int) -> dict:  # noqa: ANN001
        def feed():  # noqa: ANN202
            for b, packet in enumerate(packets):
                if b == self.after and self.t_fault is None:
                    os.kill(self.inner.pipeline.processes[self.stage].pid, self.sig)
                    self.t_fault = time.monotonic()
                yield packet

        try:
            return self.inner.train_epoch(feed(), epoch, total_epochs)
        except BpfreeError as exc:
            if self.t_fault is not None and self.noticed is None:
                self.noticed = time.monotonic() - self.t_fault
                self.error = str(exc).split(";")[0][:160]
            raise


def _accuracy(cfg: ExperimentConfig, weights: dict[str, torch.Tensor]) -> float:
    objective = build_objective(cfg)
    stage = Stage(build_layers(cfg, objective=objective))
    stage.load_state_dict(weights)
    test = limited(load_dataset(cfg.model.dataset, cfg.train.data_dir).test, cfg.train.test_limit)
    return headline(evaluate(stage.eval_step, objective, test, cfg), cfg)


def stage_faults(data_dir: Path) -> list[dict[str, Any]]:
    from bpfree.client.executor import PipelineExecutor
    from bpfree_core.federation.client import (
        InProcessExecutor,
        client_split,
        local_round,
        stack_template,
        train_split,
    )
    from bpfree_core.run.restarts import RoundFailedError

    torch.set_num_threads(1)   # the reference runs on one thread, as each stage does
    cfg = load_config(None, [f"train.data_dir={data_dir}", *CASES])
    part = client_split(cfg, train_split(cfg), 0)
    start = stack_template(cfg)
    rnd = 1   # the middle round: global epochs 2-3 of 6
    t0 = time.perf_counter()
    want = local_round(InProcessExecutor(cfg), cfg, part, 0, rnd, start)
    ref_seconds = time.perf_counter() - t0
    ref_acc = _accuracy(cfg, want.weights)
    rows = []
    for what, stage, sig, restarts in (
            ("last stage SIGKILLed mid-epoch", 1, signal.SIGKILL, 2),
            ("first stage SIGKILLed mid-epoch", 0, signal.SIGKILL, 2),
            ("last stage hung (SIGSTOP) mid-epoch", 1, signal.SIGSTOP, 2),
            ("last stage SIGKILLed, pipeline.restarts = 0", 1, signal.SIGKILL, 0)):
        run_cfg = cfg.with_overrides([f"pipeline.restarts={restarts}"])
        row: dict[str, Any] = {"fault": what, "undisturbed_accuracy": ref_acc,
                               "undisturbed_seconds": ref_seconds}
        with PipelineExecutor(run_cfg) as executor:
            pids = [p.pid for p in executor.pipeline.processes]
            fault = Fault(executor, stage, after=12, sig=sig)
            t0 = time.perf_counter()
            try:
                got = local_round(fault, run_cfg, part, 0, rnd, start)
            except RoundFailedError as exc:
                row.update(outcome="round failed (as configured)", message=str(exc)[:200])
                got = None
            row["seconds"] = time.perf_counter() - t0
            row["noticed_seconds"] = fault.noticed
            row["error_seen"] = fault.error
            row["restarted_pids"] = [(a, p.pid) for a, p in zip(pids, executor.pipeline.processes,
                                                                strict=True) if a != p.pid]
        if got is not None:
            same = all(torch.equal(got.weights[k], want.weights[k]) for k in want.weights)
            acc = _accuracy(cfg, got.weights)
            row.update(outcome="recovered", restarts=got.metrics["restarts"], identical=same,
                       accuracy=acc, accuracy_diff_points=100 * (acc - ref_acc))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def run_tests(fuzz_scale: float) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    env = {**os.environ, "BPFREE_FUZZ_EXAMPLES": str(fuzz_scale), "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "fuzz.json"
        env["BPFREE_FUZZ_REPORT"] = str(report)
        rows = []
        for what, node in [("hypothesis fuzz of data + control planes, then a good epoch",
                            "tests/test_fuzz.py"), *TESTS.items()]:
            t0 = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                   "-p", "no:warnings", node], cwd=REPO, env=env,
                                  capture_output=True, text=True)
            tail = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
            rows.append({"what": what, "test": node, "passed": done.returncode == 0,
                         "summary": tail, "seconds": time.perf_counter() - t0})
            print(json.dumps(rows[-1]), flush=True)
        fuzz = json.loads(report.read_text()) if report.exists() else {}
    return rows, fuzz


def render(stage_rows: list[dict[str, Any]], test_rows: list[dict[str, Any]],
           fuzz: dict[str, Any], command: str) -> str:
    lines = ["# Faults, bad input and security", "",
             f"Command: `{command}`  ",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU; load average at "
             f"the end {os.getloadavg()[0]:.1f} (other jobs share the cores, so seconds are upper "
             "bounds).  ",
             f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             "## A stage worker killed or hung while an epoch streams", "",
             "One client's round (round 2 of 3, 2 local epochs, SymBa 784-300-300, 3000 MNIST "
             "images, batches of 100) on 2 `bpfree worker` processes. The fault hits after 12 "
             "batches of the first epoch; the client recovers (respawns the dead or hung stage by "
             "PID, reconfigures both) and reruns the round from its starting weights. Compared "
             "with the same round undisturbed, in process (the golden reference).", "",
             "| fault | outcome | noticed after | round took (undisturbed) | restarted | weights "
             "identical | test acc. after | undisturbed | diff (points) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in stage_rows:
        restarted = ", ".join(f"pid {a} -> {b}" for a, b in r["restarted_pids"]) or "-"
        noticed = f"{r['noticed_seconds']:.1f} s" if r["noticed_seconds"] is not None else "-"
        if r["outcome"] == "recovered":
            lines.append(f"| {r['fault']} | recovered, {r['restarts']:.0f} rerun | {noticed} | "
                         f"{r['seconds']:.1f} s ({r['undisturbed_seconds']:.1f} s) | {restarted} | "
                         f"{'yes' if r['identical'] else '**NO**'} | {r['accuracy']:.4f} | "
                         f"{r['undisturbed_accuracy']:.4f} | {r['accuracy_diff_points']:+.2f} |")
        else:
            lines.append(f"| {r['fault']} | {r['outcome']}: \"{r['message']}...\" | {noticed} | "
                         f"{r['seconds']:.1f} s | {restarted} | - | - | - | - |")
    lines += ["", "First error the driver saw, per fault: " + "; ".join(
        f"*{r['fault']}*: \"{r['error_seen']}\"" for r in stage_rows), "",
        "## Whole-process faults, bad input, security (tests run as written)", "",
        "| what was done | test | result | seconds |", "|---|---|---|---|"]
    for r in test_rows:
        lines.append(f"| {r['what']} | `{r['test']}` | {'pass' if r['passed'] else '**FAIL**'} "
                     f"({r['summary']}) | {r['seconds']:.0f} |")
    lines += ["", "What those tests assert: a killed ClientApp is counted as failed and the rounds "
              "aggregate the other client (Flower's simulation runtime does not restart a dead "
              "actor); a killed coordinator's stage workers, SuperLink, flwr-simulation and Ray "
              "exit by themselves, `--resume` "
              "ends with weights torch.equal to the single-process federated reference (so the same "
              "test accuracy) and metrics lines for rounds 1-3 exactly once, with the token from "
              "$BPFREE_TOKEN only and nowhere in the run dir; an interrupted checkpoint write leaves "
              "the previous checkpoint byte-identical and loadable.", "",
              "## Fuzz cases by status code", "",
              "Every case is an accepted batch (OK: a mutation that still forms a valid batch) or "
              "a rejection with one of INVALID_ARGUMENT / FAILED_PRECONDITION / RESOURCE_EXHAUSTED "
              "(DEADLINE_EXCEEDED only for a valid FinishEpoch that waits); UNKNOWN or INTERNAL "
              "(a crash in a handler) fails the test. Afterwards the same worker trains a good "
              "epoch with weights identical to the reference.", "",
              "| cases | total | OK | INVALID_ARGUMENT | FAILED_PRECONDITION | RESOURCE_EXHAUSTED "
              "| DEADLINE_EXCEEDED | other |", "|---|---|---|---|---|---|---|---|"]
    known = ("OK", "INVALID_ARGUMENT", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED",
             "DEADLINE_EXCEEDED")
    grand = 0
    for name, counts in fuzz.items():
        total = sum(counts.values())
        grand += total
        other = total - sum(counts.get(k, 0) for k in known)
        lines.append(f"| {name} | {total} | " + " | ".join(str(counts.get(k, 0)) for k in known)
                     + f" | {other} |")
    lines += [f"| **all** | **{grand}** | | | | | | |", "",
              "Lost: nothing — every recovered round and resumed run ended with weights identical "
              "to an undisturbed run; no checkpoint was torn; no token reached the disk."
              if all(r.get("identical", True) for r in stage_rows) and all(
                  r["passed"] for r in test_rows) else "Lost: see the rows marked above.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DATA)
    parser.add_argument("--fuzz-scale", type=float, default=2.0,
                        help="multiplies the fuzz tests' case counts (1 = the test suite's)")
    parser.add_argument("--skip-tests", action="store_true", help="stage faults only")
    args = parser.parse_args(argv)
    command = "python -m bpfree.bench.faults " + " ".join(argv if argv is not None else sys.argv[1:])
    stage_rows = stage_faults(args.data_dir)
    test_rows, fuzz = ([], {}) if args.skip_tests else run_tests(args.fuzz_scale)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "faults.json").write_text(json.dumps(
        {"stage_faults": stage_rows, "tests": test_rows, "fuzz": fuzz}, indent=2))
    (RESULTS / "faults.md").write_text(render(stage_rows, test_rows, fuzz, command.strip()))
    print(f"wrote {RESULTS / 'faults.md'}")
    return 0 if all(r["passed"] for r in test_rows) else 1


if __name__ == "__main__":
    sys.exit(main())
