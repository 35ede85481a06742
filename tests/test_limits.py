"""Tests of parexec._limits: the per-task peak memory meter of process workers."""

from __future__ import annotations

import helpers
import psutil
import pytest

import parexec as px
from parexec._limits import EXACT_PEAK_AFTER, PeakMeter

pytestmark = pytest.mark.timeout(60)
MiB = 2**20


@pytest.fixture
def meter():
    m = PeakMeter()
    m.reset()
    if m.peak() is None:
        pytest.skip("no VmHWM on this system")
    return m


def _transient(mib):
    """Take ``mib`` MiB (every page touched), then give it back."""
    block = bytearray(mib * MiB)
    for k in range(0, len(block), 4096):
        block[k] = 1
    del block


def test_the_peak_of_a_task_counts_memory_it_gave_back(meter):
    rss = psutil.Process().memory_info().rss
    meter.reset()
    _transient(80)
    assert meter.peak(1.0) >= rss + 70 * MiB
    assert meter.peak() >= rss + 70 * MiB  # duration unknown: exact
    assert psutil.Process().memory_info().rss < rss + 40 * MiB  # it was given back


def test_a_task_shorter_than_the_threshold_reports_its_resident_size(meter):
    """Measuring exactly costs more than a no-op task: below EXACT_PEAK_AFTER the meter
    reads the resident size at the end, which misses what was given back meanwhile."""
    meter.reset()
    _transient(80)
    rss = psutil.Process().memory_info().rss
    quick = meter.peak(EXACT_PEAK_AFTER / 2)
    assert abs(quick - rss) < 4 * MiB
    assert meter.peak(EXACT_PEAK_AFTER) > quick + 60 * MiB


def test_a_no_op_process_task_reports_its_workers_size():
    with px.Workflow("m", isolation="process") as wf:
        wf.add(px.task(helpers.pid).options(id="t"))
    result = px.run(wf, progress=False)
    worker = psutil.Process(result["t"]).memory_info().rss
    assert 0.5 * worker < result.tasks["t"].peak_memory < 2 * worker
