"""Backprop baseline: the same architecture trained end to end (Rumelhart et al. 1986).

The network users compare every local objective to: a ReLU MLP of `model.hidden` (optionally
preceded by the stride-2 convs of `model.conv`) and a linear output, cross-entropy on the logits,
the configured optimiser (Adam by default). Gradients flow through every layer, so the whole
network is ONE layer unit (`layer_sizes()` has one entry) and `pipelinable` is False: `Stage` and
`train_reference` run it unchanged, the pipeline refuses to split it.

Packet keys (B = batch, C = classes):
  x       (B, 784) or (B, C_in, H, W)  input images
  y       (B,)                         true labels (training)
  logits  (B, C)                       log-probabilities (the "softmax" prediction)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bpfree_core.config import ExperimentConfig
from bpfree_core.layers import LABELS, LOGITS, LocalLayer, Metrics, Packet
from bpfree_core.objectives import register
from bpfree_core.objectives.base import Objective


def conv_stack(channels: tuple[int, ...], in_shape: tuple[int, int, int]) -> tuple[nn.Sequential, int]:
    """Stride-2 3x3 convs + ReLU (each halves H and W); returns the stack and its flat width."""
    c, h, w = in_shape
    mods: list[nn.Module] = []
    for out_c in channels:
        mods += [nn.Conv2d(c, out_c, 3, stride=2, padding=1), nn.ReLU()]
        c, h, w = out_c, (h + 1) // 2, (w + 1) // 2
    return nn.Sequential(*mods), c * h * w


class BPNetwork(LocalLayer):
    """The whole network as one unit: [convs] -> flatten -> ReLU MLP -> linear output."""

    def __init__(self, cfg: ExperimentConfig, num_classes: int, in_shape: tuple[int, int, int]):
        super().__init__(0, 1, cfg, num_classes)
        self.in_shape = in_shape
        self.convs, width = conv_stack(cfg.model.conv, in_shape)
        mods: list[nn.Module] = []
        for n in cfg.model.hidden:
            mods += [nn.Linear(width, n), nn.ReLU()]
            width = n
        mods.append(nn.Linear(width, num_classes))
        self.mlp = nn.Sequential(*mods)
        self.finish_init()  # no separate head: the output layer is the classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.convs):
            x = self.convs(x.view(-1, *self.in_shape)).flatten(1)   # (B, C*H*W)
        return self.mlp(x.flatten(1))                               # (B, classes)

    def train_step(self, packet: Packet) -> tuple[Packet, Metrics]:
        y = packet[LABELS]
        logits = self(packet["x"])                                  # (B, C)
        loss = F.cross_entropy(logits, y)
        self.step_body(loss)
        self.count_step()
        acc = (logits.argmax(1) == y).float().mean()
        return ({LOGITS: logits.detach(), LABELS: y},
                {"loss": loss.detach(), "train_acc": acc})

    @torch.no_grad()
    def eval_step(self, packet: Packet) -> Packet:
        return {LOGITS: F.log_softmax(self(packet["x"]), dim=1)}


@register("bp")
class Backprop(Objective):
    supports_conv = True
    pipelinable = False

    def layer_sizes(self) -> list[int]:
        return [self.num_classes]  # one unit: the whole network, input -> class logits

    def build_layer(self, index: int, num_layers: int, in_dim: int, out_dim: int) -> LocalLayer:
        return BPNetwork(self.cfg, self.num_classes, self.spec.shape)

    def encode_train(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> Packet:
        return {"x": x, LABELS: y}

    def encode_eval(self, x: torch.Tensor, goodness: bool) -> Packet:
        return {"x": x}
