"""The CPU meter against hand counts of tensor bytes, nested spans, tracking and the hard cap."""
import gc

import pytest
import torch

from chunkpose.engine import HardCapExceeded, Meter

MB = 1_000_000


def test_meter_counts_new_storages_by_hand():
    meter = Meter("cpu")
    a = torch.ones(1000, 1000)  # created outside any span: not counted unless tracked
    with meter.span("ops") as span:
        b = torch.empty(1000, 1000)
        assert meter.live_bytes() == 4 * MB
        c = a + b  # one new float32 1e6 tensor
        assert meter.live_bytes() == 8 * MB
        view = c[10:]
        view.add_(1)  # a view and an in-place op add nothing
        assert meter.live_bytes() == 8 * MB
        m = torch.ones(100, 200) @ torch.ones(200, 300)  # 80 kB + 240 kB inputs, 120 kB result
        assert meter.live_bytes() == 8 * MB + 80_000 + 240_000 + 120_000 - 80_000 - 240_000
        del c, view
        gc.collect()
        assert meter.live_bytes() == 4 * MB + 120_000
        stacked = torch.stack([b, b])  # 8 MB on top of b
        assert meter.live_bytes() == 12 * MB + 120_000
        del stacked
    assert span.peak_bytes == 12 * MB + 120_000
    assert span.end_bytes == 4 * MB + 120_000
    del b, m
    assert meter.live_bytes() == 0


def test_meter_out_argument_resize_and_dtype_sizes():
    meter = Meter("cpu")
    with meter.span() as span:
        target = torch.empty(0, dtype=torch.float64)
        torch.add(torch.zeros(250, dtype=torch.float64), 1.0, out=target)  # resized to 2000 bytes
        assert meter.live_bytes() == target.untyped_storage().nbytes() == 2000
        half = torch.zeros(1000, dtype=torch.float16)
        assert meter.live_bytes() == 2000 + 2000
        del target, half
    assert span.peak_bytes == 2000 + 2000  # zeros input + resized target while add ran, then target + half


def test_meter_track_dedupes_views_and_releases():
    meter = Meter("cpu")
    base = torch.zeros(1000)  # 4000 bytes
    keys = meter.track(base, base[10:], base.view(10, 100))
    assert meter.live_bytes() == 4000
    module = torch.nn.Linear(10, 20)  # 200 + 20 floats
    with meter.holding(module):
        assert meter.live_bytes() == 4000 + 220 * 4
    assert meter.live_bytes() == 4000
    meter.release(keys)
    assert meter.live_bytes() == 0


def test_meter_span_scoped_tracking_ends_with_outermost_span():
    meter = Meter("cpu")
    x = torch.zeros(250)
    with meter.span("outer"):
        with meter.span("inner"):
            meter.track(x, scope="span")
        assert meter.live_bytes() == 1000  # still counted: scope is the outermost span
    assert meter.live_bytes() == 0


def test_nested_spans_each_get_their_peak():
    meter = Meter("cpu")
    with meter.span("session") as outer:
        a = torch.empty(MB // 4)  # 1 MB
        with meter.span("stage1") as first:
            tmp = torch.empty(2 * MB // 4)  # 2 MB
            del tmp
        with meter.span("stage2") as second:
            tmp = torch.empty(MB // 4)
            del tmp
        del a
    assert first.peak_bytes == 3 * MB
    assert second.start_bytes == 1 * MB and second.peak_bytes == 2 * MB
    assert outer.peak_bytes == 3 * MB
    assert outer.end_bytes == 0


def test_freed_outside_span_is_uncounted():
    meter = Meter("cpu")
    with meter.span():
        kept = torch.empty(1000)
    assert meter.live_bytes() == 4000
    del kept
    assert meter.live_bytes() == 0


def test_hard_cap_raises_out_of_memory_without_counting_the_failed_op():
    meter = Meter("cpu", hard_cap_bytes=10_000)
    with meter.span() as span:
        small = torch.empty(1000)  # 4000
        with pytest.raises(torch.OutOfMemoryError) as info:
            torch.empty(2000)  # would reach 12000
        assert isinstance(info.value, HardCapExceeded)
        assert info.value.attempted_bytes == 12_000
        assert meter.live_bytes() == 4000
        ok = torch.empty(1500)  # 10000 is allowed
    assert span.peak_bytes == 10_000
    del small, ok
