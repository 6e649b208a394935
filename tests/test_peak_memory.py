"""The bench's CPU peak memory (`metrics.PeakMemory`): the kernel's RSS high-water mark on Linux, nested blocks each
with their own peak, and the sampling thread where the mark cannot be reset."""

import mmap
import time

import pytest

from kvcompress.bench import metrics

MIB = 2**20
exact = pytest.mark.skipif(metrics._rss_high_water() is None or not metrics._reset_rss_high_water(),
                           reason="no resettable RSS high-water mark (Linux /proc/self/clear_refs)")


def _touch(mib: int, hold: float = 0.0) -> None:
    """Map and write `mib` MiB of new pages (resident), optionally hold them `hold` seconds, then unmap them. An
    anonymous map, not a tensor: malloc may serve a tensor from heap pages the process already holds (after the
    suite's other tests), which is no growth of the RSS."""
    block = mmap.mmap(-1, mib * MIB)
    for offset in range(0, mib * MIB, mmap.PAGESIZE):
        block[offset] = 1
    time.sleep(hold)
    block.close()


@exact
def test_nested_blocks_each_get_their_own_peak():
    with metrics.PeakMemory("cpu") as outer:
        _touch(160)
        with metrics.PeakMemory("cpu") as inner:
            _touch(80)
        _touch(20)
    assert outer._thread is None and inner._thread is None  # read from the kernel, no sampling thread
    assert 150 <= outer.peak_mb < 200, outer.peak_mb  # the 160 MiB before the inner block reset the mark
    assert 75 <= inner.peak_mb < 120, inner.peak_mb  # not the outer's 160
    with metrics.PeakMemory("cpu") as outer:
        with metrics.PeakMemory("cpu"):
            _touch(120)
        _touch(10)
    assert 115 <= outer.peak_mb < 160, outer.peak_mb  # the inner block's peak folds into the outer one


@exact
def test_planted_twin_reset_without_folding_loses_the_outer_peak(monkeypatch):
    """An inner block that resets the mark without first folding it into the open outer blocks: the outer block's
    first 160 MiB are lost, and the test above would see it."""
    monkeypatch.setattr(metrics.PeakMemory, "_open_exact", [])
    real_enter = metrics.PeakMemory.__enter__

    def forgetful_enter(self):
        opened, type(self)._open_exact = type(self)._open_exact, []  # outer blocks hidden from the fold
        try:
            return real_enter(self)
        finally:
            type(self)._open_exact = opened + [b for b in type(self)._open_exact if b not in opened]

    monkeypatch.setattr(metrics.PeakMemory, "__enter__", forgetful_enter)
    with metrics.PeakMemory("cpu") as outer:
        _touch(160)
        with metrics.PeakMemory("cpu"):
            _touch(20)
    assert outer.peak_mb < 150, "the planted twin kept the outer peak: the nesting test cannot catch it"


def test_sampling_thread_where_the_mark_cannot_be_reset(monkeypatch):
    monkeypatch.setattr(metrics, "_reset_rss_high_water", lambda: False)
    with metrics.PeakMemory("cpu", interval=0.002) as peak:
        _touch(100, hold=0.1)
    assert peak._thread is not None and not peak._thread.is_alive()
    assert 90 <= peak.peak_mb < 150, peak.peak_mb
