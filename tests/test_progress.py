"""What a user sees on a real terminal (a pty): a live bar, one line per epoch, quiet when asked."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

SMALL = ["--set", "train.train_limit=3000", "--set", "train.test_limit=500", "--set",
         "model.hidden=100,100", "--set", "train.threads=1", "--epochs", "2"]


def _on_a_terminal(args: list[str], timeout: float = 240) -> str:
    """Run `bpfree ARGS` with a pty as its terminal; return everything it wrote there."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "bpfree", *args], stdin=slave, stdout=slave,
                            stderr=slave, start_new_session=True,
                            env={**os.environ, "COLUMNS": "120", "TERM": "xterm"})
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:   # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        else:
            raise AssertionError(f"bpfree {' '.join(args)} did not finish in {timeout} s")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        os.close(master)
    assert proc.returncode == 0, b"".join(chunks).decode(errors="replace")[-3000:]
    return b"".join(chunks).decode(errors="replace")


def _epoch_lines(out: str) -> list[str]:
    return [x for x in out.replace("\r", "\n").splitlines() if x.startswith("epoch ") and " test " in x]


@pytest.mark.parametrize("command", [["train"], ["pipeline", "--stages", "2"]])
def test_a_terminal_gets_a_live_bar_and_one_line_per_epoch(command, data_dir: Path):
    out = _on_a_terminal([*command, "--data-dir", str(data_dir), *SMALL])
    assert "batch/s" in out and "epoch 1/2:" in out, out[-3000:]   # tqdm's live bar
    assert [x.split()[1] for x in _epoch_lines(out)] == ["1/2", "2/2"], out[-3000:]   # each once


def test_no_progress_and_quiet(data_dir: Path):
    plain = _on_a_terminal(["train", "--data-dir", str(data_dir), *SMALL, "--no-progress"])
    assert "batch/s" not in plain
    assert len([x for x in plain.splitlines() if "epoch 1/2  test" in x]) == 1, plain[-3000:]
    quiet = _on_a_terminal(["train", "--data-dir", str(data_dir), *SMALL, "--quiet"])
    assert "batch/s" not in quiet and "epoch 1/2" not in quiet, quiet[-3000:]
    assert "bpfree train: test accuracy" in quiet   # the final summary still comes


def test_simulate_on_a_terminal_shows_rounds_as_they_finish(data_dir: Path, tmp_path: Path):
    # With the largest int64 seed: seeds used to overflow in every client (19 and up; in process:
    # tests/test_seeds.py), and this one crosses Flower's messages. Flower's deprecation block and
    # Ray's raylet lines used to reach the terminal.
    out = _on_a_terminal(["simulate", "--data-dir", str(data_dir), "--out", str(tmp_path / "run"),
                          "--seed", str(2**63 - 1),
                          "--rounds", "2", "--clients", "2", "--executor", "inprocess",
                          "--no-plot", "--set", "train.train_limit=2000", "--set",
                          "train.test_limit=500", "--set", "model.hidden=100,100",
                          "--set", "federation.local_epochs=1"])
    assert "rounds:" in out and ("round/s" in out or "s/round" in out), out[-3000:]   # live bar
    lines = [x for x in out.replace("\r", "\n").splitlines() if x.startswith("round ")]
    assert [x.split()[1] for x in lines] == ["1/2", "2/2"], out[-3000:]
    for noise in ("DEPRECATED", "raylet", "Traceback", "WARNING"):
        assert noise not in out, out[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["test_accuracy"] > 0.2
    assert (tmp_path / "run" / "logs" / "flwr.log").is_file()   # Flower's own output went there


def test_clients_left_out_of_a_round_are_named_on_the_terminal(tmp_path: Path, caplog) -> None:  # noqa: ANN001
    """Issue 38, case 7: a stage stopped with SIGSTOP was named only in RUN_DIR/logs/flwr.log."""
    from bpfree.server.simulate import RoundProgress
    from bpfree_core.config import load_config

    cfg = load_config(None, ["federation.rounds=2"])
    follow = RoundProgress(tmp_path, cfg, resume=False, enabled=False)
    record = {"round": 1, "test_accuracy_headline": 0.5, "clients": {"sent": 3, "accepted": 1,
              "timed_out": 1}, "left_out": {"2": "stage worker at 127.0.0.1:7001 made no progress "
                                                  "for 60 s (a stopped or hung stage?)"}}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    with caplog.at_level("INFO"):
        follow.poll()
    follow.close()
    said = caplog.text
    assert "client 2 left out: stage worker at 127.0.0.1:7001 made no progress" in said
    assert "1 client(s) sent no reply within federation.round_timeout" in said
