"""Sessions bound to identities, tried with the stock Mosquitto clients against a real
Mosquitto on the generated TLS, password and ACL config: a device that connects with
another device's client id, using its own valid login, gets its own session, so it can
neither close the other's connection nor take what is queued for it."""

import os
import subprocess
import time

import pytest

import eclm_wire as wire
from broker import Broker

ATTEMPTS = 100


@pytest.fixture(scope="module")
def secured(secured, tmp_path_factory):
    """The TLS+ACL broker of conftest, with a directory for the stock clients' files."""
    access, broker = secured
    return access, broker, tmp_path_factory.mktemp("clients")


def stock(tool: str, user: str, secured, *args: str, port: int | None = None):
    """argv and environment for ``mosquitto_<tool>`` logged in as ``user``: the login is in
    an owner-only options file the client reads from $XDG_CONFIG_HOME, never in argv."""
    access, broker, root = secured
    home = root / f"{user}-{tool}"
    home.mkdir(exist_ok=True)
    options = home / f"mosquitto_{tool}"
    options.touch(mode=0o600)
    options.write_text(f"-u {user}\n-P {access.password(user)}\n")
    argv = [f"mosquitto_{tool}", "-h", broker.host, "-p", str(port or broker.port)]
    argv += ["--cafile", str(access.tls.cafile), *args]
    return argv, {**os.environ, "XDG_CONFIG_HOME": str(home)}


def run(tool: str, user: str, secured, *args: str, port: int | None = None):
    argv, env = stock(tool, user, secured, *args, port=port)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)


def log_lines(broker: Broker, text: str, since: int) -> list[str]:
    lines = broker.log_path.read_text(errors="replace").splitlines()[since:]
    return [line for line in lines if text in line]


def log_length(broker: Broker) -> int:
    return len(broker.log_path.read_text(errors="replace").splitlines())


def publish_as_cloud(secured, topic: str, payload: str) -> None:
    done = run(
        "pub", "cloud", secured, "-q", "1", "-t", topic, "-m", payload, port=secured[1].cloud_port
    )
    assert done.returncode == 0, done.stderr


def test_a_device_cannot_take_over_another_devices_session(secured):
    _, broker, _ = secured
    topic = wire.device_topic("dev-a", "desired")
    since = log_length(broker)
    argv, env = stock("sub", "dev-a", secured, "-i", "dev-a", "-c", "-q", "1", "-t", topic)
    genuine = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while not log_lines(broker, "as dev-a", since) and time.monotonic() < deadline:
            time.sleep(0.05)

        refused = 0
        for i in range(ATTEMPTS):
            own = wire.device_topic("dev-b", "telemetry")
            attack = run(
                "pub", "dev-b", secured, "-i", "dev-a", "-c", "-q", "1", "-t", own, "-m", str(i)
            )
            refused += attack.returncode == 0  # connected, but as itself
        publish_as_cloud(secured, topic, "still-yours")
        line = genuine.stdout.readline().strip()

        assert refused == ATTEMPTS
        assert line == "still-yours"
        assert genuine.poll() is None
        assert len(log_lines(broker, "as dev-a", since)) == 1  # the genuine one, once
        assert len(log_lines(broker, "as dev-b", since)) == ATTEMPTS  # renamed to its user
        assert not log_lines(broker, "already connected", since)
    finally:
        genuine.terminate()
        genuine.wait(5)


def test_the_genuine_device_keeps_its_queued_messages(secured):
    _, broker, _ = secured
    topic = wire.device_topic("dev-a", "desired")
    subscribed = run("sub", "dev-a", secured, "-i", "dev-a", "-c", "-q", "1", "-t", topic, "-E")
    assert subscribed.returncode == 0, subscribed.stderr  # a persistent session, now offline
    for n in range(5):
        publish_as_cloud(secured, topic, f"queued-{n}")

    for i in range(ATTEMPTS):  # each would resume dev-a's session and drain its queue
        own = wire.device_topic("dev-b", "telemetry")
        run("pub", "dev-b", secured, "-i", "dev-a", "-c", "-q", "1", "-t", own, "-m", str(i))
    back = run(
        "sub", "dev-a", secured, "-i", "dev-a", "-c", "-q", "1", "-t", topic, "-C", "5", "-W", "10"
    )

    assert back.stdout.split() == [f"queued-{n}" for n in range(5)], back.stderr


def test_without_the_binding_the_same_attack_takes_the_session(secured, tmp_path):
    """The check above can fail: on a config without ``use_username_as_clientid``, one
    attempt closes the genuine device's connection."""
    access, _, _ = secured
    plain = Broker(
        kind="mosquitto", data_dir=tmp_path, password_file=access.password_file, tls=access.tls
    )
    conf = tmp_path / "mosquitto.conf"
    from broker.config import write_config

    write_config(plain.config)
    conf.write_text(conf.read_text().replace("use_username_as_clientid true", ""))
    # Broker.start() would write the config again: start Mosquitto on the edited one
    proc = subprocess.Popen([plain.binary, "-c", str(conf)], stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        loose = (access, plain, secured[2])
        topic = wire.device_topic("dev-a", "desired")
        argv, env = stock("sub", "dev-a", loose, "-i", "dev-a", "-c", "-q", "1", "-t", topic)
        genuine = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL)
        time.sleep(0.5)
        run("pub", "dev-b", loose, "-i", "dev-a", "-c", "-q", "1", "-t", "x", "-m", "1")
        time.sleep(0.3)
        genuine.terminate()
        genuine.wait(5)
    finally:
        proc.terminate()
        _, log = proc.communicate(timeout=5)
    assert "Client dev-a already connected, closing old connection" in log
