"""The record keeping every run loop shares (bpfree_core.run.runlog): a step's checkpoint carries its
record and lands before its metrics line, every callback sees every record, RUN_DIR/STOP stops
any loop (a train run here, as it stops a federation), and the summary has the common fields."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bpfree_core.config import ExperimentConfig, load_config
from bpfree_core.run.rundir import STOP, RunDir
from bpfree_core.run.runlog import RunLog
from bpfree_core.run.trainer import train_reference


def test_a_step_is_checkpoint_then_metrics_then_every_callback(tmp_path: Path) -> None:
    cfg = load_config(None, [])
    seen: list[tuple[str, int]] = []

    def first(record: dict) -> bool:
        lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        seen.append(("first", len(lines)))   # the line is written before callbacks run
        return True

    def second(record: dict) -> None:
        seen.append(("second", record["epoch"]))   # sees the record although `first` asked to stop

    with RunDir(tmp_path / "run") as rd:
        log = RunLog(cfg, rd, [first, second])
        assert ExperimentConfig.from_dict(json.loads((tmp_path / "run" / "config.json").read_text())) == cfg
        record = {"epoch": 1, "seconds": {"train": 1.0}}
        assert log.commit(1, record, ("checkpoint.pt", {"weights": {"w": torch.ones(2)}}))
        saved = rd.load("checkpoint.pt")
        assert saved["record"]["epoch"] == 1 and "checkpoint" in record["seconds"]
        summary = log.finish({"test_accuracy": 0.5}, {"w": torch.ones(2)})
    assert seen == [("first", 1), ("second", 1)]
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written["algorithm"] == cfg.model.algorithm and written["fingerprint"] == cfg.fingerprint()
    assert "weights" not in written and torch.equal(summary["weights"]["w"], torch.ones(2))


def test_a_stop_file_ends_a_train_run_after_the_epoch_in_flight(data_dir: Path, tmp_path: Path) -> None:
    cfg = load_config(None, [f"train.data_dir={data_dir}", "train.train_limit=300", "train.test_limit=100",
                             "model.hidden=20", "train.epochs=4", "train.threads=1"])
    run = tmp_path / "run"

    def leave_stop(record: dict) -> None:   # what a launcher in another process would do
        if record["epoch"] == 2:
            (run / STOP).touch()

    summary = train_reference(cfg, run, progress=False, callbacks=[leave_stop])
    assert summary["epochs_trained"] == 2 and summary["stopped_early"]
    assert not (run / STOP).exists()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
