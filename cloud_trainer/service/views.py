"""The JSON the dashboard reads, assembled from what a worker knows: the coordinator's
latest reports, status and desired states, the observer's histories, and the shared
database (rollouts, rounds, model versions).

Every device the worker ever heard of is listed: one that stopped reporting is marked
stale (no report for ``dashboard.stale_after`` seconds) or offline, never left out.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import asdict

import eclm_wire as wire
from eclm_wire import RolloutStatus

SORTS = ("id", "profile", "phase", "online", "seen", "version", "accuracy", "available_mb")
PAGE_MAX = 500


@functools.lru_cache(maxsize=64)
def board_of(profile: str) -> str:
    """The board's title for a profile name the device reported ("" if unknown)."""
    from device_profiles import ProfileError, load_profile, profile_names

    if profile not in profile_names():  # a device names a board, never a file
        return ""
    try:
        return load_profile(profile).title
    except ProfileError:
        return ""


def device_row(service, device_id: str, now: float) -> dict:
    fc, seen_by = service.fc, service.observer
    report = fc.reported.get(device_id)
    desired = fc.desired.get(device_id)
    seen = seen_by.seen(device_id, report)
    since = seen_by.since(device_id, report)
    online = bool(fc.online.get(device_id))
    stale = seen is None or now - seen > service.config.dashboard.stale_after
    row = {
        "id": device_id,
        "online": online,
        "status": "offline" if not online else "stale" if stale else "online",
        "seen": seen,
        "phase": report.phase if report else "unknown",
        "phase_since": since,
        "serial": report.serial if report else None,
        "desired_serial": desired.serial if desired else None,
        "version": service.version_of(report.serial) if report and report.serial else None,
    }
    if report:
        row |= {
            "profile": report.profile,
            "board": board_of(report.profile),
            "labels": list(report.labels),
            "backend": report.backend,
            "modules": report.detail,
            "accuracy": report.accuracy,
            "domain": report.domain,
            "available_mb": report.available_mb,
            "cpu_percent": report.cpu_percent,
            "temperature_c": report.temperature_c,
        }
    else:
        row |= {"profile": desired.target if desired else "", "labels": []}
    return row


def device_ids(service) -> list[str]:
    fc = service.fc
    return sorted(set(fc.reported) | set(fc.online) | set(fc.desired))


def devices(service, query: dict[str, str]) -> dict:
    """The fleet table: filtered by profile, label, phase, status; sorted; one page."""
    now = time.time()
    rows = [device_row(service, d, now) for d in device_ids(service)]
    total = len(rows)
    want = {k: query.get(k, "") for k in ("profile", "label", "phase", "status", "q")}
    if want["profile"]:
        rows = [r for r in rows if r["profile"] == want["profile"]]
    if want["label"]:
        rows = [r for r in rows if want["label"] in r["labels"]]
    if want["phase"]:
        rows = [r for r in rows if r["phase"] == want["phase"]]
    if want["status"]:
        rows = [r for r in rows if r["status"] == want["status"]]
    if want["q"]:
        rows = [r for r in rows if want["q"] in r["id"]]
    key = query.get("sort", "id")
    key = key if key in SORTS else "id"
    present = [r for r in rows if r.get(key) is not None]
    absent = [r for r in rows if r.get(key) is None]  # last, whichever the order
    present.sort(key=lambda r: (r[key], r["id"]), reverse=query.get("order") == "desc")
    rows = present + absent
    size = min(max(_int(query.get("size"), 50), 1), PAGE_MAX)
    pages = max(1, -(-len(rows) // size))
    page = min(max(_int(query.get("page"), 1), 1), pages)
    return {
        "now": now,
        "total": total,
        "matched": len(rows),
        "page": page,
        "pages": pages,
        "size": size,
        "counts": _counts(service, now),
        "devices": rows[(page - 1) * size : page * size],
    }


def _counts(service, now: float) -> dict:
    """The whole fleet at a glance, whatever the filter: by status, phase and profile."""
    out: dict[str, dict[str, int]] = {"status": {}, "phase": {}, "profile": {}}
    fc, stale_after = service.fc, service.config.dashboard.stale_after
    for d in device_ids(service):
        report = fc.reported.get(d)
        seen = service.observer.seen(d, report)
        online = fc.online.get(d)
        stale = seen is None or now - seen > stale_after
        status = "offline" if not online else "stale" if stale else "online"
        for kind, value in (
            ("status", status),
            ("phase", report.phase if report else "unknown"),
            ("profile", report.profile if report else ""),
        ):
            out[kind][value] = out[kind].get(value, 0) + 1
    return out


def _int(text: str | None, default: int) -> int:
    return int(text) if text and text.isascii() and text.isdigit() and len(text) < 7 else default


def device(service, device_id: str) -> dict | None:
    """One device: its row, desired vs reported, timeline and resource readings."""
    fc = service.fc
    if device_id not in set(device_ids(service)):
        return None
    report, desired = fc.reported.get(device_id), fc.desired.get(device_id)
    events = [e for e in list(fc.events) if e.device_id == device_id]
    timeline = [
        {"ts": e.ts, "kind": "event", "code": e.code, "reason": e.reason, "topic": e.topic}
        for e in events
    ] + [
        {"ts": c.ts, "kind": "phase", "code": c.phase, "reason": c.detail, "serial": c.serial}
        for c in service.observer.changes(device_id)
    ]
    timeline.sort(key=lambda t: t["ts"], reverse=True)
    return {
        "device": device_row(service, device_id, time.time()),
        "desired": _desired(desired),
        "reported": report.to_dict() if report else None,
        "timeline": timeline[:200],
        "samples": [asdict(s) for s in service.observer.samples(device_id)],
    }


def _desired(desired: wire.DesiredState | None) -> dict | None:
    if desired is None:
        return None
    return {
        "serial": desired.serial,
        "target": desired.target,
        "issued_at": desired.issued_at,
        "expires": desired.expires,
        "artifacts": [
            {"name": a.name, "part": a.part, "sha256": a.sha256, "size": a.size}
            for a in desired.artifacts
        ],
        "options": len(desired.options),
        "signed": bool(desired.signature),
    }


_PARSED: dict[str, tuple[str, wire.RolloutState, list[list[str]]]] = {}  # id -> record's parse


def _parse(rid: str, record: str) -> tuple[wire.RolloutState, list[list[str]]] | None:
    """A rollout record's state and waves, parsed once per record (a 500-device record
    is a large JSON document and the page asks every second)."""
    from cloud_trainer.errors import ConfigError
    from cloud_trainer.fleet.rollout import RolloutPlan

    cached = _PARSED.get(rid)
    if cached and cached[0] == record:
        return cached[1], cached[2]
    try:
        data = json.loads(record)
        state = wire.RolloutState.from_dict(data["state"])
        plan = RolloutPlan(**{**data["plan"], "waves": tuple(data["plan"]["waves"])})
        waves = plan.batches(list(state.devices))
    except (ValueError, KeyError, TypeError, RecursionError, ConfigError):
        return None  # damaged: the service's log says why when it restores it
    if len(_PARSED) > 1000:
        _PARSED.clear()
    _PARSED[rid] = (record, state, waves)
    return state, waves


def rollouts(service) -> dict:
    """Every rollout, newest first: waves with their progress, outcome, devices' phases."""
    now, out = time.time(), []
    for rid, record in reversed(list(service.state.rollouts().items())):
        parsed = _parse(rid, record)
        if parsed is None:
            out.append({"id": rid, "state": "damaged", "waves": [], "devices": []})
            continue
        s, batches = parsed
        ok, bad, given = set(s.succeeded), set(s.failed), set(s.updated)
        waves = [
            {
                "wave": i,
                "devices": len(batch),
                "updated": sum(d in given for d in batch),
                "succeeded": sum(d in ok for d in batch),
                "failed": sum(d in bad for d in batch),
            }
            for i, batch in enumerate(batches)
        ]
        members = []
        for d in s.devices:
            report = service.fc.reported.get(d)
            outcome = "succeeded" if d in ok else "failed" if d in bad else "pending"
            members.append(
                {
                    "id": d,
                    "outcome": "returned" if d in s.reverted else outcome,
                    "phase": report.phase if report else "unknown",
                    "phase_since": service.observer.since(d, report),
                }
            )
        out.append(
            {
                "id": rid,
                "state": s.state,
                "running": s.state == RolloutStatus.RUNNING,
                "wave": s.wave,
                "total": len(s.devices),
                "succeeded": len(s.succeeded),
                "failed": len(s.failed),
                "returned": len(s.reverted),
                "reason": s.reason,
                "ts": s.ts,
                "waves": waves,
                "devices": members,
            }
        )
    return {"now": now, "rollouts": out}


def rounds(service) -> dict:
    """Aggregation rounds per domain, with refusals by reason per domain."""
    by_domain: dict[str, dict] = {}
    strategy = service.config.aggregation.strategy
    for r in service.state.round_summaries():
        entry = by_domain.setdefault(r["domain"], {"domain": r["domain"], "rounds": []})
        entry["rounds"].append(r | {"strategy": strategy})
    for key, n in service.state.counters("refused:").items():
        domain, _, reason = key.partition(":")
        entry = by_domain.setdefault(domain, {"domain": domain, "rounds": []})
        entry.setdefault("refused", {})[reason] = n
    for entry in by_domain.values():
        entry.setdefault("refused", {})
    return {
        "strategy": strategy,
        "quorum": service.config.aggregation.quorum,
        "refused": service.state.counters("rejected:"),
        "domains": sorted(by_domain.values(), key=lambda e: e["domain"]),
    }


def versions(service) -> dict:
    keys = ("version", "round_id", "rollout_id", "committed")
    return {
        "current": service.version,
        "versions": [dict(zip(keys, v, strict=True)) for v in service.state.versions()],
    }
