"""Collaborative inference: the device runs its programs to a layer boundary, the cloud
runs the rest of the full model. Split execution against the torch model, the offload
round trip over a real Mosquitto, the deadline fallback with the cloud gone, and replies
that do not come from the cloud (refused by the ACL) or do not fit (refused by the device)."""

import time
import zlib

import numpy as np
import pytest
import torch

import eclm_wire as wire
from cloud_trainer.export.plan import plan_device_modular
from cloud_trainer.fleet.coordinator import FleetCoordinator
from cloud_trainer.fleet.deploy import wait_for_fleet
from cloud_trainer.service.offload import OffloadServer
from device_profiles import load_profile
from eclm_wire import features
from eclm_wire.mqtt import BrokerAddress, make_client
from edge_runtime.agent import AgentConfig, EdgeAgent
from edge_runtime.artifacts import ArtifactStore
from edge_runtime.backends import FORMAT_OF, get_backend
from edge_runtime.composer import ComposedModel
from edge_runtime.errors import BackendError, ConfigError
from edge_runtime.offload import OffloadConfig, Offloader, tune_threshold, unsure

BACKEND = {"pte": "executorch", "tflite": "litert"}


def composed_full(modular, fmt: str) -> ComposedModel:
    backend = get_backend(BACKEND[fmt], threads=1)
    store = ArtifactStore(modular["store"])
    programs = {
        r.part: backend.load(store.path(r.ref.sha256))
        for r in modular["records"]
        if r.variant == f"{fmt}-fp32"
    }
    net = modular["net"]
    return ComposedModel(programs, net.full_selection(), net.layout())


@pytest.mark.parametrize("fmt", ["pte", "tflite"])
def test_device_prefix_and_cloud_suffix_equal_the_full_model(modular, fmt):
    net = modular["net"]
    x = np.load(modular["model_dir"] / "test.npz")["x"][:24]
    model = composed_full(modular, fmt)
    with torch.no_grad():
        full = net(torch.from_numpy(x)).numpy()

    for split in range(len(net.full_selection()) + 1):
        boundary = model.prefix(x, split)
        with torch.no_grad():
            logits = net.suffix(torch.from_numpy(boundary), split).numpy()
        assert np.abs(logits - full).max() <= 1e-4, split
    with pytest.raises(BackendError, match="boundaries"):
        model.prefix(x, 3)


def test_features_travel_as_int8_within_half_a_scale_and_refuse_what_does_not_fit():
    x = np.random.default_rng(0).normal(size=(5, 32, 8, 8)).astype(np.float32)

    small, exact = features.encode("r-1", 1, x), features.encode("r-1", 1, x, dtype="float32")
    got = features.decode(small)

    assert (got.request_id, got.split, got.dtype) == ("r-1", 1, "int8")
    assert np.abs(got.tensor - x).max() <= np.abs(x).max() / 127 / 2 + 1e-6
    assert np.array_equal(features.decode(exact).tensor, x)
    assert len(small) < len(exact) / 3
    for bad in (small[:-3], small + b"\0", small[:20], b"ECLF" + small[4:9], b"x" * 40):
        with pytest.raises(wire.ProtocolError):
            features.decode(bad)
    with pytest.raises(wire.ProtocolError, match="limit"):
        features.decode(small, max_bytes=100)


def test_the_gate_threshold_offloads_the_share_asked_for():
    logits = np.random.default_rng(1).normal(size=(1000, 10)) * 3

    for gate in ("margin", "entropy"):
        threshold = tune_threshold(logits, 0.2, gate)
        assert 0.18 <= unsure(logits, gate, threshold).mean() <= 0.2
    with pytest.raises(ConfigError):
        OffloadConfig(policy="sometimes")


def forged(request_id: str, shape, fill: float) -> bytes:
    """A float32 answer frame whose values are ``fill`` (NaN passes no encoder)."""
    zeros = np.zeros(shape, np.float32)
    frame = features.encode(request_id, 0, zeros, dtype="float32")
    head = frame[: len(frame) - len(zlib.compress(zeros.tobytes(), 1))]
    return head + zlib.compress(np.full(shape, fill, np.float32).tobytes(), 1)


@pytest.fixture(scope="module")
def serving(modular, mosquitto, tmp_path_factory):
    """A device serving its largest module set on LiteRT, with offloading always on."""
    address = BrokerAddress.parse(mosquitto.url)
    profile = load_profile("rpi5")
    options, refs = plan_device_modular(modular["model_dir"], modular["store"], profile)
    refs = [r for r in refs if r.format == FORMAT_OF["litert"]]
    coordinator = FleetCoordinator(
        address, ArtifactStore(modular["store"]), client_id="cloud-offload"
    ).start()
    always = OffloadConfig(policy="always", split=0, dtype="float32", deadline_ms=10_000)
    agent = EdgeAgent(
        AgentConfig(
            device_id="pi5-offload",
            profile=profile,
            broker=address,
            store_dir=tmp_path_factory.mktemp("offload-device"),
            backend="litert",
            insecure=True,
            offload=always,
        )
    ).start()
    try:
        serial = coordinator.assign(agent.config.device_id, refs, options=options).serial
        assert wait_for_fleet(coordinator, {agent.config.device_id: serial}, timeout=60)
        yield agent, address
    finally:
        agent.stop()
        coordinator.stop()


def test_offloaded_samples_get_the_full_models_answer(serving, modular, collector_factory):
    agent, address = serving
    net = modular["net"]
    x = np.load(modular["model_dir"] / "test.npz")["x"][:16]
    hostile = collector_factory(client_id="hostile-device")
    infer = wire.device_topic("pi5-other", "infer")
    cloud = OffloadServer(net, address, client_id="offload-a", window_ms=2).start()
    try:
        assert cloud.subscribed.wait(10)
        hostile.publish(infer, b"not a frame")
        hostile.publish(infer, features.encode("r-1", 0, np.ones((2, 3, 4, 4))))  # shape
        hostile.publish(infer, features.encode("r-2", 9, np.ones((2, 32, 8, 8))))  # split
        scores = np.concatenate([agent.predict(x[i : i + 4]) for i in range(0, 16, 4)])
        deadline = time.monotonic() + 10
        while cloud.counts["refused"] < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        cloud.shutdown()
    with torch.no_grad():
        full = net(torch.from_numpy(x)).numpy()

    assert agent.offload.counts["answered"] == 16, agent.offload.counts
    assert np.abs(scores - full).max() <= 1e-4  # split 0, float32: the whole model's logits
    assert cloud.counts["answered"] == 4 and cloud.counts["refused"] == 3, cloud.counts


def test_with_the_cloud_gone_every_prediction_is_answered_locally(serving, modular):
    agent, _ = serving
    x = np.load(modular["model_dir"] / "test.npz")["x"][:40]
    agent.offload = Offloader(
        agent.client, agent.config.device_id, OffloadConfig(policy="always"), 50.0
    )
    local = agent.runner.predict(x)

    scores = [agent.predict(x[i : i + 2]) for i in range(0, 40, 2)]

    assert all(s.shape == (2, 10) and np.isfinite(s).all() for s in scores)
    assert np.array_equal(np.concatenate(scores), local)
    counts = agent.offload.counts
    assert counts["late"] + counts["skipped"] == 40 and counts["answered"] == 0
    assert counts["skipped"] > 0  # after a few misses it stops waiting for the cloud


def test_forged_answers_are_refused_by_the_device(serving, modular, collector_factory):
    agent, _ = serving
    device = agent.config.device_id
    x = np.load(modular["model_dir"] / "test.npz")["x"][:3]
    gated = OffloadConfig(policy="gated", threshold=2.0, deadline_ms=2000)  # every sample
    agent.offload = Offloader(agent.client, device, gated, 0.0)
    forger = collector_factory(wire.device_topic(device, "infer"), client_id="forger")

    def answer_forged(client, userdata, msg):
        rid = features.decode(msg.payload).request_id
        for payload in (
            features.encode("not-" + rid, 0, np.zeros((3, 10)), dtype="float32"),
            features.encode(rid, 0, np.zeros((2, 10)), dtype="float32"),
            forged(rid, (3, 10), np.nan),
        ):
            client.publish(wire.device_topic(device, "answer"), payload, qos=0)

    forger.client.on_message = answer_forged
    local = agent.runner.predict(x)

    scores = agent.predict(x)

    deadline = time.monotonic() + 10
    while agent.offload.counts["refused"] < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert np.array_equal(scores, local)
    assert agent.offload.counts["refused"] == 3 and agent.offload.counts["answered"] == 0


def test_only_the_cloud_can_answer_a_device(secured):
    access, broker = secured
    cafile = str(access.tls.cafile)

    def session(user: str, port: int):
        got: list[tuple[str, bytes]] = []
        address = BrokerAddress(broker.host, port, True, user, access.password(user), cafile)
        client = make_client(f"acl-{user}-{time.monotonic_ns()}", address)
        client.on_message = lambda c, u, m: got.append((m.topic, m.payload))
        client.connect(broker.host, port)
        client.loop_start()
        return client, got

    cloud, cloud_got = session("cloud", broker.cloud_port)
    a, a_got = session("dev-a", broker.port)
    b, _ = session("dev-b", broker.port)
    answer = wire.device_topic("dev-a", "answer")
    try:
        time.sleep(0.5)
        a.subscribe(answer, qos=1)
        cloud.subscribe(wire.all_devices_topic("infer"), qos=1)
        time.sleep(0.3)
        b.publish(answer, b"from dev-b", qos=1)
        a.publish(answer, b"from dev-a itself", qos=1)
        a.publish(wire.device_topic("dev-a", "infer"), b"request", qos=1)
        b.publish(wire.device_topic("dev-a", "infer"), b"posing as dev-a", qos=1)
        cloud.publish(answer, b"from the cloud", qos=1)
        deadline = time.monotonic() + 5
        while (not a_got or not cloud_got) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # time for anything that should not arrive

        assert a_got == [(answer, b"from the cloud")]
        assert cloud_got == [(wire.device_topic("dev-a", "infer"), b"request")]
    finally:
        for client in (cloud, a, b):
            client.loop_stop()
            client.disconnect()
