"""The cloud service's durable state: serials, devices, updates, aggregation rounds,
rollouts and model versions, in one database shared by every worker.

An adapter update is acknowledged to the broker only after it is committed here, once:
its key (the device's nonce, or the hash of the message) is the primary key, so a
redelivered or replayed update, or one that two workers both received, counts once.
Updates gather in the open round of their domain; a round closes (once, whichever worker
gets there first) and keeps the aggregate it produced.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import time
from dataclasses import dataclass

import eclm_wire as wire
from cloud_trainer.service.database import Database
from eclm_wire.errors import ProtocolError

log = logging.getLogger(__name__)


class RoundState(str, enum.Enum):
    """An aggregation round's state (``rounds.state``)."""

    def __str__(self) -> str:
        return str(self.value)

    OPEN = "open"  # taking updates
    CLOSED = "closed"  # aggregated; waiting to be integrated
    DONE = "done"  # integrated, or nothing to integrate


OPEN, CLOSED, DONE = (f"'{s.value}'" for s in RoundState)  # as SQL literals
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS serials (serial BIGINT PRIMARY KEY, version INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS devices (device_id TEXT PRIMARY KEY, report TEXT,"
    " online INTEGER NOT NULL DEFAULT 0, seen REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS rounds (id INTEGER PRIMARY KEY AUTOINCREMENT,"
    " domain TEXT NOT NULL, state TEXT NOT NULL, opened REAL NOT NULL, closed REAL,"
    " samples INTEGER, devices INTEGER, weights BLOB)",
    f"CREATE UNIQUE INDEX IF NOT EXISTS one_open_round ON rounds (domain) WHERE state = {OPEN}",
    "CREATE TABLE IF NOT EXISTS updates (key TEXT PRIMARY KEY, device_id TEXT NOT NULL,"
    " domain TEXT NOT NULL, base TEXT NOT NULL, samples INTEGER NOT NULL,"
    " weight REAL NOT NULL, message BLOB NOT NULL, round_id INTEGER NOT NULL,"
    " worker TEXT NOT NULL, received REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS rollouts (rollout_id TEXT PRIMARY KEY, state TEXT NOT NULL,"
    " record TEXT NOT NULL, updated REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS versions (version INTEGER PRIMARY KEY, head BLOB NOT NULL,"
    " round_id INTEGER, rollout_id TEXT, created REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL,"
    " expires REAL NOT NULL)",
)


@dataclass(frozen=True)
class Round:
    id: int
    domain: str
    state: str  # open -> closed (aggregate kept) -> done (integrated or nothing to do)
    opened: float
    devices: int  # distinct devices with an update in it
    samples: int = 0
    weights: bytes | None = None


def update_key(update: wire.AdapterUpdate) -> str:
    """What makes an update unique: its device's nonce, else the hash of its bytes."""
    nonce = getattr(update, "nonce", "")
    if nonce:
        return f"{update.device_id}/{nonce}"
    return hashlib.sha256(update.encode()).hexdigest()


class CloudState:
    def __init__(self, db: Database) -> None:
        self.db = db
        with db.transaction() as cur:
            for statement in SCHEMA:
                cur.execute(statement)

    # --- serials and counters -------------------------------------------------------------

    def next_serial(self, version: int) -> int:
        """A desired-state serial never handed out before (across restarts and workers),
        at least the clock in ms; remembers the model ``version`` it carries."""
        with self.db.transaction() as cur:
            cur.execute(
                "INSERT INTO counters (name, value) VALUES ('serial', 0) ON CONFLICT DO NOTHING"
            )
            (last,) = cur.execute("SELECT value FROM counters WHERE name = 'serial'")[0]
            serial = max(int(last) + 1, int(time.time() * 1000))
            cur.execute("UPDATE counters SET value = ? WHERE name = 'serial'", (serial,))
            cur.execute("INSERT INTO serials (serial, version) VALUES (?, ?)", (serial, version))
        return serial

    def version_of_serial(self, serial: int) -> int | None:
        rows = self.db.execute("SELECT version FROM serials WHERE serial = ?", (serial,))
        return rows[0][0] if rows else None

    def count(self, name: str, by: int = 1) -> None:
        with self.db.transaction() as cur:
            cur.execute(
                "INSERT INTO counters (name, value) VALUES (?, 0) ON CONFLICT DO NOTHING", (name,)
            )
            cur.execute("UPDATE counters SET value = value + ? WHERE name = ?", (by, name))

    def counters(self, prefix: str) -> dict[str, int]:
        rows = self.db.execute(
            "SELECT name, value FROM counters WHERE name LIKE ?", (prefix + "%",)
        )
        return {name.removeprefix(prefix): int(value) for name, value in rows}

    # --- devices ----------------------------------------------------------------------------

    def save_report(self, report: wire.ReportedState) -> None:
        self.db.execute(
            "INSERT INTO devices (device_id, report, seen) VALUES (?, ?, ?) ON CONFLICT"
            " (device_id) DO UPDATE SET report = excluded.report, seen = excluded.seen",
            (report.device_id, report.encode().decode(), time.time()),
        )

    def save_status(self, device_id: str, online: bool) -> None:
        self.db.execute(
            "INSERT INTO devices (device_id, online, seen) VALUES (?, ?, ?) ON CONFLICT"
            " (device_id) DO UPDATE SET online = excluded.online, seen = excluded.seen",
            (device_id, int(online), time.time()),
        )

    def reports(self) -> dict[str, tuple[wire.ReportedState, bool]]:
        rows = self.db.execute(
            "SELECT device_id, report, online FROM devices WHERE report IS NOT NULL"
        )
        return {d: (wire.decode(wire.ReportedState, r), bool(o)) for d, r, o in rows}

    # --- updates and rounds -----------------------------------------------------------------

    def add_update(
        self, update: wire.AdapterUpdate, *, weight: float, worker: str
    ) -> tuple[int, int] | None:
        """Store ``update`` in its domain's open round (opening one); (round id, distinct
        devices in it), or None if this update was stored before."""
        key = update_key(update)
        with self.db.transaction() as cur:
            if cur.execute("SELECT 1 FROM updates WHERE key = ?", (key,)):
                return None
            cur.execute(
                f"INSERT INTO rounds (domain, state, opened) VALUES (?, {OPEN}, ?)"
                " ON CONFLICT DO NOTHING",
                (update.domain, time.time()),
            )
            (round_id,) = cur.execute(
                f"SELECT id FROM rounds WHERE domain = ? AND state = {OPEN}", (update.domain,)
            )[0]
            cur.execute(
                "INSERT INTO updates (key, device_id, domain, base, samples, weight, message,"
                " round_id, worker, received) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    key,
                    update.device_id,
                    update.domain,
                    update.base,
                    update.samples,
                    weight,
                    update.encode(),
                    round_id,
                    worker,
                    time.time(),
                ),
            )
            (devices,) = cur.execute(
                "SELECT COUNT(DISTINCT device_id) FROM updates WHERE round_id = ?", (round_id,)
            )[0]
        return round_id, int(devices)

    def rounds(self, state: RoundState) -> list[Round]:
        rows = self.db.execute(
            "SELECT r.id, r.domain, r.state, r.opened, COUNT(DISTINCT u.device_id), r.samples,"
            " r.weights FROM rounds r LEFT JOIN updates u ON u.round_id = r.id"
            " WHERE r.state = ? GROUP BY r.id, r.domain, r.state, r.opened, r.samples, r.weights"
            " ORDER BY r.id",
            (str(state),),
        )
        return [
            Round(i, d, s, o, int(n), int(m or 0), bytes(w) if w is not None else None)
            for i, d, s, o, n, m, w in rows
        ]

    def round_updates(self, round_id: int) -> list[tuple[wire.AdapterUpdate, float]]:
        """The latest update of each device in the round, with its weight factor."""
        rows = self.db.execute(
            "SELECT device_id, message, weight FROM updates WHERE round_id = ? ORDER BY received",
            (round_id,),
        )
        latest = {}
        for device, message, weight in rows:
            try:
                latest[device] = (wire.decode(wire.AdapterUpdate, bytes(message)), weight)
            except ProtocolError as exc:  # the round goes on without it
                log.error("round %d: %s's stored update is damaged: %s", round_id, device, exc)
        return list(latest.values())

    def latest_updates(self, domain: str, round_id: int) -> list[wire.AdapterUpdate]:
        """Each device's latest update of ``domain`` in round ``round_id`` or before."""
        rows = self.db.execute(
            "SELECT device_id, message FROM updates WHERE domain = ? AND round_id <= ?"
            " ORDER BY received",
            (domain, round_id),
        )
        latest = {}
        for device, message in rows:
            try:
                latest[device] = wire.decode(wire.AdapterUpdate, bytes(message))
            except ProtocolError as exc:  # the aggregate goes on without it
                log.error("%s's stored update for %s is damaged: %s", device, domain, exc)
        return list(latest.values())

    def updates_after(self, domain: str, round_id: int) -> int:
        """Updates of ``domain`` stored in rounds after ``round_id``."""
        rows = self.db.execute(
            "SELECT COUNT(*) FROM updates WHERE domain = ? AND round_id > ?", (domain, round_id)
        )
        return int(rows[0][0])

    def last_integrated_round(self) -> int:
        """The round the latest integration rollout started from (0: none yet)."""
        ids = (r.removeprefix("integrate-") for r in self.rollouts())
        return max((int(i) for i in ids if i.isdigit()), default=0)

    def close_round(self, round_id: int, weights: bytes, samples: int, devices: int) -> bool:
        """Keep the round's aggregate; False if another worker closed it first."""
        with self.db.transaction() as cur:
            cur.execute(
                f"UPDATE rounds SET state = {CLOSED}, closed = ?, weights = ?, samples = ?,"
                f" devices = ? WHERE id = ? AND state = {OPEN}",
                (time.time(), weights, samples, devices, round_id),
            )
            return cur.rowcount == 1

    def finish_round(self, round_id: int) -> None:
        self.db.execute(f"UPDATE rounds SET state = {DONE} WHERE id = ?", (round_id,))

    def latest_aggregate(self, domain: str) -> tuple[bytes, int] | None:
        rows = self.db.execute(
            "SELECT weights, samples FROM rounds WHERE domain = ? AND weights IS NOT NULL"
            " ORDER BY id DESC LIMIT 1",
            (domain,),
        )
        return (bytes(rows[0][0]), int(rows[0][1])) if rows else None

    def domains(self) -> list[str]:
        """Domains with a closed round's aggregate."""
        rows = self.db.execute("SELECT DISTINCT domain FROM rounds WHERE weights IS NOT NULL")
        return sorted(d for (d,) in rows)

    def samples_of(self, domain: str, device_id: str) -> int:
        rows = self.db.execute(
            "SELECT MAX(samples) FROM updates WHERE domain = ? AND device_id = ?",
            (domain, device_id),
        )
        return int(rows[0][0] or 0)

    def updates_by_worker(self) -> dict[str, int]:
        rows = self.db.execute("SELECT worker, COUNT(*) FROM updates GROUP BY worker")
        return {w: int(n) for w, n in rows}

    # --- rollouts and model versions --------------------------------------------------------

    def save_rollout(self, rollout_id: str, state: str, record: str) -> None:
        self.db.execute(
            "INSERT INTO rollouts (rollout_id, state, record, updated) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (rollout_id) DO UPDATE SET state = excluded.state,"
            " record = excluded.record, updated = excluded.updated",
            (rollout_id, state, record, time.time()),
        )

    def rollouts(self, state: str | None = None) -> dict[str, str]:
        """rollout id -> record, oldest first."""
        query = "SELECT rollout_id, record FROM rollouts"
        rows = self.db.execute(
            query + (" WHERE state = ? ORDER BY updated" if state else " ORDER BY updated"),
            (state,) if state else (),
        )
        return dict(rows)

    def rollout_states(self) -> dict[str, wire.RolloutState]:
        """Each rollout's state; a damaged record is left out (restoring it says why)."""
        states = {}
        for rid, record in self.rollouts().items():
            try:
                states[rid] = wire.RolloutState.from_dict(json.loads(record)["state"])
            except (ValueError, KeyError, TypeError, RecursionError):
                continue  # ProtocolError and json's errors are ValueErrors
        return states

    def add_version(self, head: bytes, round_id: int, rollout_id: str) -> int:
        """The next model version, made of ``head`` by ``round_id``'s rollout (the one
        already recorded for that round, if any: a restart may commit it twice)."""
        with self.db.transaction() as cur:
            done = cur.execute("SELECT version FROM versions WHERE round_id = ?", (round_id,))
            if done:
                return int(done[0][0])
            (top,) = cur.execute("SELECT COALESCE(MAX(version), 0) FROM versions")[0]
            version = int(top) + 1
            cur.execute(
                "INSERT INTO versions (version, head, round_id, rollout_id, created)"
                " VALUES (?, ?, ?, ?, ?)",
                (version, head, round_id, rollout_id, time.time()),
            )
        return version

    def latest_version(self) -> tuple[int, bytes | None]:
        rows = self.db.execute("SELECT version, head FROM versions ORDER BY version DESC LIMIT 1")
        return (int(rows[0][0]), bytes(rows[0][1])) if rows else (0, None)

    def versions(self) -> list[tuple[int, int | None, str | None, float]]:
        """Every model version: (version, round id, rollout id, commit time), newest first."""
        rows = self.db.execute(
            "SELECT version, round_id, rollout_id, created FROM versions ORDER BY version DESC"
        )
        return [(int(v), r, o, float(c)) for v, r, o, c in rows]

    def round_summaries(self, limit: int = 200) -> list[dict]:
        """The latest rounds with their updates and devices, newest first (no weights)."""
        rows = self.db.execute(
            "SELECT r.id, r.domain, r.state, r.opened, r.closed, r.samples,"
            " COUNT(u.key), COUNT(DISTINCT u.device_id) FROM rounds r"
            " LEFT JOIN updates u ON u.round_id = r.id"
            " GROUP BY r.id, r.domain, r.state, r.opened, r.closed, r.samples"
            " ORDER BY r.id DESC LIMIT ?",
            (limit,),
        )
        keys = ("id", "domain", "state", "opened", "closed", "samples", "updates", "devices")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    # --- leadership -------------------------------------------------------------------------

    def claim(self, name: str, holder: str, ttl: float) -> bool:
        """Hold lease ``name`` for ``ttl`` seconds if it is free, expired or already ours."""
        now = time.time()
        with self.db.transaction() as cur:
            cur.execute(
                "INSERT INTO leases (name, holder, expires) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET holder = excluded.holder,"
                " expires = excluded.expires WHERE leases.holder = excluded.holder"
                " OR leases.expires < ?",
                (name, holder, now + ttl, now),
            )
            (owner,) = cur.execute("SELECT holder FROM leases WHERE name = ?", (name,))[0]
        return owner == holder

    def release(self, name: str, holder: str) -> None:
        self.db.execute("DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder))
