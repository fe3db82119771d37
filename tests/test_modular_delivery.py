"""Modular delivery: per-module programs over Mosquitto, and the agent's budget policy
switching module sets when the board's free memory drops and comes back."""

import threading

import numpy as np
import pytest
from cloud_trainer.fleet.deploy import wait_for_fleet

from cloud_trainer.export.plan import plan_device_modular
from cloud_trainer.fleet.coordinator import FleetCoordinator
from device_profiles import load_profile
from edge_runtime.agent import AgentConfig, EdgeAgent
from edge_runtime.artifacts import ArtifactStore
from edge_runtime.backends import FORMAT_OF
from edge_runtime.composer import part_names
from edge_runtime.monitor import Reading, ResourceSource


class Dial(ResourceSource):
    """A board whose free memory the test turns up and down (no real board to starve)."""

    def __init__(self, available_mb: float) -> None:
        self.available_mb = available_mb

    def read(self) -> Reading:
        return Reading(available_mb=self.available_mb)


def allowing(kb: float) -> float:
    """Free memory (MB) under which the policy allows the model ``kb`` (a quarter of it)."""
    return kb * 4 / 1024


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["litert", "executorch"])
def test_a_memory_drop_swaps_to_a_smaller_module_set_while_serving(
    backend, modular, mosquitto, address, tmp_path
):
    profile = load_profile("rpi5")
    options, refs = plan_device_modular(modular["model_dir"], modular["store"], profile)
    largest, smallest = options[0], options[-1]
    assert len(options) >= 2 and largest.memory_kb > smallest.memory_kb
    refs = [r for r in refs if r.format == FORMAT_OF[backend]]

    def parts_of(option):
        return {r.sha256 for r in refs if r.part in part_names(option.selection)}

    dial = Dial(allowing(10 * largest.memory_kb))
    test = np.load(modular["model_dir"] / "test.npz")
    coordinator = FleetCoordinator(
        address, ArtifactStore(modular["store"]), client_id=f"cloud-{backend}"
    ).start()
    agent = EdgeAgent(
        AgentConfig(
            device_id=f"pi5-{backend}",
            profile=profile,
            broker=address,
            store_dir=tmp_path / "device",
            eval_data=modular["model_dir"] / "test.npz",
            backend=backend,
            insecure=True,
            policy_interval=0.05,
        ),
        resources=dial,
    ).start()
    try:
        device = agent.config.device_id
        serial = coordinator.assign(device, refs, options=options).serial
        assert wait_for_fleet(coordinator, {device: serial}, timeout=60)
        report = coordinator.reported[device]
        assert set(report.active) == parts_of(largest)
        assert report.accuracy > 0.95

        errors, served = [], [0]
        stop = threading.Event()

        def serve():
            while not stop.is_set():
                try:
                    scores = agent.predict(test["x"][:8])
                    assert scores.shape == (8, 10) and np.isfinite(scores).all()
                    served[0] += 1
                except Exception as exc:  # every failure counts
                    errors.append(exc)

        client = threading.Thread(target=serve)
        client.start()
        try:
            dial.available_mb = allowing(smallest.memory_kb + 1)
            assert coordinator.wait_until(
                lambda c: set(c.reported[device].active) == parts_of(smallest), 30
            ), coordinator.reported[device]
            assert agent.runner.policy.current.memory_kb <= smallest.memory_kb + 1
            dial.available_mb = allowing(10 * largest.memory_kb)
            assert coordinator.wait_until(
                lambda c: set(c.reported[device].active) == parts_of(largest), 30
            ), coordinator.reported[device]
        finally:
            stop.set()
            client.join(10)
        assert errors == [] and served[0] > 0
        assert "allowed now" in coordinator.reported[device].detail
        accuracy = (agent.predict(test["x"]).argmax(1) == test["y"]).mean()
        assert accuracy > 0.95
    finally:
        agent.stop()
        coordinator.stop()
