"""Which data a federated node trains and evaluates on: its partition of the run's dataset, or,
with node_config `dataset`, a site's own dataset that never leaves the site.

`dataset` names any bpfree source ("npz:PATH", "csv:DIR", "folder:PATH", or a built-in name with
node_config `data-dir`). The site trains on the whole training split of it (train.train_limit and
train.validation of the run apply) and evaluates on its test split; it must hold samples of the
run's shape and classes. The run's own dataset is then never read on this node.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from bpfree_core.config import ExperimentConfig
from bpfree_core.data.datasets import Split, bind_data, run_spec
from bpfree_core.data.splits import run_splits
from bpfree_core.errors import ConfigError
from bpfree_core.federation.client import client_split, train_split
from bpfree_core.federation.client_evaluation import client_test_split


def site_source(node_config: dict[str, Any]) -> str:
    return str(node_config.get("dataset", "") or "")


def site_splits(cfg: ExperimentConfig, source: str) -> tuple[Split, Split]:
    """(train, test) of a site's own dataset, checked against the run's model."""
    model = dataclasses.replace(cfg.model, dataset=source, input_shape=(), data_classes=0,
                                data_fingerprint="")
    site = bind_data(dataclasses.replace(cfg, model=model))
    want, have = run_spec(cfg), run_spec(site)
    if tuple(have.shape) != tuple(want.shape) or have.num_classes != want.num_classes:
        raise ConfigError(
            f"node_config dataset = {source!r} holds samples of shape {tuple(have.shape)} in "
            f"{have.num_classes} classes, but the run trains a model for {tuple(want.shape)} in "
            f"{want.num_classes} classes ({cfg.model.dataset}); give this node data of that shape "
            "and classes")
    train, _, test = run_splits(site)
    return train, test


def node_train_data(cfg: ExperimentConfig, node_config: dict[str, Any], partition: int) -> Split:
    source = site_source(node_config)
    return site_splits(cfg, source)[0] if source else client_split(cfg, train_split(cfg), partition)


def node_test_data(cfg: ExperimentConfig, node_config: dict[str, Any], partition: int) -> Split:
    source = site_source(node_config)
    return site_splits(cfg, source)[1] if source else client_test_split(cfg, run_splits(cfg)[2], partition)
