"""train.compile: each layer's forward and loss through torch.compile, on CPU (inductor).

Compiled kernels fuse the elementwise work, so their float results differ from eager in the last
bits: the tests bound that difference on one step's outputs, keep the golden rule (a compiled
stack split over stages ends bit-identical to the unsplit compiled stack) and refuse the option
where an objective has no compiled step.
"""

from __future__ import annotations

import pytest
import torch

from bpfree_core.config import load_config
from bpfree_core.errors import ConfigError
from bpfree_core.model import Stage, build_layers, build_objective
from tests.support import assert_packets_close, assert_two_stages_equal_one, synthetic_packets


def _cfg(algorithm: str, compiled: bool, *extra: str):
    return load_config(None, [f"model.algorithm={algorithm}", "model.hidden=64,32",
                              "train.batch_size=32", f"train.compile={str(compiled).lower()}", *extra])


@pytest.mark.parametrize("algorithm", ["ff", "symba", "sffa", "mono"])
def test_a_compiled_step_computes_what_eager_does_within_float_rounding(algorithm):
    """One step from the same weights: the losses within 1e-5, every handed-on tensor within 1e-4
    (the neutral pass follows the step, where Adam can turn a last-bit difference in a near-zero
    gradient into a step of lr), and the compiled function really ran (it was built)."""
    packet = synthetic_packets(_cfg(algorithm, False), 1)[0]
    outs, losses, weights = {}, {}, {}
    for compiled in (False, True):
        stage = Stage(build_layers(_cfg(algorithm, compiled)))
        outs[compiled], metrics = stage.train_step(packet)
        weights[compiled] = stage.state_dict()
        losses[compiled] = torch.stack([m["loss"] for m in metrics.values()])
        built = [layer.__dict__.get("_compiled", {}) for layer in stage.layers]
        assert all("forward_loss" in b for b in built) == compiled
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-5, atol=1e-6)
    # other bits (so a compiled pipeline that equals a compiled reference shows it compiled too)
    assert any(not torch.equal(weights[True][k], weights[False][k]) for k in weights[False])
    assert_packets_close(outs[True], outs[False])


def test_compiled_layers_split_over_stages_end_bit_identical():
    """The golden rule under train.compile: stage 0 | stage 1 = the whole compiled stack."""
    cfg = _cfg("ff", True)
    assert_two_stages_equal_one(cfg, synthetic_packets(cfg, 3))


@pytest.mark.parametrize("algorithm", ["deeper", "ffcl", "bp"])
def test_compile_is_refused_where_an_objective_has_no_compiled_step(algorithm):
    with pytest.raises(ConfigError, match="train.compile = true but .* has no compiled step"):
        build_objective(_cfg(algorithm, True, "model.hidden=60,30"))
