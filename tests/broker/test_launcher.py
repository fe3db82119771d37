import time

import paho.mqtt.client as paho
import pytest

from broker import Broker, BrokerConfig, render_acl, render_mosquitto_conf
from broker.errors import BrokerError
from eclm_wire.mqtt import BrokerAddress


def test_a_password_can_come_from_the_environment_instead_of_the_url(monkeypatch):
    monkeypatch.setenv("ECLM_BROKER_PASSWORD", "s3cret")

    assert BrokerAddress.parse("mqtts://pi4-a@broker:8883").password == "s3cret"
    assert BrokerAddress.parse("mqtts://pi4-a:inline@broker").password == "inline"
    assert BrokerAddress.parse("mqtt://broker").password is None


def roundtrip(url: str, retain: bool = False) -> bytes | None:
    address = BrokerAddress.parse(url)
    got: list[bytes] = []
    sub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="sub")
    sub.on_message = lambda c, u, m: got.append(m.payload)
    sub.connect(address.host, address.port)
    sub.loop_start()
    sub.subscribe("eclm/v1/test", qos=1)
    time.sleep(0.2)
    pub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="pub")
    pub.connect(address.host, address.port)
    pub.loop_start()
    pub.publish("eclm/v1/test", b"hello", qos=1, retain=retain).wait_for_publish(5)
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        time.sleep(0.02)
    for client in (pub, sub):
        client.loop_stop()
        client.disconnect()
    return got[0] if got else None


def test_mosquitto_starts_on_a_free_port_carries_messages_and_stops(mosquitto):
    assert mosquitto.kind == "mosquitto"
    assert roundtrip(mosquitto.url) == b"hello"


def test_the_embedded_broker_is_the_fallback(tmp_path):
    with Broker(kind="amqtt", data_dir=tmp_path) as broker:
        assert broker.kind == "amqtt"
        assert roundtrip(broker.url) == b"hello"
    assert broker.proc is None


def test_retained_state_survives_a_mosquitto_restart(tmp_path):
    broker = Broker(kind="mosquitto", data_dir=tmp_path).start()
    roundtrip(broker.url, retain=True)
    broker.stop()  # SIGTERM: Mosquitto writes its persistence file
    broker.start()
    try:
        address = BrokerAddress.parse(broker.url)
        got = []
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="late")
        client.on_message = lambda c, u, m: got.append(m.payload)
        client.connect(address.host, address.port)
        client.loop_start()
        client.subscribe("eclm/v1/test", qos=1)
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.02)
        client.loop_stop()
        client.disconnect()
    finally:
        broker.stop()
    assert got == [b"hello"]


def test_a_broken_config_fails_with_the_log_tail(tmp_path):
    broker = Broker(kind="mosquitto", data_dir=tmp_path)
    broker.config = BrokerConfig(
        port=broker.port, data_dir=tmp_path, password_file=tmp_path / "missing-passwords"
    )

    with pytest.raises(BrokerError, match="exited with code"):
        broker.start()


def test_config_has_limits_persistence_and_per_device_acl(tmp_path):
    config = BrokerConfig(
        port=1883, data_dir=tmp_path, max_packet_size=300_000, password_file=tmp_path / "passwd"
    )
    text = render_mosquitto_conf(config)
    acl = render_acl(config)

    assert "max_packet_size 300000" in text and "persistence true" in text
    assert "allow_anonymous false" in text and f"acl_file {tmp_path / 'acl'}" in text
    assert "pattern read eclm/v1/devices/%u/desired" in acl
    assert "pattern write eclm/v1/devices/%u/updates" in acl
    assert "%u/#" not in acl  # no device may reach every topic under its own id blindly


def test_with_logins_devices_are_bound_to_their_user_and_the_cloud_has_its_own_listener(
    tmp_path,
):
    config = BrokerConfig(port=8883, data_dir=tmp_path, password_file=tmp_path / "passwd")
    devices, cloud = render_mosquitto_conf(config).split("listener 8884 ")

    assert "per_listener_settings true" in devices and "listener 8883 " in devices
    assert f"password_file {tmp_path / 'passwd'}" in devices
    assert "use_username_as_clientid true" in devices
    assert f"password_file {tmp_path / 'cloud-passwd'}" in cloud
    assert "use_username_as_clientid" not in cloud and "allow_anonymous false" in cloud
    assert "use_username_as_clientid" not in render_mosquitto_conf(BrokerConfig(port=1883))
    with pytest.raises(ValueError, match="cloud_port"):
        BrokerConfig(port=8883, password_file=tmp_path / "passwd", cloud_port=8883)
