"""A client's stack trained through a pipeline of stage workers: the reference's epoch loop
(bpfree_core.run.trainer) over a PipelineExecutor, and the final weights kept in RUN_DIR."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bpfree.client.executor import PipelineExecutor
from bpfree.client.pipeline import Pipeline
from bpfree_core.config import ExperimentConfig
from bpfree_core.errors import RunDirError
from bpfree_core.run.checkpoint import save_checkpoint
from bpfree_core.run.rundir import os_error_sentence
from bpfree_core.run.trainer import train_epochs


def train_pipeline(cfg: ExperimentConfig, pipe: Pipeline, run_dir: Path | None = None,
                   progress: bool = True, resume: bool = False,
                   overwrite: bool = False) -> dict[str, Any]:
    """Train cfg.train.epochs epochs through `pipe`: the same epoch loop as `bpfree train`,
    with a checkpoint (weights + optimiser state of every stage) after each epoch, and a dead
    stage restarted (launched workers) and its epoch rerun, up to pipeline.restarts times."""
    summary = train_epochs(cfg, PipelineExecutor.from_pipeline(pipe), run_dir, resume=resume,
                           progress=progress, overwrite=overwrite)
    if run_dir:
        try:
            save_checkpoint(run_dir / "weights.pt", {"config": cfg.to_dict(),
                                                     "weights": summary["weights"]})
        except OSError as exc:
            raise RunDirError(os_error_sentence(exc, run_dir / "weights.pt", "writing")) from None
    return summary
