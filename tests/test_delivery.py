"""Delivery over Mosquitto: a download cut short resumes after the chunks held, a chunk
damaged on the way is refused and fetched again, and a program that does not pass its
health check on the board is refused."""

import time
from dataclasses import replace

import numpy as np
import pytest

import eclm_wire as wire
from cloud_trainer.fleet.coordinator import FleetCoordinator
from device_profiles import load_profile
from edge_runtime.agent import AgentConfig, EdgeAgent
from edge_runtime.artifacts import ArtifactStore


@pytest.mark.slow
def test_an_interrupted_download_resumes_and_a_damaged_chunk_is_fetched_again(
    exported, address, collector_factory, tmp_path
):
    ref = exported["refs"]["tflite"]
    data = ArtifactStore(exported["store"]).read(ref.sha256)
    assert ref.chunk_count >= 4
    device = "pi4-resume"
    held = 3  # what an earlier run of this device wrote before it was stopped
    partial = ArtifactStore(tmp_path / device).download(ref)
    for index in range(held):
        partial.add(index, data[index * ref.chunk_size : (index + 1) * ref.chunk_size])

    spy = collector_factory(
        *(wire.device_topic(device, k) for k in ("fetch", "events", "status")), client_id="spy"
    )
    agent = EdgeAgent(
        AgentConfig(
            device_id=device,
            profile=load_profile("rpi4"),
            broker=address,
            store_dir=tmp_path / device,
            eval_data=exported["test_npz"],
            fetch_timeout=1.0,
            insecure=True,
        )
    ).start()
    coordinator = FleetCoordinator(address, ArtifactStore(exported["store"]), client_id="c-r")
    try:
        assert spy.wait_for(lambda t, p: t.endswith("/status"))  # subscribed before this
        # A chunk that arrives damaged (a flipped byte) before the cloud sends anything.
        good = wire.pack_chunk(data[held * ref.chunk_size : (held + 1) * ref.chunk_size])
        spy.publish(wire.chunk_topic(device, ref.sha256, held), good[:-1] + b"\x00")
        coordinator.start()
        desired = coordinator.assign(device, [ref])
        assert coordinator.wait_until(
            lambda c: device in c.reported and c.reported[device].phase == "active", 60
        ), coordinator.reported.get(device)

        fetches = [wire.decode(wire.FetchRequest, p) for t, p in spy.messages if "fetch" in t]
        events = [wire.decode(wire.Event, p) for t, p in spy.messages if "events" in t]
        assert fetches[0].first_chunk == held
        assert [e.code for e in events] == ["chunk-hash"]
        report = coordinator.reported[device]
        assert report.serial == desired.serial and report.active == (ref.sha256,)
        assert report.accuracy > 0.9
        scores = agent.predict(np.load(exported["test_npz"])["x"][:4])
        assert scores.shape == (4, 10)
    finally:
        agent.stop()
        coordinator.stop()


@pytest.mark.slow
def test_a_program_over_the_latency_budget_fails_its_health_check(exported, address, tmp_path):
    board = load_profile("rpi4")
    impatient = replace(board, budget=replace(board.budget, latency_ms=1e-4))
    ref = exported["refs"]["tflite"]
    agent = EdgeAgent(
        AgentConfig(
            device_id="pi4-slow",
            profile=impatient,
            broker=address,
            store_dir=tmp_path / "d",
            insecure=True,
        )
    ).start()
    coordinator = FleetCoordinator(address, ArtifactStore(exported["store"]), client_id="c-h")
    try:
        coordinator.start()
        coordinator.assign("pi4-slow", [ref])
        assert coordinator.wait_until(
            lambda c: "pi4-slow" in c.reported and c.reported["pi4-slow"].phase == "failed", 60
        )
        report = coordinator.reported["pi4-slow"]
        assert "health check" in report.detail and "budget 0.0001 ms" in report.detail
        assert report.active == () and agent.runner is None
    finally:
        agent.stop()
        coordinator.stop()


@pytest.mark.slow
def test_a_restart_after_a_failed_update_comes_back_serving_the_last_good_set(
    exported, address, tmp_path
):
    ref = exported["refs"]["tflite"]
    x = np.load(exported["test_npz"])["x"][:4]
    config, coordinator = _one_board("pi4-ab", exported, address, tmp_path)
    agent = EdgeAgent(config).start()
    try:
        good = coordinator.assign("pi4-ab", [ref])
        assert coordinator.wait_until(lambda c: _phase(c, "pi4-ab", good.serial) == "active", 60)
        broken = coordinator.add_artifact("broken", b"\x01" * 3000, "tflite")
        bad = coordinator.assign("pi4-ab", [broken])  # retained: a restart sees it again
        assert coordinator.wait_until(lambda c: _phase(c, "pi4-ab", bad.serial) == "failed", 60)
        expected = agent.predict(x)
        agent.stop()

        restarted = time.time()
        agent = EdgeAgent(config).start()  # the same board, restarted

        assert coordinator.wait_until(
            lambda c: (
                c.reported["pi4-ab"].ts > restarted and _phase(c, "pi4-ab", bad.serial) == "failed"
            ),
            60,
        )
        assert agent.runner is not None
        np.testing.assert_allclose(agent.predict(x), expected, rtol=1e-5, atol=1e-5)
        assert coordinator.reported["pi4-ab"].active == (ref.sha256,)
    finally:
        agent.stop()
        coordinator.stop()


def _one_board(device_id, exported, address, tmp_path):
    """An rpi4 agent's config and a started coordinator serving the exported programs."""
    config = AgentConfig(
        device_id, load_profile("rpi4"), address, tmp_path / device_id, insecure=True
    )
    store = ArtifactStore(exported["store"])
    return config, FleetCoordinator(address, store, client_id=f"c-{device_id}").start()


def _phase(coordinator, device_id, serial):
    report = coordinator.reported.get(device_id)
    return report.phase if report and report.serial == serial else None


@pytest.mark.slow
def test_a_device_offline_while_its_desired_state_changes_converges_on_reconnect(
    exported, address, tmp_path
):
    config, coordinator = _one_board("pi4-away", exported, address, tmp_path)
    agent = EdgeAgent(config).start()
    try:
        first = coordinator.assign("pi4-away", [exported["refs"]["tflite"]])
        assert coordinator.wait_until(lambda c: _phase(c, "pi4-away", first.serial) == "active", 60)
        agent.stop()
        assert coordinator.wait_until(lambda c: not c.online["pi4-away"], 10)
        both = [exported["refs"]["tflite"], exported["refs"]["pte"]]
        second = coordinator.assign("pi4-away", both)  # while the board is away

        agent = EdgeAgent(config).start()

        # The deadline the delivery issue sets for convergence after reconnecting.
        assert coordinator.wait_until(
            lambda c: _phase(c, "pi4-away", second.serial) == "active", 10
        )
        assert coordinator.online["pi4-away"]
    finally:
        agent.stop()
        coordinator.stop()
