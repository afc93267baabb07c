"""train.one_pass: positive and negative data through each goodness layer as one batch.

One matmul each way instead of two (and no sum of two weight gradients), so the float bits
differ from the default's: the tests bound the difference on one step, keep the golden rule (the
split stack and a real pipeline of stage workers end with the one-pass single process's
weights; tests/test_pipeline.py) and refuse the option where there are no negatives to join.
"""

from __future__ import annotations

import pytest
import torch

from bpfree_core.config import load_config
from bpfree_core.errors import ConfigError
from bpfree_core.model import Stage, build_layers, build_objective
from tests.support import assert_packets_close, assert_two_stages_equal_one, synthetic_packets


def _cfg(algorithm: str, one_pass: bool, *extra: str):
    return load_config(None, [f"model.algorithm={algorithm}", "model.hidden=64,32",
                              "train.batch_size=32", f"train.one_pass={str(one_pass).lower()}",
                              *extra])


@pytest.mark.parametrize("algorithm,extra", [("ff", ()), ("symba", ()), ("sffa", ()),
                                             ("symba", ("objective.negatives=hard",)),
                                             ("sffa", ("objective.input_skip=true",))])
def test_one_pass_computes_what_two_passes_do_within_float_rounding(algorithm, extra):
    packets = synthetic_packets(_cfg(algorithm, False, *extra), 2)
    outs, losses, weights = {}, {}, {}
    for one_pass in (False, True):
        stage = Stage(build_layers(_cfg(algorithm, one_pass, *extra)))
        outs[one_pass], metrics = stage.train_step(packets[0])
        losses[one_pass] = torch.stack([m["loss"] for m in metrics.values()])
        stage.train_step(packets[1])
        weights[one_pass] = stage.state_dict()
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-5, atol=1e-6)
    assert_packets_close(outs[True], outs[False])
    assert any(not torch.equal(weights[True][k], weights[False][k]) for k in weights[False])


def test_one_pass_layers_split_over_stages_end_bit_identical():
    cfg = _cfg("symba", True)
    assert_two_stages_equal_one(cfg, synthetic_packets(cfg, 3))


@pytest.mark.parametrize("algorithm", ["mono", "deeper", "ffcl", "bp"])
def test_one_pass_is_refused_where_there_are_no_negatives_to_join(algorithm):
    with pytest.raises(ConfigError, match="train.one_pass = true but .* no positive and negative"):
        build_objective(_cfg(algorithm, True, "model.hidden=60,30"))
