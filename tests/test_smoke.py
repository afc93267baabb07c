"""The reference trainer learns on real MNIST (a few thousand images)."""

from bpfree_core.config import load_config
from bpfree_core.run.trainer import train_reference


def test_ff_reference_trainer_learns_and_writes_run_dir(data_dir, tmp_path):
    cfg = load_config(None, [f"train.data_dir={data_dir}", "train.train_limit=3000",
                             "train.test_limit=1000", "train.epochs=2", "model.hidden=200,200",
                             "train.threads=1"])
    summary = train_reference(cfg, tmp_path / "run", progress=False)
    assert summary["test_accuracy"] > 0.5
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "summary.json"):
        assert (tmp_path / "run" / name).is_file()
