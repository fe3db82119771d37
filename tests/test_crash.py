"""The agent killed with SIGKILL at random points while it applies a new desired state
(downloading, verifying, loading, health-checking, committing) restarts into a consistent
active set every time, and then converges on what the cloud wants."""

import collections
import json
import random
import signal
import subprocess
import time

import pytest

import eclm_wire as wire
from cloud_trainer.export.plan import export_fused_for
from cloud_trainer.fleet.coordinator import FleetCoordinator
from eclm_common.lifeline import popen
from edge_runtime.artifacts import ArtifactStore, sha256_file
from edge_runtime.cli import run_command

KILLS = 50
DEVICE = "pi4-crash"


def start_agent(url: str, store, log) -> subprocess.Popen:
    cmd = run_command("rpi4", url, DEVICE, store, backend="litert", insecure=True)
    return popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def check_consistent(store) -> int | None:
    """The serial of the active set on disk (None before the first): every artifact it
    names is held whole, and every artifact held matches its name."""
    objects = store / "objects"
    for path in objects.iterdir() if objects.exists() else ():
        assert sha256_file(path) == path.name, f"{path.name} is damaged"
    try:
        active = wire.decode(wire.DesiredState, (store / "active.json").read_bytes())
    except FileNotFoundError:
        return None
    for ref in active.artifacts:
        assert ArtifactStore(store).has(ref.sha256), f"active artifact {ref.name} is missing"
    return active.serial


def phase_at_kill(store, serial: int) -> str:
    """What the agent last said it was doing with ``serial`` ("before": not started on it)."""
    try:
        report = json.loads((store / "reported.json").read_text())
    except FileNotFoundError:
        return "before"
    return report["phase"] if report["serial"] == serial else "before"


def up(coordinator, since: float, serial: int | None = None) -> bool:
    """The agent started after ``since`` has reported (and serves ``serial``, if given)."""
    report = coordinator.reported.get(DEVICE)
    if report is None or report.ts < since:
        return False
    return serial is None or (report.serial == serial and report.phase == "active")


@pytest.mark.slow
def test_sigkill_at_50_random_points_of_an_install_leaves_a_consistent_active_set(
    modular, exported, mosquitto, address, tmp_path
):
    sub_models = [((0,), (1,)), ((1,), (2,)), ((2,), (3,)), exported["modules"]]
    refs = [
        export_fused_for(modular["model_dir"], exported["store"], m, "tflite") for m in sub_models
    ]
    store = tmp_path / DEVICE
    coordinator = FleetCoordinator(address, ArtifactStore(exported["store"]), client_id="c-kill")
    coordinator.start()
    rng = random.Random(50)
    killed_in: collections.Counter[str] = collections.Counter()
    with open(tmp_path / "agent.log", "ab") as log:
        since = time.time()
        agent = start_agent(mosquitto.url, store, log)
        try:
            assert coordinator.wait_until(lambda c: up(c, since), 30)
            began = time.time()  # how long one apply takes here, end to end
            desired = coordinator.assign(DEVICE, [refs[-1]])
            assert coordinator.wait_until(lambda c: up(c, since, desired.serial), 30)
            window = time.time() - began
            for kill in range(KILLS):
                desired = coordinator.assign(DEVICE, [refs[kill % len(refs)]])
                time.sleep(rng.uniform(0.0, window))
                agent.send_signal(signal.SIGKILL)
                agent.wait()
                killed_in[phase_at_kill(store, desired.serial)] += 1
                check_consistent(store)
                since = time.time()
                agent = start_agent(mosquitto.url, store, log)
                assert coordinator.wait_until(
                    lambda c, s=desired.serial, t=since: up(c, t, s), 60
                ), coordinator.reported.get(DEVICE)
                assert check_consistent(store) == desired.serial
        finally:
            agent.send_signal(signal.SIGTERM)
            agent.wait(timeout=30)
            coordinator.stop()
    print(f"{KILLS} kills in {window:.2f} s applies, by phase: {dict(killed_in)}")
    assert killed_in["downloading"] + killed_in["verifying"] + killed_in["installing"] >= 10
