"""Channel-wise competitive learning (CwComp: Papachristodoulou et al., AAAI 2024, arXiv 2312.12668).

A Forward-Forward-family loss with no negative data and no label in the input: each layer's
units (channels, for a conv layer) are split into C equal class groups, the goodness of class c
is the mean square activity of group c, and the layer's local loss is the cross-entropy of the
true class against the softmax over the C goodnesses. Every layer hands its detached output on.

  h = rms(x)                               the input, unit RMS per sample
  y = BN(pool(ReLU(conv3x3(h))))           conv layer i of model.conv: the paper's CFSE pattern,
                                           odd i = conv grouped by class + 2x2 max-pool, even i
                                           = plain conv, no pool; linear: y = BN(ReLU(W h + b))
  g_c = mean(y[group c]^2)                 (B, C) class goodness, groups of channels / units
  L = cross_entropy(g, label)              the channel-wise competitive (CwC) loss

Prediction both ways: goodness (the log-softmax of g summed over layers, argmax: the paper's
"GF", one forward pass, no candidate labels) and the local softmax heads on the detached
features ("SF").

Normalisation, as the paper: BatchNorm after the ReLU (and pool). Its *batch* statistics are
what make a channel's goodness mean "more active than usual for this batch"; a per-sample norm
(we tried unit RMS) learns far slower. We use batch statistics in evaluation too
(track_running_stats=False): the layers are scale-invariant, their weights grow, and running
averages lag so far behind that eval-mode goodness collapses to chance. So predictions are made
per batch (evaluation batches of 1000), never per single image, and there are no running
buffers for federated averaging to mix. Each layer's input is also scaled to unit RMS.

Packet keys: x (B, D) or (B, C, H, W) layer input / output, y (B,) labels, logits and
goodness (B, C) eval accumulators.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bpfree_core.config import ExperimentConfig
from bpfree_core.errors import ConfigError
from bpfree_core.layers import (
    GOODNESS,
    LABELS,
    LocalLayer,
    Metrics,
    Packet,
    add_vote,
    relu,
    rms_all,
    rms_normalize,
)
from bpfree_core.objectives import register
from bpfree_core.objectives.base import Shape, ShapedObjective, numel


class CwCLayer(LocalLayer):
    """Conv (3x3, stride 1, 2x2 max-pool) or linear layer trained by the CwC loss."""

    def __init__(self, index: int, num_layers: int, cfg: ExperimentConfig, num_classes: int,
                 in_shape: Shape, out_shape: Shape):
        super().__init__(index, num_layers, cfg, num_classes)
        self.in_shape, self.out_shape = in_shape, out_shape
        self.conv = len(out_shape) == 3
        # CFSE pattern: odd conv layers are grouped by class and pool; even ones do neither
        self.pool = self.conv and out_shape[1] < in_shape[1]
        if self.conv:
            groups = num_classes if self.pool and in_shape[0] % num_classes == 0 else 1
            self.body: nn.Module = nn.Conv2d(in_shape[0], out_shape[0], 3, padding=1,
                                             groups=groups)
            self.norm: nn.Module = nn.BatchNorm2d(out_shape[0], track_running_stats=False)
        else:
            self.body = nn.Linear(numel(in_shape), out_shape[0])
            self.norm = nn.BatchNorm1d(out_shape[0], track_running_stats=False)
        self.make_head(numel(out_shape))
        self.finish_init()

    def votes(self) -> bool:
        return True  # no label in the input: every layer's goodness is a fair vote

    def forward_body(self, x: torch.Tensor) -> torch.Tensor:
        h = rms_all(x.detach().reshape(x.shape[0], *self.in_shape).float())  # no grad upstream
        y = relu(self.body(h), self.cfg.objective.straight_through)
        if self.pool:
            y = F.max_pool2d(y, 2)
        return self.norm(y)                                        # (B, *out_shape)

    def goodness(self, y: torch.Tensor) -> torch.Tensor:
        """(B, *out_shape) -> (B, C): mean square activity of each class group."""
        return y.reshape(y.shape[0], self.num_classes, -1).pow(2).mean(2)

    def loss(self, out: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        """CwC loss: cross-entropy of the true class against softmax over the class goodnesses."""
        g = self.goodness(out)                                     # (B, C)
        loss = F.cross_entropy(g, labels)
        return loss, {"cwc_acc": (g.argmax(1) == labels).float().mean()}

    def train_step(self, packet: Packet) -> tuple[Packet, Metrics]:
        y_true = packet[LABELS]
        out = self.forward_body(packet["x"])
        loss, metrics = self.loss(out, y_true)
        self.step_body(loss)
        out = out.detach()
        metrics["loss"] = loss.detach()
        metrics.update(self.step_head(rms_normalize(out.flatten(1)), y_true))
        self.count_step()
        return {"x": out, LABELS: y_true}, metrics

    @torch.no_grad()
    def eval_step(self, packet: Packet) -> Packet:
        out = self.forward_body(packet["x"])
        acc: Packet = {k: v for k, v in packet.items() if k in ("logits", GOODNESS)}
        self.add_logits(acc, rms_normalize(out.flatten(1)))
        # each layer's softmax(g) is trained as a class posterior: sum their logs (all layers)
        add_vote(acc, GOODNESS, F.log_softmax(self.goodness(out), dim=1))
        acc["x"] = out
        return acc


@register("cwc")
class ChannelWiseCompetitive(ShapedObjective):
    supports_staged = True
    batch_coupled = True   # BatchNorm with batch statistics, in evaluation too
    supports_conv = True
    layer_cls = CwCLayer

    supports_goodness = True

    def shapes(self) -> list[Shape]:
        """Input shape of the stack, then every layer's output shape."""
        c, h, w = self.spec.shape
        out: list[Shape] = [(c, h, w)] if self.cfg.model.conv else [(c * h * w,)]
        for i, ch in enumerate(self.cfg.model.conv):
            if i % 2:
                h, w = h // 2, w // 2
            if h < 1 or w < 1:
                raise ConfigError(
                    f"model.conv has {len(self.cfg.model.conv)} layers, but each halves the "
                    f"{self.spec.shape[1]}x{self.spec.shape[2]} image and layer {i} gets nothing "
                    f"left; use at most {i} conv layers")
            if ch % self.num_classes:
                raise ConfigError(
                    f"model.conv[{i}] = {ch}: cwc splits channels into {self.num_classes} class "
                    f"groups, so use a multiple of {self.num_classes}")
            out.append((ch, h, w))
        for i, n in enumerate(self.cfg.model.hidden):
            if n % self.num_classes:
                raise ConfigError(
                    f"model.hidden[{i}] = {n}: cwc splits units into {self.num_classes} class "
                    f"groups, so use a multiple of {self.num_classes}")
            out.append((n,))
        return out
