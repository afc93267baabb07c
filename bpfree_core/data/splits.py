"""A run's data: the train, validation and test splits its config names."""

from __future__ import annotations

from bpfree_core.config import ExperimentConfig
from bpfree_core.data.datasets import Split, load_dataset
from bpfree_core.errors import ConfigError


def limited(split: Split, limit: int) -> Split:
    return split.subset(slice(0, limit)) if limit else split

def run_splits(cfg: ExperimentConfig) -> tuple[Split, Split, Split]:
    """(train, validation, test) of a run: train.train_limit first, then the last
    train.validation images of that are held out (never trained on); train.test_limit on test."""
    data = load_dataset(cfg.model.dataset, cfg.train.data_dir or None, cfg.model.data_fingerprint)
    train = limited(data.train, cfg.train.train_limit)
    if cfg.train.batch_size > len(train):
        raise ConfigError(f"train.batch_size = {cfg.train.batch_size} is larger than the "
                          f"{len(train)} training samples; give a batch size of at most {len(train)}")
    n = len(train) - cfg.train.validation
    if n < cfg.train.batch_size:
        raise ConfigError(f"train.validation = {cfg.train.validation} leaves {max(n, 0)} of "
                          f"{len(train)} training samples, fewer than one batch; hold out fewer")
    val = train.subset(slice(n, len(train)))
    if not cfg.train.validation and data.val is not None:   # the source's own validation split
        val = data.val
    return train.subset(slice(0, n)), val, limited(data.test, cfg.train.test_limit)
