"""Staged rollouts over Mosquitto with real agents: a bad release stops after the canary
and one wave and the devices it reached go back; a good one reaches the whole fleet."""

import pytest

import eclm_wire as wire
from cloud_trainer.export.plan import Target
from cloud_trainer.fleet.coordinator import FleetCoordinator
from cloud_trainer.fleet.rollout import Rollout, RolloutPlan
from device_profiles import load_profile
from edge_runtime.agent import AgentConfig, EdgeAgent
from edge_runtime.artifacts import ArtifactStore

DEVICES = [f"fleet-{i}" for i in range(4)]
RINGS = (("ring=beta", "site=lab"), ("ring=stable",))
PLAN = RolloutPlan(canary=1, waves=(0.5, 1.0), max_failure_rate=0.5, min_reports=2)


def start_agents(devices, address, tmp_path):
    """Real agents in this process, one per device id, serving LiteRT programs; every
    other one is labelled ring=beta."""
    profile = load_profile("rpi4")
    return [
        EdgeAgent(
            AgentConfig(
                d,
                profile,
                address,
                tmp_path / d,
                backend="litert",
                labels=RINGS[i % 2],
                insecure=True,
            )
        ).start()
        for i, d in enumerate(devices)
    ]


@pytest.fixture
def fleet(exported, address, tmp_path):
    agents = start_agents(DEVICES, address, tmp_path)
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


@pytest.mark.slow
def test_twenty_devices_with_thirty_percent_failing_abort_and_roll_back(
    exported, address, tmp_path
):
    devices = [f"wide-{i:02d}" for i in range(20)]
    failing = set(devices[2::3][:6])  # 30%, spread over the fleet
    agents = start_agents(devices, address, tmp_path)
    coordinator = FleetCoordinator(
        address, ArtifactStore(exported["store"]), client_id="cloud-wide"
    ).start()
    try:
        v1 = exported["refs"]["tflite"]
        before = {d: coordinator.assign(d, [v1]).serial for d in devices}
        assert coordinator.wait_until(
            lambda c: all(_active_on(c, d, s) for d, s in before.items()), 90
        )
        broken = coordinator.add_artifact("broken", b"\x00" * 4096, "tflite")
        targets = {d: Target((broken if d in failing else v1,)) for d in devices}
        plan = RolloutPlan(canary=1, waves=(0.25, 0.5, 1.0), max_failure_rate=0.2, min_reports=3)

        final = Rollout(coordinator, "wide-1", targets, plan).run(lambda line: None)

        started = set(final.updated)
        assert final.state == "aborted" and final.wave == 1
        assert started == set(devices[:5]) and set(final.failed) == started & failing
        assert set(final.reverted) == started
        assert coordinator.wait_until(
            lambda c: all(
                c.reported[d].serial > before[d] and c.reported[d].phase == "active"
                for d in started
            ),
            30,
        )
        for d in devices:
            assert coordinator.reported[d].active == (v1.sha256,), d
            if d not in started:  # outside the waves that started: nothing new arrived
                assert coordinator.reported[d].serial == before[d]
                assert coordinator.desired[d].serial == before[d]
    finally:
        coordinator.stop()
        for agent in agents:
            agent.stop()


def _active_on(coordinator, device_id, serial):
    report = coordinator.reported.get(device_id)
    return report is not None and report.serial == serial and report.phase == "active"


@pytest.mark.slow
def test_the_cli_rolls_out_to_the_devices_of_a_profile_and_label_and_reports_it(
    fleet, modular, mosquitto, capsys
):
    from eclm.cli import main

    coordinator, _, before = fleet
    common = ["--broker", mosquitto.url]
    start = ["cloud", "rollout", "start", "cli-1", *common, "--model", str(modular["model_dir"])]
    start += ["--artifacts", str(modular["store"]), "--profile", "rpi4", "--unsigned"]
    beta = ["--label", "ring=beta", "--label", "site=lab"]

    assert main([*start, *beta, "--delivery", "fused", "--waves", "1"]) == 0
    out = capsys.readouterr().out
    assert "wave 1: 1 devices; 2 succeeded, 0 failed of 2" in out
    assert "rollout cli-1: succeeded" in out
    for i, d in enumerate(DEVICES):  # only the beta ring moved
        assert (coordinator.reported[d].serial > before[d]) == (i % 2 == 0), d
    assert main([*start, "--label", "ring=nowhere"]) == 2  # the selection names no device

    assert main(["cloud", "rollout", "status", "cli-1", *common]) == 0
    assert '"state": "succeeded"' in capsys.readouterr().out
    assert main(["cloud", "rollout", "status", "nothing-here", *common]) == 3
