"""The interface every local objective implements."""

from __future__ import annotations

from typing import ClassVar

import torch

from bpfree_core.config import ExperimentConfig
from bpfree_core.data.datasets import DatasetSpec
from bpfree_core.errors import ConfigError
from bpfree_core.layers import LABELS, LocalLayer, Packet

Shape = tuple[int, ...]  # a layer's output per sample: (D,) linear, (C, H, W) conv


class Objective:
    """Builds layers and encodes batches for one algorithm."""

    name: ClassVar[str] = ""
    supports_goodness: ClassVar[bool] = False   # can predict by goodness over candidate labels
    pipelinable: ClassVar[bool] = True          # False for bp: it needs gradients across layers
    uses_negatives: ClassVar[bool] = False      # trains on negative (wrong-label) data
    supports_conv: ClassVar[bool] = False       # builds conv layers from model.conv
    supports_input_skip: ClassVar[bool] = False # objective.input_skip: the image into every layer
    supports_compile: ClassVar[bool] = False    # train.compile: its layers have a forward_loss
    supports_staged: ClassVar[bool] = False     # train.layer_epochs: train packets are x and y,
                                                # so a frozen layer hands on its eval output
    batch_coupled: ClassVar[bool] = False       # a layer's output for a sample depends on the
                                                # rest of its batch (BatchNorm): nothing to cache

    def __init__(self, cfg: ExperimentConfig, spec: DatasetSpec):
        self._refuse_unsupported(cfg)
        self.cfg = cfg
        self.spec = spec
        self.num_classes = spec.num_classes
        if spec.shape[1] == 1:   # flat features (your own tabular data), not an image
            what = ("train.jitter shifts images" if cfg.train.jitter else
                    "model.conv convolves images" if cfg.model.conv else "")
            if what:
                raise ConfigError(f"{what}, but {spec.name} holds flat features ({spec.shape[2]} "
                                  "per sample); turn it off")

    def _refuse_unsupported(self, cfg: ExperimentConfig) -> None:
        """Options this objective cannot honour, each refused with what to do instead."""
        n = cfg.objective.negatives
        for refused, message in [
            (n != "uniform" and not self.uses_negatives,
             f"objective.negatives = {n!r} but {self.name} uses no negative data; leave it at "
             "'uniform' (it applies to ff, symba and sffa)"),
            (bool(cfg.model.conv) and not self.supports_conv,
             f"model.conv is set but model.algorithm = {self.name!r} builds no conv layers (uff, "
             "bp, cwc, deeper and asge do); use model.hidden"),
            (cfg.objective.input_skip and not self.supports_input_skip,
             f"objective.input_skip = true but {self.name} does not feed the image to later "
             "layers (sffa does); turn it off"),
            (cfg.train.one_pass and not self.uses_negatives,
             f"train.one_pass = true but {self.name} has no positive and negative passes to join "
             "(ff, symba and sffa do); turn it off"),
            (cfg.objective.shortcut != "add" and self.name != "deeper",
             f"objective.shortcut = {cfg.objective.shortcut!r} but {self.name} has no residual "
             "shortcuts (deeper does); leave it at 'add'"),
            (bool(cfg.train.layer_epochs) and not self.supports_staged,
             f"train.layer_epochs is set but {self.name}'s layers do not hand on one tensor per "
             "sample (cwc, deeper, asge and mono do); leave it empty"),
            (cfg.train.compile and not self.supports_compile,
             f"train.compile = true but {self.name} has no compiled step (ff, symba, sffa and "
             "mono do); turn it off"),
        ]:
            if refused:
                raise ConfigError(message)

    @property
    def input_dim(self) -> int:
        c, h, w = self.spec.shape
        return c * h * w

    def layer_sizes(self) -> list[int]:
        """Output width of every layer of the stack, in order."""
        return list(self.cfg.model.hidden)

    def layer_shapes(self) -> list[Shape]:
        """Input shape of the stack, then every layer's output shape (per sample)."""
        return [(self.input_dim,), *((n,) for n in self.layer_sizes())]

    def build_layer(self, index: int, num_layers: int, in_dim: int, out_dim: int) -> LocalLayer:
        raise NotImplementedError

    def encode_train(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> Packet:
        """First-layer packet of a training batch; `gen` supplies every random draw."""
        raise NotImplementedError

    def encode_eval(self, x: torch.Tensor, goodness: bool) -> Packet:
        """First-layer packet of an evaluation batch (with candidates when `goodness`)."""
        raise NotImplementedError

    def predict(self, packet: Packet) -> dict[str, torch.Tensor]:
        """Predicted labels by method name ("softmax", "goodness") from the last packet."""
        out = {}
        if "logits" in packet:
            out["softmax"] = packet["logits"].argmax(1)
        if "goodness" in packet:
            out["goodness"] = packet["goodness"].argmax(1)
        return out

    def wrong_labels(self, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """A uniformly drawn label != y for every sample (never the true one)."""
        offset = torch.randint(1, self.num_classes, y.shape, generator=gen)
        return (y + offset) % self.num_classes


def numel(shape: Shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class ShapedObjective(Objective):
    """A stack of conv layers (model.conv) then linear ones (model.hidden), fed the plain image.

    Subclasses give `shapes()` and the layer class; packets carry x (B, D) or (B, C, H, W)
    and the labels (training only).
    """

    layer_cls: ClassVar[type[LocalLayer]]

    def shapes(self) -> list[Shape]:
        """Input shape of the stack, then every layer's output shape."""
        raise NotImplementedError

    def layer_sizes(self) -> list[int]:
        return [numel(s) for s in self.shapes()[1:]]

    def layer_shapes(self) -> list[Shape]:
        return self.shapes()

    def build_layer(self, index: int, num_layers: int, in_dim: int, out_dim: int) -> LocalLayer:
        shapes = self.shapes()
        in_shape = shapes[index] if len(shapes[index + 1]) == 3 else (in_dim,)
        return self.layer_cls(index, num_layers, self.cfg, self.num_classes,  # type: ignore[call-arg]
                              in_shape, shapes[index + 1])

    def encode_train(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> Packet:
        return {"x": self._layout(x), LABELS: y}

    def encode_eval(self, x: torch.Tensor, goodness: bool) -> Packet:
        return {"x": self._layout(x)}

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], *self.spec.shape) if self.cfg.model.conv else x
