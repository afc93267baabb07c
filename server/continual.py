"""Continual learning: a task stream (SplitMNIST) through one process, a pipeline of stage
workers or a federation (`bpfree continual`: bpfree/cli/continual.py)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bpfree_core.config import ExperimentConfig
from bpfree_core.continual.stream import run_continual
from bpfree_core.errors import ConfigError
from bpfree_core.run.callbacks import Callback
from bpfree_core.run.executor import InProcessExecutor
from bpfree_core.runtime import resolve_device, set_threads


def continual(cfg: ExperimentConfig, executor: str = "inprocess", run_dir: Path | None = None,
              progress: bool = True, overwrite: bool = False,
              callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Run the task stream through one process or a local pipeline of stage workers."""
    set_threads(cfg.train.threads)
    if cfg.continual.federated:
        from bpfree.server.simulate import simulate

        if run_dir is None:
            raise ConfigError("a federated continual run needs a run directory")
        return simulate(cfg, run_dir, progress=progress, overwrite=overwrite, callbacks=callbacks)
    if executor == "pipeline":
        from bpfree.client.executor import PipelineExecutor
        from bpfree.client.pipeline import Pipeline

        with Pipeline.launch_local(cfg, threads=max(cfg.train.threads, 1)) as pipe:
            return run_continual(cfg, PipelineExecutor.from_pipeline(pipe), run_dir, progress,
                                 overwrite, callbacks)
    with InProcessExecutor(cfg, resolve_device(cfg.train.device)) as ex:
        return run_continual(cfg, ex, run_dir, progress, overwrite, callbacks)


