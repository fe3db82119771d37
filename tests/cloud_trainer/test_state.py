"""The service's state on SQLite and on a real PostgreSQL: serials never repeat, an
update is stored once, a round closes once, one worker holds the lease, and a damaged
database is reported for what it is."""

from __future__ import annotations

import numpy as np
import pytest

import eclm_wire as wire
from cloud_trainer.errors import StateError
from cloud_trainer.service.database import Database
from cloud_trainer.service.state import CloudState
from eclm_wire.codec import tensor_bytes


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/state.db"
    return request.getfixturevalue("postgres_url")


def update(device: str, nonce: str, base: int, domain: str = "clean") -> wire.AdapterUpdate:
    weights = {"weight": np.ones((10, 8), np.float32), "bias": np.zeros(10, np.float32)}
    return wire.AdapterUpdate(
        device_id=device,
        domain=domain,
        base=str(base),
        samples=4,
        histogram=(4,) + (0,) * 9,
        weights=tensor_bytes(weights),
        nonce=nonce,
    )


def test_serials_grow_across_reopening(url):
    state = CloudState(Database(url))
    first = [state.next_serial(version=0) for _ in range(3)]
    state.db.close()

    again = CloudState(Database(url))
    later = again.next_serial(version=2)

    assert first == sorted(set(first))
    assert later > first[-1]
    assert again.version_of_serial(later) == 2 and again.version_of_serial(first[0]) == 0


def test_an_update_is_stored_once_and_rounds_close_once(url):
    state = CloudState(Database(url))
    other = CloudState(Database(url))  # a second worker on the same database
    base = state.next_serial(version=0)

    first = state.add_update(update("a", "00" * 8, base), weight=1.0, worker="w1")
    again = other.add_update(update("a", "00" * 8, base), weight=1.0, worker="w2")
    second = other.add_update(update("b", "11" * 8, base), weight=0.5, worker="w2")
    shifted = state.add_update(update("b", "22" * 8, base, "rotate"), weight=1.0, worker="w1")

    assert first == (1, 1) and again is None and second == (1, 2)
    assert shifted[0] != first[0]
    assert state.updates_by_worker() == {"w1": 2, "w2": 1}
    assert [w for _, w in state.round_updates(first[0])] == [1.0, 0.5]
    assert state.close_round(first[0], b"agg", 8, 2) is True
    assert other.close_round(first[0], b"agg", 8, 2) is False
    assert state.latest_aggregate("clean") == (b"agg", 8)
    # the next update for the domain opens a new round
    assert state.add_update(update("c", "33" * 8, base), weight=1.0, worker="w1")[0] > first[0]


def test_one_worker_holds_the_lease_until_it_expires(url):
    state = CloudState(Database(url))

    assert state.claim("leader", "w1", ttl=30)
    assert not state.claim("leader", "w2", ttl=30)
    assert state.claim("leader", "w1", ttl=-1)  # renewed, but already expired
    assert state.claim("leader", "w2", ttl=30)


def test_versions_are_committed_once_per_round(url):
    state = CloudState(Database(url))

    first = state.add_version(b"head-1", round_id=7, rollout_id="integrate-7")
    repeated = state.add_version(b"head-1", round_id=7, rollout_id="integrate-7")
    second = state.add_version(b"head-2", round_id=9, rollout_id="integrate-9")

    assert (first, repeated, second) == (1, 1, 2)
    assert state.latest_version() == (2, b"head-2")


def test_a_corrupt_sqlite_file_is_reported_as_corrupt(tmp_path):
    path = tmp_path / "state.db"
    CloudState(Database(f"sqlite:///{path}")).db.close()
    data = bytearray(path.read_bytes())
    data[:100] = b"\xff" * 100  # the header
    path.write_bytes(bytes(data))

    with pytest.raises(StateError, match="corrupt"):
        CloudState(Database(f"sqlite:///{path}"))


def test_a_locked_sqlite_file_is_reported_as_locked(tmp_path):
    url = f"sqlite:///{tmp_path}/state.db"
    holder = CloudState(Database(url))
    waiter = CloudState(Database(url, timeout=0.2))

    with holder.db.transaction():  # another worker in the middle of a write
        with pytest.raises(StateError, match="locked"):
            waiter.next_serial(version=0)
    assert waiter.next_serial(version=0) > 0  # and it works once the lock is gone


def test_an_unreachable_postgres_is_reported():
    with pytest.raises(StateError, match="postgresql://eclm@127.0.0.1:1/none"):
        Database("postgresql://eclm@127.0.0.1:1/none", timeout=1)


def test_a_damaged_stored_update_is_left_out_of_its_round(url, caplog):
    state = CloudState(Database(url))
    base = state.next_serial(version=0)
    round_id, _ = state.add_update(update("a", "44" * 8, base), weight=1.0, worker="w1")
    state.add_update(update("b", "55" * 8, base), weight=1.0, worker="w1")
    state.db.execute("UPDATE updates SET message = ? WHERE device_id = ?", (b"{damaged", "a"))

    kept = state.round_updates(round_id)

    assert [u.device_id for u, _ in kept] == ["b"]
    assert "a's stored update is damaged" in caplog.text


def test_each_devices_latest_update_of_a_domain_is_there_for_a_carried_round(url):
    state = CloudState(Database(url))
    base = state.next_serial(version=0)
    first, _ = state.add_update(update("a", "01" * 8, base), weight=1.0, worker="w")
    state.add_update(update("b", "02" * 8, base, "rotate"), weight=1.0, worker="w")
    state.close_round(first, b"", 4, 1)
    second, _ = state.add_update(update("b", "03" * 8, base), weight=1.0, worker="w")
    state.add_update(update("a", "04" * 8, base), weight=1.0, worker="w")
    state.close_round(second, b"", 8, 2)
    third, _ = state.add_update(update("c", "05" * 8, base), weight=1.0, worker="w")

    latest = {u.device_id: u.nonce for u in state.latest_updates("clean", second)}
    assert latest == {"a": "04" * 8, "b": "03" * 8}  # a's newer one; c's is in a later round
    assert {u.device_id for u in state.latest_updates("clean", third)} == {"a", "b", "c"}
    assert state.updates_after("clean", first) == 3 and state.updates_after("clean", third) == 0
    assert state.last_integrated_round() == 0
    state.save_rollout(f"integrate-{second}", "succeeded", "{}")
    state.save_rollout("canary-7", "succeeded", "{}")  # an operator's rollout: not integration
    assert state.last_integrated_round() == second
