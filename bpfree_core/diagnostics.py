"""Which layer learns what: a per-layer table scored on held-out images.

For every layer, on its own (its vote alone, the first layer included):
  softmax     accuracy of its readout (the local softmax head; Mono-Forward's projection; bp's
              output layer)
  goodness    accuracy of its goodness (FF family: the best candidate label; cwc/deeper: the
              strongest class group)
  separation  how far the true label's goodness stands above the others', in standard
              deviations of the layer's goodness: (mean g_true - mean g_wrong) / std(g)
  dead_units  share of units (ReLU outputs) that are zero on every image
  sparsity    share of zero activations

Computed in the caller's process on a copy of the weights, so it is the same for every executor.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bpfree_core.config import ExperimentConfig
from bpfree_core.data.datasets import Split
from bpfree_core.layers import GOODNESS, LOGITS, LocalLayer, Packet
from bpfree_core.model import Stage, build_layers
from bpfree_core.objectives import Objective

ACCUMULATORS = (LOGITS, GOODNESS)


@torch.no_grad()
def layer_diagnostics(weights: dict[str, torch.Tensor], cfg: ExperimentConfig,
                      objective: Objective, split: Split, samples: int = 1000,
                      device: str | torch.device = "cpu") -> dict[str, dict[str, float]]:
    """{layer index: {metric: value}} on the first `samples` images of `split`, computed on
    `device` (the training device: on a GPU run the CPU would take longer than an epoch)."""
    stage = Stage(build_layers(cfg, objective=objective), device)
    stage.load_state_dict(weights)
    x, y = split.images[:samples].to(device), split.labels[:samples].to(device)
    packet = objective.encode_eval(x, objective.supports_goodness)
    table: dict[str, dict[str, float]] = {}
    for layer in stage.layers:
        layer.always_vote = True
        try:
            out, relus, handed = eval_with_units(
                layer, {k: v for k, v in packet.items() if k not in ACCUMULATORS})
        finally:
            layer.always_vote = False
        row: dict[str, float] = {}
        if LOGITS in out:
            row["softmax"] = _accuracy(out[LOGITS], y)
        if GOODNESS in out:
            row["goodness"] = _accuracy(out[GOODNESS], y)
            row["separation"] = separation(out[GOODNESS], y)
        units = relus[-1] if relus else handed
        if units is not None and units.shape[0] == len(y):
            row["dead_units"] = float((units <= 0).all(0).float().mean())
            row["sparsity"] = float((units <= 0).float().mean())
        table[str(layer.index)] = {k: round(v, 4) for k, v in row.items()}
        packet = {k: v for k, v in out.items() if k not in ACCUMULATORS}
    return table


@torch.no_grad()
def eval_with_units(layer: LocalLayer, packet: Packet
                    ) -> tuple[Packet, list[torch.Tensor], torch.Tensor | None]:
    """`layer.eval_step(packet)`, and what its units did: each ReLU module's output (B, D), in
    order (bp, deeper), and the activations it hands on (B, D) (the neutral role's, for the FF
    family; None if it hands on none)."""
    relus: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: relus.append(o.flatten(1)))
             for m in layer.modules() if isinstance(m, nn.ReLU)]
    layer.eval()
    try:
        out = layer.eval_step(packet)
    finally:
        for h in hooks:
            h.remove()
    handed = out.get("neutral", out.get("x"))
    return out, relus, None if handed is None else handed.flatten(1)


def separation(g: torch.Tensor, y: torch.Tensor) -> float:
    """(B, C) goodness per label -> (mean g_true - mean g_wrong) / std(g)."""
    g = g.float()
    true = g.gather(1, y[:, None]).squeeze(1)                          # (B,)
    wrong = (g.sum(1) - true) / (g.shape[1] - 1)                       # (B,)
    return float((true - wrong).mean() / (g.std() + 1e-12))


def _accuracy(scores: torch.Tensor, y: torch.Tensor) -> float:
    return float((scores.argmax(1).cpu() == y).float().mean())


def format_table(table: dict[str, dict[str, Any]]) -> str:
    """The table as aligned text lines, one per layer (what `bpfree train` prints)."""
    cols = ["softmax", "goodness", "separation", "dead_units", "sparsity"]
    cols = [c for c in cols if any(c in row for row in table.values())]
    lines = ["layer  " + "  ".join(f"{c:>10}" for c in cols)]
    for name, row in table.items():
        cells = [f"{row[c]:>10.4f}" if c in row else f"{'-':>10}" for c in cols]
        lines.append(f"{name:>5}  " + "  ".join(cells))
    return "\n".join(lines)

