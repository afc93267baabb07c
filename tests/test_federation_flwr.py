"""`flwr run .` against a local-simulation SuperLink: the app as Flower users launch it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import torch

from bpfree.server.flower_run import stop_pids
from bpfree.server.reference import federated_reference
from bpfree_core.config import load_config
from bpfree_core.run.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = ["train.train_limit=3000", "train.test_limit=1000", "model.hidden=200,200",
             "model.algorithm=symba", "train.threads=1", "federation.clients=3",
             "federation.rounds=2", "federation.executor=inprocess"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_with(marker: str) -> list[int]:
    """PIDs of processes whose command line mentions `marker` (our own FLWR_HOME)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def test_flwr_run_local_simulation_trains_the_reference_weights(data_dir, tmp_path):
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n'
                                      '[superlink.local]\naddress = ":local:"\n')
    env = {**os.environ, "FLWR_HOME": str(home), "BPFREE_RUNS_DIR": str(tmp_path / "runs"),
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
           "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port())}
    overrides = ";".join([f"train.data_dir={data_dir}", *OVERRIDES])
    try:
        done = subprocess.run(
            ["flwr", "run", str(REPO), "local", "--stream",
             "--federation-config", "num-supernodes=3 client-resources-num-cpus=1",
             "--run-config", f"overrides='{overrides}'"],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    finally:
        stop_pids(_pids_with(str(home)), grace=15.0)  # the detached local SuperLink and its children
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]

    runs = list((tmp_path / "runs").glob("flwr-*"))
    assert len(runs) == 1, done.stdout[-3000:]
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["replies"]["accepted"] == 6
    assert summary["accuracy_per_round"][1] > summary["accuracy_per_round"][0] > 0.3

    cfg = load_config(None, [f"train.data_dir={data_dir}", *OVERRIDES])
    reference = federated_reference(cfg)
    final = load_checkpoint(runs[0] / "checkpoints" / "round-0002.pt")["weights"]
    assert all(torch.equal(final[k], reference[k]) for k in reference)
