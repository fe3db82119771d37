import numpy as np
import pytest

from cloud_trainer.model.data import load_digits_split
from device_profiles import Budget
from eclm_lab.scenario import ModelMemory, ScenarioSpec, build
from edge_runtime.monitor import Reading
from edge_runtime.policy import Option, Policy

# a model of 627 KB whose smallest sub-model needs 151.4 KB (the digits model's sizes)
MEMORY = ModelMemory(full_kb=627.0, smallest_kb=151.4)


@pytest.fixture(scope="module")
def held_out():
    split = load_digits_split(seed=0)
    return split.x_test, split.y_test, MEMORY


def test_the_same_seed_gives_the_same_streams_and_another_seed_others(held_out):
    spec = ScenarioSpec(devices=2, steps=30, seed=3)
    a, b = build(spec, *held_out), build(spec, *held_out)
    other = build(ScenarioSpec(devices=2, steps=30, seed=4), *held_out)

    for sa, sb in zip(a, b, strict=True):
        for step_a, step_b in zip(sa, sb, strict=True):
            np.testing.assert_array_equal(step_a.x, step_b.x)
            np.testing.assert_array_equal(step_a.labelled, step_b.labelled)
    assert a[0].domains != other[0].domains or not np.array_equal(a[0].mixes, other[0].mixes)


def test_label_mixes_differ_between_devices_and_change_over_time(held_out):
    streams = build(ScenarioSpec(devices=6, steps=120, mix_len=30, seed=1), *held_out)

    first = [
        np.bincount(np.concatenate([s.y for s in stream][:20]), minlength=10) for stream in streams
    ]
    hist = [h / h.sum() for h in first]
    distances = [0.5 * np.abs(p - q).sum() for i, p in enumerate(hist) for q in hist[i + 1 :]]
    assert np.mean(distances) > 0.4  # far from IID (0 would be identical mixes)
    for stream in streams:
        assert len({m.tobytes() for m in stream.mixes}) >= 2


def test_shifts_come_and_go_and_only_the_given_domains_appear(held_out):
    spec = ScenarioSpec(devices=4, steps=100, domains=("noise", "occlude"), seed=2)
    for stream in build(spec, *held_out):
        assert set(stream.domains) <= {"clean", "noise", "occlude"}
        changes = stream.shifts()
        assert changes[0] == (0, "clean") and len(changes) >= 4
        steps = list(stream)
        assert {s.domain for s in steps} == set(stream.domains)
        clean = next(s for s in steps if s.domain == "clean")
        pool = {row.tobytes() for row in held_out[0]}
        assert all(row.tobytes() in pool for row in clean.x)  # held-out samples as they are


def test_labels_arrive_for_the_given_share_and_memory_drops_and_recovers(held_out):
    spec = ScenarioSpec(devices=3, steps=80, label_rate=0.25, seed=5)
    low_mb = MEMORY.free_mb(MEMORY.low_kb())
    for stream in build(spec, *held_out):
        share = np.mean(np.concatenate([s.labelled for s in stream]))
        assert abs(share - 0.25) < 0.05
        trace = stream.resources()
        memory = [trace.read().available_mb for _ in range(spec.steps)]
        low = [i for i, m in enumerate(memory) if m == low_mb]
        assert low and 0 < low[0] and low[-1] < spec.steps - 1  # drops, then recovers


@pytest.mark.parametrize("scale", [1.0, 40.0])  # the digits model's size, and an RGB one's
def test_a_drop_forces_a_smaller_sub_model_than_each_devices_normal_readings(held_out, scale):
    """The readings follow the model's size: under the edge policy each device runs one of
    the plan's module sets most of the time and only the smallest sub-model in a drop."""
    x, y, _ = held_out
    memory = ModelMemory(full_kb=627.0 * scale, smallest_kb=151.4 * scale)
    # module sets as a plan offers them: the full set, smaller shares, the smallest one
    sizes = [memory.full_kb, 0.6 * memory.full_kb, 0.35 * memory.full_kb, memory.smallest_kb]
    options = [Option(((i,),), round(kb, 1)) for i, kb in enumerate(sizes)]
    budget = Budget(10**7, 100.0)  # a board with far more memory than any of them needs
    spec = ScenarioSpec(devices=4, steps=60, seed=1)
    served = set()
    for stream in build(spec, x, y, memory):
        normal, low = stream.memory_mb.max(), stream.memory_mb.min()
        usual = Policy(options, budget).decide(Reading(available_mb=normal))
        dropped = Policy(options, budget).decide(Reading(available_mb=low))
        assert dropped.memory_kb == round(memory.smallest_kb, 1) < usual.memory_kb
        served.add(usual.memory_kb)
    assert len(served) >= 2  # the devices' shares give them different sub-models


def test_shares_that_leave_no_room_above_the_smallest_sub_model_are_refused(held_out):
    x, y, _ = held_out
    with pytest.raises(ValueError, match="memory_shares"):
        build(ScenarioSpec(memory_shares=(1.0, 0.2)), x, y, MEMORY)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"devices": 0}, "devices"),
        ({"label_rate": 0.0}, "label_rate"),
        ({"domains": ("underwater",)}, "domains"),
        ({"domains": ()}, "domains"),
        ({"alpha": -1.0}, "alpha"),
        ({"memory_shares": ()}, "memory_shares"),
        ({"memory_shares": (1.0, 1.5)}, "memory_shares"),
    ],
)
def test_a_bad_spec_names_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        ScenarioSpec(**change)
