"""What the dashboard remembers of each device beyond its latest report: when it was last
heard, since when it is in its phase, its phase changes, and its resource readings over
time. Every history is a ring of fixed length, so a service that runs for months with a
thousand devices holds the same memory on its last day as on its first.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

import eclm_wire as wire

CHANGES_KEPT = 50  # phase changes kept per device for its timeline


@dataclass(frozen=True)
class Sample:
    """One resource reading as the cloud received it."""

    ts: float
    available_mb: float | None
    cpu_percent: float | None
    temperature_c: float | None


@dataclass(frozen=True)
class Change:
    """A device's phase change: one line of its timeline."""

    ts: float
    phase: str
    serial: int
    detail: str


class FleetObserver:
    """Fed every report by the coordinator (on the MQTT thread: appends only)."""

    def __init__(self, history: int = 120, clock=time.time) -> None:
        self.history, self.clock = history, clock
        self._lock = threading.Lock()
        self._seen: dict[str, float] = {}
        self._since: dict[str, float] = {}
        self._samples: dict[str, deque[Sample]] = {}
        self._changes: dict[str, deque[Change]] = {}

    def __call__(self, before: wire.ReportedState | None, report: wire.ReportedState) -> None:
        now, d = self.clock(), report.device_id
        with self._lock:
            self._seen[d] = now
            if before is None or before.phase != report.phase:
                self._since[d] = now
            if before is None or before.phase != report.phase or before.serial != report.serial:
                ring = self._changes.setdefault(d, deque(maxlen=CHANGES_KEPT))
                ring.append(Change(now, report.phase, report.serial, report.detail))
            if report.available_mb is not None or report.cpu_percent is not None:
                if before is None or before.ts != report.ts:
                    ring = self._samples.setdefault(d, deque(maxlen=self.history))
                    ring.append(
                        Sample(now, report.available_mb, report.cpu_percent, report.temperature_c)
                    )

    def seen(self, device_id: str, report: wire.ReportedState | None) -> float | None:
        """When the device was last heard (its report's own time before this worker
        heard it: a restarted service still knows how stale a retained report is)."""
        with self._lock:
            seen = self._seen.get(device_id)
        return seen if seen is not None else (report.ts if report else None)

    def since(self, device_id: str, report: wire.ReportedState | None) -> float | None:
        """Since when the device is in its current phase (as far as this worker knows)."""
        with self._lock:
            since = self._since.get(device_id)
        return since if since is not None else (report.ts if report else None)

    def samples(self, device_id: str) -> list[Sample]:
        with self._lock:
            return list(self._samples.get(device_id, ()))

    def changes(self, device_id: str) -> list[Change]:
        with self._lock:
            return list(self._changes.get(device_id, ()))
