"""One seed rule: every random stream of a run is derived from (seed, purpose, parts).

`derive` mixes the parts into the run's seed with the purpose's fixed constants (Horner form:
h = h * multiplier + scale * part + offset, one step per part) in Python's exact integers, then
reduces the result into [0, 2**64), torch's generator seed range. So every seed 0 .. 2**64 - 1
works, a derived seed is itself a valid seed (a client's stream seed feeds its batch seeds), and
nothing overflows. The constants are the formulas bpfree has always used, so every seed that
worked before keeps its exact streams; the one exception is UFF's denoising noise, which was
reduced mod 2**62 and now follows the common rule: it differs where its old value was >= 2**62
(single-process seeds >= 4,600,000; federated runs with seed >= 5).

Purposes: "layer" (init of layer i), "client" (client k's batch/negative stream), "epoch" (batch
order of an epoch), "batch" (the draws of one (epoch, batch)), "noise" (a UFF cell's denoising
noise at a step), "pattern" (the fixed class patterns), "partition" (who holds which samples),
"tasks" (the continual class order), "memory" (which samples of a task replay keeps), "sample"
(which clients train in a round, under federation.fraction_train), "dp" (a round's central DP
noise), "evaluate" (which clients score the global model after a round), "projection" (asge's
fixed class projection of layer i).
"""

from __future__ import annotations

from itertools import zip_longest
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SEED_SPACE = 2**64            # every seed, given or derived, lies in [0, SEED_SPACE)

# purpose -> one (multiplier, part scale, offset) step per part; parts not given count as 0.
_STEPS: dict[str, tuple[tuple[int, int, int], ...]] = {
    "layer": ((7_919, 104_729, 104_729),),                 # part: layer index
    "client": ((1_000_037, 7_919, 7_919),),                # part: partition id
    "epoch": ((1_000_003, 1, 0),),                         # part: epoch
    "batch": ((1_000_003, 1, 0), (1_000_033, 1, 0)),       # parts: epoch, batch
    "noise": ((1_000_003, 1, 0), (1_000_033, 1, 0)),       # parts: cell index, step
    "pattern": ((31, 0, 2_718),),                          # no parts
    "partition": (),                                       # no parts: the seed itself
    "tasks": ((1_000_211, 7_919, 7_727),),                 # part: 0 = the class order, k + 1 =
                                                           # client k's own task order
    "memory": ((1_000_249, 15_485_863, 15_485_863),),      # part: task whose samples replay keeps
    "sample": ((1_000_303, 104_723, 104_723),),            # part: round whose training clients are drawn
    "dp": ((1_000_333, 7_907, 7_907), (1_000_357, 1, 0)),  # parts: round, stream (0 weights, 1 count)
    "evaluate": ((1_000_363, 104_707, 104_707),),          # part: round whose evaluating clients are drawn
    "projection": ((1_000_381, 104_711, 104_711),),        # part: layer index (asge's class projection)
}
PURPOSES = tuple(_STEPS)


def derive(seed: int, purpose: str, *parts: int) -> int:
    """The seed of `purpose`'s stream for `parts` (e.g. derive(s, "batch", epoch, b))."""
    steps = _STEPS.get(purpose)
    if steps is None:
        raise ValueError(f"unknown seed purpose {purpose!r}; one of {', '.join(PURPOSES)}")
    if len(parts) > len(steps):
        raise ValueError(f"seed purpose {purpose!r} takes at most {len(steps)} part(s), got {parts}")
    h = int(seed)
    for step, part in zip_longest(steps, parts, fillvalue=0):
        mult, scale, offset = step  # type: ignore[misc]
        h = h * mult + scale * int(part) + offset
    return h % SEED_SPACE


def generator(seed: int, purpose: str, *parts: int) -> torch.Generator:
    """A CPU generator seeded with derive(seed, purpose, *parts)."""
    import torch  # here, so that the config (which imports SEED_SPACE) stays torch-free

    return torch.Generator().manual_seed(derive(seed, purpose, *parts))
