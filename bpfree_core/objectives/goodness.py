"""What FF, SymBa and SFFA share: a linear+ReLU layer trained on positive vs negative inputs.

Packet keys (B = batch, C = classes, D = width):
  x        (B, D)    first-layer input shared by all roles (label carried by a class pattern);
                     with objective.input_skip it travels on, and every later layer reads it again
  pos/neg  (B, D)    positive / negative activations
  neutral  (B, D)    activations of the neutral input (softmax readout)
  cand     (B*C, D)  activations of every candidate label (goodness prediction)
  y, y_neg (B,)      true and negative labels; y_cand (B*C,) candidate labels
  u        (B,)      uniform draws in (0, 1] for hard negatives (objective.negatives = "hard")

Hard negatives: the first layer replaces the uniform y_neg by a wrong label drawn in proportion
to its own readout head's belief (Hinton's "use the net's predictions to pick hard negatives",
made local: no prediction travels backwards). The head starts at zero, so early draws are
uniform; the draw uses the packet's `u`, so it is a pure function of (seed, epoch, batch).
"""

from __future__ import annotations

import torch
from torch import nn

from bpfree_core.config import ExperimentConfig
from bpfree_core.data.datasets import DatasetSpec, run_spec
from bpfree_core.errors import ConfigError
from bpfree_core.layers import GOODNESS, LABELS, LocalLayer, Metrics, Packet, add_vote, relu, rms_normalize
from bpfree_core.objectives.base import Objective
from bpfree_core.seeds import generator

ROLES = ("pos", "neg", "neutral")
LossOut = tuple[torch.Tensor, Metrics]  # (loss, metrics)


def label_planes(x: torch.Tensor, num_classes: int, channels: int = 1
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """A copy of x (B, D) and a view of its label pixels (B, channels, C): the first C pixels of
    every colour plane, so on colour images no channel's units see a corner that contradicts the
    others' (MNIST: the first C pixels)."""
    out = x.clone()
    return out, out.view(x.shape[0], channels, -1)[:, :, :num_classes]


def embed_label(x: torch.Tensor, y: torch.Tensor, num_classes: int, channels: int = 1
                ) -> torch.Tensor:
    """Hinton's label embedding: the label pixels become the one-hot of y. (B, D) -> (B, D)."""
    out, pixels = label_planes(x, num_classes, channels)
    pixels.zero_()
    pixels[torch.arange(x.shape[0], device=x.device), :, y] = 1.0
    return out


def draw_hard_labels(logits: torch.Tensor, y: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """A wrong label per row, drawn in proportion to softmax(logits) with the true label removed.

    logits (B, C), y (B,), u (B,) uniforms in (0, 1] -> (B,) labels, never equal to y.
    """
    p = torch.softmax(logits.float(), dim=1)
    p[torch.arange(y.shape[0], device=p.device), y] = 0.0
    cdf = p.cumsum(dim=1)                                                   # (B, C)
    target = (u * cdf[:, -1]).unsqueeze(1)                                  # (B, 1), > 0
    drawn = torch.searchsorted(cdf, target).squeeze(1).clamp(max=logits.shape[1] - 1)
    # Rounding can only land on y where p[y] = 0 borders the target; step to the next label.
    return torch.where(drawn == y, (y + 1) % logits.shape[1], drawn)


def class_patterns(seed: int, num_classes: int, bits: int, density: float) -> torch.Tensor:
    """A fixed random binary pattern per class (C, bits), the same in every process."""
    gen = generator(seed, "pattern")
    pats = (torch.rand(num_classes, bits, generator=gen) < density).float()
    pats[torch.arange(num_classes), torch.arange(num_classes) % bits] = 1.0  # never all-zero
    return pats


class GoodnessLayer(LocalLayer):
    """y = ReLU(W [normalise(x), pattern(label)] + b); subclasses give the loss and goodness."""

    def __init__(
        self,
        index: int,
        num_layers: int,
        cfg: ExperimentConfig,
        num_classes: int,
        in_dim: int,
        out_dim: int,
        patterns: torch.Tensor | None = None,
    ):
        super().__init__(index, num_layers, cfg, num_classes)
        self.skips_input = cfg.objective.input_skip and index > 0   # in_dim counts the image
        extra = 0 if patterns is None else patterns.shape[1]
        self.linear = nn.Linear(in_dim + extra, out_dim)
        self.patterns: torch.Tensor | None
        self.register_buffer("patterns", patterns)
        # Running mean activity of each unit on positive data (peer normalisation, Hinton/loeweX).
        self.register_buffer("running_mean", torch.full((out_dim,), 0.5))
        self.make_head(out_dim)
        self.finish_init()

    # -- pieces subclasses override --------------------------------------------------------------
    def loss(self, y_pos: torch.Tensor, y_neg: torch.Tensor) -> LossOut:
        raise NotImplementedError

    def goodness(self, y: torch.Tensor) -> torch.Tensor:
        """(B, D) activations -> (B,) goodness used to rank candidate labels."""
        raise NotImplementedError

    # -- forward ------------------------------------------------------------------------------
    def codes(self, packet: Packet, key: str, rows: int) -> torch.Tensor | None:
        if self.patterns is None:
            return None
        if key == "neutral":  # the mean pattern carries no class information
            return self.patterns.mean(0, keepdim=True).expand(rows, -1)
        return self.patterns[packet[key]]

    def forward_role(self, x: torch.Tensor, codes: torch.Tensor | None) -> torch.Tensor:
        h = x.detach().float()                           # (B, D_in); never backprop upstream
        if self.cfg.objective.input_norm == "rms":
            h = rms_normalize(h)
        if codes is not None:
            h = torch.cat([h, codes], dim=1)             # (B, D_in + bits)
        return self.activate(self.linear(h))             # (B, D_out)

    def activate(self, z: torch.Tensor) -> torch.Tensor:
        return relu(z, self.cfg.objective.straight_through)

    def role_input(self, packet: Packet, role: str) -> torch.Tensor:
        """The first layer's image, or the last layer's activations of `role` (input skip: with
        the image beside them, repeated for each candidate row)."""
        if role not in packet:
            return packet["x"]
        h = packet[role]                                   # (R, D_prev), R = B or B*C
        if self.skips_input:
            x = packet["x"]                                # (B, D_x)
            if h.shape[0] != x.shape[0]:
                x = x.repeat_interleave(h.shape[0] // x.shape[0], dim=0)
            h = torch.cat([h, x], dim=1)                   # (R, D_prev + D_x)
        return h

    def handed_on(self, packet: Packet, out: Packet) -> Packet:
        """`out`, and (input skip) the image for the layers after this one."""
        if self.cfg.objective.input_skip:
            out["x"] = packet["x"]
        return out

    # -- training -----------------------------------------------------------------------------
    @torch.no_grad()
    def redraw_negatives(self, packet: Packet) -> Packet:
        """Replace the packet's uniform negatives by hard ones drawn from this layer's head."""
        assert self.head is not None
        y, b = packet[LABELS], packet[LABELS].shape[0]
        neutral = self.forward_role(self.role_input(packet, "neutral"),
                                    self.codes(packet, "neutral", b))
        y_neg = draw_hard_labels(self.head(rms_normalize(neutral)), y, packet["u"])
        packet = {k: v for k, v in packet.items() if k != "u"}
        packet["y_neg"] = y_neg
        if self.patterns is None:  # the label lives in the first pixels of the input
            packet["neg"] = embed_label(packet["pos"], y_neg, self.num_classes,
                                        run_spec(self.cfg).shape[0])
        return packet

    def forward_loss(self, x_pos: torch.Tensor, codes_pos: torch.Tensor | None, x_neg: torch.Tensor,
                     codes_neg: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Metrics]:
        """Both roles' activations, the loss and its metrics: the part train.compile fuses. With
        train.one_pass both roles go through as one batch of 2B rows: one matmul forward and one
        for the weights' gradient (whose inner size doubles) instead of two each plus a sum."""
        if not self.cfg.train.one_pass:
            y_pos, y_neg = self.forward_role(x_pos, codes_pos), self.forward_role(x_neg, codes_neg)
        else:
            codes = None if codes_pos is None else torch.cat([codes_pos, codes_neg])
            y_pos, y_neg = self.forward_role(torch.cat([x_pos, x_neg]), codes).split(
                [x_pos.shape[0], x_neg.shape[0]])                          # (B, D_out) each
        return (y_pos, y_neg, *self.loss(y_pos, y_neg))

    def train_step(self, packet: Packet) -> tuple[Packet, Metrics]:
        if "u" in packet:
            packet = self.redraw_negatives(packet)
        y = packet[LABELS]
        b = y.shape[0]
        code_keys = {"pos": LABELS, "neg": "y_neg", "neutral": "neutral"}
        x_pos, x_neg = self.role_input(packet, "pos"), self.role_input(packet, "neg")
        y_pos, y_neg, loss, metrics = self.compiled("forward_loss")(
            x_pos, self.codes(packet, code_keys["pos"], b), x_neg, self.codes(packet, code_keys["neg"], b))
        peer = self.cfg.objective.peer_weight
        if peer > 0:
            running = 0.9 * self.running_mean + 0.1 * y_pos.mean(0)
            loss = loss + peer * (running.mean() - running).pow(2).mean()
            self.running_mean.copy_(running.detach())
        self.step_body(loss)
        with torch.no_grad():
            neutral = self.forward_role(self.role_input(packet, "neutral"),
                                        self.codes(packet, "neutral", b))
        metrics["loss"] = loss.detach()
        metrics.update(self.step_head(rms_normalize(neutral), y))
        self.count_step()
        out = {"pos": y_pos.detach(), "neg": y_neg.detach(), "neutral": neutral, LABELS: y,
               "y_neg": packet["y_neg"]}
        return self.handed_on(packet, out), metrics

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def eval_step(self, packet: Packet) -> Packet:
        out: Packet = {k: v for k, v in packet.items() if k in ("logits", GOODNESS, "y_cand")}
        neutral_in = self.role_input(packet, "neutral")
        neutral = self.forward_role(neutral_in, self.codes(packet, "neutral", neutral_in.shape[0]))
        self.add_logits(out, rms_normalize(neutral))
        out["neutral"] = neutral
        if "cand" in packet or ("y_cand" in packet and "x" in packet):
            x = self.role_input(packet, "cand") if "cand" in packet else packet["x"].repeat_interleave(
                self.num_classes, dim=0)
            cand = self.forward_role(x, self.codes(packet, "y_cand", x.shape[0]))  # (B*C, D)
            if self.votes():
                add_vote(out, GOODNESS, self.goodness(cand).view(-1, self.num_classes))   # (B, C)
            out["cand"] = cand
        return self.handed_on(packet, out)


class GoodnessObjective(Objective):
    """Encodes batches for the goodness family; subclasses pick the layer class and labels."""

    supports_goodness = True
    uses_negatives = True
    layer_cls: type[GoodnessLayer] = GoodnessLayer
    uses_patterns = False      # label carried as a class pattern appended to the input
    supports_compile = True
    supports_seen_negatives = False   # objective.negatives = seen

    def __init__(self, cfg: ExperimentConfig, spec: DatasetSpec):
        super().__init__(cfg, spec)
        if spec.shape[1] == 1 and not self.uses_patterns:
            raise ConfigError(f"{self.name} writes the label into the first {self.num_classes} "
                              f"pixels of an image, but {spec.name} holds flat features, which it "
                              "would overwrite; use symba, sffa or mono (they append the label)")
        if cfg.objective.negatives == "seen" and not self.supports_seen_negatives:
            raise ConfigError(f"objective.negatives = 'seen' scores every class seen so far "
                              f"through class codes, which {self.name} does not use; it is sffa's")
        if cfg.objective.negatives == "hard" and not cfg.objective.head:
            raise ConfigError("objective.negatives = 'hard' draws negatives from the first "
                              "layer's readout head, but objective.head = false; turn the head on")

    def patterns_for(self, index: int) -> torch.Tensor | None:
        if not self.uses_patterns or not self.injects_at(index):
            return None
        o = self.cfg.objective
        return class_patterns(self.cfg.train.seed, self.num_classes, o.pattern_bits,
                              o.pattern_density)

    def injects_at(self, index: int) -> bool:
        return index == 0 or self.cfg.objective.input_skip   # the code goes with the image

    def build_layer(self, index: int, num_layers: int, in_dim: int, out_dim: int) -> LocalLayer:
        if self.cfg.objective.input_skip and index > 0:
            in_dim += self.input_dim
        return self.layer_cls(index, num_layers, self.cfg, self.num_classes, in_dim, out_dim,
                              self.patterns_for(index))

    # Label in the first C pixels (Hinton); the pattern objectives override these two.
    def embed(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return embed_label(x, y, self.num_classes, self.spec.shape[0])

    def embed_neutral(self, x: torch.Tensor) -> torch.Tensor:
        out, pixels = label_planes(x, self.num_classes, self.spec.shape[0])
        pixels.fill_(1.0 / self.num_classes)
        return out

    def encode_train(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> Packet:
        y_neg = self.wrong_labels(y, gen)
        packet: Packet = {"x": x, LABELS: y, "y_neg": y_neg} if self.uses_patterns else {
            "pos": self.embed(x, y), "neg": self.embed(x, y_neg),
            "neutral": self.embed_neutral(x), LABELS: y, "y_neg": y_neg}
        if self.cfg.objective.negatives == "hard":  # the first layer redraws y_neg from these
            packet["u"] = 1.0 - torch.rand(y.shape, generator=gen)          # (B,) in (0, 1]
        return packet

    def encode_eval(self, x: torch.Tensor, goodness: bool) -> Packet:
        b, c = x.shape[0], self.num_classes
        y_cand = torch.arange(c).repeat(b)                                   # (B*C,)
        if self.uses_patterns:
            packet: Packet = {"x": x}
            if goodness:
                packet["y_cand"] = y_cand
            return packet
        packet = {"neutral": self.embed_neutral(x)}
        if goodness:
            packet["cand"] = self.embed(x.repeat_interleave(c, dim=0), y_cand)
        return packet
