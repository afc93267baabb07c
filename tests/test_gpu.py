"""On a CUDA GPU (skipped, with the reason, elsewhere): the golden rule, fused Adam, bf16, compile
and placement on two devices, run for real. `bash bench/gpu_check.sh` runs these first."""

from __future__ import annotations

import pytest
import torch

from bpfree_core.config import load_config
from bpfree_core.model import Stage, build_layers
from tests.support import assert_two_stages_equal_one, synthetic_packets

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA, reason="no CUDA GPU here: these run where one is")


def _cfg(*extra: str):  # noqa: ANN202
    return load_config(None, ["model.algorithm=ff", "model.hidden=64,64", "train.batch_size=32",
                              "train.device=cuda", *extra])


@pytest.mark.parametrize("extra", [(), ("optim.kernels=fused",), ("train.precision=bf16",),
                                   ("train.compile=true",), ("train.tf32=true",)],
                         ids=["float32", "fused-adam", "bf16", "compile", "tf32"])
def test_one_stage_equals_two_on_the_gpu(extra: tuple[str, ...]) -> None:
    cfg = _cfg(*extra)
    assert_two_stages_equal_one(cfg, synthetic_packets(cfg, 4), ("cuda",) * 3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="one GPU here: placement needs two")
def test_stages_on_two_gpus_equal_one_gpu() -> None:
    cfg = _cfg()
    assert_two_stages_equal_one(cfg, synthetic_packets(cfg, 4), ("cuda:0", "cuda:0", "cuda:1"))


def test_a_gpu_step_matches_the_cpu_step_within_rounding() -> None:
    cfg = _cfg()
    packets = synthetic_packets(cfg, 3)
    gpu, cpu = Stage(build_layers(cfg), "cuda"), Stage(build_layers(cfg), "cpu")
    for p in packets:
        gpu.train_step(p)
        cpu.train_step(p)
    a, b = gpu.state_dict(), cpu.state_dict()
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)
