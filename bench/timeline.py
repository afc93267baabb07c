"""Per-batch stage timelines of one pipelined epoch, as measured by the workers themselves.

Each stage worker records, for every train batch of an epoch, when its step started, when it
ended and when the output had been handed to the downstream link (StageStats.timeline, Unix
seconds, so stages on one host share a clock); the driver records when it started and finished
handing each batch to stage 0 (Pipeline.train_epoch's "driver_timeline"). This module turns those
into Gantt segments and a few derived numbers; bench/plots.py draws them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BUSY, BLOCKED, SEND = "busy", "blocked", "send"


@dataclass(frozen=True)
class Segment:
    lane: str        # "driver", "stage 0", ...
    kind: str        # busy (train_step), blocked (hand-off downstream), send (driver -> stage 0)
    start: float     # seconds since the epoch's first event
    seconds: float
    batch: int


def segments(epoch: dict[str, Any]) -> list[Segment]:
    """Gantt segments of one `Pipeline.train_epoch` result (times relative to its first event)."""
    driver = epoch.get("driver_timeline") or []
    stages = [s.get("timeline") or [] for s in epoch["stages"]]
    starts = [t[0] for t in driver] + [t[0] for st in stages for t in st]
    if not starts:
        return []
    t0 = min(starts)
    out = [Segment("driver", SEND, a - t0, b - a, i) for i, (a, b) in enumerate(driver)]
    for s, st in enumerate(stages):
        for i, (start, end, handed) in enumerate(st):
            out.append(Segment(f"stage {s}", BUSY, start - t0, end - start, i))
            if handed > end:
                out.append(Segment(f"stage {s}", BLOCKED, end - t0, handed - end, i))
    return out


def span(segs: list[Segment]) -> float:
    """Seconds from the first event to the last one."""
    return max((g.start + g.seconds for g in segs), default=0.0)


def bubble_fraction(segs: list[Segment], stages: int) -> float:
    """Share of the stages' time (S x span) not spent in train_step: fill, drain, waits."""
    total = span(segs) * stages
    busy = sum(g.seconds for g in segs if g.kind == BUSY)
    return 1.0 - busy / total if total > 0 else 0.0
