"""The device's learner: an adapter per domain, when to upload, warm starts, label mixes.
Real softmax-regression training on separable synthetic features (no model needed)."""

import numpy as np
import pytest
from safetensors.numpy import save

import eclm_wire as wire
from eclm_wire.errors import ProtocolError
from edge_runtime.learning import Learner, LearnerConfig

CLASSES, FEATURES = 4, 16


def base():
    return {
        "weight": np.zeros((CLASSES, FEATURES), np.float32),
        "bias": np.zeros(CLASSES, np.float32),
    }


def domain_data(shift: float, n: int, seed: int = 0):
    """Class c lights up feature c (+ shift * 4), so each domain needs its own head."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    x = rng.normal(0, 0.1, (n, FEATURES)).astype(np.float32)
    x[np.arange(n), y + int(shift) * CLASSES] += 1.0
    return x, y


def accuracy(learner, x, y):
    return float((learner.logits(x).argmax(1) == y).mean())


def test_each_domain_learns_its_own_adapter_and_keeps_it_across_visits():
    learner = Learner(base(), LearnerConfig(lr=0.5))
    xa, ya = domain_data(0, 400)
    xb, yb = domain_data(1, 400, seed=1)
    for i in range(0, 200, 8):
        learner.learn(xa[i : i + 8], ya[i : i + 8])
    learner.enter("rotate")
    assert accuracy(learner, xb[200:], yb[200:]) < 0.5  # a fresh adapter for the new domain
    for i in range(0, 200, 8):
        learner.learn(xb[i : i + 8], yb[i : i + 8])
    assert accuracy(learner, xb[200:], yb[200:]) > 0.9
    learner.enter("clean")
    assert accuracy(learner, xa[200:], ya[200:]) > 0.9  # what it learned there is still there


def test_uploads_come_on_leaving_a_domain_and_on_schedule_only_with_new_labels():
    learner = Learner(base(), LearnerConfig(upload_every=3, min_new_samples=8))
    x, y = domain_data(0, 64)
    due = [learner.learn(x[i : i + 4], y[i : i + 4]) for i in range(0, 24, 4)]
    assert due == [False, False, True, False, False, True]
    update = learner.update("clean", "pi4-01", "7")
    assert update.samples == 24 and sum(update.histogram) == 24
    assert learner.enter("noise") is None  # nothing new learned in clean since that upload
    learner.learn(x[:8], y[:8])
    assert learner.enter("clean") == "noise"  # leaving noise with 8 new labels
    assert learner.learn(np.zeros((0, FEATURES), np.float32), np.zeros(0, int)) is False


def test_a_warm_start_replaces_a_fresh_adapter_and_is_averaged_into_a_trained_one():
    learner = Learner(base())
    x, y = domain_data(1, 200)
    trained = Learner(base(), LearnerConfig(lr=0.5))
    trained.enter("rotate")
    for i in range(0, 200, 8):
        trained.learn(x[i : i + 8], y[i : i + 8])
    weights = trained.bank["rotate"].trainer.weights()

    learner.warm_start("rotate", save(weights), 200)
    learner.enter("rotate")
    assert accuracy(learner, x, y) > 0.9  # without a single label of its own
    learner.learn(x[:8], y[:8])
    own = learner.bank["rotate"].trainer.weights()
    learner.warm_start("rotate", save(base()), 24)  # 8 labels of its own, 24 of the fleet
    np.testing.assert_allclose(
        learner.bank["rotate"].trainer.weights()["weight"], own["weight"] / 4
    )
    with pytest.raises(ProtocolError):
        learner.warm_start("noise", save({"weight": weights["weight"][:, :3].copy()}), 5)
    with pytest.raises(ProtocolError):
        bad = {**weights, "bias": np.full(CLASSES, np.nan, np.float32)}
        learner.warm_start("noise", save(bad), 5)
    assert "noise" in learner.bank and learner.bank["noise"].samples_trained == 0


def test_a_new_head_replaces_only_adapters_the_device_has_not_trained():
    learner = Learner(base())
    x, y = domain_data(0, 16)
    learner.learn(x, y)
    learner.enter("noise")
    learner.logits(x)  # creates the noise adapter from the old head
    new = {k: v + 1.0 for k, v in base().items()}
    learner.rebase(new)
    assert set(learner.bank) == {"clean"}
    learner.logits(x)
    np.testing.assert_array_equal(learner.bank["noise"].trainer.weights()["bias"], new["bias"])
    with pytest.raises(ProtocolError):
        learner.rebase({"weight": np.zeros((2, 2), np.float32), "bias": new["bias"]})


def test_a_label_mix_that_moves_is_noticed_once():
    learner = Learner(base(), LearnerConfig(mix_window=32, mix_shift=0.3))
    zeros, ones = np.zeros(8, int), np.ones(8, int)
    features = np.zeros((8, FEATURES), np.float32)
    seen = []
    for labels in [zeros] * 4 + [zeros] * 2 + [ones] * 4:
        learner.learn(features, labels)
        mix = learner.mix_shifted()
        seen.append(None if mix is None else float(mix[1]))
    # the first full window is reported; then only a move of 0.3 or more from it
    assert seen == [None, None, None, 0.0, None, None, None, 0.5, None, 1.0]


def test_an_update_built_by_the_learner_passes_the_wire_checks():
    learner = Learner(base())
    x, y = domain_data(0, 16)
    learner.learn(x, y)
    update = learner.update("clean", "zero-01", "12")
    assert wire.decode(wire.AdapterUpdate, update.encode()) == update


def test_predictions_lean_toward_the_label_mix_the_device_sees():
    """``prior`` adds prior x log of the latest labels' frequencies (one extra count each)
    to the adapter's logits; 0 turns it off."""
    x, y = domain_data(0, 48)
    y = np.where(np.arange(48) < 36, 2, y)  # three labels in four are 2
    learners = {
        p: Learner(base(), LearnerConfig(prior=p, mix_window=48, gate_window=0)) for p in (0, 1.0)
    }
    for learner in learners.values():
        for i in range(0, 48, 8):
            learner.learn(x[i : i + 8], y[i : i + 8])
    counts = np.bincount(y, minlength=CLASSES) + 1.0
    np.testing.assert_allclose(
        learners[1.0].logits(x) - learners[0].logits(x),
        np.broadcast_to(np.log(counts / counts.sum()), (48, CLASSES)),
        rtol=1e-5,
    )
    ambiguous = np.zeros((1, FEATURES), np.float32)
    assert learners[1.0].logits(ambiguous).argmax() == 2
    with pytest.raises(ValueError, match="prior"):
        LearnerConfig(prior=-1)


def right_head():
    """A head that is already right on the base domain (class c: feature c)."""
    weight = np.zeros((CLASSES, FEATURES), np.float32)
    weight[np.arange(CLASSES), np.arange(CLASSES)] = 5.0
    return {"weight": weight, "bias": np.zeros(CLASSES, np.float32)}


def test_in_the_base_domain_the_head_serves_until_the_adapter_beats_it_on_new_labels():
    x, y = domain_data(0, 400)
    gated, ungated = (Learner(right_head(), LearnerConfig(lr=1e-3, gate_window=g)) for g in (64, 0))
    for learner in (gated, ungated):
        learner.warm_start("clean", save(base()), 400)  # an adapter worse than the head
        for i in range(0, 64, 8):
            learner.learn(x[i : i + 8], y[i : i + 8])
    assert accuracy(ungated, x[200:], y[200:]) < 0.5  # its adapter serves
    assert not gated.adapting
    assert accuracy(gated, x[200:], y[200:]) == 1.0  # the head still serves
    gated.enter("noise")  # elsewhere the head is not known to fit: the adapter serves at once
    assert gated.adapting

    learner = Learner(base())  # a head that is wrong: the adapter beats it and serves
    assert not learner.adapting
    for i in range(0, 200, 8):
        learner.learn(x[i : i + 8], y[i : i + 8])
    assert learner.adapting and accuracy(learner, x[200:], y[200:]) > 0.9
    learner.rebase(right_head())  # a new head: the adapter has to beat it again
    assert not learner.adapting
    with pytest.raises(ValueError, match="gate_window"):
        LearnerConfig(gate_window=-1)
