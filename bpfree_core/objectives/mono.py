"""Mono-Forward (Gong, Li, Abdulla 2025, arXiv 2501.09238): local cross-entropy through a projection.

No negative data, no label in the input, one forward pass. Every layer owns a projection M to the
class scores and trains itself and M on the cross-entropy of those scores:

  a = ReLU(W h + b)              the layer (h: the previous layer's detached output, pixels first)
  G = a M^T                      (B, C) the layer's class scores ("goodness" in the paper)
  L = cross_entropy(G, label)    gradient reaches W, b and M only

Prediction sums log softmax(G) over the voting layers (all but the first, unless
`objective.vote_first`; with one layer, that layer): the same accumulator as the softmax heads,
so evaluation is one pass with no candidate labels. The paper predicts from the last layer alone;
the vote over layers was no worse on a validation split (bench/results/defaults.md).

Packet keys (B = batch, C = classes): x (B, D) layer input / output, y (B,) labels,
logits (B, C) the eval accumulator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bpfree_core.config import ExperimentConfig
from bpfree_core.layers import LABELS, LOGITS, LocalLayer, Metrics, Packet, add_vote
from bpfree_core.objectives import register
from bpfree_core.objectives.base import Shape, ShapedObjective, numel


class MonoLayer(LocalLayer):
    """Linear + ReLU with its own projection to class scores, both trained by local CE."""

    def __init__(self, index: int, num_layers: int, cfg: ExperimentConfig, num_classes: int,
                 in_shape: Shape, out_shape: Shape):
        super().__init__(index, num_layers, cfg, num_classes)
        self.body = nn.Linear(numel(in_shape), out_shape[0])
        self.proj = nn.Linear(out_shape[0], num_classes, bias=False)   # M (C, D)
        self.finish_init()   # no separate head: the projection is the layer's classifier

    def forward_body(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x.detach().flatten(1).float()))        # (B, D), no grad upstream

    def loss(self, a: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        scores = self.proj(a)                                          # (B, C)
        loss = F.cross_entropy(scores, labels)
        return loss, {"layer_acc": (scores.argmax(1) == labels).float().mean()}

    def forward_loss(self, x: torch.Tensor, labels: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, Metrics]:
        """Activations, loss and metrics: the part train.compile fuses."""
        a = self.forward_body(x)
        return (a, *self.loss(a, labels))

    def train_step(self, packet: Packet) -> tuple[Packet, Metrics]:
        labels = packet[LABELS]
        a, loss, metrics = self.compiled("forward_loss")(packet["x"], labels)
        self.step_body(loss)
        self.count_step()
        metrics["loss"] = loss.detach()
        return {"x": a.detach(), LABELS: labels}, metrics

    @torch.no_grad()
    def eval_step(self, packet: Packet) -> Packet:
        a = self.forward_body(packet["x"])
        out: Packet = {k: v for k, v in packet.items() if k == LOGITS}
        if self.votes():
            add_vote(out, LOGITS, F.log_softmax(self.proj(a), dim=1))
        out["x"] = a
        return out


@register("mono")
class MonoForward(ShapedObjective):
    supports_staged = True
    layer_cls = MonoLayer
    supports_compile = True

    def shapes(self) -> list[Shape]:
        return [(self.input_dim,), *((n,) for n in self.cfg.model.hidden)]
