"""The Python entry points behind `import bpfree` (see its docstring): one config rule, one data
rule, one `Run` for every loop. The loops themselves are bpfree_core.run.trainer (train, pipeline),
server.coordinator via server.simulate (federated) and bpfree_core.continual.stream."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bpfree.cli.common import SHORTCUTS
from bpfree_core.config import ExperimentConfig, load_config
from bpfree_core.data.datasets import bind_data, default_cache_dir
from bpfree_core.errors import ConfigError
from bpfree_core.run.callbacks import Callback
from bpfree_core.run.rundir import read_records


@dataclass
class Run:
    """A finished run: its summary, its per-epoch (round, task) records and its weights."""

    config: ExperimentConfig
    summary: dict[str, Any]
    weights: dict[str, torch.Tensor]
    metrics: list[dict[str, Any]] = field(default_factory=list)
    run_dir: Path | None = None

    def predict(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """Class ids for samples shaped like the training data (scaled the same way: uint8
        images to [0, 1]; CSV features standardised as csv: does)."""
        return self.scores(x).argmax(1).numpy()

    def scores(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Class scores (N, C): what bpfree predicts by (bpfree_core.predict.ScoreModel)."""
        from bpfree_core.data.readers import as_features
        from bpfree_core.predict import ScoreModel, scores

        x = torch.from_numpy(as_features(np.asarray(x)).reshape(len(x), -1))
        return scores(ScoreModel(self.config, self.weights), x)

    def export(self, path: str | Path, fmt: str = "pt2") -> Path:
        """A torch.export program: torch.export.load(path).module()(x) -> class scores, without
        bpfree (`fmt="torchscript"`: torch.jit.load instead)."""
        from bpfree_core.predict import export

        return export(self.config, self.weights, Path(path), fmt=fmt)


class EarlyStopping:
    """Stop when `monitor` (default val_accuracy, the best method's) has not improved by more
    than `min_delta` for `patience` epochs or rounds."""

    def __init__(self, monitor: str = "val_accuracy", patience: int = 3, min_delta: float = 0.0):
        self.monitor, self.patience, self.min_delta = monitor, patience, min_delta
        self.best, self.waited = -float("inf"), 0

    def __call__(self, record: dict[str, Any]) -> bool:
        value = record.get(self.monitor)
        if isinstance(value, dict):
            value = max(value.values(), default=None)
        if value is None:
            raise ConfigError(f"EarlyStopping watches {self.monitor!r}, which the records lack; "
                              "set train.validation = N (val_accuracy) or pick another key")
        if value > self.best + self.min_delta:
            self.best, self.waited = value, 0
            return False
        self.waited += 1
        return self.waited >= self.patience


def resolve_config(config: Any = None, data: Any = None, set: Sequence[str] = (),  # noqa: A002
                   **shortcuts: Any) -> ExperimentConfig:
    """The run's config: `config`, then the keyword shortcuts and `data`, then `set`."""
    unknown = sorted(k for k in shortcuts if k not in SHORTCUTS)
    if unknown:
        raise ConfigError(f"unknown keyword(s) {', '.join(unknown)}; use {', '.join(SHORTCUTS)} "
                          "or set=['section.key=value']")
    overrides = [f"{SHORTCUTS[k]}={_text(v)}" for k, v in shortcuts.items() if v is not None]
    if data is not None:
        overrides.append(f"model.dataset={dataset_reference(data)}")
    if isinstance(config, ExperimentConfig):
        cfg = config.with_overrides(overrides + list(set))
    elif isinstance(config, dict):
        cfg = ExperimentConfig.from_dict(config).with_overrides(overrides + list(set))
    else:
        cfg = load_config(config, overrides + list(set))
    return bind_data(cfg)


def _text(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


def dataset_reference(data: Any) -> str:
    """`model.dataset` for `data`: a name as given; arrays or torch Datasets written once to a
    content-addressed npz under the cache ($BPFREE_CACHE_DIR/arrays/<sha>.npz)."""
    if isinstance(data, str | Path):
        return str(data)
    if isinstance(data, dict):
        arrays = {k: np.asarray(v) for k, v in data.items()}
    elif isinstance(data, tuple | list) and len(data) == 2:
        arrays = {}
        for part, ds in zip(("train", "test"), data, strict=True):
            xs, ys = zip(*(ds[i] for i in range(len(ds))), strict=True)
            arrays[f"x_{part}"] = np.stack([np.asarray(x) for x in xs])
            arrays[f"y_{part}"] = np.asarray([int(y) for y in ys])
    elif isinstance(data, tuple | list) and len(data) in (4, 6):
        keys = ("x_train", "y_train", "x_test", "y_test", "x_val", "y_val")
        arrays = {k: np.asarray(v) for k, v in zip(keys, data, strict=False)}
    else:
        raise ConfigError("data must be a dataset name (npz:PATH, csv:DIR, folder:PATH, mnist, ...), "
                          "arrays (x_train, y_train, x_test, y_test[, x_val, y_val]), a dict of "
                          "them, or a (train, test) pair of torch Datasets")
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    raw = buf.getvalue()
    path = default_cache_dir() / "arrays" / f"{hashlib.sha256(raw).hexdigest()[:20]}.npz"
    if not path.is_file():
        from bpfree_core.run.checkpoint import atomic_write_bytes

        atomic_write_bytes(path, raw)
    return f"npz:{path}"


def _run(cfg: ExperimentConfig, out: str | Path | None, go: Callable[..., dict[str, Any]],
         callbacks: Sequence[Callback]) -> Run:
    seen: list[dict[str, Any]] = []
    run_dir = Path(out) if out is not None else None
    summary = go(run_dir, [seen.append, *callbacks])
    weights = summary.pop("weights")
    return Run(cfg, summary, weights, read_records(run_dir) if run_dir else seen, run_dir)


def train(config: Any = None, *, data: Any = None, out: str | Path | None = None,
          callbacks: Sequence[Callback] = (), resume: bool = False, overwrite: bool = False,
          progress: bool = False, set: Sequence[str] = (), **shortcuts: Any) -> Run:  # noqa: A002
    """The single-process reference trainer (`bpfree train`)."""
    from bpfree_core.run.trainer import train_reference

    cfg = resolve_config(config, data, set, **shortcuts)
    return _run(cfg, out, lambda rd, cbs: train_reference(cfg, rd, resume, progress, overwrite, cbs),
                callbacks)


def pipeline(config: Any = None, *, data: Any = None, out: str | Path | None = None,
             callbacks: Sequence[Callback] = (), stages: int | None = None,
             workers: Sequence[str] = (), resume: bool = False, overwrite: bool = False,
             progress: bool = False, set: Sequence[str] = (), **shortcuts: Any) -> Run:  # noqa: A002
    """One client's stack on stage worker processes (`bpfree pipeline`): launched on loopback,
    or at `workers` (HOST:PORT in stage order)."""
    from bpfree.client.executor import PipelineExecutor
    from bpfree.client.pipeline import Pipeline
    from bpfree_core.run.trainer import train_epochs

    extra = [f"pipeline.stages={stages}"] if stages else []
    cfg = resolve_config(config, data, [*extra, *set], **shortcuts)

    def go(rd: Path | None, cbs: Sequence[Callback]) -> dict[str, Any]:
        pipe = Pipeline.connect(cfg, list(workers)) if workers else Pipeline.launch_local(
            cfg, threads=max(cfg.train.threads, 1))
        with pipe:
            return train_epochs(cfg, PipelineExecutor.from_pipeline(pipe), rd, resume, progress,
                                overwrite, cbs)

    return _run(cfg, out, go, callbacks)


def simulate(config: Any = None, *, data: Any = None, out: str | Path = "runs/simulate",
             callbacks: Sequence[Callback] = (), resume: bool = False, overwrite: bool = False,
             progress: bool = False, set: Sequence[str] = (), **shortcuts: Any) -> Run:  # noqa: A002
    """A federation on Flower's simulation runtime (`bpfree simulate`); callbacks see each round
    as it is committed, and a truthy answer ends the run after the round in flight."""
    from bpfree.server.simulate import simulate as run_simulation

    cfg = resolve_config(config, data, set, **shortcuts)
    return _run(cfg, out, lambda rd, cbs: run_simulation(cfg, rd, resume, progress,
                                                         overwrite=overwrite, callbacks=cbs),
                callbacks)


def continual(config: Any = None, *, data: Any = None, out: str | Path | None = None,
              callbacks: Sequence[Callback] = (), executor: str = "inprocess",
              overwrite: bool = False, progress: bool = False, set: Sequence[str] = (),  # noqa: A002
              **shortcuts: Any) -> Run:
    """A task stream (`bpfree continual`); callbacks see each task's record."""
    from bpfree.server.continual import continual as run_stream
    from bpfree_core.continual.stream import continual_config

    cfg = continual_config(resolve_config(config, data, set, **shortcuts))
    return _run(cfg, out, lambda rd, cbs: run_stream(cfg, executor, rd, progress, overwrite, cbs),
                callbacks)
