"""Holding up under attack, against a real Mosquitto, with stock mosquitto_pub/_sub where
an attacker acts: damaged objects in a device's store are repaired with no hand work while
the last good set serves, 50 poisoned chunks do not stop a download, and a flood of
hostile messages gets a bounded number of events back."""

import os
import shutil
import subprocess
import threading
import time

import numpy as np
import pytest
import torch
from netproxy import ChaosProxy
from torch import nn

import eclm_wire as wire
from cloud_trainer.export.programs import export_litert
from cloud_trainer.fleet.coordinator import FleetCoordinator
from cloud_trainer.fleet.keys import init_keys, load_signing_key
from device_profiles import load_profile
from eclm_wire import EventCode
from eclm_wire.mqtt import BrokerAddress
from edge_runtime.agent import AgentConfig, EdgeAgent
from edge_runtime.artifacts import ArtifactStore, sha256_file
from edge_runtime.download import RetryPolicy
from edge_runtime.events import EventLimits

KINDS = ("flip", "truncate", "replace")


def small_program(seed: int) -> bytes:
    """A real LiteRT program (an MLP on 8x8 digits) of some 10 KB."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))
    return export_litert(net, torch.zeros(1, 64), name=f"mlp-{seed}")


@pytest.fixture(scope="module")
def programs():
    return [small_program(seed) for seed in (0, 1)]


@pytest.fixture
def cloud(tmp_path):
    private, public = init_keys(tmp_path / "keys")
    return {"key": load_signing_key(private), "public": public, "store": tmp_path / "cloud"}


def start_coordinator(address, cloud, name, **options) -> FleetCoordinator:
    store = ArtifactStore(cloud["store"])
    return FleetCoordinator(
        address, store, client_id=name, signing_key=cloud["key"], **options
    ).start()


def agent_config(device, address, tmp_path, cloud, **options) -> AgentConfig:
    return AgentConfig(
        device,
        load_profile("rpi4"),
        address,
        tmp_path / device,
        backend="litert",
        trust_key=cloud["public"],
        **options,
    )


def active(coordinator, device, serial) -> bool:
    report = coordinator.reported.get(device)
    return report is not None and report.serial == serial and report.phase == "active"


def damage(path, kind: str, other: bytes, trial: int) -> None:
    data = bytearray(path.read_bytes())
    if kind == "flip":
        data[trial * 7919 % len(data)] ^= 1 << (trial % 8)
    elif kind == "truncate":
        del data[len(data) - 1 - trial % (len(data) // 2) :]
    else:  # another real program under this one's name
        data = bytearray(other)
    path.write_bytes(bytes(data))


class Server:
    """Inference in a loop on another thread, every failure kept."""

    def __init__(self, agent: EdgeAgent) -> None:
        self.agent, self.served, self.failures = agent, 0, []
        self.x = np.random.default_rng(0).random((1, 64), dtype=np.float32)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                assert np.isfinite(self.agent.predict(self.x)).all()
                self.served += 1
            except Exception as exc:  # every failure counts
                self.failures.append(exc)
            time.sleep(0.001)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def events_of(collector, code: str) -> list[wire.Event]:
    found = [wire.decode(wire.Event, p) for t, p in list(collector.messages) if "events" in t]
    return [e for e in found if e.code == code]


@pytest.mark.slow
def test_a_damaged_object_is_repaired_in_100_of_100_trials_while_the_last_good_set_serves(
    programs, address, collector_factory, tmp_path, cloud
):
    device = "pi4-heal"
    coordinator = start_coordinator(address, cloud, "c-heal", chunk_size=4096)
    ref = coordinator.add_artifact("mlp.tflite", programs[0], "tflite")
    agent = EdgeAgent(agent_config(device, address, tmp_path, cloud)).start()
    events = collector_factory(wire.device_topic(device, "events"), client_id="heal-events")
    server = None
    try:
        first = coordinator.assign(device, [ref], target="rpi4")
        assert coordinator.wait_until(lambda c: active(c, device, first.serial), 60)
        server = Server(agent)
        path, repaired = agent.store.path(ref.sha256), 0
        started = time.perf_counter()
        for trial in range(100):
            damage(path, KINDS[trial % 3], programs[1], trial)
            assert sha256_file(path) != ref.sha256
            desired = coordinator.assign(device, [ref], target="rpi4")  # refers to it
            assert coordinator.wait_until(lambda c, s=desired.serial: active(c, device, s), 30)
            repaired += sha256_file(path) == ref.sha256
        elapsed = time.perf_counter() - started
        server.stop()
        print(f"repaired {repaired} of 100 in {elapsed:.1f} s; {server.served} inferences")

        assert repaired == 100
        assert server.failures == [] and server.served > 100
        assert events.wait_for(lambda t, p: len(events_of(events, "artifact-damaged")) >= 100)
        assert len(events_of(events, "artifact-damaged")) == 100 == agent.stats.repairs
        assert len(list((agent.store.root / "damaged").iterdir())) <= 8  # the latest kept
    finally:
        if server:
            server.stop()
        agent.stop()
        coordinator.stop()


@pytest.mark.slow
def test_a_device_whose_every_set_is_damaged_comes_back_when_the_chunks_arrive(
    programs, address, collector_factory, tmp_path, cloud
):
    device = "pi4-wreck"
    config = agent_config(device, address, tmp_path, cloud, fetch_timeout=0.5)
    coordinator = start_coordinator(address, cloud, "c-wreck", chunk_size=4096)
    refs = [
        coordinator.add_artifact(f"mlp-{i}.tflite", p, "tflite") for i, p in enumerate(programs)
    ]
    agent = EdgeAgent(config).start()
    try:
        for ref in refs:  # serial A, then B: B is active, A the fallback
            desired = coordinator.assign(device, [ref], target="rpi4")
            assert coordinator.wait_until(lambda c, s=desired.serial: active(c, device, s), 60)
        agent.stop()
        coordinator.stop()
        store = ArtifactStore(tmp_path / device)
        damage(store.path(refs[1].sha256), "flip", b"", 3)

        # Only the active set is damaged: the one before it serves at once, no cloud up.
        agent = EdgeAgent(config).start()
        deadline = time.monotonic() + 30
        while agent.report.phase != "downloading" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert agent.report.serial == desired.serial  # on its way back, while A serves
        assert agent.runner is not None and agent.runner.active == (refs[0].sha256,)
        agent.stop()

        # Every set damaged: nothing to serve until the cloud's chunks come.
        damage(store.path(refs[0].sha256), "truncate", b"", 1)  # B is still set aside
        assert not any(
            store.has(r.sha256) and sha256_file(store.path(r.sha256)) == r.sha256 for r in refs
        )
        agent = EdgeAgent(config).start()
        time.sleep(1.0)
        assert agent.runner is None and agent.report.phase == "downloading"
        coordinator = start_coordinator(address, cloud, "c-wreck-2", chunk_size=4096)
        assert coordinator.wait_until(lambda c: active(c, device, desired.serial), 60)
        assert agent.runner.active == (refs[1].sha256,)
        assert store.verify(refs[1].sha256).value == "good"
    finally:
        agent.stop()
        coordinator.stop()


def attacker(address: BrokerAddress, device: str, ref: wire.ArtifactRef, count: int) -> dict:
    """Stock clients: mosquitto_sub watches the device's fetch requests and mosquitto_pub
    answers the first ``count`` of them with a chunk whose own hash holds but whose bytes
    are wrong. Returns what it did so far (updated from its thread)."""
    where = ["-h", address.host, "-p", str(address.port)]
    sub = subprocess.Popen(
        [shutil.which("mosquitto_sub"), *where, "-t", wire.device_topic(device, "fetch")],
        stdout=subprocess.PIPE,
        text=True,
    )
    done = {"sent": 0}

    def answer() -> None:
        for line in sub.stdout:
            request = wire.decode(wire.FetchRequest, line.strip())
            index = request.first_chunk
            size = min(ref.chunk_size, ref.size - index * ref.chunk_size)
            topic = wire.chunk_topic(device, request.sha256, index)
            lie = wire.pack_chunk(os.urandom(size))
            pub = [shutil.which("mosquitto_pub"), *where, "-q", "1", "-t", topic, "-s"]
            subprocess.run(pub, input=lie, check=True)
            done["sent"] += 1
            if done["sent"] >= count:
                break
        sub.terminate()

    threading.Thread(target=answer, daemon=True).start()
    time.sleep(0.3)  # subscribed
    return done


@pytest.mark.slow
def test_fifty_poisoned_chunks_in_a_row_do_not_stop_a_download_that_then_completes(
    programs, mosquitto, address, collector_factory, tmp_path, cloud
):
    device = "pi4-poison"
    proxy = ChaosProxy(address.port)
    proxy.delay = 0.15  # the genuine cloud answers late: every lie arrives first
    slow = BrokerAddress("127.0.0.1", proxy.port)
    coordinator = start_coordinator(slow, cloud, "c-poison", chunk_size=1024)
    ref = coordinator.add_artifact("mlp.tflite", programs[0], "tflite")
    retry = RetryPolicy(budget=3, backoff=0.05, max_backoff=0.2)
    config = agent_config(device, address, tmp_path, cloud, retry=retry, fetch_timeout=2.0)
    events = collector_factory(wire.device_topic(device, "events"), client_id="poison-events")
    agent = EdgeAgent(config).start()
    done = attacker(address, device, ref, 50)
    try:
        started = time.perf_counter()
        desired = coordinator.assign(device, [ref], target="rpi4")
        assert coordinator.wait_until(lambda c: active(c, device, desired.serial), 120), (
            coordinator.reported.get(device),
            done,
        )
        print(
            f"{done['sent']} poisoned chunks, "
            f"{len(events_of(events, 'transfer-retry'))} failed attempts, "
            f"completed in {time.perf_counter() - started:.1f} s ({ref.chunk_count} chunks)"
        )
        assert done["sent"] == 50
        assert agent.store.read(ref.sha256) == programs[0]
        retries = events_of(events, EventCode.TRANSFER_RETRY)
        assert retries and all("does not match" in e.reason for e in retries)
        assert [int(e.reason.split("attempt ")[1].split(":")[0]) for e in retries] == list(
            range(1, len(retries) + 1)
        )
    finally:
        agent.stop()
        coordinator.stop()
        proxy.close()


@pytest.mark.slow
def test_a_flood_of_hostile_messages_gets_a_bounded_number_of_events_back(
    programs, address, collector_factory, tmp_path, cloud
):
    device, flood = "pi4-flood", 600
    limits = EventLimits(rate=5.0, burst=10, summary_every=1.0)
    coordinator = start_coordinator(address, cloud, "c-flood", chunk_size=4096)
    ref = coordinator.add_artifact("mlp.tflite", programs[0], "tflite")
    agent = EdgeAgent(agent_config(device, address, tmp_path, cloud, events=limits)).start()
    events = collector_factory(wire.device_topic(device, "events"), client_id="flood-events")
    try:
        desired = coordinator.assign(device, [ref], target="rpi4")
        assert coordinator.wait_until(lambda c: active(c, device, desired.serial), 60)
        server = Server(agent)
        lines = "".join(f"not json {i}\n" for i in range(flood))
        where = ["-h", address.host, "-p", str(address.port), "-q", "1"]
        started = time.monotonic()
        subprocess.run(  # one stock client, one message a line
            [shutil.which("mosquitto_pub"), *where, "-t", wire.device_topic(device, "desired")]
            + ["-l"],
            input=lines.encode(),
            check=True,
        )

        def accounted(*_) -> bool:
            told = len(events_of(events, "malformed"))
            summed = sum(int(e.reason.split()[0]) for e in events_of(events, "events-suppressed"))
            return told + summed >= flood

        assert events.wait_for(accounted, 30)
        elapsed = time.monotonic() - started
        server.stop()
        told = len(events_of(events, "malformed"))
        summaries = events_of(events, "events-suppressed")
        print(f"{flood} refused in {elapsed:.1f} s: {told} events, {len(summaries)} summaries")
        assert told <= limits.burst + limits.rate * elapsed + 1
        assert 1 <= len(summaries) <= elapsed / limits.summary_every + 1
        assert told + sum(int(e.reason.split()[0]) for e in summaries) == flood
        assert server.failures == [] and agent.report.serial == desired.serial
    finally:
        agent.stop()
        coordinator.stop()


def test_an_insecure_device_says_so_in_its_retained_state(address, collector_factory, tmp_path):
    device = "pi4-open"
    config = AgentConfig(device, load_profile("rpi4"), address, tmp_path / device, insecure=True)
    agent = EdgeAgent(config).start()
    try:
        reported = collector_factory(wire.device_topic(device, "reported"), client_id="open")
        found = reported.wait_for(lambda t, p: wire.decode(wire.ReportedState, p).insecure)
        assert found, reported.messages
    finally:
        agent.stop()


def test_a_device_refuses_to_run_without_a_trust_key_unless_told_insecure(tmp_path):
    with pytest.raises(ValueError, match="no trust key"):
        AgentConfig("pi4-x", load_profile("rpi4"), BrokerAddress("127.0.0.1", 1), tmp_path)
