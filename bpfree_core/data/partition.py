"""Federated partitioners, deterministic by seed: IID, Dirichlet(alpha) over labels, shards, and
natural ids (one client per group id of the user's data, or per label)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bpfree_core.errors import ConfigError
from bpfree_core.seeds import generator


@dataclass(frozen=True)
class PartitionSpec:
    kind: str            # iid | dirichlet | shards | natural
    alpha: float = 0.0   # dirichlet concentration
    shards: int = 0      # shards per client
    by: str = ""         # natural: "group" (the data's group ids) | "label"

    @property
    def text(self) -> str:
        if self.kind == "natural":
            return "natural" if self.by == "group" else f"natural:{self.by}"
        if self.kind == "dirichlet":
            return f"dirichlet:{self.alpha:g}"
        return "iid" if self.kind == "iid" else f"shards:{self.shards}"


def parse_partition(text: str) -> PartitionSpec:
    """Parse `iid`, `dirichlet:ALPHA`, `shards:N`, `natural` or `natural:label`."""
    kind, _, arg = text.partition(":")
    if kind == "iid" and not arg:
        return PartitionSpec("iid")
    if kind == "natural" and arg in ("", "group", "label"):
        return PartitionSpec("natural", by=arg or "group")
    try:
        if kind == "dirichlet":
            alpha = float(arg)
            if alpha <= 0:
                raise ValueError
            return PartitionSpec("dirichlet", alpha=alpha)
        if kind == "shards":
            n = int(arg)
            if n <= 0:
                raise ValueError
            return PartitionSpec("shards", shards=n)
    except ValueError:
        pass
    raise ConfigError(
        f"federation.partition = {text!r} is not valid; use iid, dirichlet:ALPHA (ALPHA > 0, "
        "e.g. dirichlet:0.5), shards:N (N > 0, e.g. shards:2), natural (client k holds group id k of "
        "your data) or natural:label (client k holds class k)"
    )


MAX_REDRAWS = 20   # Dirichlet splits drawn again (same generator) until every part is big enough


def partition_indices(
    labels: torch.Tensor, num_clients: int, spec: str | PartitionSpec, seed: int, min_size: int = 0,
    groups: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Split sample indices into `num_clients` disjoint, covering parts (each sorted), each of
    at least `min_size` samples (federation.min_partition_size; Dirichlet splits are redrawn, as
    Flower Datasets' DirichletPartitioner does, so min_size = 0 keeps the first draw). `groups`
    (int64 ids 0..G-1, one per sample) is what `natural` splits by."""
    if isinstance(spec, str):
        spec = parse_partition(spec)
    n = labels.numel()
    if num_clients < 1 or num_clients > n:
        raise ConfigError(f"cannot split {n} samples across {num_clients} clients")
    gen = generator(seed, "partition")
    for _ in range(MAX_REDRAWS if spec.kind == "dirichlet" else 1):
        if spec.kind == "natural":
            parts = _natural(labels if spec.by == "label" else groups, num_clients, spec)
        elif spec.kind == "iid":
            parts = list(torch.randperm(n, generator=gen).tensor_split(num_clients))
        elif spec.kind == "dirichlet":
            parts = _dirichlet(labels, num_clients, spec.alpha, gen)
        else:
            parts = _shards(labels, num_clients, spec.shards, gen)
        smallest = min(p.numel() for p in parts)
        if smallest >= min_size:
            return [p.sort().values for p in parts]
    tries = f" in {MAX_REDRAWS} draws" if spec.kind == "dirichlet" else ""
    raise ConfigError(
        f"federation.partition = {spec.text} over {num_clients} clients gives a client only "
        f"{smallest} of {n} samples{tries}, under federation.min_partition_size = {min_size}; lower "
        "it, use fewer clients or a less skewed partition")


def _dirichlet(
    labels: torch.Tensor, k: int, alpha: float, gen: torch.Generator
) -> list[torch.Tensor]:
    # Per class, split its samples across clients in Dirichlet(alpha) proportions.
    buckets: list[list[torch.Tensor]] = [[] for _ in range(k)]
    conc = torch.full((k,), float(alpha), dtype=torch.float64)
    for c in labels.unique(sorted=True).tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        props = _seeded_dirichlet(conc, gen)  # (k,) client shares of class c
        cuts = (props.cumsum(0) * idx.numel()).round().long().clamp(max=idx.numel())[:-1]
        for client, piece in enumerate(torch.tensor_split(idx, cuts.tolist())):
            buckets[client].append(piece)
    return [torch.cat(b) if b else torch.empty(0, dtype=torch.long) for b in buckets]


def _seeded_dirichlet(conc: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    # Dirichlet via normalised Gamma draws; Gamma(a) by Marsaglia-Tsang using only `gen`,
    # so the split depends on the seed alone (torch's Dirichlet ignores generators).
    draws = torch.stack([_gamma(float(a), gen) for a in conc])
    return draws / draws.sum()


def _gamma(a: float, gen: torch.Generator) -> torch.Tensor:
    boost = 1.0
    if a < 1.0:  # Gamma(a) = Gamma(a + 1) * U^(1/a)
        boost = float(torch.rand((), generator=gen, dtype=torch.float64)) ** (1.0 / a)
        a += 1.0
    d = a - 1.0 / 3.0
    c = 1.0 / (9.0 * d) ** 0.5
    while True:
        x = float(torch.randn((), generator=gen, dtype=torch.float64))
        v = (1.0 + c * x) ** 3
        if v <= 0:
            continue
        u = float(torch.rand((), generator=gen, dtype=torch.float64))
        if u < 1 - 0.0331 * x**4 or math.log(u) < 0.5 * x * x + d * (1 - v + math.log(v)):
            return torch.tensor(max(d * v * boost, 1e-300), dtype=torch.float64)


def _shards(
    labels: torch.Tensor, k: int, per_client: int, gen: torch.Generator
) -> list[torch.Tensor]:
    # Sort by label, cut into k * per_client shards, deal shards out at random (McMahan et al.).
    order = torch.sort(labels, stable=True).indices
    num_shards = k * per_client
    if num_shards > labels.numel():
        raise ConfigError(
            f"shards:{per_client} with {k} clients needs {num_shards} shards but there are only "
            f"{labels.numel()} samples; lower N"
        )
    shards = list(order.tensor_split(num_shards))
    deal = torch.randperm(num_shards, generator=gen).view(k, per_client)
    return [torch.cat([shards[s] for s in row.tolist()]) for row in deal]


def _natural(ids: torch.Tensor | None, k: int, spec: PartitionSpec) -> list[torch.Tensor]:
    # Flower Datasets' NaturalIdPartitioner: client c holds every sample whose id is c.
    if ids is None:
        raise ConfigError("federation.partition = natural splits by your data's group ids, and this "
                          "dataset has none: give npz arrays group_train/group_test or a csv "
                          "'group' column, or use natural:label")
    found = int(ids.max()) + 1
    if found > k:
        what = "classes" if spec.by == "label" else "group ids"
        raise ConfigError(f"federation.partition = {spec.text}: the data has {found} {what} but "
                          f"federation.clients = {k}; set federation.clients = {found} (one client "
                          "per id)")
    return [(ids == c).nonzero().flatten() for c in range(k)]
