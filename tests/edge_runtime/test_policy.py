import pytest

from device_profiles import Budget
from edge_runtime.monitor import PsutilSource, Reading, TraceSource
from edge_runtime.policy import Option, Policy, PolicyConfig

SMALL = Option(((0,), (0,)), 100.0)
MID = Option(((0, 1), (0, 1)), 200.0)
LARGE = Option(((0, 1, 2, 3), (0, 1, 2, 3)), 400.0)


def mem(kb_allowed: float, **kw) -> Reading:
    """A reading under which the model may use ``kb_allowed`` (memory_fraction 0.25)."""
    return Reading(available_mb=kb_allowed * 4 / 1024, ts=0.0, **kw)


def run(trace):
    policy = Policy([LARGE, SMALL, MID], Budget(400 / 1024, 10.0))  # 400 KB
    source = TraceSource(trace)
    chosen, switches = [], 0
    for _ in trace:
        reading = source.read()
        if policy.decide(reading) is not None:
            switches += 1
        assert not policy.over_budget
        assert policy.current.memory_kb <= policy.allowed_kb(reading)
        chosen.append(policy.current)
    return chosen, switches


def test_a_drop_switches_down_at_once_and_recovery_waits():
    trace = [mem(1000)] * 3 + [mem(150)] + [mem(1000)] * 5

    chosen, switches = run(trace)

    assert chosen[:3] == [LARGE] * 3
    assert chosen[3] == SMALL  # the very reading that shows the drop
    assert chosen[4:7] == [SMALL, SMALL, LARGE]  # up only after 3 roomy readings
    assert switches == 3


def test_oscillating_readings_do_not_cause_a_swap_storm():
    trace = [mem(1000)] + [mem(430) if i % 2 else mem(390) for i in range(40)]

    chosen, switches = run(trace)

    assert switches <= 2  # one step down to MID, then it stays
    assert chosen[-1] == MID


def test_low_battery_and_heat_shrink_the_budget():
    policy = Policy([SMALL, MID, LARGE], Budget(400 / 1024, 10.0))

    assert policy.decide(mem(1000)) == LARGE
    assert policy.decide(mem(1000, battery_percent=10.0, on_power=False)) == MID
    assert policy.allowed_kb(mem(1000, battery_percent=10.0, on_power=True)) == 400
    assert policy.allowed_kb(mem(1000, temperature_c=80.0)) == 200


def test_policy_needs_options_and_psutil_reads_this_machine():
    with pytest.raises(ValueError):
        Policy([], Budget(1, 1.0))
    reading = PsutilSource().read()
    assert reading.available_mb > 0 and reading.rss_mb > 0
    assert PolicyConfig().up_after == 3
