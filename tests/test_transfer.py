"""A 20 MB program through a broker that takes packets of 256 KiB at most, once over a
steady link and once over one cut five times: a cut costs at most two chunks sent again."""

import threading
import time

import pytest
import torch
from netproxy import CutProxy
from torch import nn

from cloud_trainer.export.programs import export_litert
from cloud_trainer.fleet.coordinator import FleetCoordinator
from device_profiles import load_profile
from eclm_wire.mqtt import BrokerAddress
from edge_runtime.agent import AgentConfig, EdgeAgent
from edge_runtime.artifacts import ArtifactStore

CHUNK = 128 * 1024


def big_program(seed: int) -> bytes:
    """A real LiteRT program of about 22 MB (a wide MLP on 8x8 digits)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(64, 2304), nn.ReLU(), nn.Linear(2304, 2304), nn.Linear(2304, 10))
    return export_litert(net, torch.zeros(1, 64), name=f"wide-{seed}")


def chunks_sent(coordinator) -> int:
    return coordinator.client.traffic.messages["sent", "chunks"]


def cut_while_downloading(agent: EdgeAgent, proxy: CutProxy, chunks: int, cuts: int) -> None:
    """Cut the link each time another 1/(cuts+2) of the chunks has arrived (gives up after
    two minutes; the test then counts too few cuts)."""
    deadline = time.monotonic() + 120
    for k in range(1, cuts + 1):
        while time.monotonic() < deadline:
            fetch = agent.keeper.transfer
            if fetch is not None and len(fetch.current.received) >= k * chunks // (cuts + 2):
                proxy.cut()
                break
            time.sleep(0.005)


@pytest.mark.slow
def test_a_20_mb_program_arrives_whole_through_a_steady_and_a_cut_link(
    mosquitto, address, tmp_path
):
    conf = (mosquitto.data_dir / "mosquitto.conf").read_text()
    assert "max_packet_size 262144" in conf
    programs = [big_program(seed) for seed in (0, 1)]
    assert all(len(p) >= 20_000_000 for p in programs)
    proxy = CutProxy(address.port)
    coordinator = FleetCoordinator(
        address, ArtifactStore(tmp_path / "cloud"), client_id="c-big", chunk_size=CHUNK
    ).start()
    agent = EdgeAgent(
        AgentConfig(
            "pi4-big",
            load_profile("rpi4"),
            BrokerAddress("127.0.0.1", proxy.port),
            tmp_path / "device",
            backend="litert",
            insecure=True,
            broadcast_wait=0,  # the per-device path (its cuts are what is counted)
        )
    ).start()
    try:
        results = []
        for program, cuts in zip(programs, (0, 5), strict=True):
            ref = coordinator.add_artifact(f"wide-{cuts}.tflite", program, "tflite")
            sent_before, duplicates_before = chunks_sent(coordinator), agent.stats.duplicate_chunks
            cutter = threading.Thread(
                target=cut_while_downloading, args=(agent, proxy, ref.chunk_count, cuts)
            )
            desired = coordinator.assign("pi4-big", [ref])
            cutter.start()
            assert coordinator.wait_until(
                lambda c, s=desired.serial: (
                    (r := c.reported.get("pi4-big")) is not None
                    and r.serial == s
                    and r.phase == "active"
                ),
                120,
            ), coordinator.reported.get("pi4-big")
            cutter.join()
            assert agent.report.active == (ref.sha256,)
            assert agent.store.read(ref.sha256) == program
            results.append(
                (
                    chunks_sent(coordinator) - sent_before - ref.chunk_count,
                    agent.stats.duplicate_chunks - duplicates_before,
                )
            )
        assert results[0] == (0, 0)
        # What crossed the broker, counted on both sides (both transfers, with the cuts).
        cloud, device = coordinator.client.traffic, agent.client.traffic
        chunk_bytes = device.total("received", "chunks")
        assert chunk_bytes >= sum(map(len, programs))
        assert chunk_bytes <= cloud.total("sent", "chunks") + 10 * CHUNK
        assert cloud.total("received", "fetch") >= device.total("sent", "fetch") > 0
        print(f"chunks: {chunk_bytes} bytes down, fetch: {device.total('sent', 'fetch')} up")
        assert proxy.cuts == 5
        resent, duplicated = results[1]
        print(f"5 cuts over {ref.chunk_count} chunks: {resent} re-sent, {duplicated} duplicated")
        assert resent <= 2 * proxy.cuts and duplicated <= 2 * proxy.cuts
    finally:
        agent.stop()
        coordinator.stop()
        proxy.close()
