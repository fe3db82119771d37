"""Staged rollouts over Mosquitto with real agents: a bad release stops after the canary
and one wave and the devices it reached go back; a good one reaches the whole fleet."""

import pytest

from cloud_trainer.coordinator import FleetCoordinator
from cloud_trainer.rollout import Rollout, RolloutPlan, Target
from device_profiles import load_profile
from edge_runtime import protocol as wire
from edge_runtime.agent import AgentConfig, EdgeAgent
from edge_runtime.artifacts import ArtifactStore

DEVICES = [f"fleet-{i}" for i in range(4)]
PLAN = RolloutPlan(canary=1, waves=(0.5, 1.0), max_failure_rate=0.5, min_reports=2)


@pytest.fixture
def fleet(exported, address, tmp_path):
    agents = [
        EdgeAgent(
            AgentConfig(
                device_id=d,
                profile=load_profile("rpi4"),
                broker=address,
                store_dir=tmp_path / d,
                backend="litert",
            )
        ).start()
        for d in DEVICES
    ]
    coordinator = FleetCoordinator(
        address, ArtifactStore(exported["store"]), client_id="cloud-rollout"
    ).start()
    v1 = exported["refs"]["tflite"]
    serials = {d: coordinator.assign(d, [v1]).serial for d in DEVICES}
    assert coordinator.wait_until(
        lambda c: all(
            d in c.reported and c.reported[d].serial == s and c.reported[d].phase == "active"
            for d, s in serials.items()
        ),
        60,
    )
    yield coordinator, v1, serials
    coordinator.stop()
    for agent in agents:
        agent.stop()


@pytest.mark.slow
def test_a_bad_release_stops_early_and_the_devices_it_reached_go_back(fleet, collector_factory):
    coordinator, v1, before = fleet
    broken = coordinator.add_artifact("broken", b"\x00" * 4096, "tflite")
    watcher = collector_factory(wire.rollout_topic("bad-1"), client_id="watch-bad")
    lines: list[str] = []

    final = Rollout(coordinator, "bad-1", {d: Target((broken,)) for d in DEVICES}, PLAN).run(
        lines.append
    )

    assert final.state == "aborted" and "failure rate 100%" in final.reason
    assert final.updated == tuple(DEVICES[:2]) == final.failed == final.reverted
    assert coordinator.wait_until(
        lambda c: all(
            c.reported[d].serial > before[d] and c.reported[d].phase == "active"
            for d in DEVICES[:2]
        ),
        30,
    )
    for d in DEVICES:
        assert coordinator.reported[d].active == (v1.sha256,)
    for d in DEVICES[2:]:  # never touched
        assert coordinator.reported[d].serial == before[d]
    assert lines[-1] == "returned 2 devices to their previous state"
    assert watcher.wait_for(
        lambda t, p: wire.decode(wire.RolloutState, p).state == "aborted", timeout=5
    )


@pytest.mark.slow
def test_a_good_release_reaches_every_device_wave_by_wave(fleet):
    coordinator, v1, before = fleet
    lines: list[str] = []

    final = Rollout(coordinator, "good-1", {d: Target((v1,)) for d in DEVICES}, PLAN).run(
        lines.append
    )

    assert final.state == "succeeded" and final.failed == ()
    assert sorted(final.succeeded) == DEVICES and final.wave == 2
    assert [line.split(":")[0] for line in lines] == ["wave 0", "wave 1", "wave 2"]
    assert all(coordinator.reported[d].serial > before[d] for d in DEVICES)


@pytest.mark.slow
def test_an_operator_abort_stops_the_rollout_after_the_current_wave(fleet, collector_factory):
    coordinator, v1, _ = fleet
    operator = collector_factory(client_id="operator")
    operator.publish(wire.rollout_abort_topic("stop-1"), b"{}")
    assert coordinator.wait_until(lambda c: "stop-1" in c.abort_requests, 5)

    final = Rollout(coordinator, "stop-1", {d: Target((v1,)) for d in DEVICES}, PLAN).run(
        lambda line: None
    )

    assert final.state == "aborted" and final.reason == "aborted by an operator"
    assert final.updated == (DEVICES[0],) and final.reverted == (DEVICES[0],)
