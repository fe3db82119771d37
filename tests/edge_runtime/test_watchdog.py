"""The systemd notify protocol: datagrams on a real unix socket, from the notifier and from
an agent connected to Mosquitto."""

import os
import socket
import tempfile
import time
from pathlib import Path

import pytest

from device_profiles import load_profile
from edge_runtime.agent import AgentConfig, EdgeAgent
from edge_runtime.watchdog import Notifier


class Listener:
    """A unix datagram socket standing in for systemd's notify socket."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.05)
        self.received: list[bytes] = []

    def drain(self) -> list[bytes]:
        while True:
            try:
                self.received.append(self.sock.recv(4096))
            except TimeoutError:
                return self.received

    def wait_for(self, datagram: bytes, count: int = 1, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while self.drain().count(datagram) < count and time.monotonic() < deadline:
            pass
        return self.received.count(datagram)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listener():
    made = Listener(f"@eclm-test-{os.getpid()}-{time.monotonic_ns()}")
    yield made
    made.close()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_ready_watchdog_at_half_the_interval_and_stopping_reach_an_abstract_socket(listener):
    clock = Clock()
    notifier = Notifier(listener.address, watchdog_usec=2_000_000, clock=clock)

    sent = [notifier.ready("connected"), notifier.ping()]
    clock.now += 0.9
    sent.append(notifier.ping())  # before half of 2 s: nothing
    clock.now += 0.1
    sent += [notifier.ping(), notifier.stopping()]

    assert sent == [True, True, False, True, True]
    assert listener.drain() == [
        b"READY=1\nSTATUS=connected",
        b"WATCHDOG=1",
        b"WATCHDOG=1",
        b"STOPPING=1",
    ]


def test_a_path_socket_works_and_a_vanished_one_does_not_raise():
    with tempfile.TemporaryDirectory(prefix="n") as tmp:  # short: sun_path holds 108 bytes
        path = str(Path(tmp) / "notify")
        listener = Listener(path)
        notifier = Notifier(path)
        assert notifier.ready() and listener.drain() == [b"READY=1"]
        listener.close()
        os.unlink(path)

        assert notifier.ready() is False
        assert notifier.ping() is False  # no WatchdogSec: no pings


@pytest.mark.parametrize(
    "environ, enabled, interval",
    [
        ({}, False, None),
        ({"NOTIFY_SOCKET": "relative/path"}, False, None),
        ({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "30000000"}, True, 15.0),
        ({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "soon"}, True, None),
        ({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, True, None),
        (
            {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())},
            True,
            2.0,
        ),
    ],
)
def test_the_environment_decides_what_is_sent(environ, enabled, interval):
    notifier = Notifier.from_env(environ)

    assert notifier.enabled is enabled
    assert notifier.interval == interval
    notifier.close()


def test_an_agent_says_ready_once_connected_pings_while_its_loop_turns_and_says_stopping(
    listener, address, tmp_path, monkeypatch
):
    monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # a ping each turn of the worker loop
    agent = EdgeAgent(
        AgentConfig(
            device_id="notify-1",
            profile=load_profile("rpi-zero-2w"),
            broker=address,
            store_dir=tmp_path / "store",
            insecure=True,
        )
    )
    assert listener.drain() == []

    agent.start()
    try:
        ready = listener.wait_for(b"READY=1\nSTATUS=connected to " + str(address).encode())
        pings = listener.wait_for(b"WATCHDOG=1", count=2)
    finally:
        agent.stop()

    assert ready == 1
    assert pings >= 2
    assert listener.wait_for(b"STOPPING=1") == 1
