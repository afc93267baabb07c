"""DeeperForward (Sun et al., ICLR 2025): mean goodness, normalised decoupling, deep residual CNNs.

No negative data and no label in the input. Each layer's channels (units, for a linear layer)
split into C class groups, as in CwC, but the goodness of class c is the *mean* activity of its
group, not the mean square, so the gradient reaching unit j does not scale with y_j and a unit
at zero is not stuck there (FF's dead-neuron problem in deep nets):

  h = x                              the previous layer's detached output (layer 0: the image,
                                     layer-normalised over C, H, W)
  a = ReLU(conv3x3(h))               no bias; stride 2 where the channel count changes
  g_c = mean(a[group c])             (B, C) class goodness
  L = cross_entropy(g, label)        the local loss
  out = norm(a) + h                  norm: zero mean, unit variance per class group and sample
                                     (removes g, so the next layer cannot just read it); the
                                     parameter-free residual joins where the shapes agree

Linear layers (model.hidden) work the same way, with units for channels. Prediction sums g over
the voting layers (all but the first, unless objective.vote_first; the paper also drops the
first layer and picks a best range on held-out data), in one pass with no candidate labels;
the optional local softmax heads read the detached features as usual.

Packet keys: x (B, D) or (B, C, H, W) layer input / output, y (B,) labels, logits and goodness
(B, C) eval accumulators.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bpfree_core.config import ExperimentConfig
from bpfree_core.errors import ConfigError
from bpfree_core.layers import LABELS, LocalLayer, Metrics, Packet, rms_normalize
from bpfree_core.objectives import register
from bpfree_core.objectives.base import Shape, ShapedObjective, numel


class DeeperLayer(LocalLayer):
    """Conv 3x3 (or linear) + ReLU, mean class-group goodness, group-normalised residual output."""

    def __init__(self, index: int, num_layers: int, cfg: ExperimentConfig, num_classes: int,
                 in_shape: Shape, out_shape: Shape):
        super().__init__(index, num_layers, cfg, num_classes)
        self.in_shape, self.out_shape = in_shape, out_shape
        if len(out_shape) == 3:
            stride = 2 if out_shape[1] < in_shape[1] else 1
            self.body: nn.Module = nn.Conv2d(in_shape[0], out_shape[0], 3, stride=stride,
                                             padding=1, bias=False)
            nn.init.kaiming_normal_(self.body.weight, mode="fan_out", nonlinearity="relu")
        else:
            self.body = nn.Linear(numel(in_shape), out_shape[0], bias=False)
        same = tuple(in_shape) == tuple(out_shape)
        shortcut = cfg.objective.shortcut
        # pad: ResNet's parameter-free shortcut where the map halves and channels grow
        self.padded = (shortcut == "pad" and not same and len(out_shape) == 3
                       and out_shape[0] >= in_shape[0] and out_shape[1] < in_shape[1])
        self.residual = shortcut != "none" and same
        self.relu = nn.ReLU()   # a module, so diagnostics can read the activity before the norm
        self.make_head(numel(out_shape))
        self.finish_init()

    def activity(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer input (detached, shaped) and its ReLU activity a, (B, *out_shape)."""
        h = x.detach().float().reshape(x.shape[0], *self.in_shape)
        if self.index == 0:
            h = F.layer_norm(h, h.shape[1:])
        if len(self.out_shape) == 1:
            h = h.flatten(1)
        return h, self.relu(self.body(h))

    def goodness(self, a: torch.Tensor) -> torch.Tensor:
        """(B, *out_shape) -> (B, C): mean activity of each class group."""
        return a.reshape(a.shape[0], self.num_classes, -1).mean(2)

    def hand_on(self, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """What the next layer gets: a normalised per class group (g removed), plus h."""
        groups = a.reshape(a.shape[0], self.num_classes, -1)
        out = F.layer_norm(groups, groups.shape[2:]).reshape_as(a)
        if self.padded:   # h pooled to the new map, zero channels to the new width
            pooled = F.avg_pool2d(h, 2, ceil_mode=True)
            return out + F.pad(pooled, (0, 0, 0, 0, 0, out.shape[1] - pooled.shape[1]))
        return out + h if self.residual else out

    def loss(self, a: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        g = self.goodness(a)                                       # (B, C)
        loss = F.cross_entropy(g, labels)
        return loss, {"layer_acc": (g.argmax(1) == labels).float().mean(),
                      "dead": (a.detach().flatten(1).amax(0) <= 0).float().mean()}

    def train_step(self, packet: Packet) -> tuple[Packet, Metrics]:
        labels = packet[LABELS]
        h, a = self.activity(packet["x"])
        loss, metrics = self.loss(a, labels)
        self.step_body(loss)
        out = self.hand_on(h, a.detach())
        metrics["loss"] = loss.detach()
        metrics.update(self.step_head(rms_normalize(out.flatten(1)), labels))
        self.count_step()
        return {"x": out, LABELS: labels}, metrics

    @torch.no_grad()
    def eval_step(self, packet: Packet) -> Packet:
        h, a = self.activity(packet["x"])
        return self.voted(packet, self.hand_on(h, a), lambda: self.goodness(a))


@register("deeper")
class DeeperForward(ShapedObjective):
    supports_staged = True
    supports_conv = True
    layer_cls = DeeperLayer

    supports_goodness = True

    def shapes(self) -> list[Shape]:
        """Input shape, then every layer's output: a conv layer halves H and W (stride 2) where
        its channel count differs from the previous conv layer's, else keeps them (residual)."""
        c, h, w = self.spec.shape
        out: list[Shape] = [(c, h, w)] if self.cfg.model.conv else [(c * h * w,)]
        for i, ch in enumerate(self.cfg.model.conv):
            if i > 0 and ch != self.cfg.model.conv[i - 1]:
                h, w = (h + 1) // 2, (w + 1) // 2
            self._check_groups(f"model.conv[{i}]", ch)
            out.append((ch, h, w))
        for i, n in enumerate(self.cfg.model.hidden):
            self._check_groups(f"model.hidden[{i}]", n)
            out.append((n,))
        return out

    def _check_groups(self, field: str, n: int) -> None:
        if n % self.num_classes:
            raise ConfigError(f"{field} = {n}: deeper splits channels into {self.num_classes} "
                              f"class groups, so use a multiple of {self.num_classes}")
