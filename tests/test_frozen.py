"""train.layer_epochs: a staged schedule whose frozen layers stop stepping, and whose frozen
outputs are kept per sample instead of recomputed (bpfree_core.frozen), ending bit-identical to
the run that recomputes them, in one process and across stage workers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bpfree_core import frozen
from bpfree_core.config import load_config
from bpfree_core.data.batches import train_packets
from bpfree_core.data.datasets import Split
from bpfree_core.errors import ConfigError
from bpfree_core.frozen import caches
from bpfree_core.layers import LocalLayer
from bpfree_core.model import Stage, build_layers, build_objective
from tests.test_pipeline import _assert_pipeline_equals_reference, _cfg

EPOCHS = 4
RULES = [("deeper", ["model.conv=20,20,40", "model.hidden=[]", "train.layer_epochs=1,2,4"]),
         ("asge", ["model.conv=16,32,32", "model.hidden=[]", "train.layer_epochs=1,2,4"]),
         ("mono", ["model.hidden=60,60,60", "train.layer_epochs=2,2,4"])]


def _split(n: int = 160) -> Split:
    gen = torch.Generator().manual_seed(0)
    return Split(torch.rand(n, 784, generator=gen), torch.randint(0, 10, (n,), generator=gen))


def _train(algorithm: str, extra: list[str], *more: str) -> tuple[Stage, list[dict]]:
    """EPOCHS epochs in one Stage, as the in-process executor runs them; the weights after each."""
    cfg = load_config(None, [f"model.algorithm={algorithm}", "train.batch_size=16",
                             f"train.epochs={EPOCHS}", *extra, *more])
    stage, objective, split = Stage(build_layers(cfg)), build_objective(cfg), _split()
    after = []
    for epoch in range(EPOCHS):
        stage.set_epoch(epoch, EPOCHS)
        for packet in train_packets(objective, split, cfg, epoch):
            stage.train_step(packet)
        after.append(stage.state_dict())
    return stage, after


def test_bad_schedules_say_what_to_do() -> None:
    for value, says in [("3,2", "must not decrease"), ("0,2", r"1..train.epochs \(4\)"),
                        ("2,5", r"1..train.epochs \(4\)")]:
        with pytest.raises(ConfigError, match=says):
            load_config(None, ["train.epochs=4", f"train.layer_epochs={value}"])
    with pytest.raises(ConfigError, match="has 2 entries but the model has 3 layers"):
        build_layers(load_config(None, ["model.hidden=8,8,8", "train.epochs=4",
                                        "train.layer_epochs=2,4", "model.algorithm=mono"]))
    with pytest.raises(ConfigError, match="ff's layers do not hand on one tensor per sample"):
        build_objective(load_config(None, ["train.epochs=4", "train.layer_epochs=2,4"]))


def test_a_frozen_layer_stops_and_the_layers_after_it_go_on() -> None:
    _, after = _train(*RULES[0])
    for epoch in range(1, EPOCHS):
        changed = {k.split(".")[1] for k in after[epoch] if not torch.equal(after[epoch][k],
                                                                            after[epoch - 1][k])}
        assert changed == {str(i) for i, stop in enumerate((1, 2, 4)) if stop > epoch}, epoch


@pytest.mark.parametrize(("algorithm", "extra"), RULES, ids=[r[0] for r in RULES])
def test_cached_and_recomputed_runs_end_bit_identical(algorithm: str, extra: list[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    frozen_step = LocalLayer.frozen_step

    def counted(self: LocalLayer, packet):  # noqa: ANN001, ANN202
        calls["n"] += 1
        return frozen_step(self, packet)

    monkeypatch.setattr(LocalLayer, "frozen_step", counted)
    _, recomputed = _train(algorithm, extra, "train.cache_frozen=false")
    uncached_calls, calls["n"] = calls["n"], 0
    _, cached = _train(algorithm, extra)
    for k, v in recomputed[-1].items():
        assert torch.equal(cached[-1][k], v), k
    # each frozen layer ran once per batch, in its first frozen epoch, and never again
    assert (calls["n"], uncached_calls) == (20, {"mono": 40}.get(algorithm, 50))


def test_what_depends_on_its_batch_or_changes_each_epoch_is_not_cached() -> None:
    cwc = load_config(None, ["model.algorithm=cwc", "model.conv=20,40", "model.hidden=[]",
                             "train.epochs=2", "train.layer_epochs=1,2"])
    assert not caches(cwc, build_objective(cwc))   # BatchNorm over the batch
    jitter = load_config(None, ["model.algorithm=mono", "model.hidden=8,8", "train.epochs=2",
                                "train.layer_epochs=1,2", "train.jitter=2"])
    assert not caches(jitter, build_objective(jitter))   # the input shifts every epoch
    packet = next(iter(train_packets(build_objective(jitter), _split(), jitter, 0)))
    assert "index" not in packet


def test_loading_weights_forgets_the_kept_outputs() -> None:
    stage, after = _train(*RULES[2])
    assert stage.frozen_outputs.lookup(torch.arange(16), stage.frozen) is not None
    stage.load_state_dict(after[0])
    assert stage.frozen_outputs.lookup(torch.arange(16), stage.frozen) is None


def test_a_staged_cached_pipeline_matches_the_reference_exactly(data_dir: Path,
                                                                tmp_path: Path) -> None:
    """Stage 1 holds layers 0-1 (frozen after epochs 1 and 2: it gathers from its cache in epoch
    3), stage 2 layer 2-3; the sample index travels with each batch."""
    _assert_pipeline_equals_reference(_cfg(
        data_dir, "model.algorithm=deeper", "model.conv=10,10,20,20", "model.hidden=[]",
        "optim.lr=1e-2", "pipeline.stages=2", "train.epochs=3", "train.layer_epochs=1,2,2,3",
        "train.predict=both"), tmp_path)


def test_each_staged_layer_cools_down_over_its_own_epochs() -> None:
    """A layer that freezes after 4 of 8 epochs anneals within those 4, not over the run's 8."""
    cfg = load_config(None, ["model.algorithm=mono", "model.hidden=8,8", "train.epochs=8",
                             "train.layer_epochs=4,8", "optim.lr=0.01"])
    early, late = build_layers(cfg)
    rates = []
    for epoch in range(8):
        early.set_epoch(epoch, 8)
        late.set_epoch(epoch, 8)
        rates.append((early.optimizer.param_groups[0]["lr"], late.optimizer.param_groups[0]["lr"]))
    assert [round(e, 5) for e, _ in rates[:4]] == [0.01, 0.01, 0.01, 0.00667]
    assert [round(t, 5) for _, t in rates[4:]] == [0.01, 0.008, 0.006, 0.004]


def test_the_cache_is_sized_to_the_split_not_doubled_as_it_fills() -> None:
    """160 samples; in the last epoch layers 0-1 are frozen and their c20 28x28 outputs kept:
    exactly 160 rows (256 had it doubled as it filled), the depth-1 cache gone once spent."""
    stage, _ = _train(*RULES[0])
    assert stage.frozen_outputs.nbytes == 160 * 20 * 28 * 28 * 4


def test_a_cache_that_does_not_fit_is_declined_and_the_run_recomputes(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """With 1 MB free, the 2 MB cache is not kept: a warning, no memory held, the same weights."""
    _, recomputed = _train(*RULES[0], "train.cache_frozen=false")
    monkeypatch.setattr(frozen, "free_bytes", lambda device: 1_000_000)
    stage, cached = _train(*RULES[0])
    assert stage.frozen_outputs.nbytes == 0 and stage.frozen_outputs.declined
    assert "not kept" in caplog.text and "recomputing" in caplog.text
    for k, v in recomputed[-1].items():
        assert torch.equal(v, cached[-1][k]), k
