"""``eclm cloud serve`` as a process over a real Mosquitto, with real edge agents: it
assigns sub-models, keeps every acknowledged update across SIGKILL, closes the round on
its quorum, re-trains the head on it in two torch.distributed processes, resumes the
rollout of that head after another SIGKILL without reissuing a serial, serves /metrics
and /healthz, and exits 0 on SIGTERM.
"""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
from cloudproc import Cloud, wait

import eclm_wire as wire
from device_profiles import load_profile
from edge_runtime.agent import AgentConfig, EdgeAgent
from edge_runtime.learning import LearnerConfig

DEVICES = ("dev-a", "dev-b", "dev-c")


@pytest.fixture
def cloud(tmp_path, modular, mosquitto):
    sections = {
        "aggregation": 'strategy = "trimmed-mean"\nquorum = 3\ndeadline = 600.0',
        "rollout": "canary = 1\nwaves = [1.0]\nwave_timeout = 120.0",
        "integration": "retrain = true\nworkers = 2\nepochs = 30",  # on torch.distributed
    }
    made = Cloud(tmp_path / "cloud", modular, mosquitto.url, **sections)
    yield made
    made.stop()


def agent(name: str, tmp_path, address, public) -> EdgeAgent:
    config = AgentConfig(
        name,
        load_profile("rpi4"),
        address,
        tmp_path / name,
        backend="litert",
        trust_key=public,
        learning=LearnerConfig(upload_every=1),  # every batch of labels is uploaded
    )
    return EdgeAgent(config).start()


def upload(device: EdgeAgent, x, y) -> None:
    """Serve a batch, learn from its labels: the device uploads its adapter."""
    uploads = device.stats.uploads
    device.infer(x, "clean")
    device.learn(x, y)
    assert device.stats.uploads == uploads + 1


@pytest.mark.slow
def test_the_service_resumes_aggregation_and_rollouts_after_sigkill(
    cloud, modular, address, tmp_path
):
    test = np.load(modular["model_dir"] / "test.npz")
    x, y = test["x"], test["y"]
    cloud.start()
    agents = {d: agent(d, tmp_path, address, cloud.public) for d in DEVICES}
    try:
        # A device that reports with no desired state gets its sub-model.
        wait(lambda: all(a.report.phase == "active" for a in agents.values()), 120, "assignment")
        first = {d: a.report.serial for d, a in agents.items()}
        state = cloud.state()

        # Mid-aggregation: two of the three updates the round needs, then SIGKILL.
        upload(agents["dev-a"], x[:16], y[:16])
        upload(agents["dev-b"], x[16:32], y[16:32])
        wait(lambda: [r.devices for r in state.rounds("open")] == [2], what="two stored updates")
        assert cloud.kill() == -signal.SIGKILL
        cloud.start()
        assert [r.devices for r in state.rounds("open")] == [2]

        # The third update closes the round; its rollout reaches dev-c while it is away.
        upload(agents["dev-c"], x[32:48], y[32:48])
        agents["dev-c"].stop()

        def waiting_for_dev_c():
            record = state.rollouts().get("integrate-1")
            r = record and json.loads(record)
            return r and r["state"]["wave"] == 1 and "dev-c" in r["serials"] and r

        record = wait(waiting_for_dev_c, 120, "wave 1 of the integration rollout")
        assert (
            record["state"]["succeeded"][:1] == ["dev-a"] and record["state"]["state"] == "running"
        )
        given = record["serials"]["dev-c"]

        # Mid-rollout: SIGKILL; the next start resumes the wave and dev-c comes back.
        assert cloud.kill() == -signal.SIGKILL
        cloud.start()
        agents["dev-c"] = agent("dev-c", tmp_path, address, cloud.public)

        wait(lambda: state.latest_version()[0] == 1, 120, "model version 1")
        final = state.rollout_states()["integrate-1"]
        assert final.state == "succeeded" and sorted(final.succeeded) == list(DEVICES)
        assert agents["dev-c"].report.serial == given  # resumed, not reissued
        assert all(agents[d].report.serial > first[d] for d in DEVICES)
        assert state.updates_by_worker() == {"cloud-1": 3}  # each update stored once
        wait(lambda: not state.rounds("closed") and len(state.rounds("done")) == 1)

        metrics = cloud.get("/metrics")
        assert "eclm_model_version 1.0" in metrics
        assert "eclm_updates_accepted_total 3.0" in metrics
        assert "eclm_updates_redelivered_total" in metrics  # after the SIGKILL: 0 or more
        assert 'eclm_fleet_devices{phase="active",version="1"} 3.0' in metrics
        assert 'eclm_rollout_devices{outcome="succeeded",rollout="integrate-1"} 3.0' in metrics
        assert json.loads(cloud.get("/healthz"))["leader"] is True

        assert cloud.kill(signal.SIGTERM) == 0
        log = cloud.log.read_text()
        assert "re-trained on clean in 2 processes" in log
        assert '"msg": "stopped: worker cloud-1"' in log
    finally:
        for a in agents.values():
            a.stop()


@pytest.mark.slow
def test_an_update_with_an_unknown_base_is_refused_and_counted(cloud, modular, address):
    cloud.start()
    weights = {"weight": np.zeros((10, 512), np.float32), "bias": np.zeros(10, np.float32)}
    from eclm_wire.codec import tensor_bytes
    from eclm_wire.mqtt import connect, make_client

    device = make_client("dev-x", address)
    connect(device, address)
    device.loop_start()
    message = wire.AdapterUpdate(
        device_id="dev-x",
        domain="clean",
        base="12345",
        samples=1,
        histogram=(1,) + (0,) * 9,
        weights=tensor_bytes(weights),
    )
    device.publish(wire.device_topic("dev-x", "updates"), message.encode(), qos=1)
    state = cloud.state()
    wait(lambda: state.counters("rejected:").get("unknown-base") == 1, 20, "the refusal")
    assert 'eclm_updates_rejected_total{reason="unknown-base"} 1.0' in cloud.get("/metrics")
    device.loop_stop()
    device.disconnect()
