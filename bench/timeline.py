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


def replay(epoch: dict[str, Any], transfer: list[float], window: int) -> float:
    """Epoch seconds predicted from the measured per-batch step times (a trace-driven model).

    The same rules as bench/model.py, batch by batch instead of on means: the driver makes batch
    t (its measured gap between sends), each stage starts t when t has arrived (hand-off + link
    time `transfer[i]` on link i, driver -> stage 0 first) and it has finished t-1; a stage may
    hand t on only while its downstream has fewer than `window` batches queued, i.e. once the
    downstream has started t - window. What it leaves out: everything but the step times and the
    links, e.g. the gRPC threads' CPU, which show up as waits in the measurement.
    """
    driver = epoch.get("driver_timeline") or []
    stages = [[e - s for s, e, _ in st.get("timeline") or []] for st in epoch["stages"]]
    n = min([len(d) for d in stages] + [len(driver)])
    if n == 0:
        return 0.0
    gaps = [0.0] + [b[0] - a[1] for a, b in zip(driver, driver[1:], strict=False)]
    lanes = len(stages) + 1                       # lane 0 = the driver
    start = [[0.0] * n for _ in range(lanes)]
    handed = [[0.0] * n for _ in range(lanes)]
    for t in range(n):
        for lane in range(lanes):
            free = handed[lane][t - 1] if t else 0.0
            if lane == 0:
                ready, dur = 0.0, max(gaps[t], 0.0)
            else:
                ready, dur = handed[lane - 1][t] + transfer[lane - 1], stages[lane - 1][t]
            start[lane][t] = max(free, ready)
            end = start[lane][t] + dur
            # credit: the downstream must have taken batch t - window off its queue
            credit = start[lane + 1][t - window] if lane + 1 < lanes and t >= window else 0.0
            handed[lane][t] = max(end, credit)
    return handed[-1][n - 1] - start[0][0]
