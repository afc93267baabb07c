"""Config: TOML + overrides coerced to declared types; bad values name the field and the fix."""

import pytest

from bpfree_core.config import ExperimentConfig, load_config
from bpfree_core.errors import ConfigError


def test_overrides_are_coerced_to_field_types():
    cfg = ExperimentConfig().with_overrides(
        ["train.epochs=3", "optim.lr=0.01", "model.hidden=3x100", "objective.icp=false",
         "model.algorithm=symba"])
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.optim.lr == 0.01
    assert cfg.model.hidden == (100, 100, 100)
    assert cfg.objective.icp is False
    assert cfg.model.algorithm == "symba"


def test_toml_round_trip(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[model]\nalgorithm = "sffa"\nhidden = [64, 32]\n[train]\nepochs = 4\n')
    cfg = load_config(path, ["train.seed=7"])
    assert (cfg.model.algorithm, cfg.model.hidden, cfg.train.epochs, cfg.train.seed) == (
        "sffa", (64, 32), 4, 7)
    assert ExperimentConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("model.algorithm=nope", ["model.algorithm = 'nope'", "asge, bp, cwc, deeper, ff, ffcl, mono",
                                  "pkg.module:Class"]),
        ("train.epochs=two", ["train.epochs", "int"]),
        ("train.epochs=0", ["train.epochs", "> 0"]),
        ("model.hidden=100,1", ["model.hidden[1]", ">= 2"]),
        ("train.nope=1", ["train.nope", "valid keys", "epochs"]),
        ("nosection.x=1", ["unknown section", "train"]),
        ("epochs", ["section.key=value"]),
        ("federation.partition=dirichlet:-1", ["federation.partition", "dirichlet:ALPHA"]),
        ("pipeline.wire_dtype=int4", ["pipeline.wire_dtype", "bfloat16, float16, int8"]),
        ("objective.temperature=0", ["objective.temperature", "> 0"]),
        ("objective.negatives=random", ["objective.negatives", "uniform, hard"]),
        ("train.validation=-5", ["train.validation", ">= 0"]),
    ],
)
def test_bad_values_name_the_field_and_the_fix(override, words):
    with pytest.raises(ConfigError) as err:
        ExperimentConfig().with_overrides([override])
    for word in words:
        assert word in str(err.value)


def test_a_validation_split_must_leave_images_to_train_on():
    with pytest.raises(ConfigError, match="train.validation = 1000 leaves nothing of "
                                          "train.train_limit = 1000"):
        ExperimentConfig().with_overrides(["train.train_limit=1000", "train.validation=1000"])
    from bpfree_core.model import build_objective  # the objective's own check

    with pytest.raises(ConfigError, match=r"builds no conv layers \(uff, bp, cwc, deeper and asge do\)"):
        build_objective(ExperimentConfig().with_overrides(["model.algorithm=mono", "model.conv=8"]))


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nepochs = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    latin = tmp_path / "latin.toml"
    latin.write_bytes("[train]\nepochs = 1   # caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin.toml is not UTF-8 text \(byte 0xe9 at offset 26\)"):
        load_config(latin)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[trian]\nepochs = 1\n")
    with pytest.raises(ConfigError, match=r"unknown config section \[trian\]"):
        load_config(unknown)


def test_every_field_is_computed_runtime_or_secret_and_secrets_never_serialise():
    cfg = ExperimentConfig().with_overrides(["pipeline.token=s3cret", "train.threads=2"])
    computed, runtime, public = cfg.computed_dict(), cfg.runtime_dict(), cfg.to_dict()
    for section, values in public.items():
        assert set(values) == set(computed[section]) | set(runtime[section])
        assert not set(computed[section]) & set(runtime[section])
    assert "token" not in public["pipeline"] and "s3cret" not in cfg.to_json() + repr(cfg)
    assert cfg.with_overrides(["train.epochs=3"]).pipeline.token == "s3cret"   # kept in memory
    assert {"threads", "device", "data_dir"} <= set(runtime["train"])
    assert "seed" in computed["train"] and "wire_dtype" in computed["pipeline"]


def test_the_fingerprint_follows_what_is_computed_only():
    base = ExperimentConfig()
    moved = base.with_overrides(["train.threads=4", "pipeline.stages=3", "train.data_dir=/x",
                                 "pipeline.rpc_timeout=5", "federation.executor=inprocess"])
    assert moved.fingerprint() == base.fingerprint()
    assert base.with_overrides(["train.seed=1"]).fingerprint() != base.fingerprint()
    assert base.with_overrides(["pipeline.wire_dtype=bfloat16"]).fingerprint() != base.fingerprint()


def test_resume_refuses_a_changed_computation_and_accepts_a_moved_run(tmp_path):
    from bpfree_core.run.rundir import check_resumable

    saved = ExperimentConfig()
    check_resumable(saved, saved.with_overrides(["train.threads=3", "train.device=cpu"]), tmp_path)
    with pytest.raises(ConfigError, match=r"optim.lr.*same config"):
        check_resumable(saved, saved.with_overrides(["optim.lr=0.1"]), tmp_path)


def test_small_input_errors_say_the_format():
    with pytest.raises(ConfigError, match=r"model.hidden = '3x'.*e.g. 500,500 or 3x1000"):
        ExperimentConfig().with_overrides(["model.hidden=3x"])
    with pytest.raises(ConfigError, match=r"train.threads = -3.*>= 0"):
        ExperimentConfig().with_overrides(["train.threads=-3"])
    import argparse

    from bpfree.cli.common import add_config_arguments
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    assert "cwc" in parser.format_help()


def test_cli_defaults_apply_without_a_config_and_flags_win_over_them(tmp_path):
    import argparse

    from bpfree.cli import simulate
    from bpfree.cli.common import SIMULATE_DEFAULTS, TRAIN_DEFAULTS, add_config_arguments, config_from_args

    def parse(add, *argv: str) -> argparse.Namespace:
        parser = argparse.ArgumentParser()
        add(parser)
        return parser.parse_args(list(argv))

    sim = parse(simulate.add_arguments, "--algorithm", "mono", "--rounds", "2", "--set",
                "train.epochs=3")
    cfg, _, _ = simulate.resolve(sim)
    # --algorithm used to lose to the simulate default (symba) when no --config was given
    assert (cfg.model.algorithm, cfg.federation.rounds, cfg.train.epochs) == ("mono", 2, 3)
    assert simulate.resolve(parse(simulate.add_arguments))[0].model.algorithm == \
        dict(s.split("=") for s in SIMULATE_DEFAULTS)["model.algorithm"]
    train = config_from_args(parse(add_config_arguments, "--layers", "30,30"), TRAIN_DEFAULTS)
    assert train.model.hidden == (30, 30) and train.model.algorithm == "mono"
    toml = tmp_path / "c.toml"
    toml.write_text("[train]\nepochs = 1\n")
    plain = config_from_args(parse(add_config_arguments, "--config", str(toml)), TRAIN_DEFAULTS)
    assert plain.model == ExperimentConfig().model      # a config file starts from the plain defaults


def test_every_device_string_is_checked_once_with_one_sentence(monkeypatch) -> None:  # noqa: ANN001
    """Issue 40: "cuda:x" and "cuda:-1" raised torch's RuntimeError (gRPC UNKNOWN on a worker);
    the missing-GPU sentence printed its own f-string braces."""
    import torch

    from bpfree_core.run.executor import InProcessExecutor
    from bpfree_core.runtime import resolve_device

    for bad in ("cuda:x", "cuda:-1", "gpu", "cuda:", "cuda:0:1"):
        with pytest.raises(ConfigError, match="is not a device; use cpu, cuda or cuda:N"):
            resolve_device(bad)
        with pytest.raises(ConfigError, match="train.device"):
            load_config(None, [f"train.device={bad}"])
    monkeypatch.setattr(torch.version, "cuda", "12.8")   # a CUDA build on a machine with 2 GPUs
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ConfigError, match=r"has 2 GPU\(s\), cuda:0 \.\. cuda:1$"):
        resolve_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no usable CUDA GPU"):   # the in-process executor asks too
        InProcessExecutor(load_config(None, ["train.device=cuda"]), "cuda")
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(ConfigError, match="CPU-only build"):
        resolve_device("cuda")


def test_stages_take_their_devices_in_turn_from_pipeline_devices() -> None:
    from bpfree_core.config import stage_device

    devices = "cuda:0, cuda:1"
    assert [stage_device(devices, s) for s in range(4)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert stage_device("cuda", 3) == "cuda" and stage_device("", 1) == ""   # "": the worker's own
    assert load_config(None, [f"pipeline.devices={devices}"]).pipeline.devices == devices
    with pytest.raises(ConfigError, match="pipeline.devices entry = 'gpu1' is not a device"):
        load_config(None, ["pipeline.devices=cuda:0,gpu1"])
