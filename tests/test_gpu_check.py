"""bench/gpu_check: on a machine without a CUDA GPU it stops at once with one sentence."""

from __future__ import annotations

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
