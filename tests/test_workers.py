"""Two ``eclm cloud serve`` workers on one Mosquitto share the device traffic through a
shared subscription, and every update is stored exactly once, replays and all, on a
shared SQLite file and on PostgreSQL; when the leading worker dies, the other leads."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
from cloudproc import Cloud, wait

import eclm_wire as wire
from eclm_wire.codec import tensor_bytes
from eclm_wire.mqtt import connect, make_client

DEVICES, UPDATES, REPLAYS = 10, 20, 30


@pytest.mark.slow
@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_two_workers_store_every_update_exactly_once(
    tmp_path, modular, mosquitto, address, database, request
):
    if database == "sqlite":
        shared = f"sqlite:///{tmp_path}/shared.db"
    else:
        shared = request.getfixturevalue("postgres_url")
    workers = [
        Cloud(
            tmp_path / name,
            modular,
            mosquitto.url,
            worker=name,
            db_url=shared,
            broker='shared_group = "eclm-cloud"',
            fleet="auto_assign = false",
            aggregation="quorum = 1000",  # no round closes: this is about intake
        )
        for name in ("w1", "w2")
    ]
    state = workers[0].state()
    base = state.next_serial(version=0)  # a desired state the cloud issued
    for cloud in workers:
        cloud.start()
    rng = np.random.default_rng(0)
    clients, sent = [], []
    try:
        for d in range(DEVICES):
            device = f"dev-{d}"
            client = make_client(device, address)
            connect(client, address)
            client.loop_start()
            clients.append(client)
            for _ in range(UPDATES):
                weights = {
                    "weight": rng.normal(size=(10, 512)).astype(np.float32),
                    "bias": rng.normal(size=10).astype(np.float32),
                }
                update = wire.AdapterUpdate(
                    device_id=device,
                    domain="clean",
                    base=str(base),
                    samples=8,
                    histogram=(8,) + (0,) * 9,
                    weights=tensor_bytes(weights),
                    nonce=rng.bytes(8).hex(),
                )
                sent.append((client, device, update.encode()))
        for client, device, payload in sent + sent[:REPLAYS]:  # some sent twice
            client.publish(wire.device_topic(device, "updates"), payload, qos=1)

        total = DEVICES * UPDATES
        wait(
            lambda: (
                sum(state.updates_by_worker().values()) == total
                and state.counters("rejected:").get("replayed") == REPLAYS
            ),
            60,
            "every update stored and every replay refused",
        )
        by_worker = state.updates_by_worker()
        assert set(by_worker) == {"w1", "w2"} and min(by_worker.values()) > total // 10
        assert state.db.execute("SELECT COUNT(DISTINCT key) FROM updates")[0][0] == total

        # One worker leads; when it dies, the other takes the lease over.
        def leaders():
            return [json.loads(c.get("/healthz"))["leader"] for c in workers]

        wait(lambda: sorted(leaders()) == [False, True], 30, "one leader")
        leader, follower = sorted(
            workers, key=lambda c: not json.loads(c.get("/healthz"))["leader"]
        )
        leader.kill()
        wait(lambda: json.loads(follower.get("/healthz"))["leader"], 30, "the follower to lead")
        assert follower.kill(signal.SIGTERM) == 0
    finally:
        for client in clients:
            client.loop_stop()
            client.disconnect()
        for cloud in workers:
            cloud.stop()
