"""Unsupervised Forward-Forward (Hwang, Seo, Jung 2024, arXiv 2404.14664).

Every layer unit is a self-contained local autoencoder cell: an encoder and a decoder trained on
reconstructing the cell's own input, no negatives, no goodness. The cell hands its latent
(detached) to the next cell; the classifier is the per-layer softmax heads on the latents (their
log-probabilities summed over cells, our stand-in for the paper's classifier on the concatenated
latents -- it keeps the readout local to each cell too).

  h = rms(x)                         the input, normalised to unit RMS (the paper's "layer
                                     normalisation for stability"; also equalises cell scales)
  z = ReLU(enc(h + noise))           noise = noise_std * N(0, 1): denoising AE (DAEFF); 0 = AEFF
  L = mean((dec(z) - h)^2)           reconstruction of the clean input
  out = ReLU(enc(h))                 the clean latent is passed on

The noise is drawn from a generator seeded with (train.seed, layer index, layer step), so any
process that owns the cell draws the same noise. Plain ReLU (not straight-through): the
reconstruction gradient is then the true gradient of the cell.

Convolutional variant (CAEFF, the paper's best) when `model.conv` is set: the first cells are
stride-2 3x3 conv encoders with transposed-conv decoders (each halves H and W, small enough for a
CPU), then linear cells of `model.hidden` on the flattened latent.

Packet keys: x (B, D) or (B, C, H, W) cell input / latent, y (B,) labels, logits (B, C) eval.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bpfree_core.config import ExperimentConfig
from bpfree_core.layers import LABELS, LocalLayer, Metrics, Packet, rms_all, rms_normalize
from bpfree_core.objectives import register
from bpfree_core.objectives.base import Shape, ShapedObjective, numel
from bpfree_core.seeds import generator


def noise_generator(seed: int, index: int, step: int) -> torch.Generator:
    """The generator of cell `index`'s denoising noise at its `step`-th update."""
    return generator(seed, "noise", index, step)


class UFFCell(LocalLayer):
    """A local autoencoder cell: linear (in_shape (D,)) or stride-2 conv (in_shape (C, H, W))."""

    def __init__(self, index: int, num_layers: int, cfg: ExperimentConfig, num_classes: int,
                 in_shape: Shape, out_shape: Shape):
        super().__init__(index, num_layers, cfg, num_classes)
        self.in_shape, self.out_shape = in_shape, out_shape
        if len(out_shape) == 3:
            c_in, h_in = in_shape[0], in_shape[1]
            c_out, h_out = out_shape[0], out_shape[1]
            self.encoder: nn.Module = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)
            # output_padding restores odd/even input sizes exactly (28 -> 14 -> 28, 7 -> 4 -> 7).
            pad = h_in - (2 * h_out - 1)
            self.decoder: nn.Module = nn.ConvTranspose2d(c_out, c_in, 3, stride=2, padding=1,
                                                         output_padding=pad)
        else:
            in_dim = 1
            for n in in_shape:
                in_dim *= n
            self.encoder = nn.Linear(in_dim, out_shape[0])
            self.decoder = nn.Linear(out_shape[0], in_dim)
        self.make_head(numel(out_shape))
        self.finish_init()

    def votes(self) -> bool:
        return True  # no label in the input: every cell's latent may vote

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The cell's normalised input in its own layout: (B, D) or (B, C, H, W)."""
        return rms_all(x.detach().reshape(x.shape[0], *self.in_shape).float())  # no grad upstream

    def train_step(self, packet: Packet) -> tuple[Packet, Metrics]:
        y = packet[LABELS]
        h = self.prepare(packet["x"])
        std = self.cfg.objective.noise_std
        if std > 0:
            gen = noise_generator(self.cfg.train.seed, self.index, self.host_steps())
            noise = torch.randn(h.shape, generator=gen)   # the host's stream: every device alike
            if h.device.type == "cuda":   # pinned, so the upload overlaps instead of waiting
                noise = noise.pin_memory()
            noisy = h + std * noise.to(h.device, non_blocking=True)
        else:
            noisy = h
        z = F.relu(self.encoder(noisy))
        loss = F.mse_loss(self.decoder(z), h)
        self.step_body(loss)
        with torch.no_grad():
            latent = F.relu(self.encoder(h)) if std > 0 else z.detach()
        metrics = {"loss": loss.detach(), "recon_mse": loss.detach()}
        metrics.update(self.step_head(rms_normalize(latent.flatten(1)), y))
        self.count_step()
        return {"x": latent.detach(), LABELS: y}, metrics

    @torch.no_grad()
    def eval_step(self, packet: Packet) -> Packet:
        latent = F.relu(self.encoder(self.prepare(packet["x"])))
        out: Packet = {k: v for k, v in packet.items() if k == "logits"}
        self.add_logits(out, rms_normalize(latent.flatten(1)))
        out["x"] = latent
        return out



@register("uff")
class UnsupervisedFF(ShapedObjective):
    supports_conv = True
    layer_cls = UFFCell

    def shapes(self) -> list[Shape]:
        """Input shape of the stack, then the output shape of every cell."""
        c, h, w = self.spec.shape
        out: list[Shape] = [(c, h, w)] if self.cfg.model.conv else [(c * h * w,)]
        for ch in self.cfg.model.conv:
            h, w = (h + 1) // 2, (w + 1) // 2
            out.append((ch, h, w))
        out += [(n,) for n in self.cfg.model.hidden]
        return out
