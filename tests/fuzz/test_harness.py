"""The fuzzing harness itself: the wall-clock guard interrupts a hang, and a recorder tells
a rejection from a crash (so a fuzz test that passes has really seen no crash)."""

from __future__ import annotations

import time

import pytest
from fuzzkit import Hang, Recorder, Stats, wall_clock


def test_the_guard_interrupts_a_call_that_hangs():
    started = time.monotonic()
    with pytest.raises(Hang), wall_clock(0.05):
        while True:
            time.sleep(0.01)
    assert time.monotonic() - started < 2


def test_a_recorder_counts_rejections_and_lets_crashes_through():
    rec = Recorder(Stats("self-test"), (ValueError,))

    assert rec.call(int, "12").value == 12
    assert isinstance(rec.call(int, "twelve").error, ValueError)
    with pytest.raises(ZeroDivisionError):
        rec.call(lambda: 1 / 0)

    s = rec.stats
    assert (s.cases, s.accepted, dict(s.rejected), dict(s.crashes)) == (
        3,
        1,
        {"ValueError": 1},
        {"ZeroDivisionError": 1},
    )
