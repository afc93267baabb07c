"""train.precision = bf16: matmuls under autocast, float32 between layers, same bits across stages."""

from __future__ import annotations

import pytest
import torch

from bpfree_core.config import load_config
from bpfree_core.errors import ConfigError
from bpfree_core.model import Stage, build_layers
from tests.support import assert_two_stages_equal_one, synthetic_packets


def _packets(cfg, n: int = 4):
    return synthetic_packets(cfg, n)


def _cfg(algorithm: str, precision: str):
    hidden = "60,30" if algorithm == "deeper" else "64,32"   # deeper: class groups of 10
    return load_config(None, [f"model.algorithm={algorithm}", f"model.hidden={hidden}",
                              "train.batch_size=32", f"train.precision={precision}"])


@pytest.mark.parametrize("algorithm", ["ff", "symba", "mono", "deeper"])
def test_bf16_computes_in_bfloat16_and_hands_on_float32(algorithm):
    packets = _packets(_cfg(algorithm, "float32"))
    stages = {}
    for precision in ("float32", "bf16"):
        stage = Stage(build_layers(_cfg(algorithm, precision)))
        for p in packets:
            out, _ = stage.train_step(p)
            assert all(v.dtype == torch.float32 for v in out.values() if v.is_floating_point())
        stages[precision] = stage.state_dict()
    a, b = stages["float32"], stages["bf16"]
    assert all(v.dtype == torch.float32 for v in b.values() if v.is_floating_point())  # weights: f32
    assert any(not torch.equal(a[k], b[k]) for k in a)          # the maths did change precision


def test_bf16_one_stage_equals_two_stages():
    """The golden rule under bf16: layers split over stages end with one stage's weights."""
    cfg = _cfg("ff", "bf16")
    assert_two_stages_equal_one(cfg, _packets(cfg))


def test_an_unknown_precision_is_a_clear_error():
    with pytest.raises(ConfigError, match="train.precision"):
        _cfg("ff", "fp8")
