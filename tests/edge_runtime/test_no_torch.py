"""edge_runtime runs on a LiteRT-only board: torch is never imported."""

import json
import subprocess
import sys
import textwrap
import time

import pytest
from cloud_trainer.fleet.deploy import wait_for_fleet

import eclm_wire as wire
from cloud_trainer.fleet.coordinator import FleetCoordinator
from eclm_common.lifeline import popen
from edge_runtime.artifacts import ArtifactStore

AGENT_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path

    class NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "executorch", "torchao", "litert_torch"):
                raise ImportError(f"{name} is not installed on this board")

    sys.meta_path.insert(0, NoTorch())
    from device_profiles import load_profile
    from edge_runtime.agent import AgentConfig, EdgeAgent
    from eclm_wire.mqtt import BrokerAddress

    url, store, eval_data, stop = sys.argv[1:5]
    agent = EdgeAgent(AgentConfig(device_id="zero-1", profile=load_profile("rpi4"),
                                  broker=BrokerAddress.parse(url), store_dir=Path(store),
                                  eval_data=Path(eval_data), insecure=True)).start()
    deadline = time.monotonic() + 90
    while not Path(stop).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    agent.stop()
    print(json.dumps({"torch": [m for m in sys.modules if m.split(".")[0] == "torch"],
                      "phase": agent.report.phase, "backend": agent.report.backend,
                      "accuracy": agent.report.accuracy}))
""")


@pytest.mark.slow
def test_a_litert_agent_installs_serves_and_rejects_without_torch(
    mosquitto, address, exported, tmp_path, collector_factory
):
    stop = tmp_path / "stop"
    proc = popen(
        [
            sys.executable,
            "-c",
            AGENT_SCRIPT,
            mosquitto.url,
            str(tmp_path / "store"),
            str(exported["test_npz"]),
            str(stop),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    events = collector_factory(wire.device_topic("zero-1", "events"), client_id="nt-events")
    with FleetCoordinator(address, ArtifactStore(exported["store"]), client_id="nt-cloud") as fc:
        # Both formats are offered; rpi4 prefers LiteRT and must not even try ExecuTorch.
        desired = fc.assign("zero-1", list(exported["refs"].values()))
        active = wait_for_fleet(fc, {"zero-1": desired.serial}, timeout=60)
        events.publish(wire.device_topic("zero-1", "desired"), b"not json")
        got = events.wait_for(lambda t, p: True, timeout=10)
    time.sleep(0.2)
    stop.touch()
    out, err = proc.communicate(timeout=30)

    assert active, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["torch"] == []
    assert result["phase"] == "active" and result["backend"] == "litert"
    assert result["accuracy"] > 0.9
    assert got and wire.decode(wire.Event, got[0][1]).code == "malformed"
