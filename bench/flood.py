"""One device flooding the cloud with updates: the others' updates and the cloud's memory.

    python bench/flood.py [--flood 10000] [--devices 4]

A FleetCoordinator with the service's default limits on a real Mosquitto. First the
others' updates alone (their usual time from publish to stored), then the same while one
device publishes ``--flood`` valid updates (QoS 1) as fast as paho sends them. Reports
the others' time to stored in both (and the ratio), what the flood got in and dropped,
and the cloud process's RSS before and after the flood (the flooder is another process).
Ends with one line of JSON.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import print_json  # noqa: E402


def _updates(device: str, count: int, like: dict) -> list[bytes]:
    import secrets

    import eclm_wire as wire
    from eclm_wire.codec import tensor_bytes

    weights = tensor_bytes({k: v + 0.01 for k, v in like.items()})
    message = dict(device_id=device, domain="rotate", base="1", samples=10, weights=weights)
    return [
        wire.AdapterUpdate(**message, histogram=(1,) * 10, nonce=secrets.token_hex(8)).encode()
        for _ in range(count)
    ]


def flood(port: int, count: int) -> None:
    """The flooding device: ``count`` QoS 1 updates as fast as paho sends them."""
    import numpy as np
    import paho.mqtt.client as paho

    import eclm_wire as wire

    like = {"weight": np.zeros((10, 512), np.float32), "bias": np.zeros(10, np.float32)}
    distinct = _updates("pi4-flood", 200, like)
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="pi4-flood")
    client.max_inflight_messages_set(100)
    client.connect("127.0.0.1", port)
    client.loop_start()
    print("ready", flush=True)
    topic = wire.device_topic("pi4-flood", "updates")
    infos = [client.publish(topic, distinct[n % len(distinct)], qos=1) for n in range(count)]
    infos[-1].wait_for_publish(120)
    client.loop_stop()
    client.disconnect()


def main(argv: list[str] | None = None) -> dict:
    if argv is None and sys.argv[1:2] == ["--flooder"]:
        flood(int(sys.argv[2]), int(sys.argv[3]))
        return {}
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flood", type=int, default=10_000)
    parser.add_argument("--devices", type=int, default=4)
    args = parser.parse_args(argv)

    import logging

    import numpy as np
    import paho.mqtt.client as paho
    import psutil

    import eclm_wire as wire
    from broker import Broker
    from cloud_trainer.federation.aggregation import DomainAggregator
    from cloud_trainer.fleet.coordinator import FleetCoordinator
    from cloud_trainer.service.config import LimitsSection
    from eclm_wire.mqtt import BrokerAddress
    from edge_runtime.artifacts import ArtifactStore

    logging.disable(logging.WARNING)
    like = {"weight": np.zeros((10, 512), np.float32), "bias": np.zeros(10, np.float32)}
    others = {f"pi4-{n}": _updates(f"pi4-{n}", 2, like) for n in range(args.devices)}
    process = psutil.Process()
    with Broker(kind="mosquitto") as broker, tempfile.TemporaryDirectory() as store:
        address = BrokerAddress.parse(broker.url)
        aggregator = DomainAggregator(like)
        limiter = LimitsSection().limiter()
        cloud = FleetCoordinator(
            address, ArtifactStore(store), aggregator=aggregator, limiter=limiter
        ).start()
        clients = []
        sender = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="pi4-others")
        sender.connect(address.host, address.port)
        sender.loop_start()
        clients.append(sender)
        time.sleep(0.5)

        def others_stored(n: int) -> float:
            """Seconds from publishing the others' n-th updates to all of them stored."""
            before = aggregator.accepted
            started = time.monotonic()
            for device, payloads in others.items():
                sender.publish(wire.device_topic(device, "updates"), payloads[n], qos=1)
            while aggregator.accepted - before < len(others):
                time.sleep(0.001)
            return time.monotonic() - started

        quiet = others_stored(0)
        rss_before = process.memory_info().rss
        flooder = subprocess.Popen(
            [sys.executable, __file__, "--flooder", str(broker.port), str(args.flood)],
            stdout=subprocess.PIPE,
        )
        flooder.stdout.readline()  # its payloads are built and it is connected
        started = time.monotonic()
        time.sleep(0.2)
        loud = others_stored(1)
        flooder.wait(120)
        expected, quiet_for = args.flood + 2 * len(others), 0.0
        handled = 0
        while handled < expected and quiet_for < 5.0:  # the broker may drop past its queue
            seen = sum(limiter.counts().values()) + aggregator.accepted
            quiet_for = quiet_for + 0.01 if seen == handled else 0.0
            handled = seen
            time.sleep(0.01)
        flood_seconds = time.monotonic() - started - quiet_for
        rss_after = process.memory_info().rss
        for client in clients:
            client.loop_stop()
            client.disconnect()
        cloud.stop()
    dropped = limiter.counts()[("updates", "rate-limit")]
    result = {
        "bench": "flood",
        "flood": args.flood,
        "flood_seconds": round(flood_seconds, 2),
        "flood_per_s": round(args.flood / flood_seconds),
        "flood_dropped": dropped,
        "flood_in": aggregator.accepted - 2 * len(others),
        "flood_not_delivered": expected - handled,  # dropped by the broker (its queue bound)
        "others_ms_quiet": round(quiet * 1000, 1),
        "others_ms_flood": round(loud * 1000, 1),
        "rss_mb_before": round(rss_before / 2**20, 1),
        "rss_mb_after": round(rss_after / 2**20, 1),
    }
    print(
        f"flood: {args.flood} updates in {flood_seconds:.2f} s: {dropped} dropped by the "
        f"cloud's limit, {expected - handled} not delivered by the broker"
    )
    print(
        f"others' updates stored in {quiet * 1000:.1f} ms quiet, {loud * 1000:.1f} ms in the flood"
    )
    print(f"RSS {rss_before / 2**20:.1f} MB before the flood, {rss_after / 2**20:.1f} MB after")
    print_json(result)
    return result


if __name__ == "__main__":
    main()
