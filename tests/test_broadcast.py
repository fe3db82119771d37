"""Send once, fetch what is missing: a rollout wave gets each chunk of an artifact once on
its shared topic; a device that joins late or loses chunks repairs on its own topic; a
device cannot write a shared artifact topic."""

from __future__ import annotations

import time
from collections import Counter

import paho.mqtt.client as paho
import pytest
from cloudproc import wait
from netproxy import ChaosProxy
from small_program import mlp_program

import eclm_wire as wire
from cloud_trainer.export.plan import Target
from cloud_trainer.fleet.broadcast import BroadcastPolicy
from cloud_trainer.fleet.coordinator import FleetCoordinator
from cloud_trainer.fleet.deploy import wait_for_fleet
from cloud_trainer.fleet.rollout import Rollout, RolloutPlan
from device_profiles import load_profile
from eclm_wire.mqtt import BrokerAddress
from edge_runtime.agent import AgentConfig, EdgeAgent
from edge_runtime.artifacts import ArtifactStore
from edge_runtime.fleet import FleetSimulator, make_devices

CHUNK = 1024  # small chunks: the program travels in dozens of them


@pytest.fixture
def cloud(address, tmp_path):
    """A coordinator holding a real LiteRT program, cut in 1 KiB chunks."""
    coordinator = FleetCoordinator(
        address, ArtifactStore(tmp_path / "cloud"), client_id="cloud-bcast", chunk_size=CHUNK
    ).start()
    ref = coordinator.add_artifact("mlp.tflite", mlp_program(), "tflite")
    yield coordinator, ref
    coordinator.stop()


def shared_chunks(collector, sha: str) -> Counter[int]:
    """How many times each chunk of ``sha`` was published on its shared topic."""
    prefix = wire.artifact_topic(sha, "")
    return Counter(
        int(t[len(prefix) :]) for t, _ in list(collector.messages) if t.startswith(prefix)
    )


def own_chunks(coordinator: FleetCoordinator) -> int:
    """Chunks the cloud sent on devices' own topics."""
    return coordinator.client.traffic.messages["sent", "chunks"]


@pytest.mark.slow
def test_a_wave_of_twenty_gets_one_broadcast_of_each_chunk_and_converges(
    cloud, address, collector_factory, tmp_path
):
    coordinator, ref = cloud
    watcher = collector_factory(f"{wire.TOPIC_ROOT}/artifacts/#", client_id="watch-bcast")
    devices = make_devices(20, ["rpi4"], prefix="wave", pressure=0.0)
    sim = FleetSimulator(devices, address, tmp_path / "agents", insecure=True)
    try:
        sim.start()
        wait(lambda: sim.connected() == len(devices), 30, "every connection")
        plan = RolloutPlan(canary=len(devices), waves=(1.0,), wave_timeout=120)
        targets = {d.device_id: Target((ref,)) for d in devices}

        final = Rollout(coordinator, "bcast-1", targets, plan, settle=0).run(lambda _: None)

        assert final.state == "succeeded" and len(final.succeeded) == len(devices)
        assert all(a.report.phase == "active" for a in sim.agents.values())
        assert all(a.store.has(ref.sha256) for a in sim.agents.values())
        assert shared_chunks(watcher, ref.sha256) == Counter(
            dict.fromkeys(range(ref.chunk_count), 1)
        )
        done = [p for t, p in watcher.messages if t == wire.artifact_done_topic(ref.sha256)]
        assert [wire.decode(wire.BroadcastDone, p).devices for p in done] == [len(devices)]
        assert own_chunks(coordinator) == 0  # nobody had to repair
        assert sum(a.stats.broadcast_chunks for a in sim.agents.values()) == 20 * ref.chunk_count
        assert coordinator.broadcaster.sent[ref.sha256] == 1
    finally:
        sim.stop()


def agent(device_id: str, address, tmp_path, **options) -> EdgeAgent:
    config = AgentConfig(
        device_id,
        load_profile("rpi4"),
        address,
        tmp_path / device_id,
        backend="litert",
        insecure=True,
        **options,
    )
    return EdgeAgent(config).start()


@pytest.mark.slow
def test_late_and_cut_off_devices_repair_on_their_own_topic(
    address, mosquitto, collector_factory, tmp_path
):
    # A quiet wait long enough to cut one device off between its request and the broadcast.
    coordinator = FleetCoordinator(
        address,
        ArtifactStore(tmp_path / "cloud"),
        client_id="cloud-repair",
        chunk_size=CHUNK,
        broadcast=BroadcastPolicy(gather=1.5, gather_max=5.0),
    ).start()
    ref = coordinator.add_artifact("mlp.tflite", mlp_program(), "tflite")
    watcher = collector_factory(f"{wire.TOPIC_ROOT}/artifacts/#", client_id="watch-repair")
    proxy = ChaosProxy(mosquitto.port)
    early = [agent(f"early-{i}", address, tmp_path) for i in range(2)]
    cut = agent("cut-0", BrokerAddress("127.0.0.1", proxy.port), tmp_path, broadcast_wait=1.0)
    agents = [*early, cut]
    try:
        wait(lambda: proxy.connections >= 1, 10, "the cut device's connection")
        serials = {
            a.config.device_id: coordinator.assign(a.config.device_id, [ref]).serial for a in agents
        }
        wait(lambda: coordinator.broadcaster.requests >= 3, 10, "three shared requests")
        proxy.hold()  # the cut device asked; the broadcast has not started yet
        wait(lambda: coordinator.broadcaster.sent[ref.sha256] == 1, 20, "the broadcast")
        time.sleep(1.5)  # longer than its broadcast_wait: it asks on its own topic, held
        proxy.release(cut=True)
        assert wait_for_fleet(coordinator, serials, timeout=60)
        assert cut.stats.asked_chunks >= 1  # it repaired on its own topic ...
        assert own_chunks(coordinator) <= ref.chunk_count  # ... at most its missing chunks
        assert all(a.stats.asked_chunks == 0 for a in early)

        # A device that asks after the wave is alone in its gathering: it gets the
        # artifact on its own topic, and nothing more is broadcast. (The cut device's
        # shared request, sent again when it reconnected, is answered first.)
        time.sleep(0.5)
        wait(lambda: coordinator.broadcaster.idle, 20, "the cut device's repeated request")
        time.sleep(0.5)  # what the sender thread queued for it has gone out
        before = own_chunks(coordinator)
        late = agent("late-0", address, tmp_path)
        agents.append(late)
        serial = coordinator.assign("late-0", [ref]).serial
        assert wait_for_fleet(coordinator, {"late-0": serial}, timeout=60)
        assert own_chunks(coordinator) - before == ref.chunk_count
        assert late.stats.asked_chunks == 0
        assert max(shared_chunks(watcher, ref.sha256).values()) == 1
    finally:
        for a in agents:
            a.stop()
        coordinator.stop()
        proxy.close()


def test_a_device_cannot_publish_on_a_shared_artifact_topic(tmp_path):
    from broker import Access, Broker

    access = Access(tmp_path / "access").init()
    password = access.add_user("dev-1")
    sha = "ab" * 32
    with Broker(
        kind="mosquitto",
        data_dir=tmp_path / "broker",
        password_file=access.password_file,
        tls=access.tls,
    ) as broker:
        cafile = str(access.tls.cafile)
        got: list[str] = []

        def client(user: str, secret: str, port: int) -> paho.Client:
            c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=user)
            c.username_pw_set(user, secret)
            c.tls_set(ca_certs=cafile)
            c.on_message = lambda cl, u, m: got.append(f"{user}:{m.topic}")
            c.connect(broker.host, port)
            c.loop_start()
            return c

        device = client("dev-1", password, broker.port)
        cloud = client("cloud", access.password("cloud"), broker.cloud_port)
        try:
            for c in (device, cloud):
                c.subscribe(wire.artifact_subscription(sha), qos=1)
            time.sleep(0.5)
            device.publish(wire.artifact_topic(sha, 0), b"forged", qos=1).wait_for_publish(5)
            time.sleep(0.5)
            assert got == []  # the broker dropped the device's publish
            cloud.publish(wire.artifact_topic(sha, 0), b"real", qos=1).wait_for_publish(5)
            wait(lambda: f"dev-1:{wire.artifact_topic(sha, 0)}" in got, 10, "the cloud's chunk")
        finally:
            for c in (device, cloud):
                c.loop_stop()
                c.disconnect()
