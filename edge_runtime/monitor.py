"""Resource readings: psutil on a real board, a scripted trace for tests and simulation."""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from edge_runtime.errors import ConfigError


@dataclass(frozen=True)
class Reading:
    """What the board has right now. ``None`` where the board has no such sensor."""

    available_mb: float
    rss_mb: float = 0.0
    cpu_percent: float = 0.0
    battery_percent: float | None = None
    on_power: bool = True
    temperature_c: float | None = None
    ts: float = field(default_factory=time.time)


class ResourceSource(ABC):
    """Where readings come from, and the clock a health check times an inference by."""

    # Wall time on a board. A simulator of many devices on one host gives each source its
    # thread's CPU time instead: there the wall time is mostly waiting for the others.
    inference_clock: Callable[[], float] = staticmethod(time.perf_counter)

    @abstractmethod
    def read(self) -> Reading: ...


class PsutilSource(ResourceSource):
    """Readings of this machine through psutil (battery and temperature where present)."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self._process = psutil.Process(os.getpid())
        self._process.cpu_percent(None)  # the first call only starts the measurement

    def read(self) -> Reading:
        ps = self._psutil
        battery = ps.sensors_battery() if hasattr(ps, "sensors_battery") else None
        return Reading(
            available_mb=ps.virtual_memory().available / 2**20,
            rss_mb=self._process.memory_info().rss / 2**20,
            cpu_percent=ps.cpu_percent(None),
            battery_percent=battery.percent if battery else None,
            on_power=battery.power_plugged if battery else True,
            temperature_c=self._temperature(),
        )

    def _temperature(self) -> float | None:
        read = getattr(self._psutil, "sensors_temperatures", None)
        sensors = read() if read else {}
        values = [t.current for entries in sensors.values() for t in entries if t.current]
        return max(values) if values else None


class TraceSource(ResourceSource):
    """Replays scripted readings, one per ``read``; the last one repeats at the end."""

    def __init__(self, readings: Sequence[Reading]) -> None:
        if not readings:
            raise ConfigError("a trace needs at least one reading")
        self.readings = list(readings)
        self.index = 0

    def read(self) -> Reading:
        reading = self.readings[min(self.index, len(self.readings) - 1)]
        self.index += 1
        return reading

    @classmethod
    def from_function(cls, steps: int, make: Callable[[int], Reading]) -> TraceSource:
        return cls([make(i) for i in range(steps)])
