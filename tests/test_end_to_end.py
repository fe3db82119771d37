"""The first round for real: cloud -> Mosquitto -> two edge processes -> reported accuracy."""

import json
import subprocess
import time
from dataclasses import replace

import pytest
from cloud_trainer.fleet.deploy import wait_for_fleet

import eclm_wire as wire
from cloud_trainer.fleet.coordinator import FleetCoordinator
from cloud_trainer.fleet.keys import init_keys, load_signing_key, sign
from eclm_common.lifeline import popen
from edge_runtime.artifacts import ArtifactStore
from edge_runtime.backends import FORMAT_OF
from edge_runtime.cli import run_command

DEVICES = {"pi5-e2e": "rpi5", "pi4-e2e": "rpi4"}


def spawn(device_id, profile, url, tmp_path, exported):
    cmd = run_command(
        profile,
        url,
        device_id,
        tmp_path / device_id,
        eval_data=exported["test_npz"],
        trust_key=tmp_path / "keys" / "signing.pub",
    )
    log = open(tmp_path / f"{device_id}.log", "ab")
    return popen(cmd, stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture
def fleet(mosquitto, address, exported, tmp_path):
    private, _ = init_keys(tmp_path / "keys")
    procs = {
        device_id: spawn(device_id, profile, mosquitto.url, tmp_path, exported)
        for device_id, profile in DEVICES.items()
    }
    coordinator = FleetCoordinator(
        address,
        ArtifactStore(exported["store"]),
        client_id="cloud-e2e",
        signing_key=load_signing_key(private),
    ).start()
    yield coordinator, procs, tmp_path
    coordinator.stop()
    for proc in procs.values():
        proc.terminate()
        proc.wait(10)


@pytest.mark.slow
def test_two_devices_fetch_verify_run_and_report_accuracy(
    fleet, mosquitto, exported, collector_factory
):
    coordinator, procs, tmp_path = fleet
    refs = list(exported["refs"].values())

    serials = {d: coordinator.assign(d, refs, target=p).serial for d, p in DEVICES.items()}
    ok = wait_for_fleet(coordinator, serials, timeout=90)

    logs = {d: (tmp_path / f"{d}.log").read_text() for d in DEVICES}
    assert ok, logs
    reports = {d: coordinator.reported[d] for d in DEVICES}
    assert reports["pi5-e2e"].backend == "executorch"
    assert reports["pi4-e2e"].backend == "litert"
    for device_id, report in reports.items():
        assert report.accuracy > 0.9, device_id
        assert report.active == (exported["refs"][FORMAT_OF[report.backend]].sha256,)
        assert coordinator.online[device_id]

    # Bad input on the desired topic: each is refused with an event; the device keeps serving.
    events = collector_factory(wire.device_topic("pi5-e2e", "events"), client_id="e2e-events")
    desired_topic = wire.device_topic("pi5-e2e", "desired")
    good = json.loads(coordinator.assign("pi5-e2e", refs, target="rpi5").encode())
    wait_for_fleet(coordinator, {"pi5-e2e": good["serial"]}, timeout=30)
    bad_payloads = [
        b"\x00garbage",
        json.dumps({**good, "serial": "high"}).encode(),
        json.dumps({**good, "device_id": "pi4-e2e", "serial": good["serial"] + 1}).encode(),
        json.dumps({**good, "v": 99}).encode(),
        b"{" + b" " * wire.MAX_CONTROL_BYTES + b"}",
    ]
    # ... and states that parse but break the trust rules.
    key, state = coordinator.signing_key, wire.decode(wire.DesiredState, json.dumps(good).encode())
    bad_payloads += [
        json.dumps({**good, "serial": good["serial"] + 1}).encode(),  # altered after signing
        replace(state, serial=state.serial + 1, signature="").encode(),
        sign(replace(state, serial=state.serial + 1, expires=time.time() - 1), key).encode(),
        sign(replace(state, serial=state.serial + 1, target="rpi4"), key).encode(),
        sign(replace(state, serial=state.serial - 5), key).encode(),
    ]
    for payload in bad_payloads:
        events.publish(desired_topic, payload)
    got = events.wait_for(lambda t, p: len(events.messages) >= len(bad_payloads), timeout=15)
    assert got
    codes = [wire.decode(wire.Event, p).code for _, p in events.messages]
    assert codes == [
        "malformed",
        "invalid",
        "wrong-device",
        "version",
        "too-large",
        "bad-signature",
        "unsigned",
        "expired",
        "wrong-target",
        "replayed",
    ]
    assert coordinator.reported["pi5-e2e"].serial == good["serial"]

    # A newer state installs from the store.
    newer = coordinator.assign("pi5-e2e", refs, target="rpi5")
    assert wait_for_fleet(coordinator, {"pi5-e2e": newer.serial}, timeout=30)
    report = coordinator.reported["pi5-e2e"]
    assert report.phase == "active" and report.accuracy > 0.9
    assert all(proc.poll() is None for proc in procs.values())
    # The cloud saw the same junk on the desired topic and kept only what it signed.
    assert coordinator.desired["pi5-e2e"] == newer

    # Restarted, a device applies the retained state it accepted before, and still refuses
    # an older one (the newest serial it accepted is on its disk).
    procs["pi4-e2e"].terminate()
    procs["pi4-e2e"].wait(10)
    restart = time.time()
    procs["pi4-e2e"] = spawn("pi4-e2e", "rpi4", mosquitto.url, tmp_path, exported)
    assert coordinator.wait_until(
        lambda c: c.reported["pi4-e2e"].ts > restart and c.reported["pi4-e2e"].phase == "active",
        60,
    )
    assert coordinator.reported["pi4-e2e"].serial == serials["pi4-e2e"]


@pytest.mark.slow
def test_a_device_that_cannot_reach_the_broker_exits_with_a_clear_message(tmp_path):
    from broker import free_port

    result = subprocess.run(
        run_command(
            "rpi4", f"mqtt://127.0.0.1:{free_port()}", "lonely", tmp_path / "s", insecure=True
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 4
    assert "cannot reach the MQTT broker" in result.stderr
    assert "Traceback" not in result.stderr
