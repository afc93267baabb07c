"""The unit of ownership: a layer that carries its parameters, optimiser, objective and head.

A `LocalLayer` takes a `Packet` (named tensors: positive/negative/neutral activations, labels,
prediction accumulators), trains itself on it with its local objective, and hands on a packet of
*detached* outputs. Nothing it returns carries autograd history, so a stack of layers splits into
contiguous stages at any boundary and no gradient ever crosses one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from bpfree_core.config import ExperimentConfig
from bpfree_core.continual.agem import GradientProjector
from bpfree_core.continual.consolidation import Consolidator
from bpfree_core.errors import ConfigError, ProtocolError
from bpfree_core.optim import LayerOptimizer, set_kernels
from bpfree_core.seeds import derive

Packet = dict[str, torch.Tensor]
# A train step's statistics: 0-dim tensors left on the layer's device (no host sync per batch);
# bpfree_core.metrics.RunningMeans reads them once per epoch.
Metrics = dict[str, torch.Tensor]

# Packet keys shared by every objective.
LABELS = "y"            # (B,) int64 true labels
LOGITS = "logits"       # (B, C) accumulated head log-probabilities (eval)
GOODNESS = "goodness"   # (B, C) accumulated goodness per candidate label (eval)
REFERENCE = "reference" # (1,) bool, continual.strategy = agem: True on a memory batch that only
                        # sets each layer's reference gradient (bpfree_core.continual.agem), no step
INDEX = "index"         # (B,) int64, train.layer_epochs runs that cache: each sample's row in
                        # the training split, the key of frozen layers' outputs (bpfree_core.frozen)


def rms_normalize(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale each row to unit root-mean-square: strips the length (goodness), keeps direction."""
    return x / (x.pow(2).mean(dim=1, keepdim=True).sqrt() + eps)


def rms_all(x: torch.Tensor) -> torch.Tensor:
    """Unit RMS per sample over every non-batch dimension, shape kept (conv feature maps)."""
    return rms_normalize(x.flatten(1)).view_as(x)


class _StraightThroughReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


def relu(x: torch.Tensor, straight_through: bool) -> torch.Tensor:
    """ReLU; with `straight_through` the full gradient passes even where the unit is 0. Without
    a gradient the same values come from a plain op (TorchScript cannot hold a Python Function)."""
    if not straight_through:
        return F.relu(x)
    return _StraightThroughReLU.apply(x) if torch.is_grad_enabled() else x.clamp(min=0)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with the global RNG seeded, restoring it afterwards (deterministic init)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def layer_seed(base_seed: int, index: int) -> int:
    """Init seed of layer `index`: the same in every process that builds it."""
    return derive(base_seed, "layer", index)


def add_vote(packet: Packet, key: str, vote: torch.Tensor) -> None:
    """Sum a layer's (B, C) vote into the packet's prediction accumulator `key` (LOGITS or
    GOODNESS), which the first voting layer starts."""
    packet[key] = packet[key] + vote if key in packet else vote


class LocalLayer(nn.Module):
    """Base class: one layer, its optimiser, its local objective and its readout head.

    Subclasses build their modules in `__init__`, then call `self.finish_init()`, and implement
    `train_step` and `eval_step`.
    """

    def __init__(self, index: int, num_layers: int, cfg: ExperimentConfig, num_classes: int):
        super().__init__()
        self.index = index
        self.num_layers = num_layers
        self.cfg = cfg
        self.num_classes = num_classes
        self.head: nn.Linear | None = None
        self.optimizer: LayerOptimizer | None = None
        self.head_optimizer: LayerOptimizer | None = None
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self._host_steps: int | None = None      # mirror of `steps`, reset when weights load
        # optimiser kernels (see `place`); foreach is bit-identical to the per-tensor loop on CPU
        # (tests/test_step.py), so every committed run reproduces
        self.kernels = "foreach"
        self.consolidators: dict[str, Consolidator] = {}   # continual learning: "body", "head"
        self.projectors: dict[str, GradientProjector] = {}  # A-GEM: "body", "head"
        self._reference = False                  # inside a reference pass: remember, no step
        self._collecting = False                 # ewc: the task's last epoch adds to the Fisher
        self.always_vote = False                 # diagnostics: score every layer on its own
        self.register_load_state_dict_post_hook(self._forget_host_steps)

    # -- construction -------------------------------------------------------------------------
    def make_head(self, features: int) -> None:
        """A bias-free linear softmax head, zero-initialised (loeweX), fed detached features."""
        if self.cfg.objective.head:
            self.head = nn.Linear(features, self.num_classes, bias=False)
            nn.init.zeros_(self.head.weight)

    def body_parameters(self) -> list[nn.Parameter]:
        head = set(map(id, self.head.parameters())) if self.head is not None else set()
        return [p for p in self.parameters() if id(p) not in head]

    def finish_init(self) -> None:
        """Create the optimisers once every module exists (again: fresh state after a load)."""
        o = self.cfg.optim
        self.optimizer = LayerOptimizer(self.body_parameters(), o.optimizer, o.lr, o.momentum,
                                        o.weight_decay, kernels=self.kernels)
        if self.head is not None:
            self.head_optimizer = LayerOptimizer(list(self.head.parameters()), o.optimizer,
                                                 o.head_lr, o.momentum, 0.0, kernels=self.kernels)

    def place(self, device: torch.device, kernels: str | None = None) -> None:
        """Move to `device`; optimiser kernels `kernels` (default optim.kernels; "auto": fused on
        CUDA, foreach elsewhere)."""
        self.to(device)
        kernels = kernels or self.cfg.optim.kernels
        if kernels == "auto":
            kernels = "fused" if device.type == "cuda" and self.cfg.optim.optimizer == "adam" \
                else "foreach"
        self.kernels = kernels
        for opt in (self.optimizer, self.head_optimizer):
            if opt is not None:
                set_kernels(opt, kernels)

    def compiled(self, name: str) -> Callable[..., object]:
        """The method `name`, through torch.compile when train.compile is on: its elementwise
        work fused into few kernels, built on the first call for each input shape (seconds to
        tens of seconds) and kept with this layer object. Float results differ from eager in the
        last bits, so it is opt-in."""
        method = getattr(self, name)
        if not self.cfg.train.compile:
            return method
        built = self.__dict__.setdefault("_compiled", {})   # plain attribute: not a submodule
        if name not in built:
            built[name] = torch.compile(method)
        return built[name]

    def host_steps(self) -> int:
        """`steps` as a Python int without reading the device each batch (read once per load)."""
        if self._host_steps is None:
            self._host_steps = int(self.steps)
        return self._host_steps

    def count_step(self) -> None:
        if self._reference:
            return
        self.steps += 1
        if self._host_steps is not None:
            self._host_steps += 1

    def _forget_host_steps(self, *_: object) -> None:
        self._host_steps = None

    # -- schedule -----------------------------------------------------------------------------
    def set_epoch(self, epoch: int, total_epochs: int) -> None:
        """Linear cool-down of the learning rates over the second half of training (loeweX);
        under a staged schedule over the second half of this layer's own epochs, so it settles
        before it freezes."""
        o = self.cfg.optim
        stops = self.cfg.train.layer_epochs
        span = stops[self.index] if stops else total_epochs
        scale = 1.0
        if o.cooldown and span > 1:
            half = span // 2
            if epoch >= half:
                scale = max(0.0, 1.0 - (epoch - half) / (span - half + 1))
        for opt, lr in ((self.optimizer, o.lr), (self.head_optimizer, o.head_lr)):
            if opt is not None:
                for group in opt.param_groups:
                    group["lr"] = lr * scale
        # EWC's Fisher: the squared gradients of each task's last epoch (continual runs one
        # schedule of epochs_per_task per task; a federated stream spreads its epochs over the
        # tasks, rounds_per_task * local_epochs each)
        span = total_epochs // self.cfg.continual.tasks if self.cfg.continual.federated else total_epochs
        self._collecting = epoch % max(span, 1) == max(span, 1) - 1
        for con in self.consolidators.values():
            con.collecting = con.kind == "ewc" and self._collecting

    # -- optimisation helpers -----------------------------------------------------------------
    def step_body(self, loss: torch.Tensor) -> None:
        assert self.optimizer is not None
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._step(self.optimizer, "body")

    def _step(self, optimizer: LayerOptimizer, part: str) -> None:
        if self.cfg.continual.strategy == "agem":
            params = optimizer.param_groups[0]["params"]
            projector = self.projectors.setdefault(part, GradientProjector())
            if self._reference:   # a memory batch: keep its gradient, do not step
                projector.remember(params)
                return
            projector.project(params)
        consolidator = self._consolidator(part, optimizer.param_groups[0]["params"])
        if consolidator is None:
            optimizer.step()
            return
        consolidator.before_step()   # EWC / SI: the penalty's gradient joins the local one
        optimizer.step()
        consolidator.after_step()

    @contextlib.contextmanager
    def reference_pass(self) -> Iterator[None]:
        """Train steps inside only set A-GEM's reference gradients: no optimiser step, and every
        buffer (step count, running means) is as it was afterwards."""
        if self.cfg.continual.strategy != "agem":
            raise ProtocolError(f"layer {self.index} got an A-GEM reference batch but "
                             f"continual.strategy = {self.cfg.continual.strategy!r}; only agem "
                             "sends them")
        saved = {name: b.clone() for name, b in self.named_buffers()}
        self._reference = True
        try:
            yield
        finally:
            self._reference = False
            with torch.no_grad():
                for name, b in self.named_buffers():
                    b.copy_(saved[name])

    def _consolidator(self, part: str, params: list[nn.Parameter]) -> Consolidator | None:
        """continual.strategy = ewc | si: this part's penalty state, made on its first step (on
        the parameters' device), so every process that owns the layer keeps its own."""
        c = self.cfg.continual
        if c.strategy not in ("ewc", "si"):
            return None
        if part not in self.consolidators:
            strength = c.ewc_lambda if c.strategy == "ewc" else c.si_c
            self.consolidators[part] = Consolidator(params, c.strategy, strength, c.si_damping)
            self.consolidators[part].collecting = c.strategy == "ewc" and self._collecting
        return self.consolidators[part]

    def end_task(self) -> float:
        """A task of the stream is learnt: store its EWC / SI importance and anchor. Returns the
        penalty (vs the earlier tasks) the weights carried at the end of it."""
        penalty = sum(con.penalty() for con in self.consolidators.values())
        for con in self.consolidators.values():
            con.end_task()
        return float(penalty)

    def consolidation_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{part}.{k}": v for part, con in self.consolidators.items()
                for k, v in con.state_tensors().items()}

    def load_consolidation_tensors(self, state: dict[str, torch.Tensor]) -> None:
        """Restore consolidation_tensors() (none: the state is dropped, as a fresh layer's)."""
        self.consolidators = {}
        for part, opt in (("body", self.optimizer), ("head", self.head_optimizer)):
            own = {k[len(part) + 1:]: v for k, v in state.items() if k.startswith(part + ".")}
            if own and opt is not None:
                con = self._consolidator(part, opt.param_groups[0]["params"])
                if con is None:
                    raise ConfigError(f"layer {self.index} got EWC / SI state but "
                                      f"continual.strategy = {self.cfg.continual.strategy!r}")
                try:
                    con.load_state_tensors(own)
                except ValueError as exc:
                    raise ConfigError(f"layer {self.index} ({part}): {exc}") from None

    def step_head(self, features: torch.Tensor, labels: torch.Tensor) -> Metrics:
        """One head step on detached features; returns head loss and accuracy on the batch."""
        if self.head is None or self.head_optimizer is None:
            return {}
        logits = self.head(features.detach())
        loss = F.cross_entropy(logits, labels)
        self.head_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._step(self.head_optimizer, "head")
        acc = (logits.argmax(1) == labels).float().mean()
        return {"head_loss": loss.detach(), "head_acc": acc}

    def votes(self) -> bool:
        """Whether this layer's head/goodness counts in prediction.

        All but the first, as Hinton, unless `objective.vote_first`: with hard negatives the first
        layer is the best-trained one (it sees the label directly) and adds 0.1-0.3 points.
        `objective.vote_layers` names the voters outright (DeeperForward's chosen layer range).
        """
        chosen = self.cfg.objective.vote_layers
        if chosen:
            return self.index in chosen
        return (self.index > 0 or self.num_layers == 1 or self.cfg.objective.vote_first
                or self.always_vote)

    def add_logits(self, packet: Packet, features: torch.Tensor) -> None:
        if self.head is not None and self.votes():
            add_vote(packet, LOGITS, F.log_softmax(self.head(features), dim=1))

    def voted(self, packet: Packet, out: torch.Tensor,
              scores: Callable[[], torch.Tensor]) -> Packet:
        """A one-pass rule's eval packet: the votes so far, this layer's head on its normalised
        output and, where it votes, its class `scores()` as goodness; x = `out`."""
        acc: Packet = {k: v for k, v in packet.items() if k in (LOGITS, GOODNESS)}
        self.add_logits(acc, rms_normalize(out.flatten(1)))
        if self.votes():
            add_vote(acc, GOODNESS, scores())
        acc["x"] = out
        return acc

    # -- to implement -------------------------------------------------------------------------
    def train_step(self, packet: Packet) -> tuple[Packet, Metrics]:
        raise NotImplementedError

    @torch.no_grad()
    def eval_step(self, packet: Packet) -> Packet:
        raise NotImplementedError

    @torch.no_grad()
    def frozen_step(self, packet: Packet) -> Packet:
        """A frozen layer's train step (train.layer_epochs): no step, the train packet with x
        replaced by the layer's evaluation output (rules whose train packets are x and y)."""
        self.eval()
        return {**packet, "x": self.eval_step({"x": packet["x"]})["x"]}

    # -- state ----------------------------------------------------------------------------------
    def optimizer_state(self) -> dict[str, object]:
        return {
            "body": self.optimizer.state_dict() if self.optimizer else None,
            "head": self.head_optimizer.state_dict() if self.head_optimizer else None,
        }

    def load_optimizer_state(self, state: dict[str, object]) -> None:
        if self.optimizer is not None and state.get("body") is not None:
            self.optimizer.load_state_dict(state["body"])  # type: ignore[arg-type]
        if self.head_optimizer is not None and state.get("head") is not None:
            self.head_optimizer.load_state_dict(state["head"])  # type: ignore[arg-type]
        for opt in (self.optimizer, self.head_optimizer):   # the saved groups carry old flags
            if opt is not None:
                set_kernels(opt, self.kernels)


def add_proximal_term(layers: list[LocalLayer], mu: float) -> list[RemovableHandle]:
    """Add FedProx's (mu/2)||w - w_now||^2 to every layer's local loss (Li et al. 2020).

    w_now = the weights at this call (the just-loaded global model). A gradient hook per parameter
    (grad += mu * (w - w_now)) is exactly the term's gradient, applied in the layer's own backward
    pass. Returns the hooks' handles: remove them before loading the next global model.
    """
    if mu <= 0:
        return []
    handles = []
    for layer in layers:
        for p in layer.parameters():
            anchor = p.detach().clone()
            handles.append(p.register_hook(lambda g, p=p, a=anchor: g + mu * (p.detach() - a)))
    return handles


def detach_packet(packet: Packet) -> Packet:
    return {k: v.detach() for k, v in packet.items()}
