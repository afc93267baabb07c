"""The batches of a training epoch: which samples, in which order, with which random draws.

Every random draw is a pure function of (seed, epoch, batch index) (`batch_generator`), so a
pipeline, a federated client and the single-process reference fed the same config draw the same
batches, negatives and jitter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from bpfree_core.config import ExperimentConfig
from bpfree_core.data.datasets import Split, epoch_batches
from bpfree_core.frozen import caches
from bpfree_core.layers import INDEX, REFERENCE, Packet
from bpfree_core.objectives import Objective
from bpfree_core.seeds import generator


def batch_generator(seed: int, epoch: int, batch: int) -> torch.Generator:
    """The generator for every random draw of one batch (negatives, noise)."""
    return generator(seed, "batch", epoch, batch)

def train_packets(
    objective: Objective, split: Split, cfg: ExperimentConfig, epoch: int,
    replay: Callable[[int, torch.Generator], Split] | None = None,
) -> Iterator[Packet]:
    """The first-layer packets of one training epoch, in order. `replay(n, gen)` is continual
    learning's memory, drawn from each batch's generator: strategy `replay` appends n old samples
    to each batch of n; `agem` sends n of them first, as a reference packet (bpfree_core.continual.agem)."""
    agem = cfg.continual.strategy == "agem"
    keyed = replay is None and caches(cfg, objective)   # frozen layers' outputs kept by sample
    for b, idx in enumerate(epoch_batches(len(split), cfg.train.batch_size, cfg.train.seed, epoch)):
        gen = batch_generator(cfg.train.seed, epoch, b)
        x, y = split.images[idx], split.labels[idx]
        if replay is not None and agem:
            old = replay(len(idx), gen)
            yield mark_reference(_encode(objective, old.images, old.labels, cfg, gen), True)
        elif replay is not None:
            old = replay(len(idx), gen)
            x, y = torch.cat([x, old.images]), torch.cat([y, old.labels])
        packet = _encode(objective, x, y, cfg, gen)
        if keyed:
            packet[INDEX] = idx
        yield mark_reference(packet, False) if agem else packet


def _encode(objective: Objective, x: torch.Tensor, y: torch.Tensor, cfg: ExperimentConfig,
            gen: torch.Generator) -> Packet:
    if cfg.train.jitter:
        x = jitter(x, objective.spec.shape, cfg.train.jitter, gen)
    return objective.encode_train(x, y, gen)


def mark_reference(packet: Packet, reference: bool) -> Packet:
    """Every train packet of an A-GEM run carries the marker (one schema on the wire); True on the
    memory's reference packets."""
    packet[REFERENCE] = torch.tensor([reference])
    return packet

def jitter(x: torch.Tensor, shape: tuple[int, int, int], pixels: int,
           gen: torch.Generator) -> torch.Tensor:
    """Shift every image by its own random (dy, dx) in [-pixels, pixels], zero fill.

    x (B, C*H*W) -> (B, C*H*W). Drawn from the batch's generator, so every process agrees.
    """
    c, h, w = shape
    b = x.shape[0]
    padded = torch.nn.functional.pad(x.view(b, c, h, w), (pixels,) * 4)  # (B, C, H+2p, W+2p)
    dy, dx = torch.randint(0, 2 * pixels + 1, (2, b), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]              # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]              # (B, 1, 1, W)
    out = padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None],
                 rows, cols]                                               # (B, C, H, W)
    return out.reshape(b, c * h * w)

def num_train_batches(split: Split, cfg: ExperimentConfig) -> int:
    return len(split) // cfg.train.batch_size
