"""Improved Forward-Forward Contrastive Learning (Gananath 2024, arXiv 2405.03432).

Two networks of the same shape, A and B, with different random initialisations, see the same
input. Layer unit i owns layer i of BOTH networks (A_i and B_i) and trains them only against each
other with a local representation loss -- no backprop across layers, no negatives by label:

  h_a = ReLU(A_i rms(a)),  h_b = ReLU(B_i rms(b))                       (B, D) each
  L   = mean_n [1 - cos(h_a[n], h_b[n])]                                 matching samples pull
      + mean_n [max(0, cos(h_a[n], h_b[n+1]) - margin)]                  mismatched pairs push

i.e. the cosine-embedding loss with the mismatched pair drawn by rolling B's batch by one
(deterministic, so every process builds the same pairs; a rolled partner may share the class,
which is fine: the loss separates samples, not classes). `objective.margin` is the cosine margin.
The paper also allows a local classification loss; here that is the per-layer softmax readout
head (`LocalLayer.make_head`), trained on the detached, RMS-normalised concatenation [h_a, h_b].
Prediction sums the heads' log-probabilities over layers (every layer votes: no label is in the
input, so the first layer is not special). The paper's 784-64-64-10 MLP reportedly reached ~63% on
MNIST (unconfirmed); with wider layers and the heads we reach far more (bench/results/accuracy.md).

Packet keys (B = batch, D = width): a (B, D) net-A activations, b (B, D) net-B activations,
y (B,) labels, logits (B, C) accumulated head log-probabilities (eval).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bpfree_core.config import ExperimentConfig
from bpfree_core.layers import LABELS, LocalLayer, Metrics, Packet, relu, rms_normalize
from bpfree_core.objectives import register
from bpfree_core.objectives.base import Objective

LossOut = tuple[torch.Tensor, Metrics]


def cosine_pair_loss(h_a: torch.Tensor, h_b: torch.Tensor, margin: float) -> LossOut:
    """Cosine-embedding loss: matching rows pulled together, rows vs rolled rows pushed apart."""
    cos_pos = F.cosine_similarity(h_a, h_b, dim=1, eps=1e-8)                      # (B,)
    cos_neg = F.cosine_similarity(h_a, h_b.roll(1, dims=0), dim=1, eps=1e-8)      # (B,)
    loss = (1 - cos_pos).mean() + (cos_neg - margin).clamp(min=0).mean()
    return loss, {"cos_pos": cos_pos.detach().mean(), "cos_neg": cos_neg.detach().mean()}


class FFCLLayer(LocalLayer):
    """Layer i of both networks: A_i and B_i, trained only against each other."""

    def __init__(self, index: int, num_layers: int, cfg: ExperimentConfig, num_classes: int,
                 in_dim: int, out_dim: int):
        super().__init__(index, num_layers, cfg, num_classes)
        self.a = nn.Linear(in_dim, out_dim)   # drawn first, then B: different initialisations
        self.b = nn.Linear(in_dim, out_dim)
        self.make_head(2 * out_dim)
        self.finish_init()

    def votes(self) -> bool:
        return True

    def forward_pair(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        st = self.cfg.objective.straight_through  # inputs detached: no gradient goes upstream
        return (relu(self.a(rms_normalize(a.detach())), st),        # (B, D_out)
                relu(self.b(rms_normalize(b.detach())), st))        # (B, D_out)

    @staticmethod
    def features(h_a: torch.Tensor, h_b: torch.Tensor) -> torch.Tensor:
        return torch.cat([rms_normalize(h_a), rms_normalize(h_b)], dim=1)   # (B, 2 D_out)

    def train_step(self, packet: Packet) -> tuple[Packet, Metrics]:
        y = packet[LABELS]
        h_a, h_b = self.forward_pair(packet["a"], packet["b"])
        loss, metrics = cosine_pair_loss(h_a, h_b, self.cfg.objective.margin)
        self.step_body(loss)
        metrics["loss"] = loss.detach()
        metrics.update(self.step_head(self.features(h_a, h_b), y))
        self.count_step()
        return {"a": h_a.detach(), "b": h_b.detach(), LABELS: y}, metrics

    @torch.no_grad()
    def eval_step(self, packet: Packet) -> Packet:
        h_a, h_b = self.forward_pair(packet["a"], packet["b"])
        out: Packet = {k: v for k, v in packet.items() if k == "logits"}
        self.add_logits(out, self.features(h_a, h_b))
        out["a"], out["b"] = h_a, h_b
        return out


@register("ffcl")
class FFCL(Objective):
    def build_layer(self, index: int, num_layers: int, in_dim: int, out_dim: int) -> LocalLayer:
        return FFCLLayer(index, num_layers, self.cfg, self.num_classes, in_dim, out_dim)

    def encode_train(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> Packet:
        return {"a": x, "b": x, LABELS: y}   # both networks see the same input

    def encode_eval(self, x: torch.Tensor, goodness: bool) -> Packet:
        return {"a": x, "b": x}
