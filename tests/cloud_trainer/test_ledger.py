"""The service's intake over a real Mosquitto: the cloud acknowledges an update to the
broker only once it is stored, so what a full database could not take is still there for
the cloud after a restart; an update trained on an old model version counts for less or
is refused."""

from __future__ import annotations

import time

import numpy as np
import pytest

import eclm_wire as wire
from cloud_trainer.federation.aggregation import DomainAggregator
from cloud_trainer.fleet.coordinator import FleetCoordinator
from cloud_trainer.service.database import Database
from cloud_trainer.service.ledger import UpdateLedger
from cloud_trainer.service.state import CloudState
from eclm_wire.codec import tensor_bytes
from eclm_wire.errors import ProtocolError
from eclm_wire.mqtt import connect, make_client
from edge_runtime.artifacts import ArtifactStore

LIKE = {"weight": np.zeros((10, 64), np.float32), "bias": np.zeros(10, np.float32)}


def update(base: int, seed: int) -> wire.AdapterUpdate:
    rng = np.random.default_rng(seed)
    weights = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in LIKE.items()}
    return wire.AdapterUpdate(
        device_id="dev-1",
        domain="clean",
        base=str(base),
        samples=8,
        histogram=(8,) + (0,) * 9,
        weights=tensor_bytes(weights),
        nonce=rng.bytes(8).hex(),
    )


def wait(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_updates_a_full_database_could_not_take_survive_a_cloud_restart(address, tmp_path):
    state = CloudState(Database(f"sqlite:///{tmp_path}/state.db"))
    base = state.next_serial(version=0)

    def cloud() -> FleetCoordinator:
        ledger = UpdateLedger(state, DomainAggregator(LIKE, max_norm=1e6), lambda: 0, worker="w1")
        store = ArtifactStore(tmp_path / "store")
        return FleetCoordinator(address, store, aggregator=ledger, client_id="cloud-full").start()

    fc = cloud()
    device = make_client("dev-1", address)
    connect(device, address)
    device.loop_start()
    try:
        (pages,) = state.db.execute("PRAGMA page_count")[0]
        state.db.execute(f"PRAGMA max_page_count = {pages}")  # the disk is full
        handles = [
            device.publish(wire.device_topic("dev-1", "updates"), update(base, i).encode(), qos=1)
            for i in range(10)
        ]
        wait(lambda: "full" in fc.store_error and all(h.is_published() for h in handles))
        held = 10 - sum(state.updates_by_worker().values())
        assert held > 0  # a few fit into the last pages' free space, the rest were held back
        fc.stop()  # the cloud goes down holding them: not acknowledged, the broker keeps them

        state.db.execute("PRAGMA max_page_count = 1073741823")  # room again
        fc = cloud()  # the same session: the broker delivers what was never acknowledged
        wait(lambda: state.updates_by_worker() == {"w1": 10})
        assert state.counters("rejected:") == {}  # each stored once, none taken as a replay
        assert fc.store_error == ""
    finally:
        device.loop_stop()
        device.disconnect()
        fc.stop()


def test_a_stale_update_weighs_less_and_a_too_stale_one_is_refused(tmp_path):
    state = CloudState(Database(f"sqlite:///{tmp_path}/state.db"))
    on = {v: state.next_serial(version=v) for v in range(4)}
    ledger = UpdateLedger(
        state, DomainAggregator(LIKE, max_norm=1e6), lambda: 3, worker="w1", max_staleness=2
    )

    ledger.add(update(on[3], 1))
    ledger.add(update(on[1], 2))
    with pytest.raises(ProtocolError, match="3 model versions back"):
        ledger.add(update(on[0], 3))
    with pytest.raises(ProtocolError, match="no desired state"):
        ledger.add(update(12345, 4))

    (round_id,) = [r.id for r in state.rounds("open")]
    assert [w for _, w in state.round_updates(round_id)] == [pytest.approx(1 / 3)]  # latest
    assert state.counters("rejected:") == {"stale-base": 1, "unknown-base": 1}


def test_a_redelivered_update_is_counted_once_and_not_taken_for_a_replay(tmp_path):
    state = CloudState(Database(f"sqlite:///{tmp_path}/state.db"))
    ledger = UpdateLedger(state, DomainAggregator(LIKE, max_norm=1e6), lambda: 0, worker="w1")
    sent = update(state.next_serial(version=0), 1)

    ledger.add(sent)
    ledger.add(sent, redelivered=True)  # the broker's second try: its ack was lost
    with pytest.raises(ProtocolError, match="replay"):
        ledger.add(sent)  # the same bytes published again: a replay
    assert state.updates_by_worker() == {"w1": 1}
    assert state.counters("redelivered") == {"": 1}
    assert state.counters("rejected:") == {"replayed": 1}
