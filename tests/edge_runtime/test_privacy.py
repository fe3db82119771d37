"""Differential privacy of uploads: clipping, Gaussian noise, the RDP accountant, and the
learner's uploads with DP on (real numpy training on separable synthetic features)."""

import math

import numpy as np
import pytest

import eclm_wire as wire
from eclm_wire.codec import check_update
from eclm_wire.errors import ProtocolError
from edge_runtime.learning import Learner, LearnerConfig
from edge_runtime.privacy import GaussianNoise, clip_delta, gaussian_epsilon

CLASSES, FEATURES = 10, 512


def head():
    rng = np.random.default_rng(7)
    return {
        "weight": rng.normal(0, 0.05, (CLASSES, FEATURES)).astype(np.float32),
        "bias": np.zeros(CLASSES, np.float32),
    }


def flat(weights: dict) -> np.ndarray:
    return np.concatenate([weights[k].ravel() for k in sorted(weights)])


def trained_learner(config: LearnerConfig, n: int = 128) -> Learner:
    rng = np.random.default_rng(1)
    y = rng.integers(0, CLASSES, n)
    x = rng.normal(0, 0.1, (n, FEATURES)).astype(np.float32)
    x[np.arange(n), y] += 1.0
    learner = Learner(head(), config, dp_seed=3)
    for i in range(0, n, 16):
        learner.learn(x[i : i + 16], y[i : i + 16])
    return learner


def test_epsilon_grows_with_releases_and_shrinks_with_more_noise():
    by_releases = [gaussian_epsilon(t, 1.0, 1e-5) for t in (0, 1, 10, 100)]
    by_noise = [gaussian_epsilon(10, z, 1e-5) for z in (0.5, 1.0, 2.0, 4.0)]

    assert by_releases[0] == 0.0
    assert by_releases == sorted(by_releases) and len(set(by_releases)) == 4
    assert by_noise == sorted(by_noise, reverse=True) and len(set(by_noise)) == 4
    assert gaussian_epsilon(10, 1.0, 1e-9) > by_releases[2]  # a smaller delta costs epsilon


@pytest.mark.parametrize(("releases", "z"), [(1, 1.0), (10, 1.1), (50, 3.0)])
def test_the_closed_form_is_the_minimum_over_renyi_orders(releases, z):
    orders = np.linspace(1.001, 400, 400_000)
    rdp = releases * orders / (2 * z**2)
    numeric = float(np.min(rdp + math.log(1 / 1e-5) / (orders - 1)))

    assert gaussian_epsilon(releases, z, 1e-5) == pytest.approx(numeric, rel=1e-6)


def test_clipping_scales_a_large_delta_down_to_the_bound_and_leaves_a_small_one():
    base = head()
    far = {k: v + 3.0 for k, v in base.items()}
    near = {k: v + 1e-4 for k, v in base.items()}

    clipped = clip_delta(far, base, 2.0)

    assert np.linalg.norm(flat(clipped) - flat(base)) == pytest.approx(2.0, rel=1e-5)
    direction = flat(clipped) - flat(base)
    unit = 1 / math.sqrt(len(direction))  # the same direction: every coordinate moved alike
    np.testing.assert_allclose(direction / np.linalg.norm(direction), unit, rtol=1e-5)
    np.testing.assert_array_equal(clip_delta(near, base, 2.0)["weight"], near["weight"])
    np.testing.assert_array_equal(clip_delta(far, base, 0.0)["weight"], far["weight"])


def test_a_release_is_the_clipped_delta_plus_noise_of_the_expected_std():
    base = head()
    far = {k: v + 3.0 for k, v in base.items()}
    noise = GaussianNoise(1.0, 0.5, seed=0)

    released = noise.privatize(far, base)

    residual = flat(released) - flat(clip_delta(far, base, 1.0))  # 5130 draws of N(0, 0.5^2)
    assert noise.std == 0.5 and noise.releases == 1
    assert abs(residual.std() - 0.5) < 0.05 and abs(residual.mean()) < 0.05
    assert noise.epsilon == pytest.approx(gaussian_epsilon(1, 0.5, 1e-5))
    with pytest.raises(ValueError, match="noise_multiplier"):
        GaussianNoise(1.0, 0.0)


def test_uploads_with_dp_are_noised_copies_that_decode_validate_and_report_epsilon():
    learner = trained_learner(LearnerConfig(lr=0.5, dp_clip=1.0, dp_noise=0.3))
    adapter = learner.bank["clean"].trainer
    kept = adapter.weights()

    first = learner.update("clean", "pi4-01", "3")
    second = learner.update("clean", "pi4-01", "3")

    decoded = wire.decode(wire.AdapterUpdate, second.encode())
    uploaded = check_update(decoded.tensors(), learner.base)
    clipped = clip_delta(kept, learner.base, 1.0)
    residual = flat(uploaded) - flat(clipped)
    assert decoded == second and 0 < first.epsilon < second.epsilon
    assert second.epsilon == pytest.approx(gaussian_epsilon(2, 0.3, 1e-5))
    assert abs(residual.std() - 0.3) < 0.03  # float16 on the wire adds ~1e-3
    assert np.linalg.norm(flat(kept) - flat(learner.base)) > 1.0  # so clipping did something
    np.testing.assert_array_equal(adapter.weights()["weight"], kept["weight"])  # serving as is


def test_without_dp_uploads_are_the_adapter_and_spend_nothing():
    learner = trained_learner(LearnerConfig(lr=0.5))

    update = learner.update("clean", "pi4-01", "3")

    assert learner.privacy is None and update.epsilon == 0.0
    sent = check_update(update.tensors(), learner.base)
    np.testing.assert_allclose(
        sent["weight"], learner.bank["clean"].trainer.weights()["weight"], atol=1e-2
    )


def test_an_upload_before_any_label_is_refused_without_spending_privacy():
    learner = Learner(head(), LearnerConfig(dp_clip=1.0, dp_noise=1.0))

    with pytest.raises(ProtocolError, match="samples"):
        learner.update("clean", "pi4-01", "3")

    assert learner.privacy.releases == 0


def test_dp_settings_and_epsilon_on_the_wire_are_checked():
    with pytest.raises(ValueError, match="dp_clip, dp_noise"):
        LearnerConfig(dp_clip=1.0)
    with pytest.raises(ValueError, match="dp_delta"):
        LearnerConfig(dp_clip=1.0, dp_noise=1.0, dp_delta=0.0)
    update = trained_learner(LearnerConfig()).update("clean", "pi4-01", "3")
    with pytest.raises(ProtocolError, match="epsilon"):
        wire.AdapterUpdate(**{**update.__dict__, "epsilon": -1.0})
