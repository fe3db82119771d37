"""Per-device rate limits: token buckets with an injected clock, then one device flooding
a real Mosquitto with updates while the others' updates still arrive and are stored."""

import secrets
import threading
import time

import numpy as np
import paho.mqtt.client as paho
import pytest

import eclm_wire as wire
from cloud_trainer.federation.aggregation import DomainAggregator
from cloud_trainer.fleet.coordinator import FleetCoordinator
from cloud_trainer.fleet.ratelimit import DropReason, Kind, Limit, RateLimiter
from cloud_trainer.service.config import LimitsSection
from eclm_wire.codec import tensor_bytes
from edge_runtime.artifacts import ArtifactStore

FLOOD = 10_000


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_device_gets_its_burst_then_its_rate_and_others_are_not_affected():
    clock = Clock()
    limiter = RateLimiter({Kind.UPDATES: Limit(rate=2.0, burst=3)}, clock=clock)

    first = [limiter.allow("pi4-a", "updates") for _ in range(5)]
    other = limiter.allow("pi4-b", "updates")
    clock.now = 1.0  # two more tokens
    later = [limiter.allow("pi4-a", "updates") for _ in range(3)]
    unlimited = all(limiter.allow("pi4-a", "telemetry") for _ in range(100))

    assert first == [True, True, True, False, False]
    assert other and later == [True, True, False] and unlimited
    assert limiter.counts() == {("updates", "rate-limit"): 3}


def test_status_counts_as_a_report_and_the_buckets_kept_are_bounded():
    limiter = RateLimiter({Kind.REPORTS: Limit(rate=1.0, burst=1)}, max_devices=50, clock=Clock())

    assert limiter.allow("pi4-a", "reported") and not limiter.allow("pi4-a", "status")
    for n in range(1000):  # invented device ids
        limiter.allow(f"fake-{n}", "reported")
    limiter.count_drop("fetch", DropReason.QUEUE_FULL)

    assert limiter.devices() == 50
    assert limiter.counts() == {("reported", "rate-limit"): 1, ("fetch", "queue-full"): 1}
    with pytest.raises(ValueError, match="burst"):
        Limit(rate=1.0, burst=0)


def test_the_default_limits_are_far_above_what_a_device_sends():
    limits = LimitsSection()

    assert limits.updates_per_s * 60 >= 100 and limits.updates_burst >= 50
    assert limits.fetches_per_s >= 100  # a 1 MB program is 16 chunk requests
    assert set(limits.limiter().limits) == set(Kind)


def updates(device: str, count: int, like: dict) -> list[bytes]:
    """``count`` valid updates from ``device``, each with a fresh nonce."""
    weights = tensor_bytes({k: v + 0.01 for k, v in like.items()})
    return [
        wire.AdapterUpdate(
            device_id=device,
            domain="rotate",
            base="1",
            samples=10,
            histogram=(1,) * 10,
            weights=weights,
            nonce=secrets.token_hex(8),
        ).encode()
        for _ in range(count)
    ]


def test_one_device_flooding_updates_leaves_the_others_stored(address, tmp_path):
    like = {"weight": np.zeros((10, 16), np.float32), "bias": np.zeros(10, np.float32)}
    aggregator = DomainAggregator(like)
    limiter = LimitsSection().limiter()
    cloud = FleetCoordinator(
        address,
        ArtifactStore(tmp_path),
        client_id="cloud-flood",
        aggregator=aggregator,
        limiter=limiter,
    ).start()
    distinct = updates("pi4-flood", 200, like)  # what passes the limit is stored or a replay
    flood = [distinct[n % len(distinct)] for n in range(FLOOD)]
    honest = {f"pi4-{n}": updates(f"pi4-{n}", 3, like) for n in range(4)}
    flooder = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="pi4-flood")
    flooder.max_inflight_messages_set(100)
    flooder.connect(address.host, address.port)
    flooder.loop_start()
    others = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="pi4-others")
    others.connect(address.host, address.port)
    others.loop_start()

    def replays() -> int:
        return aggregator.rejected.get("replayed", 0)

    def handled() -> int:
        return sum(limiter.counts().values()) + aggregator.accepted + replays()

    try:
        time.sleep(0.3)
        started = time.monotonic()
        sending = threading.Thread(
            target=lambda: [
                flooder.publish(wire.device_topic("pi4-flood", "updates"), p, qos=1) for p in flood
            ]
        )
        sending.start()
        for n in range(3):  # the others' usual updates, while the flood goes on
            for device, payloads in honest.items():
                others.publish(wire.device_topic(device, "updates"), payloads[n], qos=1)
        sending.join()
        deadline = time.monotonic() + 60  # a dropped message notifies nobody: poll
        while not (stored := handled() >= FLOOD + 12) and time.monotonic() < deadline:
            time.sleep(0.05)
        elapsed = time.monotonic() - started
    finally:
        flooder.loop_stop()
        flooder.disconnect()
        others.loop_stop()
        others.disconnect()
        cloud.stop()

    dropped = cloud.dropped[("updates", "rate-limit")]
    from_flooder = aggregator.accepted - 12 + replays()
    assert stored, (aggregator.accepted, cloud.dropped, aggregator.rejected, cloud.rejected)
    assert aggregator.contributors("rotate") == set(honest) | {"pi4-flood"}
    assert from_flooder + dropped == FLOOD
    limits = LimitsSection()
    assert from_flooder <= limits.updates_burst + limits.updates_per_s * elapsed + 1
    assert set(aggregator.rejected) <= {"replayed"}
