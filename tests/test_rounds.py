"""Rounds at the cost of training: a run configures its stage workers once. A federated client's
next round (a new driver, maybe in another process of the same run) finds its stages configured
as it would configure them and attaches to them; only a failure configures them again. The
golden rule holds round after round."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from bpfree.client.executor import make_executor
from bpfree.protos import stage_pb2 as pb
from bpfree_core.config import load_config
from bpfree_core.federation.client import client_split, local_round, stack_template, train_split
from bpfree_core.run.executor import InProcessExecutor
from tests.test_worker import Served

ROUNDS = 3


@pytest.fixture
def two_stages() -> Iterator[list[Served]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # the workers' compute threads sum as the 1-thread reference does
    stages = [Served(), Served()]
    torch.set_num_threads(threads)
    yield stages
    for s in stages:
        s.close()


def _cfg(data_dir: Path, *extra: str):  # noqa: ANN202
    return load_config(None, [f"train.data_dir={data_dir}", "model.algorithm=mono", "model.hidden=40,30",
                              "train.train_limit=1200", "train.threads=1", "train.batch_size=100",
                              "federation.clients=2", "pipeline.session=run-x", *extra])


def _rounds(cfg, make) -> list[dict[str, torch.Tensor]]:  # noqa: ANN001
    """ROUNDS rounds of client 0 from the template, a fresh executor each round (as a ClientApp)."""
    data = client_split(cfg, train_split(cfg), 0)
    weights, out = stack_template(cfg), []
    for rnd in range(ROUNDS):
        executor = make()
        try:
            weights = local_round(executor, cfg, data, 0, rnd, weights).weights
        finally:
            executor.close()
        out.append(weights)
    return out


def test_rounds_after_the_first_configure_nothing_and_equal_the_reference(two_stages, data_dir) -> None:  # noqa: ANN001
    cfg = _cfg(data_dir)
    addresses = [s.address for s in two_stages]
    piped = _rounds(cfg, lambda: make_executor(cfg, addresses))
    reference = _rounds(cfg, lambda: InProcessExecutor(cfg))
    for ours, ref in zip(piped, reference, strict=True):
        assert all(torch.equal(ours[k], ref[k]) for k in ref)
    stats = [s.stub.Stats(pb.StatsRequest(), timeout=10) for s in two_stages]
    assert [st.configures for st in stats] == [1, 1]   # round 1 only


def test_another_setup_or_a_recovery_configures_again(two_stages, data_dir) -> None:  # noqa: ANN001
    addresses = [s.address for s in two_stages]
    for cfg in (_cfg(data_dir), _cfg(data_dir, "optim.lr=5e-3")):   # a changed config: configured anew
        make_executor(cfg, addresses).close()
    executor = make_executor(_cfg(data_dir, "optim.lr=5e-3"), addresses)
    try:
        executor.pipeline.recover()   # after a failure: always configured again
    finally:
        executor.close()
    stats = [s.stub.Stats(pb.StatsRequest(), timeout=10) for s in two_stages]
    assert [st.configures for st in stats] == [3, 3]


def test_a_process_parses_a_runs_config_once(data_dir) -> None:  # noqa: ANN001
    from bpfree.client import messages

    cfg = _cfg(data_dir)
    weights = stack_template(cfg)
    messages.parse_experiment.cache_clear()
    got = [messages.read_train_message(messages.train_content(rnd, weights, cfg))[2] for rnd in range(4)]
    assert all(g is got[0] for g in got) and got[0] == cfg
    assert messages.parse_experiment.cache_info().misses == 1   # rounds 2..4 parse nothing
