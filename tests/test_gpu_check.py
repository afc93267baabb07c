"""bench/gpu_check: on a machine without a CUDA GPU it stops at once with one sentence."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available() or shutil.which("nvidia-smi") is not None,
                    reason="this machine has a GPU: the script would measure it")
@pytest.mark.parametrize("cmd", [["bash", "bench/gpu_check.sh"],
                                 [sys.executable, "-m", "bpfree.bench.gpu_check"]])
def test_without_a_gpu_it_stops_with_one_sentence(cmd, tmp_path):
    done = subprocess.run([*cmd, *(["--out", str(tmp_path)] if "-m" in cmd else [str(tmp_path)])],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1 and "no CUDA GPU" in lines[0], lines
    assert not any(tmp_path.iterdir())   # nothing measured, nothing written


def test_the_dry_run_measures_every_row_on_the_cpu_and_writes_as_it_goes(tmp_path):
    """What CI can check of the GPU run: the script sets itself up from the torch that is here
    (no registry, no install), runs every row at toy sizes, and writes them with the machine."""
    import json

    done = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-2000:])
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["errors"] == [] and res["torch"] == torch.__version__ and res["commit"] != ""
    assert len(res["steps"]) == 2 * 2 + 2 and len(res["pipelines"]) == 3   # every row of the plan
    assert len(res["recipes"]) == len(list((ROOT / "deploy" / "recipes").glob("*-gpu.toml"))) >= 4
    assert all(r["samples_per_second"] > 0 for r in res["steps"] + res["pipelines"] + res["recipes"])
    assert "| mono | 2x64 | 32 | float32 |" in (tmp_path / "gpu_check.md").read_text()


def test_a_row_that_fails_is_recorded_and_the_rest_are_measured(tmp_path, monkeypatch):
    from bpfree.bench import gpu_check

    def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(gpu_check, "pipeline_row", broken)
    plan = dataclasses.replace(gpu_check.PLANS["dry-run"], compile_rows=False)   # the dry run has them
    res = gpu_check.run(plan, tmp_path)
    assert len(res["steps"]) == 4 and res["pipelines"] == [] and len(res["errors"]) == 3
    assert "illegal memory access" in (tmp_path / "gpu_check.md").read_text()
