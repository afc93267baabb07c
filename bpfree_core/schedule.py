"""The default recipes' schedule on data that is not MNIST-sized.

The recipes were chosen on MNIST (600 steps an epoch); on a few hundred or thousand samples their
few epochs are a few dozen steps. `small_data_schedule` stretches the epochs the user did not set
to at least MIN_STEPS optimiser steps (bench/results/small_data.md) and, where that stretch needs
many epochs, holds out a validation split, keeps the best epoch and stops after PATIENCE epochs
without improvement (train.patience), so a set that peaks early does not train 100 epochs.
"""

from __future__ import annotations

from bpfree_core.config import ExperimentConfig

JITTER_MIN = 16    # a default jitter shifts images at least this tall (on 8x8 it cost 3 pt on
                   # validation: bench/results/small_data.md); flat features are never shifted
MIN_STEPS = 1000   # optimiser steps a default run takes at least (chosen on validation splits:
                   # bench/results/small_data.md)
MAX_EPOCHS = 100
PATIENCE = 5       # epochs without a better validation accuracy before a stretched run stops
VALIDATION = 0.1   # share of the training rows held out to choose the epoch, when none is set


def small_data_schedule(cfg: ExperimentConfig, asked: set[str], federated: bool) -> ExperimentConfig:
    """Stretch the epochs (a federated run: the local epochs) the user did not set so that
    training takes at least MIN_STEPS steps (a client: its own steps), at most MAX_EPOCHS epochs in
    all. A stretched single-process run also stops early on a validation split (train.patience)."""
    from bpfree_core.data.datasets import load_dataset

    data = load_dataset(cfg.model.dataset, None, cfg.model.data_fingerprint)
    n = min(cfg.train.train_limit or len(data.train), len(data.train)) - cfg.train.validation
    key = "federation.local_epochs" if federated else "train.epochs"
    rounds = cfg.federation.rounds if federated else 1
    per = cfg.federation.local_epochs if federated else cfg.train.epochs
    steps = max(n // (cfg.federation.clients if federated else 1) // cfg.train.batch_size, 1)
    if key in asked or steps * per * rounds >= MIN_STEPS:
        return cfg
    want = max(min(MAX_EPOCHS // rounds, -(-MIN_STEPS // (steps * rounds))), per)
    overrides = [f"{key}={want}"]
    if not federated and "train.patience" not in asked and want > PATIENCE:
        held = data.val is not None or cfg.train.validation or "train.validation" in asked
        if not held:
            overrides.append(f"train.validation={max(int(n * VALIDATION), 1)}")
        overrides.append(f"train.patience={PATIENCE}")
    return cfg.with_overrides(overrides)
