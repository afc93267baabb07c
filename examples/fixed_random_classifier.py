"""A local rule of your own, in one file: each layer learns through a fixed random classifier.

Mostafa, Ramesh & Cauwenberghs (2018), "Deep supervised learning using local errors": every
hidden layer gets a classifier B whose weights are random and never trained; the layer trains on
the cross-entropy of B's class scores, so each layer's error is local and B costs no update.

    bpfree train --algorithm examples/fixed_random_classifier.py:FixedRandomClassifier --out runs/frc
    bpfree pipeline --algorithm examples/fixed_random_classifier.py:FixedRandomClassifier --stages 2
    bpfree simulate --algorithm examples/fixed_random_classifier.py:FixedRandomClassifier

Every process (stage workers, Flower ClientApps) imports this file by its absolute path, so on
other machines it must sit at the same path (or be installed and named as module:Class).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bpfree_core.layers import LABELS, LOGITS, LocalLayer, Metrics, Packet
from bpfree_core.objectives.base import Shape, ShapedObjective, numel


class FixedClassifierLayer(LocalLayer):
    """Linear + ReLU, trained by the cross-entropy of a fixed random classifier B."""

    def __init__(self, index: int, num_layers: int, cfg, num_classes: int,  # noqa: ANN001
                 in_shape: Shape, out_shape: Shape):
        super().__init__(index, num_layers, cfg, num_classes)
        self.body = nn.Linear(numel(in_shape), out_shape[0])
        # B: drawn with the layer (its seed), kept in the state dict, never trained
        self.register_buffer("classifier", torch.randn(num_classes, out_shape[0]) / out_shape[0] ** 0.5)
        self.make_head(out_shape[0])   # the readout head every layer has (prediction)
        self.finish_init()

    def forward_body(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x.detach().flatten(1).float()))   # (B, D): no gradient upstream

    def train_step(self, packet: Packet) -> tuple[Packet, Metrics]:
        y = packet[LABELS]
        a = self.forward_body(packet["x"])
        scores = a @ self.classifier.T                              # (B, C), fixed B
        loss = F.cross_entropy(scores, y)
        self.step_body(loss)
        metrics = self.step_head(a.detach(), y)
        metrics["loss"] = loss.detach()
        self.count_step()
        return {"x": a.detach(), LABELS: y}, metrics

    @torch.no_grad()
    def eval_step(self, packet: Packet) -> Packet:
        a = self.forward_body(packet["x"])
        out: Packet = {k: v for k, v in packet.items() if k == LOGITS}
        self.add_logits(out, a)                                     # the heads vote
        out["x"] = a
        return out


class FixedRandomClassifier(ShapedObjective):
    """model.hidden linear layers, each with its own fixed random classifier."""

    layer_cls = FixedClassifierLayer

    def shapes(self) -> list[Shape]:
        return [(self.input_dim,), *((n,) for n in self.cfg.model.hidden)]
