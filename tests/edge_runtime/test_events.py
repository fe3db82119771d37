"""The bound on events about refused messages, with an injected clock."""

import pytest

from edge_runtime.events import EventLimiter, EventLimits


def test_refusals_over_the_bound_are_counted_in_one_summary_a_second():
    now = [0.0]
    limiter = EventLimiter(EventLimits(rate=5.0, burst=10), clock=lambda: now[0])
    sent, summaries = 0, []
    for step in range(1000):  # 1,000 refusals in two seconds
        now[0] = step * 0.002
        sent += limiter.allow("malformed" if step % 2 else "chunk-hash")
        summary = limiter.summary()
        if summary:
            summaries.append(summary)
    now[0] = 3.0
    summaries.append(limiter.summary())

    assert sent == 10 + 9  # the burst, then 5 a second for the 1.998 s after it
    assert len(summaries) == 2 and all(summaries)
    counted = sum(int(s.split()[0]) for s in summaries)
    assert counted == 1000 - sent == limiter.total_suppressed
    assert "chunk-hash" in summaries[0] and "malformed" in summaries[0]
    assert limiter.summary() is None


def test_a_quiet_device_reports_every_refusal():
    now = [0.0]
    limiter = EventLimiter(EventLimits(rate=2.0, burst=1), clock=lambda: now[0])
    for step in range(20):
        now[0] = step * 0.5
        assert limiter.allow("replayed")
    assert limiter.summary() is None


@pytest.mark.parametrize("limits", [dict(rate=0), dict(burst=0), dict(summary_every=0)])
def test_limits_out_of_range_are_refused(limits):
    with pytest.raises(ValueError, match="event limits"):
        EventLimits(**limits)
