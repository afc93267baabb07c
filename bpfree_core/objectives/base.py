"""The interface every local objective implements."""

from __future__ import annotations

from typing import ClassVar

import torch

from bpfree_core.config import ExperimentConfig
from bpfree_core.data import DatasetSpec
from bpfree_core.layers import LocalLayer, Packet


class Objective:
    """Builds layers and encodes batches for one algorithm."""

    name: ClassVar[str] = ""
    supports_goodness: ClassVar[bool] = False   # can predict by goodness over candidate labels
    pipelinable: ClassVar[bool] = True          # False for bp: it needs gradients across layers

    def __init__(self, cfg: ExperimentConfig, spec: DatasetSpec):
        self.cfg = cfg
        self.spec = spec
        self.num_classes = spec.num_classes

    @property
    def input_dim(self) -> int:
        c, h, w = self.spec.shape
        return c * h * w

    def layer_sizes(self) -> list[int]:
        """Output width of every layer of the stack, in order."""
        return list(self.cfg.model.hidden)

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
