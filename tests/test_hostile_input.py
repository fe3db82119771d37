"""200 hostile messages at a serving device over Mosquitto: tampered, truncated, wrongly
signed, expired, replayed and wrong-hardware desired states, and damaged chunks. Every one
is refused with an event, and inference never fails meanwhile."""

import random
import threading
import time
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

import eclm_wire as wire
from cloud_trainer.fleet.coordinator import FleetCoordinator
from cloud_trainer.fleet.keys import init_keys, load_signing_key, sign
from device_profiles import load_profile
from edge_runtime.agent import AgentConfig, EdgeAgent
from edge_runtime.artifacts import ArtifactStore
from edge_runtime.events import EventLimits

EACH = 30  # of the six kinds of bad desired state, plus 20 damaged chunks


@pytest.mark.slow
def test_two_hundred_hostile_messages_are_refused_while_inference_goes_on(
    exported, address, collector_factory, tmp_path
):
    private, public = init_keys(tmp_path / "keys")
    stranger, _ = init_keys(tmp_path / "stranger")
    key, other_key = load_signing_key(private), load_signing_key(stranger)
    device = "pi4-hostile"
    agent = EdgeAgent(
        AgentConfig(
            device_id=device,
            profile=load_profile("rpi4"),
            broker=address,
            store_dir=tmp_path / device,
            trust_key=public,
            events=EventLimits(rate=1000.0, burst=1000),  # one event each: bounds are elsewhere
        )
    ).start()
    coordinator = FleetCoordinator(
        address, ArtifactStore(exported["store"]), client_id="c-hostile", signing_key=key
    ).start()
    events = collector_factory(wire.device_topic(device, "events"), client_id="hostile-events")
    rng = random.Random(7)
    x = np.load(exported["test_npz"])["x"][:8]
    try:
        good = coordinator.assign(device, [exported["refs"]["tflite"]], target="rpi4")
        assert coordinator.wait_until(
            lambda c: (
                device in c.reported
                and c.reported[device].serial == good.serial
                and c.reported[device].phase == "active"
            ),
            60,
        )
        served, failures, stop = [0], [], threading.Event()

        def serve():
            while not stop.is_set():
                try:
                    assert np.isfinite(agent.predict(x)).all()
                    served[0] += 1
                except Exception as exc:  # every failure counts
                    failures.append(exc)

        client = threading.Thread(target=serve)
        client.start()

        newer = replace(good, serial=good.serial + 1, signature="")
        hostile = []
        for i in range(EACH):
            other = "cd" * 32 if i % 2 else "ef" * 32
            forged = replace(good, artifacts=(replace(good.artifacts[0], sha256=other),))
            hostile.append((forged.encode(), "bad-signature"))  # tampered after signing
            encoded = sign(newer, key).encode()
            hostile.append((encoded[: rng.randrange(1, len(encoded))], "malformed"))
            hostile.append((sign(newer, other_key).encode(), "bad-signature"))
            expired = replace(newer, expires=time.time() - rng.uniform(1, 1e6))
            hostile.append((sign(expired, key).encode(), "expired"))
            old = replace(newer, serial=good.serial - rng.randrange(1, 1000))
            hostile.append((sign(old, key).encode(), "replayed"))
            elsewhere = replace(newer, target=rng.choice(["rpi5", "rpi-zero-2w", "jetson"]))
            hostile.append((sign(elsewhere, key).encode(), "wrong-target"))
        topic = wire.device_topic(device, "desired")
        messages = [(topic, payload, code) for payload, code in hostile]
        for i in range(20):
            chunk = bytearray(wire.pack_chunk(rng.randbytes(1024)))
            chunk[rng.randrange(len(chunk))] ^= 0xFF  # damaged on the way
            sha = f"{i:064x}"
            messages.append((wire.chunk_topic(device, sha, 0), bytes(chunk), "chunk-hash"))
        rng.shuffle(messages)
        for topic, payload, _ in messages:
            events.publish(topic, payload)
        assert events.wait_for(lambda t, p: len(events.messages) >= len(messages), timeout=60)
        time.sleep(0.5)  # anything beyond one event per message would show now
        stop.set()
        client.join(10)

        codes = Counter(wire.decode(wire.Event, p).code for _, p in events.messages)
        assert codes == Counter(code for _, _, code in messages)
        assert sum(codes.values()) == 200 == agent.stats.refusals
        assert agent.stats.installs == 1  # the good state only
        assert failures == [] and served[0] > 0
        report = coordinator.reported[device]
        assert report.serial == good.serial and report.phase == "active"
        assert report.active == (exported["refs"]["tflite"].sha256,)
    finally:
        agent.stop()
        coordinator.stop()
