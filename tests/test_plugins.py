"""Your own local rule: a class from outside bpfree, loaded by every process.

* the worked example (examples/fixed_random_classifier.py, named by its file) learns, and ends
  bit-identical to the single-process reference on a 2-stage pipeline (the stage workers import
  the file) and in a 2-client Flower simulation (the ClientApps import it);
* the same rule named as a module (pkg.module:Class), a subclass of a built-in rule reached
  through the registry, and an installed plug-in (entry point group `bpfree.objectives`);
* a rule that cannot be loaded is one sentence, in the driver and on a stage worker.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from bpfree.cli import main
from bpfree.client.supervisor import REPO_ROOT
from bpfree_core.config import load_config
from bpfree_core.errors import BpfreeError, ConfigError
from bpfree_core.objectives import registered
from bpfree_core.run.trainer import train_reference

EXAMPLE = REPO_ROOT / "examples" / "fixed_random_classifier.py"
RULE = f"{EXAMPLE}:FixedRandomClassifier"
SMALL = ["model.hidden=80,80", "train.train_limit=2000", "train.test_limit=500", "train.threads=1",
         "train.batch_size=100", "train.epochs=2", "pipeline.stages=2"]


@pytest.fixture(autouse=True)
def one_thread():  # noqa: ANN201 - the reference runs on one thread, as each stage does
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cfg(data_dir: Path, algorithm: str, *extra: str):  # noqa: ANN202
    return load_config(None, [f"train.data_dir={data_dir}", f"model.algorithm={algorithm}", *SMALL,
                              *extra])


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_example_is_short_and_learns(data_dir: Path) -> None:
    assert len(EXAMPLE.read_text().splitlines()) < 100
    out = train_reference(_cfg(data_dir, RULE, "train.epochs=2", "train.train_limit=6000"), None,
                          progress=False)
    assert out["test_accuracy"] > 0.85, out["test_accuracy"]


def test_the_example_on_a_pipeline_and_in_a_flower_simulation_equals_the_reference(
        data_dir: Path, tmp_path: Path) -> None:
    from bpfree.client.pipeline import Pipeline
    from bpfree.client.train import train_pipeline
    from bpfree.server.reference import federated_reference
    from bpfree.server.simulate import simulate

    cfg = _cfg(data_dir, RULE)
    reference = train_reference(cfg, None, progress=False)["weights"]
    with Pipeline.launch_local(cfg) as pipe:
        assert _same(train_pipeline(cfg, pipe, progress=False)["weights"], reference)
    fed = _cfg(data_dir, RULE, "federation.clients=2", "federation.rounds=2",
               "federation.executor=inprocess")
    summary = simulate(fed, tmp_path / "sim")
    assert _same(summary["weights"], federated_reference(fed))


def test_a_rule_named_by_module_a_subclass_of_a_builtin_and_an_installed_plugin(
        data_dir: Path, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    by_file = train_reference(_cfg(data_dir, RULE, "train.epochs=1"), None, progress=False)
    by_module = train_reference(_cfg(data_dir, "examples.fixed_random_classifier:"
                                     "FixedRandomClassifier", "train.epochs=1"), None, progress=False)
    assert _same(by_file["weights"], by_module["weights"])
    # a subclass of Mono-Forward, reached through the registry: the built-in's weights
    (tmp_path / "my_mono.py").write_text(textwrap.dedent("""
        from bpfree_core.objectives import registered

        class MyMono(registered()["mono"]):
            pass
    """))
    mine = train_reference(_cfg(data_dir, f"{tmp_path / 'my_mono.py'}:MyMono", "train.epochs=1"),
                           None, progress=False)
    mono = train_reference(_cfg(data_dir, "mono", "train.epochs=1"), None, progress=False)
    assert _same(mine["weights"], mono["weights"])
    # an installed package that declares the rule under the entry point group
    dist = tmp_path / "site" / "frc_plugin-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: frc-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[bpfree.objectives]\nfrc = examples.fixed_random_classifier:FixedRandomClassifier\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert "frc" in registered()
    plugin = train_reference(_cfg(data_dir, "frc", "train.epochs=1"), None, progress=False)
    assert _same(plugin["weights"], by_file["weights"])


def test_a_rule_that_cannot_be_loaded_is_one_sentence_here_and_on_a_worker(
        data_dir: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    for algorithm, says in (("no_such_module:Rule", "No module named 'no_such_module'"),
                            ("examples.fixed_random_classifier:Nope", "has no attribute 'Nope'"),
                            ("torch:nn", "not a subclass of bpfree_core.objectives.Objective"),
                            (f"{tmp_path}/missing.py:Rule", "does not exist here")):
        assert main(["train", "--algorithm", algorithm, "--data-dir", str(data_dir)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and says in err, err
    # the driver loads the rule; a stage worker that cannot (the file is gone there) says so
    from bpfree.client.pipeline import Pipeline

    rule = tmp_path / "rule.py"
    rule.write_text(EXAMPLE.read_text())
    cfg = _cfg(data_dir, f"{rule}:FixedRandomClassifier")
    rule.unlink()
    with pytest.raises(BpfreeError, match=r"rule.py does not exist here"):
        Pipeline.launch_local(cfg).close()
    with pytest.raises(ConfigError, match="not a known rule"):
        _cfg(data_dir, "no-such-rule")
