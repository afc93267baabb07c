"""Deployment smoke test: deploy/local.sh on loopback with TLS, one round, real daemons.

SuperLink (HTTPS), two SuperNodes, two clients x two `bpfree worker` stages (gRPC over TLS),
`flwr run`; the coordinator's result must equal the in-process federated reference.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from bpfree.server.reference import federated_reference
from bpfree_core.config import load_config
from bpfree_core.run.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
SETS = ["train.train_limit=2000", "train.test_limit=1000", "model.hidden=200,200",
        "model.algorithm=symba", "train.threads=1"]


@pytest.mark.slow
def test_local_deployment_with_tls_runs_a_round_and_matches_the_reference(data_dir, tmp_path):
    work = tmp_path / "deploy"
    sets = [f"train.data_dir={data_dir}", *SETS]
    cmd = ["bash", str(REPO / "deploy" / "local.sh"), "--clients", "2", "--stages", "2",
           "--rounds", "1", "--tls", "--work", str(work), *sum((["--set", s] for s in sets), [])]
    rc, out = _local_sh(cmd, tmp_path, 420)
    assert rc == 0, out[-4000:]

    runs = list((work / "runs").glob("flwr-*"))
    assert len(runs) == 1, out[-4000:]
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["rounds"] == 1 and summary["replies"]["accepted"] == 2
    assert summary["test_accuracy"] > 0.3
    assert (work / "certs" / "ca.crt").is_file()
    assert "tls on" in (work / "logs" / "worker-c0-s0.log").read_text()

    cfg = load_config(None, [*sets, "federation.clients=2", "pipeline.stages=2",
                             "federation.rounds=1"])
    reference = federated_reference(cfg)
    final = load_checkpoint(runs[0] / "checkpoints" / "round-0001.pt")["weights"]
    assert all(torch.equal(final[k], reference[k]) for k in reference)

    # Every daemon the script started is gone (stopped by PID on exit).
    leftovers = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _mentions(p, str(work))]
    assert not leftovers, [(p.name, _cmdline(p)) for p in leftovers]


def _local_sh(cmd: list[str], cwd: Path, timeout: float) -> tuple[int, str]:
    """Run deploy/local.sh in its own session: if it hangs, its whole group (daemons included)
    is killed. Returns (exit code, output)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=cwd)
    try:
        out = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
        pytest.fail(f"deploy/local.sh did not finish in {timeout:g} s:\n{out[-4000:]}")
    return proc.returncode, out


def _cmdline(p: Path) -> str:
    try:
        return (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _mentions(p: Path, marker: str) -> bool:
    return marker in _cmdline(p)


@pytest.mark.slow
def test_a_failed_deployment_exits_non_zero_with_one_sentence(tmp_path):
    work, empty = tmp_path / "deploy", tmp_path / "no-data"
    empty.mkdir()
    cmd = ["bash", str(REPO / "deploy" / "local.sh"), "--clients", "1", "--stages", "1",
           "--rounds", "1", "--work", str(work), "--data-dir", str(empty),
           *sum((["--set", s] for s in SETS), [])]
    rc, out = _local_sh(cmd, tmp_path, 300)
    assert rc != 0, out[-4000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith("error: the federated run failed: DataError: ") and str(empty) in last, \
        out[-4000:]
    assert "Traceback" not in out   # Flower's traceback stays in WORK/logs/flwr.log
    leftovers = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _mentions(p, str(work))]
    assert not leftovers, [(p.name, _cmdline(p)) for p in leftovers]
