"""Rolling a 1 MB module out to N agents, against the broker's raw fan-out of the bytes.

    python bench/rollout.py [--devices 50] [--size-kb 1024] [--chunk-kb 128] [--cut 5]

One Mosquitto on loopback. First N real edge agents (in this process, one MQTT connection
each) get a real LiteRT program of about 1 MB through a staged rollout (canary, then the
rest): desired state, chunked windowed fetch with hashes, verify, load, health check,
report. The cloud sends each artifact once per wave on its shared topic; ``--cut`` agents
reach the broker through a proxy that drops their connections once the broadcast is under
way, and they fetch what they then miss on their own topics. Printed: bytes out of the
cloud against (waves x module size), and the chunks the cut devices had to ask for. Then N
``mosquitto_sub`` processes get the same bytes in the same chunks from ``mosquitto_pub``
(QoS 1), which is what the broker alone costs. Ends with one line of JSON.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent / "tests"))  # netproxy

from bench._common import print_json  # noqa: E402
from eclm_common.lifeline import popen


def program(size_kb: int) -> bytes:
    """A LiteRT program of about ``size_kb`` (a wide MLP on 8x8 digits)."""
    import torch
    from torch import nn

    from cloud_trainer.export.programs import export_litert

    width = max(16, size_kb * 1024 // (4 * (64 + 10)))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 10))
    return export_litert(net, torch.zeros(1, 64), name="bench-rollout")


def roll_out(broker, data: bytes, devices: int, chunk: int, work: Path, cut: int) -> dict:
    """Seconds from the rollout's start until every agent serves the program, bytes out
    of the cloud, and what the ``cut`` agents cut off mid-broadcast had to ask for."""
    from netproxy import ChaosProxy

    from cloud_trainer.export.plan import Target
    from cloud_trainer.fleet.coordinator import FleetCoordinator
    from cloud_trainer.fleet.rollout import Rollout, RolloutPlan
    from device_profiles import load_profile
    from eclm_wire.mqtt import BrokerAddress
    from edge_runtime.agent import AgentConfig, EdgeAgent
    from edge_runtime.artifacts import ArtifactStore

    logging.getLogger("edge_runtime.agent").setLevel(logging.ERROR)  # one line per agent
    address = BrokerAddress.parse(broker.url)
    proxy = ChaosProxy(broker.port)
    behind = BrokerAddress("127.0.0.1", proxy.port)
    profile = load_profile("rpi4")
    ids = [f"bench-{i:03d}" for i in range(devices)]
    agents = []
    for n, device_id in enumerate(ids, 1):
        config = AgentConfig(  # unsigned: the figure is the rollout's, not the signature's
            device_id,
            profile,
            behind if n > devices - cut else address,
            work / device_id,
            backend="litert",
            insecure=True,
        )
        agents.append(EdgeAgent(config).start())
        print(f"\ragents connected: {n}/{devices}", end="", flush=True)
    print()
    coordinator = FleetCoordinator(
        address, ArtifactStore(work / "cloud"), client_id="bench-cloud", chunk_size=chunk
    ).start()
    try:
        ref = coordinator.add_artifact("wide.tflite", data, "tflite")
        plan = RolloutPlan(canary=1, waves=(1.0,), wave_timeout=600)
        rollout = Rollout(coordinator, "bench", {d: Target((ref,)) for d in ids}, plan, settle=0)
        cutter = threading.Thread(target=cut_mid_broadcast, args=(coordinator, proxy, cut > 0))
        cutter.start()
        held: list[float] = []  # when every agent held the verified file
        holder = threading.Thread(target=all_hold, args=(agents, ref.sha256, held))
        holder.start()
        start = time.perf_counter()
        final = rollout.run(
            lambda line: print(f"  {time.perf_counter() - start:5.2f} s {line}", flush=True)
        )
        seconds = time.perf_counter() - start
        cutter.join()
        holder.join()
        if final.state != "succeeded":
            raise SystemExit(f"the rollout did not succeed: {final.state} {final.reason}")
        traffic = coordinator.client.traffic
        cut_agents = agents[devices - cut :]
        return {
            "rollout_s": seconds,
            "delivered_s": held[0] - start if held else float("nan"),
            "waves": len(plan.batches(ids)),
            "cloud_bytes": traffic.total("sent", "chunks") + traffic.total("sent", "artifacts"),
            "broadcasts": sum(coordinator.broadcaster.sent.values()),
            "own_topic_chunks": traffic.messages["sent", "chunks"],
            "cut_asked_chunks": max((a.stats.asked_chunks for a in cut_agents), default=0),
            "cut_devices": cut,
            "chunks": ref.chunk_count,
        }
    finally:
        coordinator.stop()
        for agent in agents:
            agent.stop()
        proxy.close()


def all_hold(agents, sha: str, held: list[float]) -> None:
    """Note when every agent's store holds ``sha`` (checked and moved in)."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if all(agent.store.has(sha) for agent in agents):
            held.append(time.perf_counter())
            return
        time.sleep(0.005)


def cut_mid_broadcast(coordinator, proxy, enabled: bool) -> None:
    """Drop the proxied agents' connections once a broadcast is under way (the canary, a
    wave of one, gets its module on its own topic: the first broadcast is the fleet's)."""
    deadline = time.monotonic() + 120
    while enabled and time.monotonic() < deadline:
        if coordinator.broadcaster.bytes_sent > 0:
            print(f"  cut {proxy.cut()} connections during the broadcast", flush=True)
            return
        time.sleep(0.001)


def fan_out(broker, data: bytes, devices: int, chunk: int, work: Path) -> float:
    """Seconds for mosquitto_pub to get the chunks of ``data`` to ``devices`` subscribers."""
    pub, sub = shutil.which("mosquitto_pub"), shutil.which("mosquitto_sub")
    if not pub or not sub:
        raise SystemExit("mosquitto_pub/mosquitto_sub missing: apt-get install mosquitto-clients")
    parts = [data[i : i + chunk] for i in range(0, len(data), chunk)]
    files = []
    for i, part in enumerate(parts):
        files.append(work / f"chunk-{i}")
        files[-1].write_bytes(part)
    host = ["-h", broker.host, "-p", str(broker.port), "-q", "1"]
    subscribers = [
        popen(
            [sub, *host, "-t", "bench/fanout/#", "-C", str(len(parts)), "-i", f"fan-{i}"],
            stdout=subprocess.DEVNULL,
        )
        for i in range(devices)
    ]
    time.sleep(2.0)  # let every subscriber connect and subscribe
    if any(s.poll() is not None for s in subscribers):
        raise SystemExit("a mosquitto_sub exited early")
    start = time.perf_counter()
    for i, path in enumerate(files):
        subprocess.run([pub, *host, "-t", f"bench/fanout/{i}", "-f", str(path)], check=True)
    for s in subscribers:
        s.wait(timeout=600)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=50, help="agents (default: %(default)s)")
    parser.add_argument("--size-kb", type=int, default=1024, help="module size (default: 1024)")
    parser.add_argument("--chunk-kb", type=int, default=128, help="chunk size (default: 128)")
    parser.add_argument(
        "--cut", type=int, default=5, help="agents cut off mid-broadcast (default: 5)"
    )
    args = parser.parse_args()
    from broker.launcher import Broker

    data = program(args.size_kb)
    chunk = args.chunk_kb * 1024
    with (
        tempfile.TemporaryDirectory() as tmp,
        Broker(kind="mosquitto", data_dir=Path(tmp) / "b") as broker,
    ):
        work = Path(tmp)
        print(
            f"module: {len(data) / 1e6:.2f} MB in {-(-len(data) // chunk)} chunks; "
            f"{args.devices} devices; {broker.kind} on port {broker.port}"
        )
        r = roll_out(broker, data, args.devices, chunk, work, min(args.cut, args.devices - 1))
        rollout_s = r["rollout_s"]
        print(f"rollout (canary, then the rest; verify, load, health check): {rollout_s:.2f} s")
        bound = (r["waves"] + 0.05) * len(data)
        print(
            f"bytes out of the cloud: {r['cloud_bytes'] / 1e6:.2f} MB = "
            f"{r['cloud_bytes'] / len(data):.2f} x the module ({r['waves']} waves; bound "
            f"{bound / 1e6:.2f} MB); {r['broadcasts']} broadcasts, "
            f"{r['own_topic_chunks']} chunks on devices' own topics"
        )
        print(
            f"{r['cut_devices']} devices cut off mid-broadcast asked for at most "
            f"{r['cut_asked_chunks']} of {r['chunks']} chunks on their own topics"
        )
        fanout_s = fan_out(broker, data, args.devices, chunk, work)
        print(f"mosquitto_pub -> {args.devices} x mosquitto_sub, same chunks: {fanout_s:.2f} s")
        print(f"rollout / raw fan-out: {rollout_s / fanout_s:.1f}x")
        print(
            f"delivery (every agent holds the verified module, canary wave included): "
            f"{r['delivered_s']:.2f} s = {r['delivered_s'] / fanout_s:.1f}x raw fan-out"
        )
    print_json(
        {
            "devices": args.devices,
            "module_bytes": len(data),
            "chunk_bytes": chunk,
            "rollout_s": round(rollout_s, 3),
            **{k: v for k, v in r.items() if k != "rollout_s"},
            "cloud_bytes_vs_module": round(r["cloud_bytes"] / len(data), 3),
            "fanout_s": round(fanout_s, 3),
            "ratio": round(rollout_s / fanout_s, 2),
            "delivery_ratio": round(r["delivered_s"] / fanout_s, 2),
        }
    )


if __name__ == "__main__":
    main()
