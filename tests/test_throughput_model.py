"""The analytic pipeline model: limits it must respect, checked on hand-made cases."""

import pytest

from bpfree.bench.model import PipelineModel, balanced, sequential_seconds


def test_balanced_compute_bound_pipeline_approaches_s_times_speedup():
    m = PipelineModel(compute=balanced(1.0, 4), link_bytes=(1e3,) * 3, bandwidth=1e12, window=8)
    speedup = sequential_seconds(m.compute, 1000) / m.epoch_seconds(1000)
    assert speedup == pytest.approx(4.0, rel=0.01)
    assert m.period() == pytest.approx(0.25, rel=1e-6)


def test_slow_link_becomes_the_bottleneck():
    # 100 MB per batch at 1 GB/s = 0.1 s per transfer > 0.05 s compute
    m = PipelineModel(compute=(0.05, 0.05), link_bytes=(1e8,), bandwidth=1e9, window=4)
    assert m.period() == pytest.approx(0.1)


def test_small_window_limits_throughput():
    wide = PipelineModel(compute=(0.1, 0.1), link_bytes=(1e8,), bandwidth=1e9, window=8)
    narrow = PipelineModel(compute=(0.1, 0.1), link_bytes=(1e8,), bandwidth=1e9, window=1)
    assert narrow.period() > wide.period()
    assert narrow.period() == pytest.approx(0.2)


def test_fill_and_bubble():
    m = PipelineModel(compute=(1.0, 1.0), link_bytes=(0.0,), bandwidth=1.0, window=4)
    assert m.fill() == pytest.approx(2.0)
    assert m.epoch_seconds(1) == pytest.approx(2.0)
    assert m.bubble_fraction(1) == pytest.approx(0.5)
    assert m.bubble_fraction(1000) < 0.01
