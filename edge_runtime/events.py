"""What a device says on its ``events`` topic: the codes it uses, and a bound on how many
events about refused messages it publishes, so that whoever can publish to a device
cannot make it publish as much back.

Refusals pass a token bucket (``rate`` a second, bursts of ``burst``); those over it are
counted by code and reported together in one ``events-suppressed`` event at most every
``summary_every`` seconds. Events about the device's own work (a damaged artifact, a
failed download attempt, a failed install) are few by nature and are not bounded here.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from edge_runtime.errors import ConfigError


@dataclass(frozen=True)
class EventLimits:
    """The bound on events about refused messages."""

    rate: float = 5.0  # a second, on average
    burst: int = 20
    summary_every: float = 1.0  # seconds between summaries of what was suppressed

    def __post_init__(self) -> None:
        if not (self.rate > 0 and self.burst >= 1 and self.summary_every > 0):
            raise ConfigError(f"event limits: rate > 0, burst >= 1, summary_every > 0: {self}")


class EventLimiter:
    """A token bucket that counts what it refuses. Not thread-safe: one worker uses it."""

    def __init__(
        self, limits: EventLimits = EventLimits(), *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limits, self.clock = limits, clock
        self._tokens = float(limits.burst)
        self._last = clock()
        self._since = self._last  # start of the window the suppressed counts cover
        self.suppressed: Counter[str] = Counter()
        self.total_suppressed = 0

    def allow(self, code: str) -> bool:
        """True if an event with ``code`` may go out now; else it is counted."""
        now = self.clock()
        self._tokens = min(self.limits.burst, self._tokens + (now - self._last) * self.limits.rate)
        self._last = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        if not self.suppressed:
            self._since = now
        self.suppressed[code] += 1
        self.total_suppressed += 1
        return False

    def summary(self) -> str | None:
        """What was suppressed since the last summary, once ``summary_every`` has passed
        since the first of it; None if nothing (or not yet)."""
        now = self.clock()
        if not self.suppressed or now - self._since < self.limits.summary_every:
            return None
        counts = ", ".join(f"{code} {n}" for code, n in self.suppressed.most_common())
        total = sum(self.suppressed.values())
        text = f"{total} refused messages not reported one by one in {now - self._since:.1f} s: "
        self.suppressed.clear()
        return (text + counts)[:2000]
