"""Where a client's layers run never changes its weights: a fixed pool of pipelines that the
sampled clients take in turn (pipeline.pool), and clients on different numbers of stages
(pipeline.client_stages, node_config `stages`), each equal to the in-process reference."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from bpfree.client.pool import lease, parse_pool
from bpfree.server.reference import federated_reference
from bpfree.server.simulate import simulate
from bpfree_core.config import load_config
from bpfree_core.errors import ConfigError

SMALL = ["train.train_limit=1500", "train.test_limit=300", "model.hidden=60,60,60",
         "model.algorithm=symba", "train.threads=1", "federation.rounds=2",
         "federation.executor=pipeline", "train.batch_size=100", "train.jitter=0"]


def _cfg(data_dir: Path | None, *extra: str):
    base = [f"train.data_dir={data_dir}"] if data_dir else []
    return load_config(None, [*base, *SMALL, *extra])


def _differing(summary: dict, reference: dict) -> list[str]:
    return [k for k in reference if not torch.equal(summary["weights"][k], reference[k])]


def _configured(stage_log: Path) -> list[str]:
    """The run ids a stage worker was configured for (once per run: later rounds attach)."""
    return re.findall(r"configured run (\S+): stage", stage_log.read_text())


def test_bad_placement_settings_are_one_sentence(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="client_stages has '1=x'"):
        _cfg(None, "pipeline.client_stages=0=2,1=x")
    with pytest.raises(ConfigError, match="names client 7, but federation.clients = 3"):
        simulate(_cfg(data_dir, "federation.clients=3", "pipeline.client_stages=7=1"), tmp_path / "a")
    with pytest.raises(ConfigError, match="need federation.executor = pipeline"):
        simulate(_cfg(data_dir, "pipeline.pool=2", "federation.executor=inprocess"), tmp_path / "b")
    with pytest.raises(ConfigError, match="drop pipeline.client_stages or pipeline.pool"):
        simulate(_cfg(data_dir, "pipeline.pool=2", "pipeline.client_stages=0=1"), tmp_path / "c")
    with pytest.raises(ConfigError, match="client 1 5 stages but the model has only 3 layer"):
        simulate(_cfg(data_dir, "federation.clients=3", "pipeline.client_stages=1=5"), tmp_path / "d")


def test_a_pipeline_is_leased_to_one_client_at_a_time(tmp_path: Path) -> None:
    pool = parse_pool("0=h:1,h:2;1=h:3,h:4")
    with lease(pool, tmp_path, client=4) as first, lease(pool, tmp_path, client=4) as second:
        assert first == ["h:1", "h:2"] and second == ["h:3", "h:4"]   # 4 mod 2 = 0 taken: the next
    with lease(pool, tmp_path, client=5) as again:
        assert again == ["h:3", "h:4"]   # both free again: client 5 starts at 5 mod 2


def test_a_pool_of_two_pipelines_serves_five_clients_and_equals_the_reference(
        data_dir: Path, tmp_path: Path) -> None:
    cfg = _cfg(data_dir, "federation.clients=5", "federation.fraction_train=0.6",
               "pipeline.pool=2", "pipeline.stages=2")
    summary = simulate(cfg, tmp_path / "run")
    assert _differing(summary, federated_reference(cfg)) == []
    logs = tmp_path / "run" / "logs"
    assert sorted(p.name for p in logs.iterdir() if p.name.startswith(("pool", "client"))) == \
        ["pool0", "pool1"]
    configured = [run for p in ("pool0", "pool1") for run in _configured(logs / p / "stage0.log")]
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(len(x["sampled"]) for x in lines) == 6   # 3 clients x 2 rounds, on 2 pipelines,
    assert len(configured) == 2                         # each configured once for the whole run


def test_clients_on_one_two_and_three_stages_equal_the_reference(data_dir: Path, tmp_path: Path) -> None:
    cfg = _cfg(data_dir, "federation.clients=3", "pipeline.stages=2",
               "pipeline.client_stages=0=1,2=3")
    summary = simulate(cfg, tmp_path / "run")
    assert _differing(summary, federated_reference(cfg)) == []
    logs = tmp_path / "run" / "logs"
    for client, stages in enumerate((1, 2, 3)):
        assert sorted(p.name for p in (logs / f"client{client}").glob("stage*.log")) == \
            [f"stage{s}.log" for s in range(stages)]
        assert f"stage 0/{stages}," in (logs / f"client{client}" / "stage0.log").read_text()
