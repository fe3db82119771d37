"""Per-device access on a real Mosquitto: TLS only, passwords, and ACLs that keep each
device to its own topics."""

import stat
import threading
import time

import pytest

import eclm_wire as wire
from broker import Broker
from broker.errors import ConfigError
from eclm_wire.mqtt import BrokerAddress, make_client


class Session:
    """A connected client recording what arrives, or why it could not connect."""

    def __init__(
        self, broker: Broker, username: str | None, password: str | None, *, tls=True, port=None
    ):
        port = port or broker.port
        self.address = BrokerAddress(
            broker.host, port, tls, username, password, str(broker.config.tls.cafile)
        )
        self.messages: list[tuple[str, bytes]] = []
        self.result: str | None = None
        connected = threading.Event()
        self.client = make_client(f"s-{username}-{tls}-{time.monotonic_ns()}", self.address)
        self.client.reconnect_delay_set(60, 60)  # no retry storm while a test looks

        def on_connect(client, userdata, flags, reason_code, properties):
            self.result = str(reason_code)
            connected.set()

        def on_disconnect(client, userdata, flags, reason_code, properties):
            self.result = self.result or f"disconnected: {reason_code}"
            connected.set()

        self.client.on_connect = on_connect
        self.client.on_disconnect = on_disconnect
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload))
        try:
            self.client.connect(broker.host, port)
        except OSError as exc:
            self.result = f"refused: {exc}"
            return
        self.client.loop_start()
        connected.wait(5)

    @property
    def ok(self) -> bool:
        return self.result == "Success"

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_the_access_directory_keeps_secrets_owner_only(secured):
    access, _ = secured

    for path in (access.dir / "ca.key", access.dir / "server.key", access.password_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE((access.dir / "credentials" / "dev-a.json").stat().st_mode) == 0o600
    assert access.password("dev-a") not in access.password_file.read_text()
    with pytest.raises(ConfigError, match="--force"):
        access.init()
    with pytest.raises(ValueError):
        access.add_user("no/slashes")


def test_plaintext_and_wrong_passwords_are_refused(secured):
    access, broker = secured

    plain = Session(broker, "dev-a", access.password("dev-a"), tls=False)
    wrong = Session(broker, "dev-a", "not-the-password")
    nobody = Session(broker, None, None)

    assert broker.url.startswith("mqtts://")
    for session in (plain, wrong, nobody):
        assert not session.ok, session.result
        session.close()


def test_each_device_reads_and_writes_only_its_own_topics(secured):
    access, broker = secured
    cloud = Session(broker, "cloud", access.password("cloud"), port=broker.cloud_port)
    a = Session(broker, "dev-a", access.password("dev-a"))
    b = Session(broker, "dev-b", access.password("dev-b"))
    try:
        assert cloud.ok and a.ok and b.ok
        cloud.client.subscribe(wire.all_devices_topic("reported"), qos=1)
        for topic in (wire.device_topic("dev-a", "desired"), wire.device_topic("dev-b", "desired")):
            a.client.subscribe(topic, qos=1)
        b.client.subscribe(wire.device_topic("dev-b", "desired"), qos=1)
        time.sleep(0.3)

        for device in ("dev-a", "dev-b"):
            topic = wire.device_topic(device, "desired")
            cloud.client.publish(topic, device.encode(), qos=1).wait_for_publish(5)
        a.client.publish(wire.device_topic("dev-a", "reported"), b"mine", qos=1)
        a.client.publish(wire.device_topic("dev-b", "reported"), b"forged", qos=1)
        deadline = time.monotonic() + 5
        while (len(b.messages) < 1 or len(cloud.messages) < 1) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # time for anything that should not arrive

        assert a.messages == [(wire.device_topic("dev-a", "desired"), b"dev-a")]
        assert b.messages == [(wire.device_topic("dev-b", "desired"), b"dev-b")]
        assert cloud.messages == [(wire.device_topic("dev-a", "reported"), b"mine")]
    finally:
        for session in (cloud, a, b):
            session.close()


@pytest.mark.slow
def test_a_device_gets_its_sub_model_through_tls_passwords_and_acls(secured, exported, tmp_path):
    from cloud_trainer.fleet.coordinator import FleetCoordinator
    from cloud_trainer.fleet.keys import init_keys, load_signing_key
    from device_profiles import load_profile
    from edge_runtime.agent import AgentConfig, EdgeAgent
    from edge_runtime.artifacts import ArtifactStore

    access, broker = secured
    cafile = str(access.tls.cafile)
    private, public = init_keys(tmp_path / "keys")
    cloud = BrokerAddress(
        broker.host, broker.cloud_port, True, "cloud", access.password("cloud"), cafile
    )
    device = BrokerAddress(
        broker.host, broker.port, True, "dev-a", access.password("dev-a"), cafile
    )
    agent = EdgeAgent(
        AgentConfig(
            device_id="dev-a",
            profile=load_profile("rpi4"),
            broker=device,
            store_dir=tmp_path / "dev-a",
            eval_data=exported["test_npz"],
            trust_key=public,
        )
    ).start()
    coordinator = FleetCoordinator(
        cloud,
        ArtifactStore(exported["store"]),
        client_id="cloud-secured",
        signing_key=load_signing_key(private),
    ).start()
    try:
        desired = coordinator.assign("dev-a", [exported["refs"]["tflite"]], target="rpi4")
        assert coordinator.wait_until(
            lambda c: (
                "dev-a" in c.reported
                and c.reported["dev-a"].serial == desired.serial
                and c.reported["dev-a"].phase == "active"
            ),
            60,
        ), coordinator.reported.get("dev-a")
        assert coordinator.reported["dev-a"].accuracy > 0.9
        assert coordinator.online["dev-a"]
    finally:
        agent.stop()
        coordinator.stop()


def test_access_add_prints_where_the_password_is_never_the_password(tmp_path, capsys):
    import json

    from eclm.cli import main

    directory = tmp_path / "access"
    assert main(["broker", "access", "init", "--dir", str(directory)]) == 0
    assert main(["broker", "access", "add", "pi4-kitchen", "--dir", str(directory)]) == 0
    out = capsys.readouterr().out

    path = directory / "credentials" / "pi4-kitchen.json"
    password = json.loads(path.read_text())["password"]
    cloud = json.loads((directory / "credentials" / "cloud.json").read_text())["password"]
    assert str(path) in out
    assert password not in out and cloud not in out
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
