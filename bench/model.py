"""A small analytic model of pipelined, layer-wise training throughput.

A batch visits stages 0..S-1; stage i computes for `compute[i]` seconds and hands its outputs to
stage i+1 over link i, which carries `link_bytes[i]` bytes at `bandwidth` bytes/s after `latency`
seconds. Stages work concurrently on different batches (stage i on batch t while stage i+1 is on
t-1), and a link holds at most `window` batches in flight.

Steady state: the slowest resource sets the pace, `period = max(compute[i], transfer[i])`, unless
the window is too small to cover the time a batch spends between handing off and being acked, in
which case `period >= cycle / window`. One epoch of N batches then takes the pipeline's fill time
(one batch's whole trip) plus (N - 1) periods.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PipelineModel:
    compute: tuple[float, ...]          # seconds per batch on each stage
    link_bytes: tuple[float, ...]       # bytes per batch on each link (len = stages - 1; + sink)
    bandwidth: float                    # bytes per second of one link
    latency: float = 0.0                # seconds of fixed cost per message on a link
    window: int = 4                     # max in-flight batches per link

    def transfer(self) -> list[float]:
        """Seconds a link is busy with one batch."""
        return [self.latency + b / self.bandwidth for b in self.link_bytes]

    def period(self) -> float:
        """Steady-state seconds per batch: the bottleneck, or the window limit."""
        transfer = self.transfer()
        bottleneck = max([*self.compute, *transfer])
        # A link with window W keeps at most W batches between send and the consumer's start.
        cycle = max((t + c for t, c in zip(transfer, self.compute[1:], strict=False)), default=0.0)
        return max(bottleneck, cycle / self.window if self.window else cycle)

    def fill(self) -> float:
        """Seconds for one batch to traverse the whole pipeline."""
        return sum(self.compute) + sum(self.transfer())

    def epoch_seconds(self, batches: int) -> float:
        return self.fill() + max(batches - 1, 0) * self.period()

    def throughput(self, batches: int, batch_size: int) -> float:
        """Predicted samples per second over an epoch of `batches` batches."""
        return batches * batch_size / self.epoch_seconds(batches)

    def bubble_fraction(self, batches: int) -> float:
        """Share of stage-time spent idle (fill/drain and imbalance), averaged over stages."""
        total = self.epoch_seconds(batches)
        busy = [c * batches for c in self.compute]
        return 1.0 - sum(busy) / (len(busy) * total)


def sequential_seconds(compute: tuple[float, ...], batches: int) -> float:
    """One process running every stage's layers in turn: no overlap, no links."""
    return sum(compute) * batches


def balanced(total_compute: float, stages: int) -> tuple[float, ...]:
    """Split a sequential per-batch compute time evenly over `stages`."""
    return tuple([total_compute / stages] * stages)
