"""The robustness table's claims on fixed seeds: with 20% attackers of each kind, the
robust strategies stay within 10% of the honest mean, Krum picks an honest device's own
update, and the capped mean holds a lying count within 25% where the uncapped one does not
(distance as in ``eclm_lab.robustness``)."""

import pytest

from cloud_trainer.federation.strategies import (
    CoordinateMedian,
    Krum,
    MultiKrum,
    TrimmedMean,
    WeightedMean,
)
from eclm_lab.robustness import ATTACKS, digits_fleet, table

ROBUST = {"median": CoordinateMedian(), "trimmed-mean": TrimmedMean(), "multi-krum": MultiKrum()}


@pytest.fixture(scope="module", params=[0, 1])
def rows(request):
    strategies = {**ROBUST, "krum": Krum(), "mean": WeightedMean(cap=0), "capped": WeightedMean()}
    return table(digits_fleet(10, seed=request.param), strategies, share=0.2)


@pytest.mark.parametrize("attack", ATTACKS)
def test_robust_strategies_stay_within_10_percent_of_the_honest_mean(rows, attack):
    for name in ROBUST:
        assert rows[attack][name] <= 0.10, (attack, name, rows[attack])
    assert rows[attack]["krum"] <= rows["honest device"]["-"]  # one honest device's update


def test_the_cap_holds_a_lying_count_within_25_percent_and_the_plain_mean_does_not(rows):
    assert rows["lying-count"]["capped"] <= 0.25
    assert rows["lying-count"]["mean"] > 0.5
    assert rows["nan"]["capped"] < 1e-6  # refused by the update checks
    assert rows["scaled"]["mean"] > 10  # a count cap does not stop a scaled update
