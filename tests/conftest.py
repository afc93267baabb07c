"""Shared fixtures: real MNIST from ../shared/datasets, Flower/Ray phone-home off, process hygiene."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Flower and Ray must never phone home from tests.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    env = os.environ.get("BPFREE_TEST_DATA_DIR")
    return Path(env) if env else REPO.parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = shared_data_dir()
    if not (path / "mnist" / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"real MNIST not found under {path}; set BPFREE_TEST_DATA_DIR")
    return path
