"""Build a stack of local layers from a config; a Stage is a contiguous run of them
(bpfree_core.balance decides which)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator

import torch

from bpfree_core.config import ExperimentConfig
from bpfree_core.data.datasets import run_spec
from bpfree_core.errors import ConfigError
from bpfree_core.frozen import FrozenOutputs, check_layer_epochs, frozen_layers
from bpfree_core.layers import INDEX, REFERENCE, LocalLayer, Metrics, Packet, layer_seed, seeded
from bpfree_core.objectives import Objective, get_objective

OPTIMIZER = "optimizer."   # key prefix of optimiser-state tensors (Stage.optimizer_tensors)
CONSOLIDATION = "consolidation."   # ... and, after the layer, of its EWC / SI state


def build_objective(cfg: ExperimentConfig) -> Objective:
    spec = run_spec(cfg)
    if cfg.model.num_classes:
        spec = dataclasses.replace(spec, num_classes=cfg.model.num_classes)
    return get_objective(cfg, spec)


def pipelined_objective(cfg: ExperimentConfig, as_what: str = "pipeline stages") -> Objective:
    """The run's objective, once it is known to split into stages (the one place that decides;
    bp needs gradients across layers)."""
    objective = build_objective(cfg)
    if not objective.pipelinable:
        raise ConfigError(f"model.algorithm = {cfg.model.algorithm!r} trains with gradients across "
                          f"layers, so it cannot be split into {as_what}; use `bpfree train` or a "
                          "backprop-free algorithm (ff, symba, sffa, mono, ...)")
    return objective


def build_layers(
    cfg: ExperimentConfig, indices: range | None = None, objective: Objective | None = None
) -> list[LocalLayer]:
    """Build layers `indices` (default: all) of the stack, each from its own seed.

    Layer i is initialised identically whichever process builds it, so a stage worker that owns
    layers 2..3 holds exactly what the single-process reference holds there.
    """
    objective = objective or build_objective(cfg)
    sizes = objective.layer_sizes()
    check_layer_epochs(cfg, len(sizes))
    outside = [i for i in cfg.objective.vote_layers if i >= len(sizes)]
    if outside:
        raise ConfigError(f"objective.vote_layers names layer(s) {outside}, but the model has "
                          f"{len(sizes)} layers (0..{len(sizes) - 1})")
    dims = [objective.input_dim, *sizes]
    indices = indices if indices is not None else range(len(sizes))
    layers = []
    for i in indices:
        with seeded(layer_seed(cfg.train.seed, i)):
            layers.append(objective.build_layer(i, len(sizes), dims[i], dims[i + 1]))
    return layers


@contextlib.contextmanager
def compute_precision(cfg: ExperimentConfig, device: torch.device) -> Iterator[Callable[[Packet], Packet]]:
    """train.precision = bf16: autocast (matmuls in bfloat16) on CPU and CUDA. Yields what to apply
    to the layer's output packet: float32 again (the same packets whichever stage a layer is on,
    the golden rule, and on the wire), or nothing at float32."""
    if cfg.train.precision != "bf16":
        yield lambda packet: packet
        return
    with torch.autocast(device.type, dtype=torch.bfloat16):
        yield as_float32


def as_float32(packet: Packet) -> Packet:
    return {k: v.float() if v.is_floating_point() and v.dtype != torch.float32 else v
            for k, v in packet.items()}


def consolidation_only(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The EWC / SI part of Stage.optimizer_tensors()."""
    return {k: v for k, v in tensors.items() if k.startswith(OPTIMIZER) and f".{CONSOLIDATION}" in k}


class Stage:
    """A contiguous run of layers: what one stage worker (or the reference trainer) owns."""

    def __init__(self, layers: list[LocalLayer], device: str | torch.device = "cpu"):
        self.layers = layers
        self.device = torch.device(device)
        self.frozen = 0                        # leading layers frozen this epoch (train.layer_epochs)
        self.frozen_outputs = FrozenOutputs()  # their per-sample outputs, where the run caches
        for layer in layers:
            layer.place(self.device)
        if self.device.type == "cuda" and layers:   # the run's choice, for this process's matmuls
            tf32 = bool(layers[0].cfg.train.tf32)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32

    @property
    def indices(self) -> list[int]:
        return [layer.index for layer in self.layers]

    def set_epoch(self, epoch: int, total_epochs: int) -> None:
        for layer in self.layers:
            layer.set_epoch(epoch, total_epochs)
        if self.layers:
            self.frozen = frozen_layers(self.layers[0].cfg, self.indices, epoch)

    def train_step(self, packet: Packet) -> tuple[Packet, dict[int, Metrics]]:
        """Train every layer on `packet`; hand on the last one's output. An A-GEM reference packet
        (REFERENCE true) only sets each layer's reference gradient and reports no metrics."""
        packet = dict(packet)
        marker = packet.pop(REFERENCE, None)                 # (1,) bool, agem runs only: read on
        reference = marker is not None and marker.tolist()[0]   # the host, before any upload
        index = packet.pop(INDEX, None)                      # (B,) on the host, runs that cache
        if index is not None:
            self.frozen_outputs.saw(index)
        packet = {k: v.to(self.device, non_blocking=True) for k, v in packet.items()}
        start, packet = self._from_frozen(packet, index)
        metrics = {}
        for i, layer in enumerate(self.layers[start:], start):
            if i < self.frozen:   # frozen (train.layer_epochs): hand on, no step, no metrics
                with compute_precision(layer.cfg, self.device) as handed_on:
                    packet = handed_on(layer.frozen_step(packet))
                if i + 1 == self.frozen and index is not None:
                    self.frozen_outputs.store(index, self.frozen, packet["x"])
                continue
            layer.train()
            with (layer.reference_pass() if reference else contextlib.nullcontext(),
                  compute_precision(layer.cfg, self.device) as handed_on):
                packet, metrics[layer.index] = layer.train_step(packet)
            packet = handed_on(packet)
        if marker is not None:
            packet[REFERENCE] = marker
        if index is not None:
            packet[INDEX] = index
        return packet, {} if reference else metrics

    def _from_frozen(self, packet: Packet, index: torch.Tensor | None) -> tuple[int, Packet]:
        """(first layer to run, its packet): past the frozen layers whose outputs are kept."""
        if index is None or not self.frozen:
            return 0, packet
        hit = self.frozen_outputs.lookup(index, self.frozen)
        if hit is None:
            return 0, packet
        depth, x = hit
        return depth, {**{k: v for k, v in packet.items() if k != "x"}, "x": x}

    @torch.no_grad()
    def eval_step(self, packet: Packet) -> Packet:
        packet = {k: v.to(self.device, non_blocking=True) for k, v in packet.items()}
        for layer in self.layers:
            layer.eval()
            with compute_precision(layer.cfg, self.device) as handed_on:
                packet = layer.eval_step(packet)
            packet = handed_on(packet)
        return packet

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Weights keyed `layers.<global index>.<name>`: the same keys in every process."""
        return {f"layers.{layer.index}.{k}": v.detach().cpu().clone()
                for layer in self.layers for k, v in layer.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for layer in self.layers:
            prefix = f"layers.{layer.index}."
            own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            expected = set(layer.state_dict())
            if set(own) != expected:
                missing, extra = expected - set(own), set(own) - expected
                raise ConfigError(
                    f"weights for layer {layer.index} do not match: missing {sorted(missing)}, "
                    f"unexpected {sorted(extra)}"
                )
            layer.load_state_dict(own)
        self.frozen_outputs.clear()   # other weights: other outputs

    def optimizer_tensors(self) -> dict[str, torch.Tensor]:
        """Every layer's optimiser state as plain tensors, keyed
        `optimizer.layers.<i>.<body|head>.<param>.<key>` (EWC / SI state:
        `optimizer.layers.<i>.consolidation.<body|head>.<name>`): what crosses the wire to a
        checkpoint."""
        out = {}
        for layer in self.layers:
            for part, opt in (("body", layer.optimizer), ("head", layer.head_optimizer)):
                for p, entry in (opt.state_dict()["state"] if opt is not None else {}).items():
                    for key, value in entry.items():
                        out[f"{OPTIMIZER}layers.{layer.index}.{part}.{p}.{key}"] = (
                            torch.as_tensor(value).detach().cpu().clone())
            out.update({f"{OPTIMIZER}layers.{layer.index}.{CONSOLIDATION}{k}": v
                        for k, v in layer.consolidation_tensors().items()})
        return out

    def end_task(self) -> dict[int, float]:
        """Continual learning's task boundary: every layer stores its EWC / SI importance; the
        penalty each carried at the end of the task, by layer."""
        return {layer.index: layer.end_task() for layer in self.layers}

    def load_optimizer_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what optimizer_tensors() gave (after the weights are loaded); EWC / SI state
        too (none given: dropped, as a fresh layer's)."""
        for layer in self.layers:
            prefix = f"{OPTIMIZER}layers.{layer.index}.{CONSOLIDATION}"
            layer.load_consolidation_tensors({k[len(prefix):]: v for k, v in tensors.items()
                                              if k.startswith(prefix)})
            for part, opt in (("body", layer.optimizer), ("head", layer.head_optimizer)):
                prefix = f"{OPTIMIZER}layers.{layer.index}.{part}."
                state: dict[int, dict[str, torch.Tensor]] = {}
                for k, v in tensors.items():
                    if k.startswith(prefix):
                        p, _, key = k[len(prefix):].partition(".")
                        if not p.isdigit() or not key:
                            raise ConfigError(f"optimiser tensor {k!r} is not {prefix}<param>.<key>")
                        state.setdefault(int(p), {})[key] = v
                if state and opt is not None:
                    saved = opt.state_dict()   # its groups keep their lr and kernel flags
                    saved["state"] = state
                    try:
                        opt.load_state_dict(saved)
                    except (ValueError, KeyError, RuntimeError) as exc:
                        raise ConfigError(f"optimiser state for layer {layer.index} ({part}) does "
                                          f"not fit: {exc}") from exc

    def optimizer_state(self) -> dict[int, dict[str, object]]:
        return {layer.index: layer.optimizer_state() for layer in self.layers}

    def load_optimizer_state(self, state: dict[int, dict[str, object]]) -> None:
        for layer in self.layers:
            if layer.index in state:
                layer.load_optimizer_state(state[layer.index])
