"""Shared fixtures: real MNIST from ../shared/datasets, Flower/Ray phone-home off, process hygiene."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Flower and Ray must never phone home from tests.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Caches every process the suite starts shares, in one directory removed when it ends: decoded
# MNIST (bpfree_core.data.datasets) and torch.compile's kernels (train.compile; torch's default is /tmp).
_CACHES = tempfile.mkdtemp(prefix="bpfree-test-caches-")
os.environ.setdefault("BPFREE_DECODED_DIR", os.path.join(_CACHES, "decoded"))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(_CACHES, "inductor"))

REPO = Path(__file__).resolve().parents[1]


REQUIRE_DATA_ENV = "BPFREE_REQUIRE_TEST_DATA"   # CI sets it: a missing MNIST fails, never skips


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Real MNIST: a local copy if there is one, else downloaded as users get it (support.py).
    Offline and without a copy, the tests that need it skip with the reason (CI: fail)."""
    from bpfree_core.errors import DataError
    from tests.support import mnist_dir

    try:
        return mnist_dir()
    except DataError as exc:
        reason = (f"no MNIST for the tests: set BPFREE_TEST_DATA_DIR to a folder holding MNIST's "
                  f"four .gz files (or run online to download them) [{exc}]")
        if os.environ.get(REQUIRE_DATA_ENV):
            pytest.fail(f"{reason}; {REQUIRE_DATA_ENV} is set, so this is an error", pytrace=False)
        pytest.skip(reason)


# -- the tiers: `pytest -m "not e2e"` is the unit tier (minutes); plain `pytest` runs everything --
# Whole modules that start processes, Flower, Ray or namespace hosts in every test, and single
# tests of mixed modules that do (by name prefix).
E2E_MODULES = {"test_faults", "test_federation_flwr", "test_ray", "test_multihost", "test_deploy",
               "test_testbed", "test_bench_links", "test_bench_sweep", "test_progress",
               "test_pipeline", "test_security", "test_continual", "test_federation", "test_plugins"}
E2E_TESTS = {
    "test_rundir": ("test_a_full_disk", "test_a_second_run", "test_runs_killed", "test_a_bad_out"),
    "test_userdata": ("test_a_pipeline_and_a_flower", "test_a_flower_simulation_split"),
    "test_trainer": ("test_killed_run_resumes",),
    "test_sampling": ("test_a_sampled_flower_simulation",),
    "test_strategies": ("test_a_flower_simulation", "test_flowers_local_dp_mod"),  # fedprox too
    "test_federated_evaluation": ("test_a_flower_simulation",),
    "test_worker": ("test_worker_cli", "test_tls_with_token"),
    "test_learning": ("test_objective_learns_real_mnist", "test_accuracy_benchmark"),
    "test_fuzz": ("test_the_fuzzed_worker",),
    "test_placement": ("test_a_pool_of", "test_clients_on"),
    "test_readme": ("test_the_readme_commands_run",),
    "test_packaging": ("test_a_wheel_in_a_fresh_venv",),
    "test_gpu_check": ("test_the_dry_run",),
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: real processes, Flower, Ray or hosts (the full tier)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        module = item.path.stem
        if module in E2E_MODULES or item.name.startswith(E2E_TESTS.get(module, ("\0",))):
            item.add_marker(pytest.mark.e2e)


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_CACHES, ignore_errors=True)
