"""Using a trained model: load a run directory's weights, score inputs, export TorchScript.

`ScoreModel(cfg, weights)` is the whole prediction path in one module: the objective's input
encoding (label pixels, class patterns, the candidate labels of goodness prediction), every
layer's eval step and the vote summed over layers, ending in class scores (B, C) whose argmax is
bpfree's prediction. `export` traces it to TorchScript, which loads with plain torch
(`torch.jit.load`) where bpfree is not installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from bpfree_core.checkpoint import load_checkpoint
from bpfree_core.config import ExperimentConfig
from bpfree_core.data import run_spec
from bpfree_core.errors import DataError
from bpfree_core.evaluation import EVAL_BATCH  # batch-statistics layers (cwc) see what evaluate saw
from bpfree_core.layers import GOODNESS, LOGITS
from bpfree_core.model import build_layers, build_objective
from bpfree_core.readers import as_features


def load_run(run_dir: Path) -> tuple[ExperimentConfig, dict[str, torch.Tensor]]:
    """A run directory's config and final weights (train/pipeline: checkpoint.pt or weights.pt;
    federated: the latest round checkpoint)."""
    run_dir = Path(run_dir)
    config = run_dir / "config.json"
    if not config.is_file():
        raise DataError(f"{run_dir} has no config.json; give a run directory that `bpfree train`, "
                        "`pipeline`, `simulate` or `continual` wrote (--out)")
    cfg = ExperimentConfig.from_dict(json.loads(config.read_text()))
    rounds = sorted((run_dir / "checkpoints").glob("round-*.pt"))
    for path in [run_dir / "weights.pt", run_dir / "checkpoint.pt", *reversed(rounds)]:
        if path.is_file():
            return cfg, load_checkpoint(path)["weights"]
    raise DataError(f"{run_dir} holds no weights (checkpoint.pt, weights.pt or checkpoints/); "
                    "did the run finish its first epoch?")


class ScoreModel(torch.nn.Module):
    """x (B, C*H*W) in [0, 1] (as the run's data was scaled) -> class scores (B, num_classes)."""

    def __init__(self, cfg: ExperimentConfig, weights: dict[str, torch.Tensor]):
        super().__init__()
        self.objective = build_objective(cfg)
        self.layers = torch.nn.ModuleList(build_layers(cfg, objective=self.objective))
        for layer in self.layers:
            layer.place(torch.device("cpu"))
        state = {k.removeprefix("layers."): v for k, v in weights.items()}
        self.layers.load_state_dict(state)
        self.goodness = cfg.train.predict == "goodness"   # "both": the softmax heads' scores
        self.key = GOODNESS if self.goodness else LOGITS
        self.eval()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packet = self.objective.encode_eval(x, self.goodness)
        for layer in self.layers:
            packet = layer.eval_step(packet)
        if self.key not in packet:   # e.g. goodness asked of a rule whose layers never vote so
            raise DataError(f"the run's layers produce no {self.key!r} scores")
        return packet[self.key]


def scores(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`model`'s class scores for every row of x, EVAL_BATCH rows at a time."""
    return torch.cat([model(x[i:i + EVAL_BATCH]) for i in range(0, len(x), EVAL_BATCH)])


def export(cfg: ExperimentConfig, weights: dict[str, torch.Tensor], path: Path,
           example: torch.Tensor | None = None) -> Path:
    """Trace ScoreModel to TorchScript at `path`; checked against the eager model first."""
    import warnings

    model = ScoreModel(cfg, weights)
    c, h, w = model.objective.spec.shape
    seeded = torch.Generator().manual_seed(0)
    x = example if example is not None else torch.rand(8, c * h * w, generator=seeded)
    with warnings.catch_warnings():   # the tracer's notes on Python ints: checked below instead
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, x, check_trace=False)
    probe = torch.rand(5, c * h * w, generator=torch.Generator().manual_seed(1))
    if not torch.allclose(traced(probe), model(probe), atol=1e-5):
        raise DataError("the traced model does not reproduce bpfree's scores; this rule cannot be "
                        "exported to TorchScript as it is")
    path.parent.mkdir(parents=True, exist_ok=True)
    traced.save(str(path))
    return path


def read_inputs(source: str, cfg: ExperimentConfig) -> torch.Tensor:
    """Rows to score from `source`: an .npz (array x, else x_test), a .csv (numeric columns; a
    `label` column is dropped; standardised with the run's training statistics when it trained
    on csv:DIR) or a folder of images (resized to the run's image size), sorted by file name."""
    p = Path(source)
    shape = run_spec(cfg).shape
    if p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            key = "x" if "x" in z.files else "x_test" if "x_test" in z.files else None
            if key is None:
                raise DataError(f"{p} has neither an array x nor x_test to predict")
            x = as_features(z[key])
    elif p.suffix == ".csv":
        from bpfree_core.readers.csv_table import table_for_prediction

        x = table_for_prediction(p, cfg.model.dataset)
    elif p.is_dir():
        from bpfree_core.readers.image_folder import images_for_prediction

        x = images_for_prediction(p, shape)
    else:
        raise DataError(f"--input {p}: give an .npz, a .csv or a folder of images")
    want = int(np.prod(shape))
    x = x.reshape(len(x), -1)
    if x.shape[1] != want:
        raise DataError(f"--input {p} has {x.shape[1]} values per sample; the run was trained on "
                        f"{want} ({'x'.join(map(str, shape))})")
    return torch.from_numpy(np.ascontiguousarray(x))
