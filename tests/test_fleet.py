"""The fleet simulator: many real agents in one process on one network thread, each
program loaded once however many agents run it, and every connection back after a cut."""

from __future__ import annotations

import threading

import pytest
from cloud_trainer.fleet.deploy import wait_for_fleet
from cloudproc import wait
from netproxy import CutProxy

from cloud_trainer.fleet.coordinator import FleetCoordinator
from cloud_trainer.fleet.keys import init_keys, load_signing_key
from device_profiles import load_profile
from eclm_wire.mqtt import BrokerAddress
from edge_runtime.artifacts import ArtifactStore
from edge_runtime.fleet import FleetSimulator, make_devices

DEVICES = 20


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """A small modular model and the sub-model a Raspberry Pi Zero 2 W gets from it."""
    from cloud_trainer.export.plan import plan_device_modular
    from cloud_trainer.model.checkpoint import train_model

    root = tmp_path_factory.mktemp("fleet-model")
    train_model(root / "model", epochs=1)
    options, refs = plan_device_modular(root / "model", root / "store", load_profile("rpi-zero-2w"))
    return {"store": root / "store", "options": options, "refs": refs}


@pytest.mark.slow
def test_twenty_agents_share_one_network_thread_and_load_each_program_once(
    planned, mosquitto, tmp_path
):
    private, public = init_keys(tmp_path / "keys")
    cloud = FleetCoordinator(
        BrokerAddress.parse(mosquitto.url),
        ArtifactStore(planned["store"]),
        client_id="cloud",
        signing_key=load_signing_key(private),
    ).start()
    proxy = CutProxy(mosquitto.port)  # only the agents' connections go through it
    devices = make_devices(DEVICES, ["rpi-zero-2w"], prefix="fleet", pressure=0.0)
    sim = FleetSimulator(
        devices, BrokerAddress("127.0.0.1", proxy.port), tmp_path / "agents", trust_key=public
    )

    def assign() -> dict[str, int]:
        return {
            d.device_id: cloud.assign(
                d.device_id, planned["refs"], options=planned["options"], target="rpi-zero-2w"
            ).serial
            for d in devices
        }

    try:
        sim.start()
        wait(lambda: sim.connected() == DEVICES, 30, "every connection")
        names = [t.name for t in threading.enumerate()]
        assert not [n for n in names if n.startswith("paho-mqtt-client-fleet")]
        assert names.count("fleet-network") == 1

        serials = assign()
        assert wait_for_fleet(cloud, serials, timeout=120)
        assert all(a.report.serial == serials[d] for d, a in sim.agents.items())
        assert all(a.report.phase == "active" for a in sim.agents.values())
        offered = {r.sha256 for r in planned["refs"] if r.format == "tflite"}
        served = set().union(*(a.report.active for a in sim.agents.values()))
        loads = dict(sim.cache.loads)
        assert set(loads.values()) == {1}  # each program once, for twenty agents
        assert served <= {sha for _, sha in loads} <= offered
        assert sim.cache.loaded == len(loads)

        # Every connection is cut: each agent comes back on the same thread and takes a
        # new desired state; the programs it needs are held already, none loads again.
        assert proxy.cut() == DEVICES
        wait(lambda: sim.network.reconnects >= DEVICES, 30, "the reconnects")
        wait(lambda: sim.connected() == DEVICES, 30, "every connection again")
        again = assign()
        assert wait_for_fleet(cloud, again, timeout=120)
        assert all(a.report.serial == again[d] for d, a in sim.agents.items())
        assert dict(sim.cache.loads) == loads
    finally:
        sim.stop()
        cloud.stop()
        proxy.close()


@pytest.mark.slow
def test_agents_on_the_network_loop_log_in_as_themselves_over_tls(planned, tmp_path):
    from broker import Access, Broker

    access = Access(tmp_path / "access").init()
    devices = make_devices(5, ["rpi-zero-2w"], prefix="tls", pressure=0.0)
    passwords = {d.device_id: access.add_user(d.device_id) for d in devices}
    private, public = init_keys(tmp_path / "keys")
    with Broker(
        kind="mosquitto",
        data_dir=tmp_path / "broker",
        password_file=access.password_file,
        tls=access.tls,
    ) as broker:
        cafile = str(access.tls.cafile)
        address = BrokerAddress(broker.host, broker.port, True, cafile=cafile)
        cloud = FleetCoordinator(
            BrokerAddress(
                broker.host, broker.cloud_port, True, "cloud", access.password("cloud"), cafile
            ),
            ArtifactStore(planned["store"]),
            client_id="cloud",
            signing_key=load_signing_key(private),
        ).start()
        sim = FleetSimulator(
            devices, address, tmp_path / "agents", trust_key=public, passwords=passwords
        )
        try:
            sim.start()
            wait(lambda: sim.connected() == len(devices), 30, "every TLS connection")
            serials = {
                d.device_id: cloud.assign(
                    d.device_id, planned["refs"], options=planned["options"], target="rpi-zero-2w"
                ).serial
                for d in devices
            }
            assert wait_for_fleet(cloud, serials, timeout=120)
            assert all(cloud.online[d.device_id] for d in devices)
        finally:
            sim.stop()
            cloud.stop()
