"""ASGE-style spatial goodness (Gong, Staszewski, Xu, arXiv 2509.12394): no negatives, no label in
the input; each layer's goodness keeps *where* a channel was active, and a fixed random projection
turns it into class scores, so the number of classes is not tied to the number of channels.

Built from the paper's description (the authors' code, KAI-Laboratory/ASGE, could not be read
from here), for conv layers (model.conv) and, as its P = 1 case, linear ones (model.hidden):

  h = x                               the previous layer's detached output (layer 0: the image,
                                      layer-normalised over C, H, W)
  a = ReLU(conv3x3(h))                no bias (linear: ReLU(W h))
  g = sum of a^2 over each of P x P   (B, C * P * P) spatial goodness; P = round(sqrt(C_last /
      patches of every channel        C) ^ alpha) clipped to 1 .. H (objective.patch_alpha; the
                                      paper's alpha = 1), so shallow, narrow layers see finer
                                      patches and every layer's goodness has ~C_last entries
  s = g W^T                           W (classes x C P P) fixed random, drawn from the run's seed
  L = cross_entropy(s, label)         the local loss
  out = LayerNorm_C(RMSPool_2(a))     the VGG block's hand-on: 2x2 RMS pooling where the channel
                                      count changes, LayerNorm over the channels (no affine)

Prediction sums log_softmax(s) over the voting layers (all but the first, unless
objective.vote_first) in one pass; the optional local softmax heads read the hand-on as usual.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bpfree_core.config import ExperimentConfig
from bpfree_core.layers import LABELS, LocalLayer, Metrics, Packet, rms_normalize
from bpfree_core.objectives import register
from bpfree_core.objectives.base import Shape, ShapedObjective, numel
from bpfree_core.seeds import generator


def spatial_goodness(a: torch.Tensor, patches: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C * P * P): the sum of squares of each channel over each of P x P
    patches, the patch's energy ((B, D) linear activity: its squares, P = 1)."""
    if a.dim() == 2:
        return a.square()
    h, w = a.shape[2:]
    area = (h / patches) * (w / patches)   # adaptive pooling averages; the paper sums
    return (F.adaptive_avg_pool2d(a.square(), patches) * area).flatten(1)


def rms_pool(a: torch.Tensor, size: int) -> torch.Tensor:
    """sqrt(mean of squares) over size x size windows (identity for size 1)."""
    return a if size == 1 else (F.avg_pool2d(a.square(), size, ceil_mode=True) + 1e-8).sqrt()


class AsgeLayer(LocalLayer):
    """Conv 3x3 (or linear) + ReLU; spatial goodness through a fixed random class projection."""

    def __init__(self, index: int, num_layers: int, cfg: ExperimentConfig, num_classes: int,
                 in_shape: Shape, out_shape: Shape, patches: int = 1):
        super().__init__(index, num_layers, cfg, num_classes)
        self.in_shape, self.out_shape, self.patches = in_shape, out_shape, patches
        conv = len(out_shape) == 3
        if conv:
            self.body: nn.Module = nn.Conv2d(in_shape[0], out_shape[0], 3, padding=1, bias=False)
            nn.init.kaiming_normal_(self.body.weight, mode="fan_out", nonlinearity="relu")
            self.pool = 2 if out_shape[1] < in_shape[1] else 1
            features = out_shape[0] * patches * patches
        else:
            self.body = nn.Linear(numel(in_shape), out_shape[0], bias=False)
            self.pool, features = 1, out_shape[0]
        gen = generator(cfg.train.seed, "projection", index)
        self.register_buffer("projection", torch.randn(num_classes, features, generator=gen)
                             / math.sqrt(features))   # fixed: never trained, same in every process
        self.make_head(numel(out_shape))
        self.finish_init()

    def activity(self, x: torch.Tensor) -> torch.Tensor:
        """ReLU activity of the detached, shaped input: (B, C, H, W) or (B, D)."""
        h = x.detach().float().reshape(x.shape[0], *self.in_shape)
        if self.index == 0 and h.dim() == 4:
            h = F.layer_norm(h, h.shape[1:])
        if len(self.out_shape) == 1:
            h = h.flatten(1)
        return F.relu(self.body(h))

    def scores(self, a: torch.Tensor) -> torch.Tensor:
        """(B, num_classes): the spatial goodness through the fixed projection."""
        return spatial_goodness(a, self.patches) @ self.projection.T

    def hand_on(self, a: torch.Tensor) -> torch.Tensor:
        if a.dim() == 2:
            return F.layer_norm(a, a.shape[1:])
        pooled = rms_pool(a, self.pool)
        return F.layer_norm(pooled.permute(0, 2, 3, 1), (pooled.shape[1],)).permute(0, 3, 1, 2)

    def train_step(self, packet: Packet) -> tuple[Packet, Metrics]:
        labels = packet[LABELS]
        a = self.activity(packet["x"])
        s = self.scores(a)
        loss = F.cross_entropy(s, labels)
        self.step_body(loss)
        out = self.hand_on(a.detach())
        metrics: Metrics = {"loss": loss.detach(), "layer_acc": (s.argmax(1) == labels).float().mean()}
        metrics.update(self.step_head(rms_normalize(out.flatten(1)), labels))
        self.count_step()
        return {"x": out, LABELS: labels}, metrics

    @torch.no_grad()
    def eval_step(self, packet: Packet) -> Packet:
        a = self.activity(packet["x"])
        return self.voted(packet, self.hand_on(a), lambda: F.log_softmax(self.scores(a), dim=1))


@register("asge")
class Asge(ShapedObjective):
    supports_staged = True
    supports_conv = True
    supports_goodness = True
    layer_cls = AsgeLayer

    def shapes(self) -> list[Shape]:
        """Input shape, then every layer's output: a conv layer halves H and W (2x2 RMS pooling)
        where its channel count differs from the previous conv layer's."""
        c, h, w = self.spec.shape
        out: list[Shape] = [(c, h, w)] if self.cfg.model.conv else [(c * h * w,)]
        for i, ch in enumerate(self.cfg.model.conv):
            if i > 0 and ch != self.cfg.model.conv[i - 1]:
                h, w = (h + 1) // 2, (w + 1) // 2
            out.append((ch, h, w))
        out += [(n,) for n in self.cfg.model.hidden]
        return out

    def patches(self, index: int) -> int:
        """P of layer `index`: round(sqrt(C_last / C) ^ alpha), within 1 .. the map's height."""
        shapes = self.shapes()
        if len(shapes[index + 1]) != 3:
            return 1
        last = max(s[0] for s in shapes[1:] if len(s) == 3) if self.cfg.model.conv else 1
        channels, height = shapes[index + 1][0], shapes[index][1]
        p = round(math.sqrt(last / channels) ** self.cfg.objective.patch_alpha)
        return max(1, min(p, height))

    def build_layer(self, index: int, num_layers: int, in_dim: int, out_dim: int) -> LocalLayer:
        shapes = self.shapes()
        in_shape = shapes[index] if len(shapes[index + 1]) == 3 else (in_dim,)
        return AsgeLayer(index, num_layers, self.cfg, self.num_classes, in_shape, shapes[index + 1],
                         self.patches(index))
