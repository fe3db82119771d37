"""Chaos: while adapter updates stream up and integration rollouts go out, Mosquitto is
restarted three times (same port and data directory) and the agents' links are cut,
partitioned and partitioned-then-cut. Afterwards every device converges on the final
desired state and every update a device got a PUBACK for is in the service's database.
bench/chaos.py runs the same with 20 restarts and 20 cuts."""

from __future__ import annotations

import random
import time

import pytest
from chaos import ChaosFleet, Observer
from cloudproc import wait

from broker import Broker
from cloud_trainer.export.plan import Target
from cloud_trainer.fleet.coordinator import FleetCoordinator
from cloud_trainer.fleet.rollout import Rollout, RolloutPlan
from eclm_wire.mqtt import BrokerAddress
from edge_runtime.artifacts import ArtifactStore

FAULTS = ("restart", "cut", "restart", "partition", "restart", "partition+cut")


@pytest.mark.slow
def test_the_fleet_converges_and_loses_no_acknowledged_update_through_restarts_and_cuts(
    tmp_path, modular
):
    fleet = ChaosFleet(tmp_path, {"model_dir": modular["model_dir"], "store": modular["store"]})
    rng = random.Random(0)
    try:
        fleet.start()
        assert fleet.wait_converged(timeout=180) is not None, fleet.lagging()
        fleet.drive()
        for kind in FAULTS:
            fault = fleet.inject(kind, rng, wait_rollout=20)
            print(f"{kind}: converged after {fault.converge_s} s (rollout: {fault.during_rollout})")
            assert fault.converge_s is not None, (kind, fleet.lagging())
        end = fleet.settle()
        print(end)
        cuts, partitions = fleet.proxy.cuts, fleet.proxy.partitions
    finally:
        fleet.stop()

    assert end["converged"], end["lagging"]
    assert end["on_latest_version"] == fleet.devices and end["model_version"] >= 1
    assert end["acknowledged"] >= 3 * len(FAULTS)  # uploads went on through the faults
    assert end["lost"] == []
    assert set(end["refused"]) <= {"replayed"}  # redeliveries only, each stored once
    assert "running" not in end["rollouts"].values()
    assert any(f.during_rollout for f in fleet.faults)
    assert sum(f.kind == "restart" for f in fleet.faults) == 3
    assert cuts == 2 and partitions == 2  # a cut, a partition and one ending in a cut
    assert not end["errors"]


def test_the_cloud_keeps_publishing_while_the_broker_restarts(tmp_path):
    """A rollout that starts while the broker is down queues its desired states and its
    state (the service used to die of paho's "not currently connected"); they are
    retained once the broker is back."""
    broker = Broker(kind="mosquitto", data_dir=tmp_path / "broker").start()
    cloud = FleetCoordinator(
        BrokerAddress.parse(broker.url), ArtifactStore(tmp_path / "store"), client_id="c-down"
    ).start()
    observer = None
    try:
        wait(cloud.client.is_connected, 10, "the cloud to connect")
        ref = cloud.add_artifact("p.tflite", b"program" * 100, "tflite")
        broker.stop()
        wait(lambda: not cloud.client.is_connected(), 10, "the cloud to notice")
        plan = RolloutPlan(wave_timeout=0.5)
        started = time.monotonic()
        final = Rollout(cloud, "r-down", {"dev-down": Target((ref,))}, plan, settle=0).run(
            progress=lambda _: None
        )
        assert final.failed == ("dev-down",)  # no device answered; nothing raised
        assert time.monotonic() - started < 5  # queued, not waited for
        broker.start()
        observer = Observer(broker.port)
        wait(lambda: "dev-down" in observer.desired, 30, "the queued desired state")
    finally:
        if observer:
            observer.close()
        cloud.stop()
        broker.stop()


def test_the_proxy_delays_holds_and_cuts(tmp_path):
    """Against an echo server: a delay is added per chunk, a partition holds the bytes
    without closing and delivers them after, and one that ends in a cut closes."""
    import socket
    import threading

    from netproxy import ChaosProxy

    echo = socket.create_server(("127.0.0.1", 0))

    def answer(conn):
        while data := conn.recv(4096):
            conn.sendall(data)

    def serve():
        while True:
            try:
                conn, _ = echo.accept()
            except OSError:
                return
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    proxy = ChaosProxy(echo.getsockname()[1])
    try:
        link = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        proxy.delay = 0.2
        started = time.monotonic()
        link.sendall(b"ping")
        assert link.recv(4) == b"ping" and time.monotonic() - started >= 0.4  # both ways
        proxy.delay = 0.0
        proxy.hold()
        link.sendall(b"held")
        link.settimeout(0.5)
        with pytest.raises(TimeoutError):
            link.recv(4)
        proxy.release()
        link.settimeout(5)
        assert link.recv(4) == b"held"
        threading.Timer(0.3, proxy.release, kwargs={"cut": True}).start()
        proxy.hold()
        link.sendall(b"lost")
        assert link.recv(4) == b""  # closed, not delivered
        assert (proxy.cuts, proxy.partitions) == (1, 2)
    finally:
        proxy.close()
        echo.close()
