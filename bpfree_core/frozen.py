"""Layer-wise schedules that cache what is frozen (train.layer_epochs).

Layer l trains for the first train.layer_epochs[l] epochs, then freezes: it takes no step and
hands on its eval-mode output (CwComp's staged schedule: 10/15/19/23 epochs). A local rule never
sends a gradient back, so a frozen layer's weights never change again, and for a fixed training
sample (no jitter) neither does its output. A stage therefore keeps the per-sample output of its
frozen leading layers (FrozenOutputs, keyed by the sample's index in the training split, which
travels with the batch as INDEX) and starts the next epochs from there instead of recomputing
them; a stage whose layers are all frozen only gathers. The cache is filled by the epoch's own
batches, so a cached run computes each frozen output once, with the same batch as the run that
recomputes it every epoch (train.cache_frozen = false) would have, and ends with the same
weights where a layer's per-sample output does not depend on the rest of its batch (every rule
but cwc, whose BatchNorm uses the batch's statistics: it runs the schedule uncached). The cache
holds a row per training sample, allocated once at the split's size; one that would take over
half the memory free is declined with a warning, and the run recomputes (same weights, slower).
"""

from __future__ import annotations

import logging
import os

import torch

from bpfree_core.config import ExperimentConfig
from bpfree_core.errors import ConfigError
from bpfree_core.objectives import Objective

log = logging.getLogger(__name__)
SHARE_OF_FREE = 0.5   # a cache takes at most this share of the memory free when it is allocated


def free_bytes(device: torch.device) -> int:
    """Memory free for a new cache on `device`: CUDA's free memory, else the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62   # unknown: trust it


def frozen_layers(cfg: ExperimentConfig, indices: list[int], epoch: int) -> int:
    """How many of `indices` (a stage's layers, in order) are frozen in `epoch` (0-based)."""
    stops = cfg.train.layer_epochs
    return sum(1 for i in indices if stops and stops[i] <= epoch)


def caches(cfg: ExperimentConfig, objective: Objective) -> bool:
    """Whether a run keeps its frozen layers' outputs: a staged schedule, the same input for a
    sample every epoch (no jitter) and outputs that are the sample's own (not cwc's)."""
    return (bool(cfg.train.layer_epochs) and cfg.train.cache_frozen and not cfg.train.jitter
            and not objective.batch_coupled)


def check_layer_epochs(cfg: ExperimentConfig, num_layers: int) -> None:
    """train.layer_epochs names one count per layer (its values are checked with the config)."""
    stops = cfg.train.layer_epochs
    if not stops:
        return
    if len(stops) != num_layers:
        raise ConfigError(f"train.layer_epochs has {len(stops)} entries but the model has "
                          f"{num_layers} layers; give one epoch count per layer")


class FrozenOutputs:
    """The per-sample output of a stage's first `depth` (frozen) layers, filled batch by batch.

    Kept for the deepest frozen depth the stage has reached, plus the one before it while the
    deeper one fills (its batches then start one layer in); forgotten when weights load."""

    def __init__(self) -> None:
        self._by_depth: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # depth -> (values, have)
        self._layout: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}   # shape, strides
        self.samples = 0   # rows seen so far (1 + the largest index): a cache is sized once
        self.declined = False   # a cache did not fit in memory: this run recomputes instead

    def saw(self, index: torch.Tensor) -> None:
        """Note a training batch's indices (every epoch, before anything freezes), so the cache
        is allocated at its final size, not doubled as it fills (it can be gigabytes)."""
        self.samples = max(self.samples, int(index.max()) + 1)

    @property
    def nbytes(self) -> int:
        """Bytes the kept outputs hold (one row per training sample per kept depth)."""
        return sum(values.nbytes for values, _ in self._by_depth.values())

    def clear(self) -> None:
        self._by_depth.clear()
        self._layout.clear()

    def lookup(self, index: torch.Tensor, depth: int) -> tuple[int, torch.Tensor] | None:
        """(d, outputs of the first d layers for `index`) for the deepest d <= depth that holds
        every sample of the batch, or None. `index` lives on the host: no device sync."""
        for d in sorted(self._by_depth, reverse=True):
            values, have = self._by_depth[d]
            if d <= depth and int(index.max()) < len(have) and bool(have[index].all()):
                return d, self._as_computed(d, values[index.to(values.device, non_blocking=True)])
        return None

    def _as_computed(self, depth: int, x: torch.Tensor) -> torch.Tensor:
        """`x` in the memory layout the layer handed it on in (e.g. channels-last after a
        permute): the next layer's kernels, and so its bits, depend on the layout."""
        shape, strides = self._layout[depth]
        if tuple(x.shape) != shape or x.stride() == strides:
            return x
        return torch.empty_strided(shape, strides, dtype=x.dtype, device=x.device).copy_(x)

    def store(self, index: torch.Tensor, depth: int, out: torch.Tensor) -> None:
        """Keep the outputs of the first `depth` layers for the samples `index` (where they fit)."""
        grown = None if self.declined else self._grown(depth, int(index.max()) + 1, out)
        if grown is None:
            return
        values, have = grown
        values[index.to(values.device, non_blocking=True)] = out.detach()
        have[index] = True
        self._layout[depth] = (tuple(out.shape), out.stride())
        done = int(have.sum())
        for d in [d for d in self._by_depth if d < depth]:   # the shallower cache is spent once
            if done >= int(self._by_depth[d][1].sum()):      # the deeper one holds as many
                del self._by_depth[d]

    def _grown(self, depth: int, size: int,
               like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        values, have = self._by_depth.get(depth, (like.new_empty((0, *like.shape[1:])),
                                                  torch.zeros(0, dtype=torch.bool)))
        if size > len(have):
            grow = max(size, self.samples, 2 * len(have))
            need = (grow - len(have)) * like[0].nbytes
            free = free_bytes(like.device)
            if need > SHARE_OF_FREE * free:   # recomputing gives the same bits, only slower
                log.warning("frozen layers' outputs not kept: %.1f GB would take over half of "
                            "the %.1f GB free on %s; recomputing them each epoch (same weights)",
                            need / 1e9, free / 1e9, like.device)
                self.declined = True
                self.clear()
                return None
            values = torch.cat([values, like.new_empty((grow - len(values), *like.shape[1:]))])
            have = torch.cat([have, torch.zeros(grow - len(have), dtype=torch.bool)])
            self._by_depth[depth] = (values, have)
        return values, have
