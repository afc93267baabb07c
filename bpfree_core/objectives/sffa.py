"""SFFA (Terres-Escudero et al. 2024, arXiv 2409.07387): positive/negative neuron partition.

Each layer's units split into a positive half P and a negative half N; fitness
g = sum_P y^2 / sum y^2 in [0, 1]; loss = binary cross-entropy, -log g(x+) - log(1 - g(x-)).
The class pattern (Bernoulli(0.1), 100 bits) is appended to the input of the first layer, as the
authors' code does. Prediction sums g over layers for every candidate class.
`objective.activation = sigmoid` and `objective.top_k = 15` are the authors' layer (sigmoid units,
the 15 largest of each half kept; their patterns are Bernoulli(0.2): objective.pattern_density).
`objective.input_skip = true` is their residual input: layers after the first get the image and
the class code again, beside the last layer's output (FF_Layer(1400 + 784 + 100, 1400)).
"""

from __future__ import annotations

from typing import Any

import torch

from bpfree_core.config import ExperimentConfig
from bpfree_core.data.datasets import DatasetSpec
from bpfree_core.errors import ConfigError
from bpfree_core.layers import LABELS, Metrics, Packet, rms_normalize
from bpfree_core.objectives import register
from bpfree_core.objectives.goodness import GoodnessLayer, GoodnessObjective, LossOut

EPS = 1e-4


def top_k_per_half(y: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest units of each half (positive, negative) per row, zero the rest: the
    authors' sparse layer (SFFA_CoLLAS FF_Layer, k = 15). Gradients reach the kept units only."""
    half = y.shape[1] // 2
    parts = []
    for part in (y[:, :half], y[:, half:]):                              # (B, D/2) each
        values, index = part.topk(k, dim=1)
        parts.append(torch.zeros_like(part).scatter(1, index, values))
    return torch.cat(parts, dim=1)                                       # (B, D)


class SFFALayer(GoodnessLayer):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.cfg.objective.negatives == "seen" and self.index == 0:
            # the classes this layer's labels have shown so far (continual learning: they grow);
            # 0 / 1 floats, so that a federation's average keeps every class some client saw
            self.register_buffer("seen", torch.zeros(self.num_classes))

    def train_step(self, packet: Packet) -> tuple[Packet, Metrics]:
        if self.cfg.objective.negatives == "seen":
            return self.train_step_seen(packet)
        return super().train_step(packet)

    def train_step_seen(self, packet: Packet) -> tuple[Packet, Metrics]:
        """objective.negatives = seen: every class seen so far is a candidate of every sample; the
        layer's loss is the BCE of its goodness for each against the one-hot label (the authors'
        loss, made local: theirs is on the product of every layer's goodness). The first layer
        picks the candidates; they travel as y_cand, their activations as cand (B*S rows)."""
        y = packet[LABELS]                                               # (B,)
        b = y.shape[0]
        if "y_cand" not in packet:
            self.seen[y] = 1.0
            classes = (self.seen > 0).nonzero().squeeze(1)               # (S,)
            y_cand = classes.repeat(b)                                   # (B*S,)
            x = packet["x"].repeat_interleave(len(classes), dim=0)       # (B*S, D_in)
        else:
            y_cand, x = packet["y_cand"], self.role_input(packet, "cand")
        cand = self.forward_role(x, self.codes({"y_cand": y_cand}, "y_cand", x.shape[0]))
        g = self.goodness(cand).view(b, -1)                              # (B, S)
        target = (y_cand.view(b, -1) == y[:, None]).float()              # (B, S) one-hot
        loss = -(target * g.log() + (1 - target) * (1 - g).log()).mean()
        self.step_body(loss)
        with torch.no_grad():
            neutral = self.forward_role(self.role_input(packet, "neutral"),
                                        self.codes(packet, "neutral", b))
        metrics: Metrics = {"loss": loss.detach(),
                            "ff_acc": (g.argmax(1) == target.argmax(1)).float().mean()}
        metrics.update(self.step_head(rms_normalize(neutral), y))
        self.count_step()
        out = {"cand": cand.detach(), "y_cand": y_cand, "neutral": neutral, LABELS: y}
        return self.handed_on(packet, out), metrics

    def activate(self, z: torch.Tensor) -> torch.Tensor:
        o = self.cfg.objective
        y = torch.sigmoid(z) if o.activation == "sigmoid" else super().activate(z)
        return top_k_per_half(y, o.top_k) if o.top_k else y

    def goodness(self, y: torch.Tensor) -> torch.Tensor:
        half = y.shape[1] // 2
        sq = y.pow(2)                                                        # (B, D)
        g = sq[:, :half].sum(1) / (sq.sum(1) + 1e-12)                        # (B,)
        return g.clamp(EPS, 1 - EPS)

    def loss(self, y_pos: torch.Tensor, y_neg: torch.Tensor) -> LossOut:
        g_pos, g_neg = self.goodness(y_pos), self.goodness(y_neg)
        loss = -(g_pos.log().mean() + (1 - g_neg).log().mean())
        ff_acc = 0.5 * ((g_pos > 0.5).float().mean() + (g_neg < 0.5).float().mean())
        return loss, {"ff_acc": ff_acc, "g_pos": g_pos.detach().mean(), "g_neg": g_neg.detach().mean()}


@register("sffa")
class SFFA(GoodnessObjective):
    layer_cls = SFFALayer
    uses_patterns = True
    supports_input_skip = True
    supports_seen_negatives = True

    def __init__(self, cfg: ExperimentConfig, spec: DatasetSpec):
        for i, n in enumerate(cfg.model.hidden):
            if n % 2:
                raise ConfigError(f"model.hidden[{i}] = {n}: sffa splits each layer into positive "
                                  "and negative halves, so every size must be even")
            if cfg.objective.top_k > n // 2:
                raise ConfigError(f"objective.top_k = {cfg.objective.top_k} exceeds half of "
                                  f"model.hidden[{i}] = {n}; keep at most {n // 2} units per half")
        super().__init__(cfg, spec)
