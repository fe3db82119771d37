import numpy as np
import pytest
from safetensors.numpy import save

import eclm_wire as wire
from cloud_trainer.federation.aggregation import DomainAggregator
from cloud_trainer.federation.strategies import WeightedMean
from eclm_wire.errors import ProtocolError
from edge_runtime.adapter import Adapter, NumpyTrainer


def update(device, weights, labels, domain="rotate"):
    histogram = tuple(int(n) for n in np.bincount(labels, minlength=10))
    return wire.AdapterUpdate(
        device_id=device,
        domain=domain,
        base="1",
        samples=len(labels),
        histogram=histogram,
        weights=save(weights),
    )


def accuracy(weights, shifted, rows):
    adapter = NumpyTrainer(weights["weight"], weights["bias"])
    f, y = shifted["features"][rows], shifted["labels"][rows]
    return float((adapter.logits(f).argmax(1) == y).mean())


def test_updates_of_three_devices_in_a_domain_average_into_one_that_serves_a_fourth(shifted):
    head = {"weight": shifted["weight"], "bias": shifted["bias"]}
    aggregator = DomainAggregator(head)
    held_out = slice(400, None)
    alone = []
    for device, rows in enumerate((slice(0, 100), slice(100, 200), slice(200, 300))):
        adapter = Adapter(NumpyTrainer(shifted["weight"], shifted["bias"]), seed=device)
        f, y = shifted["features"][rows], shifted["labels"][rows]
        for i in range(0, len(y), 8):
            adapter.observe(f[i : i + 8], y[i : i + 8])
        alone.append(accuracy(adapter.trainer.weights(), shifted, held_out))
        message = adapter.update_message(f"pi4-{device}", "rotate", base="1")
        assert message.histogram == tuple(np.bincount(y, minlength=10))
        aggregator.add(wire.decode(wire.AdapterUpdate, message.encode()))

    mean, samples = aggregator.aggregate("rotate")
    newcomer = Adapter(NumpyTrainer(shifted["weight"], shifted["bias"]))
    newcomer.load_update(save(mean))  # what the cloud would send a device entering rotate

    assert samples == 300 and aggregator.domains() == ["rotate"]
    assert aggregator.aggregate("noise") is None
    before = accuracy(head, shifted, held_out)
    after = accuracy(newcomer.trainer.weights(), shifted, held_out)
    print(f"rotate: head {before:.3f}, devices alone {np.round(alone, 3)}, aggregated {after:.3f}")
    assert after > before + 0.3
    assert after >= np.mean(alone) - 0.02


def test_a_devices_newer_update_replaces_its_older_one(shifted):
    head = {"weight": shifted["weight"], "bias": shifted["bias"]}
    aggregator = DomainAggregator(head, strategy=WeightedMean(cap=0))  # counts as claimed
    labels = np.arange(10).repeat(3)
    zeros = {k: np.zeros_like(v) for k, v in head.items()}
    ones = {k: np.ones_like(v) for k, v in head.items()}

    aggregator.add(update("a", zeros, labels))
    aggregator.add(update("a", ones, labels))
    aggregator.add(update("b", zeros, labels[:10]))

    mean, samples = aggregator.aggregate("rotate")
    assert samples == 40
    np.testing.assert_allclose(mean["bias"], 0.75)  # 30 samples of ones, 10 of zeros


@pytest.mark.parametrize(
    ("spoil", "code"),
    [
        (lambda w: {**w, "bias": np.full_like(w["bias"], np.nan)}, "not-finite"),
        (lambda w: {**w, "weight": w["weight"][:, :3].copy()}, "invalid"),
        (lambda w: {"weight": w["weight"]}, "invalid"),
        (lambda w: {**w, "weight": w["weight"] * 1e6}, "too-large"),
        (lambda w: {**w, "bias": w["bias"].astype(np.float64)}, "invalid"),
    ],
)
def test_a_bad_update_is_refused_counted_and_changes_nothing(shifted, spoil, code):
    head = {"weight": shifted["weight"], "bias": shifted["bias"]}
    aggregator = DomainAggregator(head)
    labels = np.arange(10)

    with pytest.raises(ProtocolError) as info:
        aggregator.add(update("bad", spoil(head), labels))

    assert info.value.code == code and aggregator.rejected[code] == 1
    assert aggregator.aggregate("rotate") is None


def test_an_update_message_is_checked_field_by_field():
    ok = update("a", {"bias": np.zeros(10, np.float32)}, np.arange(10))
    assert wire.decode(wire.AdapterUpdate, ok.encode()) == ok
    for change in (
        {"samples": 11},
        {"histogram": (-1, 11)},
        {"domain": "a/b"},
        {"weights": b""},
    ):
        with pytest.raises(ProtocolError):
            wire.AdapterUpdate(**{**ok.__dict__, **change}).check()


@pytest.mark.slow
def test_the_coordinator_aggregates_updates_devices_send_over_mosquitto(
    shifted, address, collector_factory, tmp_path
):
    from cloud_trainer.fleet.coordinator import FleetCoordinator
    from edge_runtime.artifacts import ArtifactStore

    head = {"weight": shifted["weight"], "bias": shifted["bias"]}
    coordinator = FleetCoordinator(
        address,
        ArtifactStore(tmp_path),
        client_id="c-updates",
        aggregator=DomainAggregator(head),
    ).start()
    device = collector_factory(client_id="pi4-upd")
    try:
        labels = np.arange(10).repeat(2)
        nan = {**head, "bias": np.full_like(head["bias"], np.nan)}
        for sender, message in (
            ("pi4-upd", update("pi4-upd", head, labels)),
            ("pi4-upd", update("pi4-upd", nan, labels)),
            ("pi4-upd", update("pi4-other", head, labels, domain="noise")),  # not its own
            ("pi4-upd", b"{truncated"),
        ):
            payload = message if isinstance(message, bytes) else message.encode()
            device.publish(wire.device_topic(sender, "updates"), payload)
        assert coordinator.wait_until(lambda c: sum(c.rejected.values()) == 3, 10)
        assert coordinator.aggregator.domains() == ["rotate"]
        mean, samples = coordinator.aggregator.aggregate("rotate")
        assert samples == 20
        np.testing.assert_allclose(mean["weight"], head["weight"])
        assert coordinator.rejected["not-finite"] == 1 and coordinator.rejected["malformed"] == 1
    finally:
        coordinator.stop()
