"""Aggregation strategies and the checks every update passes, on real adapters: a head
trained on clean digits (features: a fixed random ReLU projection of the 8x8 images to 512,
like the real head's input) and ten devices adapting it to rotated digits with the numpy
trainer, each on a stream of 1000 draws from the same 1200 images (one domain)."""

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save

import eclm_wire as wire
from cloud_trainer.federation.aggregation import Contribution, DomainAggregator
from cloud_trainer.federation.strategies import (
    STRATEGIES,
    ClassWeightedMean,
    CoordinateMedian,
    Krum,
    MultiKrum,
    TrimmedMean,
    WeightedMean,
    make_strategy,
)
from eclm_lab.robustness import rotated_digits
from eclm_wire.errors import ProtocolError
from edge_runtime.adapter import Adapter, NumpyTrainer

DEVICES, STREAM, POOL = 10, 1000, 1200
LOOSE = 1e5  # a norm bound the scaled updates pass: the strategy has to stop them


@pytest.fixture(scope="module")
def fleet():
    head, rotated, y = rotated_digits(seed=0)
    adapters = []
    for device in range(DEVICES):
        adapter = Adapter(NumpyTrainer(head["weight"], head["bias"], lr=0.5), seed=device)
        rows = np.random.default_rng(100 + device).choice(POOL, STREAM, replace=False)
        for i in range(0, STREAM, 16):
            adapter.observe(rotated[rows[i : i + 16]], y[rows[i : i + 16]])
        adapters.append(adapter)
    return {
        "head": head,
        "adapters": adapters,
        "pool": (rotated[:POOL], y[:POOL]),
        "test": (rotated[POOL:], y[POOL:]),
    }


def received(message: wire.AdapterUpdate) -> wire.AdapterUpdate:
    """What the cloud decodes from the bytes a device sent."""
    return wire.decode(wire.AdapterUpdate, message.encode())


def attack(adapter: Adapter, head: dict, kind: str) -> dict[str, np.ndarray]:
    """An attacker's adapter: its honest delta from the head times 100, or NaN."""
    weights = adapter.trainer.weights()
    if kind == "nan":
        return {k: np.full_like(v, np.nan) for k, v in weights.items()}
    return {k: head[k] + 100 * (v - head[k]) for k, v in weights.items()}


def flat(weights: dict) -> np.ndarray:
    return np.concatenate([weights[k].ravel() for k in sorted(weights)])


def error(aggregate: dict, honest: dict, head: dict) -> float:
    """The distance of an aggregate from the honest devices' mean, relative to how far
    that mean moved from the head (an aggregate equal to the head scores 1.0)."""
    return float(
        np.linalg.norm(flat(aggregate) - flat(honest)) / np.linalg.norm(flat(honest) - flat(head))
    )


def accuracy(weights: dict, test) -> float:
    x, y = test
    return float(((x @ weights["weight"].T + weights["bias"]).argmax(1) == y).mean())


def attacked_round(fleet, strategy, kinds: list[str]):
    """Every device uploads; the first len(kinds) are attackers of those kinds. Returns the
    aggregator with every upload, and the mean of the honest ones alone."""
    head, adapters = fleet["head"], fleet["adapters"]
    everyone = DomainAggregator(head, strategy=strategy, max_norm=LOOSE)
    honest_only = DomainAggregator(head, max_norm=LOOSE)
    for i, adapter in enumerate(adapters):
        name = f"pi4-{i}"
        if i < len(kinds):
            bad = attack(adapter, head, kinds[i])
            message = adapter.update_message(name, "rotate", "1", weights=bad)
            try:
                everyone.add(received(message))
            except ProtocolError as exc:
                assert exc.code == "not-finite"
            continue
        message = received(adapter.update_message(name, "rotate", "1"))
        everyone.add(message)
        honest_only.add(message)
    return everyone, honest_only.aggregate("rotate")[0]


ATTACKS = {"scaled": ["scaled"] * 2, "nan": ["nan"] * 2, "mixed": ["scaled", "nan"]}


@pytest.mark.parametrize("attack_name", sorted(ATTACKS))
@pytest.mark.parametrize("name", ["median", "trimmed-mean"])
def test_robust_strategies_stay_within_10_percent_of_the_honest_mean(fleet, name, attack_name):
    kinds = ATTACKS[attack_name]
    aggregator, honest = attacked_round(fleet, make_strategy(name), kinds)

    aggregate, samples = aggregator.aggregate("rotate")

    nans = kinds.count("nan")
    assert aggregator.rejected == ({"not-finite": nans} if nans else {})
    assert aggregator.accepted == DEVICES - nans and samples == STREAM * (DEVICES - nans)
    assert error(aggregate, honest, fleet["head"]) <= 0.1
    assert accuracy(aggregate, fleet["test"]) >= accuracy(honest, fleet["test"]) - 0.02
    assert accuracy(honest, fleet["test"]) > accuracy(fleet["head"], fleet["test"]) + 0.5


def test_the_plain_mean_is_dragged_far_off_by_scaled_updates_and_nan_never_enters(fleet):
    test = fleet["test"]
    scaled, honest = attacked_round(fleet, WeightedMean(), ATTACKS["scaled"])
    nan, _ = attacked_round(fleet, WeightedMean(), ATTACKS["nan"])

    dragged, clean = scaled.aggregate("rotate")[0], nan.aggregate("rotate")[0]

    assert scaled.accepted == DEVICES  # the norm bound let them in: only a strategy helps
    assert error(dragged, honest, fleet["head"]) > 10  # 2 of 10 at 100x: about 20
    assert accuracy(dragged, test) < accuracy(honest, test) - 0.3
    assert nan.rejected["not-finite"] == 2
    assert error(clean, honest, fleet["head"]) < 1e-6  # refused, so the mean is the honest one


def test_clipping_bounds_what_one_contribution_moves_the_aggregate(fleet):
    head = fleet["head"]
    attacker = attack(fleet["adapters"][0], head, "scaled")
    contributions = [Contribution(attacker, 100, np.zeros(10))] + [
        Contribution(head, 100, np.zeros(10)) for _ in range(3)
    ]

    for strategy in (WeightedMean(clip=2.0), TrimmedMean(trim=0.0, clip=2.0)):
        moved = np.linalg.norm(flat(strategy.aggregate(contributions, head)) - flat(head))
        assert moved == pytest.approx(2.0 / 4, rel=1e-4)  # clipped to 2, one of four
    unclipped = WeightedMean().aggregate(contributions, head)
    assert np.linalg.norm(flat(unclipped) - flat(head)) > 100
    with pytest.raises(ValueError, match="reference"):
        WeightedMean(clip=2.0).aggregate(contributions)


def test_each_strategy_combines_coordinates_as_it_says():
    def contributions(values, samples=None):
        samples = samples or [1] * len(values)
        return [
            Contribution({"bias": np.array([v, -v], np.float32)}, n, np.zeros(2))
            for v, n in zip(values, samples, strict=True)
        ]

    mean = WeightedMean(cap=0).aggregate(contributions([0.0, 1.0], [1, 3]))
    median = CoordinateMedian().aggregate(contributions([1.0, 2.0, 100.0]))
    trimmed = TrimmedMean(trim=0.2).aggregate(contributions([0.0, 1.0, 2.0, 3.0, 100.0]))

    np.testing.assert_allclose(mean["bias"], [0.75, -0.75])
    np.testing.assert_allclose(median["bias"], [2.0, -2.0])
    np.testing.assert_allclose(trimmed["bias"], [2.0, -2.0])  # 0 and 100 dropped
    assert mean["bias"].dtype == np.float32

    rows = [np.array([[1.0], [1.0], [1.0]]), np.array([[5.0], [5.0], [5.0]])]
    skewed = [
        Contribution({"weight": rows[0]}, 3, np.array([3, 0, 0])),
        Contribution({"weight": rows[1]}, 1, np.array([1, 0, 2])),
    ]
    by_class = ClassWeightedMean(coverage=0, cap=0).aggregate(skewed)
    # class 0: 3:1; class 1 nobody saw: by samples (3:1); class 2: only the second
    np.testing.assert_allclose(by_class["weight"][:, 0], [2.0, 2.0, 5.0])
    # the first saw one class, the second 1.89 (exp of its labels' entropy) of three
    covered = ClassWeightedMean(coverage=1, cap=0).aggregate(skewed)
    first, second = 3 * 1 / 3, 1 * 1.8899 / 3
    expected = (first * 1 + second * 5) / (first + second)
    np.testing.assert_allclose(covered["weight"][:, 0], [expected, 2.0, 5.0], rtol=1e-4)


def test_strategies_are_made_by_name_and_bad_names_or_parameters_are_named():
    assert set(STRATEGIES) == {
        "mean",
        "class-mean",
        "median",
        "trimmed-mean",
        "krum",
        "multi-krum",
    }
    assert make_strategy("multi-krum", malicious=0.1, keep=0.5) == MultiKrum(
        malicious=0.1, keep=0.5
    )
    assert make_strategy("trimmed-mean", trim=0.1, clip=3.0) == TrimmedMean(trim=0.1, clip=3.0)
    assert isinstance(make_strategy("median"), CoordinateMedian)

    with pytest.raises(ValueError, match="'bulyan'.*mean, class-mean, median, trimmed-mean"):
        make_strategy("bulyan")
    with pytest.raises(ValueError, match="malicious"):
        Krum(malicious=0.5)
    with pytest.raises(ValueError, match="cap"):
        WeightedMean(cap=0.5)
    with pytest.raises(ValueError, match="no parameter trim"):
        make_strategy("median", trim=0.1)
    with pytest.raises(ValueError, match="trim"):
        TrimmedMean(trim=0.5)
    with pytest.raises(ValueError, match="clip"):
        WeightedMean(clip=-1.0)
    with pytest.raises(ValueError, match="coverage"):
        ClassWeightedMean(coverage=float("nan"))


def test_a_replayed_update_is_refused_and_counted(fleet):
    adapter = fleet["adapters"][0]
    aggregator = DomainAggregator(fleet["head"])
    first = adapter.update_message("pi4-0", "rotate", "1")
    second = adapter.update_message("pi4-0", "rotate", "1")

    aggregator.add(received(first))
    aggregator.add(received(second))
    with pytest.raises(ProtocolError) as info:
        aggregator.add(received(first))
    aggregator.add(received(first), redelivered=True)  # the broker's copy: ack lost

    assert len(first.nonce) == 16 and first.nonce != second.nonce
    assert info.value.code == "replayed" and info.value.field == "nonce"
    assert aggregator.rejected == {"replayed": 1} and aggregator.accepted == 2
    assert aggregator.redelivered == 1
    with pytest.raises(ProtocolError, match="nonce"):
        wire.AdapterUpdate(**{**first.__dict__, "nonce": "not-hex"})


def test_an_update_without_a_nonce_still_decodes_and_is_taken_each_time(fleet):
    message = fleet["adapters"][0].update_message("pi4-0", "rotate", "1")
    payload = message.encode()
    size = int.from_bytes(payload[:4], "big")
    header = payload[4 : 4 + size].replace(f',"nonce":"{message.nonce}"'.encode(), b"")
    old = len(header).to_bytes(4, "big") + header + payload[4 + size :]  # an older device's
    aggregator = DomainAggregator(fleet["head"])

    decoded = wire.decode(wire.AdapterUpdate, old)
    aggregator.add(decoded)
    aggregator.add(decoded)

    assert decoded.nonce == "" and decoded.epsilon == 0.0
    assert aggregator.accepted == 2 and not aggregator.rejected


@pytest.mark.parametrize("bases", [{"2", "3"}, lambda base: int(base) >= 2])
def test_an_update_on_a_head_no_longer_taken_is_refused(fleet, bases):
    adapter = fleet["adapters"][0]
    aggregator = DomainAggregator(fleet["head"], bases=bases)

    aggregator.add(received(adapter.update_message("pi4-0", "rotate", "2")))
    with pytest.raises(ProtocolError) as info:
        aggregator.add(received(adapter.update_message("pi4-0", "rotate", "1")))

    assert info.value.code == "stale-base" and info.value.field == "base"
    assert aggregator.rejected == {"stale-base": 1} and aggregator.accepted == 1


def test_the_cloud_keeps_the_largest_epsilon_each_device_reported(fleet):
    adapter = fleet["adapters"][0]
    aggregator = DomainAggregator(fleet["head"])

    for epsilon in (1.5, 4.0, 2.0):
        message = adapter.update_message("pi4-0", "rotate", "1", epsilon=epsilon)
        aggregator.add(received(message))
    aggregator.add(received(fleet["adapters"][1].update_message("pi4-1", "rotate", "1")))

    assert aggregator.epsilon == {"pi4-0": 4.0, "pi4-1": 0.0}


def test_a_new_reference_moves_what_clipping_measures_from(fleet):
    head = fleet["head"]
    moved = {k: v + 1.0 for k, v in head.items()}
    aggregator = DomainAggregator(head, strategy=WeightedMean(clip=0.5), max_norm=LOOSE)
    labels = np.arange(10).repeat(2)
    aggregator.add(
        wire.AdapterUpdate(
            device_id="pi4-0",
            domain="rotate",
            base="1",
            samples=len(labels),
            histogram=tuple(np.bincount(labels, minlength=10).tolist()),
            weights=save(moved),
        )
    )

    near_head = aggregator.aggregate("rotate")[0]
    aggregator.rebase(moved)
    at_moved = aggregator.aggregate("rotate")[0]

    assert np.linalg.norm(flat(near_head) - flat(head)) == pytest.approx(0.5, rel=1e-3)
    np.testing.assert_allclose(at_moved["bias"], moved["bias"], atol=1e-3)
    with pytest.raises(ValueError, match="reference"):
        aggregator.rebase({"bias": head["bias"]})


def test_class_mean_keeps_what_each_device_learned_about_the_classes_it_saw(fleet):
    """Five devices, each seeing two classes of rotated digits in 90% of its labels: the
    plain mean divides what one device learned about its classes by five; weighting each
    class's row by the labels of that class keeps it."""
    head, (x, y) = fleet["head"], fleet["pool"]
    contributions = []
    for device in range(5):
        rng = np.random.default_rng(device)
        mine = np.flatnonzero((y == 2 * device) | (y == 2 * device + 1))
        rows = rng.permutation(np.concatenate([mine, rng.choice(len(y), len(mine) // 9)]))
        adapter = Adapter(NumpyTrainer(head["weight"], head["bias"], lr=0.1), seed=device)
        for i in range(0, len(rows), 16):
            adapter.observe(x[rows[i : i + 16]], y[rows[i : i + 16]])
        contributions.append(
            Contribution(adapter.trainer.weights(), adapter.samples_trained, adapter.histogram)
        )
    plain = accuracy(WeightedMean().aggregate(contributions), fleet["test"])
    by_class = accuracy(ClassWeightedMean().aggregate(contributions), fleet["test"])
    assert by_class > plain + 0.1, (plain, by_class)


FLOWER = Path(__file__).with_name("reference") / "krum_flower.json"


def _flower_case(case):
    inputs = [
        Contribution(
            {"weight": np.array(c["weight"]), "bias": np.array(c["bias"])},
            c["samples"],
            np.zeros(3),
        )
        for c in case["inputs"]
    ]
    n = len(inputs)
    share = case["num_malicious"] / n
    if case["to_keep"]:
        strategy = MultiKrum(malicious=share, keep=case["to_keep"] / n, cap=0)
    else:
        strategy = Krum(malicious=share, cap=0)
    return inputs, strategy


@pytest.mark.parametrize("index", range(6))
def test_krum_and_multi_krum_match_flowers_aggregate_krum(index):
    """Against outputs of Flower's ``aggregate_krum`` (1.42.0) stored by
    reference/make_krum_reference.py: the same parameters, number for number."""
    case = json.loads(FLOWER.read_text())["cases"][index]
    inputs, strategy = _flower_case(case)

    out = strategy.aggregate(inputs)

    for name in ("weight", "bias"):
        np.testing.assert_allclose(out[name], np.array(case["output"][name]), rtol=1e-6, atol=1e-6)


def test_krum_matches_flower_on_the_adapters_when_flower_is_installed(fleet):
    aggregate = pytest.importorskip("flwr.server.strategy.aggregate")
    head = fleet["head"]
    contributions = [
        Contribution(attack(a, head, "scaled") if i < 2 else a.trainer.weights(), 1000, a.histogram)
        for i, a in enumerate(fleet["adapters"])
    ]
    results = [([c.weights["weight"], c.weights["bias"]], c.samples) for c in contributions]

    for strategy, keep in ((Krum(cap=0), 0), (MultiKrum(cap=0), DEVICES - 2)):
        ours = strategy.aggregate(contributions)
        theirs = aggregate.aggregate_krum(results, 2, keep)
        np.testing.assert_allclose(ours["weight"], theirs[0], rtol=1e-5, atol=1e-6)


def test_krum_picks_an_honest_update_and_multi_krum_averages_only_honest_ones(fleet):
    head = fleet["head"]
    contributions = [
        Contribution(attack(a, head, "scaled") if i < 2 else a.trainer.weights(), 1000, a.histogram)
        for i, a in enumerate(fleet["adapters"])
    ]

    picked = Krum().aggregate(contributions)
    averaged = MultiKrum().aggregate(contributions)
    honest_ones = contributions[2:]
    honest = WeightedMean().aggregate(honest_ones)

    chosen = flat(picked)
    assert any(np.array_equal(chosen, flat(c.weights).astype(np.float32)) for c in honest_ones)
    np.testing.assert_allclose(flat(averaged), flat(honest), rtol=1e-5, atol=1e-6)


def test_a_claimed_count_weighs_at_most_cap_times_the_median():
    def contribution(value, samples):
        histogram = np.array([samples, 0])
        return Contribution({"bias": np.array([value, value])}, samples, histogram)

    honest = [contribution(1.0, 100) for _ in range(4)]
    liar = contribution(-1.0, 100_000)

    uncapped = WeightedMean(cap=0).aggregate([*honest, liar])["bias"][0]
    capped = WeightedMean().aggregate([*honest, liar])["bias"][0]
    twice = WeightedMean(cap=2).aggregate([*honest, liar])["bias"][0]
    by_class = ClassWeightedMean().aggregate([*honest, liar])["bias"][0]
    kept = MultiKrum(malicious=0.0, keep=1.0).aggregate([*honest, liar])["bias"][0]

    assert uncapped < -0.99  # the liar is nearly all of the weight
    assert capped == pytest.approx((4 - 1) / 5)  # one device of five
    assert twice == pytest.approx((4 - 2) / 6)
    assert by_class == pytest.approx((4 - 1) / 5)
    assert kept == pytest.approx((4 - 1) / 5)
