"""The HTTPS content source: a real TLS server holding content-addressed objects, a
download cut mid-way resumed with Range, tokens that keep it private, and an agent that
takes its sub-model from the server its signed desired state names."""

from __future__ import annotations

import os
import time

import pytest
from cloudproc import wait
from netproxy import ChaosProxy
from small_program import mlp_program

import eclm_wire as wire
from broker import Access
from cloud_trainer.fleet.content import device_token, load_secret, serve_content
from cloud_trainer.fleet.coordinator import FleetCoordinator
from cloud_trainer.fleet.deploy import wait_for_fleet
from device_profiles import load_profile
from edge_runtime.agent import AgentConfig, EdgeAgent
from edge_runtime.artifacts import ArtifactStore
from edge_runtime.content import ContentAccess, HttpFetch


@pytest.fixture
def server(tmp_path):
    """A TLS content server on the cloud's store, its certificate from a broker access
    directory, tokens made from a fresh secret."""
    access = Access(tmp_path / "access").init()
    store = ArtifactStore(tmp_path / "cloud")
    secret = load_secret(tmp_path / "content.secret")
    tls = access.tls
    http = serve_content(store, "127.0.0.1", 0, cert=tls.certfile, key=tls.keyfile, secret=secret)
    yield store, http.server_port, secret, tls.cafile
    http.shutdown()
    http.server_close()


def ref_of(store: ArtifactStore, data: bytes, fmt: str = "tflite") -> wire.ArtifactRef:
    return wire.ArtifactRef(name="big", sha256=store.put(data), size=len(data), format=fmt)


def test_a_download_cut_mid_way_resumes_with_range(server, tmp_path):
    store, port, secret, cafile = server
    data = os.urandom(32 * 1024 * 1024)  # far more than the socket buffers hold
    ref = ref_of(store, data)
    proxy = ChaosProxy(port)
    proxy.delay = 0.002  # per 64 KB forwarded: about a second in all, so the cut lands mid-way
    device = ArtifactStore(tmp_path / "device")
    access = ContentAccess(token=device_token(secret, "dev-1"), cafile=cafile, timeout=1.0)
    try:
        fetch = HttpFetch(device, [ref], f"https://127.0.0.1:{proxy.port}", access).start()
        wait(lambda: fetch.received > 0, 30, "the first bytes")
        proxy.hold()  # the link goes quiet mid-way: the read times out
        time.sleep(1.5)
        proxy.release(cut=True)
        assert fetch.finished.wait(60)
    finally:
        proxy.close()

    assert fetch.ok, fetch.error
    assert device.read(ref.sha256) == data
    assert fetch.resumed >= 1  # asked again from where it was cut ...
    assert fetch.received == len(data)  # ... so no byte came twice


def test_without_a_token_of_ours_the_server_refuses(server, tmp_path):
    store, port, secret, cafile = server
    ref = ref_of(store, b"x" * 5000)
    device = ArtifactStore(tmp_path / "device")
    forged = device_token(b"another secret of 32 characters..", "dev-1")
    for token in ("", forged):
        access = ContentAccess(token=token, cafile=cafile, attempts=1)
        fetch = HttpFetch(device, [ref], f"https://127.0.0.1:{port}", access).start()
        assert fetch.finished.wait(30)
        assert not fetch.ok and "401" in fetch.error
    assert not device.has(ref.sha256)


@pytest.mark.slow
def test_an_agent_takes_its_program_from_the_content_server_its_state_names(
    server, address, tmp_path
):
    store, port, secret, cafile = server
    data = mlp_program()
    coordinator = FleetCoordinator(
        address, store, client_id="cloud-content", source=f"https://127.0.0.1:{port}"
    ).start()
    ref = coordinator.add_artifact("mlp.tflite", data, "tflite")
    config = AgentConfig(
        "content-1",
        load_profile("rpi4"),
        address,
        tmp_path / "content-1",
        backend="litert",
        insecure=True,
        content=ContentAccess(token=device_token(secret, "content-1"), cafile=cafile),
    )
    agent = EdgeAgent(config).start()
    try:
        serial = coordinator.assign("content-1", [ref]).serial
        assert wait_for_fleet(coordinator, {"content-1": serial}, timeout=60)
        assert agent.stats.http_bytes == len(data)
        assert agent.stats.asked_chunks == agent.stats.broadcast_chunks == 0
        assert coordinator.client.traffic.messages["sent", "chunks"] == 0
    finally:
        agent.stop()
        coordinator.stop()


def test_new_settings_are_checked_when_built(tmp_path):
    from cloud_trainer.errors import ConfigError as CloudConfigError
    from cloud_trainer.service.config import load_config
    from edge_runtime.errors import ConfigError

    with pytest.raises(ConfigError, match="broadcast_wait"):
        AgentConfig("d-1", load_profile("rpi4"), None, tmp_path, insecure=True, broadcast_wait=-1)
    with pytest.raises(ConfigError, match="content token"):
        ContentAccess(token="two words")
    for text, where in (
        ("[content]\nenabled = true\n", "cert and key"),
        ('[content]\nenabled = true\ncert = "c"\nkey = "k"\nurl = "http://x"\n', "content.url"),
        ("[broadcast]\ngather = 5.0\ngather_max = 1.0\n", "gather"),
        ("[broadcast]\ngather = nan\n", "nan"),
    ):
        path = tmp_path / "cloud.toml"
        path.write_text(text)
        with pytest.raises(CloudConfigError, match=where):
            load_config(path)
    with pytest.raises(wire.ProtocolError, match="source"):
        wire.DesiredState(
            device_id="d-1",
            serial=1,
            artifacts=(ref_of(ArtifactStore(tmp_path / "s"), b"y" * 2000),),
            source="http://plain.example/objects",
        )
