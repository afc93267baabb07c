"""Using a trained model: load a run directory's weights, score inputs, export it.

`ScoreModel(cfg, weights)` is the whole prediction path in one module: the objective's input
encoding (label pixels, class patterns, the candidate labels of goodness prediction), every
layer's eval step and the vote summed over layers, ending in class scores (B, C) whose argmax is
bpfree's prediction. `export` writes it as a torch.export program, which loads with plain torch
(`torch.export.load(path).module()`) where bpfree is not installed (TorchScript where asked).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import torch

from bpfree_core.config import ExperimentConfig
from bpfree_core.data.datasets import run_spec
from bpfree_core.data.readers import as_features
from bpfree_core.errors import DataError
from bpfree_core.evaluation import EVAL_BATCH  # batch-statistics layers (cwc) see what evaluate saw
from bpfree_core.layers import GOODNESS, LOGITS
from bpfree_core.model import build_layers, build_objective
from bpfree_core.run.checkpoint import load_checkpoint
from bpfree_core.run.rundir import trusted_rule


def load_run(run_dir: Path, rule: str | None = None) -> tuple[ExperimentConfig, dict[str, torch.Tensor]]:
    """A run directory's config and final weights (train/pipeline: checkpoint.pt or weights.pt;
    federated: the latest round checkpoint). A rule the config names by its code's place is
    built only if `rule` names the same code (rundir.trusted_rule)."""
    run_dir = Path(run_dir)
    config = run_dir / "config.json"
    if not config.is_file():
        raise DataError(f"{run_dir} has no config.json; give a run directory that `bpfree train`, "
                        "`pipeline`, `simulate` or `continual` wrote (--out)")
    try:
        cfg = ExperimentConfig.from_dict(json.loads(config.read_text(encoding="utf-8")))
    except (ValueError, TypeError, AttributeError) as exc:   # JSON, UTF-8 or shape of the tree
        raise DataError(f"{config} is not a config bpfree wrote ({type(exc).__name__}: {exc}); "
                        "restore it from the run, or train again") from None
    trusted_rule(cfg, rule, config)
    rounds = sorted((run_dir / "checkpoints").glob("round-*.pt"))
    for path in [run_dir / "weights.pt", run_dir / "checkpoint.pt", *reversed(rounds)]:
        if path.is_file():
            weights = load_checkpoint(path)["weights"]
            check_fits(cfg, weights, config, path)
            return cfg, weights
    raise DataError(f"{run_dir} holds no weights (checkpoint.pt, weights.pt or checkpoints/); "
                    "did the run finish its first epoch?")


def check_fits(cfg: ExperimentConfig, weights: dict[str, torch.Tensor], config: Path,
               path: Path) -> None:
    """The weights are the model the config describes (same layers, same shapes), or one sentence."""
    try:
        ScoreModel(cfg, weights)
    except (RuntimeError, KeyError) as exc:   # torch's size mismatch / missing keys
        first = str(exc).strip().splitlines()
        detail = next((x.strip() for x in first if "size mismatch" in x or "Missing" in x), first[0])
        raise DataError(f"the weights in {path} do not fit the model {config} describes ({detail}); "
                        "was config.json edited? restore it from the run") from None


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


EXPORT_FORMATS = ("pt2", "torchscript")


def export(cfg: ExperimentConfig, weights: dict[str, torch.Tensor], path: Path,
           example: torch.Tensor | None = None, fmt: str = "pt2") -> Path:
    """ScoreModel as a torch.export program (.pt2: `torch.export.load(path).module()(x)`, any
    batch size) or, where asked, TorchScript (`torch.jit.load`); checked against the eager model
    before it is written."""
    model = ScoreModel(cfg, weights).eval()
    c, h, w = model.objective.spec.shape
    seeded = torch.Generator().manual_seed(0)
    x = example if example is not None else torch.rand(8, c * h * w, generator=seeded)
    if fmt == "pt2":
        with torch.no_grad():   # the eval steps' own no_grad blocks are then no-ops, not graph nodes
            program = torch.export.export(model, (x,),
                                          dynamic_shapes=({0: torch.export.Dim("batch")},))
        run = program.module()
    elif fmt == "torchscript":
        import warnings

        with warnings.catch_warnings():   # the tracer's notes on Python ints: checked below instead
            warnings.simplefilter("ignore")
            run = program = torch.jit.trace(model, x, check_trace=False)
    else:
        raise DataError(f"export format {fmt!r}: give one of {', '.join(EXPORT_FORMATS)}")
    probe = torch.rand(5, c * h * w, generator=torch.Generator().manual_seed(1))
    if not torch.allclose(run(probe), model(probe), atol=1e-5):
        raise DataError(f"the exported model does not reproduce bpfree's scores; this rule cannot be "
                        f"exported as {fmt} as it is")
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "pt2":
        torch.export.save(program, str(path))
    else:
        program.save(str(path))
    return path


def _npz_rows(p: Path) -> np.ndarray:
    """Array x (else x_test) of an .npz, as float32 features; one sentence for anything else."""
    try:
        with np.load(p, allow_pickle=False) as z:
            key = "x" if "x" in z.files else "x_test" if "x_test" in z.files else None
            if key is None:
                raise DataError(f"{p} has neither an array x nor x_test to predict")
            x = z[key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:   # pickled objects, bad zip
        raise DataError(f"--input {p} is not a numeric .npz bpfree can read ({exc})") from None
    if x.dtype.kind not in "biuf":   # strings, complex: not features
        raise DataError(f"--input {p}: array {key} holds {x.dtype} values; give numbers")
    return as_features(x)


def read_inputs(source: str, cfg: ExperimentConfig) -> torch.Tensor:
    """Rows to score from `source`: an .npz (array x, else x_test), a .csv (numeric columns; a
    `label` column is dropped; standardised with the run's training statistics when it trained
    on csv:DIR) or a folder of images (resized to the run's image size), sorted by file name."""
    p = Path(source)
    shape = run_spec(cfg).shape
    if p.suffix == ".npz":
        x = _npz_rows(p)
    elif p.suffix == ".csv":
        from bpfree_core.data.readers.csv_table import table_for_prediction

        x = table_for_prediction(p, cfg.model.dataset)
    elif p.is_dir():
        from bpfree_core.data.readers.image_folder import images_for_prediction

        x = images_for_prediction(p, shape)
    else:
        raise DataError(f"--input {p}: give an .npz, a .csv or a folder of images")
    want = int(np.prod(shape))
    if len(x) == 0:
        raise DataError(f"--input {p} holds no rows to predict")
    x = x.reshape(len(x), -1)
    if x.shape[1] != want:
        raise DataError(f"--input {p} has {x.shape[1]} values per sample; the run was trained on "
                        f"{want} ({'x'.join(map(str, shape))})")
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(axis=1).sum())
        raise DataError(f"--input {p}: {bad} of {len(x)} rows hold NaN or infinite values; their "
                        "scores would mean nothing: clean or drop those rows")
    return torch.from_numpy(np.ascontiguousarray(x))
