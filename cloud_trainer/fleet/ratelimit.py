"""Per-device limits on what devices send the cloud: updates, events, fetches, reports.

A token bucket per (device, kind): ``burst`` messages at once, refilled at ``rate`` a
second. A message over the limit is dropped before it is decoded, and counted by kind and
reason (``eclm_messages_dropped_total`` on ``/metrics``); nothing waits in a queue for
room. The buckets of at most ``max_devices`` devices are kept (the least recently heard
from go first), so a sender that invents device ids cannot grow the cloud's memory.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from cloud_trainer.errors import ConfigError


class Kind(StrEnum):
    """What is limited, by the device topic it arrives on."""

    UPDATES = "updates"
    EVENTS = "events"
    FETCHES = "fetch"
    REPORTS = "reported"  # and ``status``


class DropReason(StrEnum):
    RATE_LIMIT = "rate-limit"  # over its device's limit for the kind
    QUEUE_FULL = "queue-full"  # the cloud's bounded work queue for the kind is full


_KIND_OF_TOPIC = {k.value: k for k in Kind} | {"status": Kind.REPORTS}


@dataclass(frozen=True)
class Limit:
    """``burst`` messages at once, then ``rate`` a second (``rate`` 0: no limit)."""

    rate: float
    burst: int

    def __post_init__(self) -> None:
        if not (self.rate >= 0 and self.burst >= 1):
            raise ConfigError(f"limit: rate >= 0 and burst >= 1, got {self.rate}, {self.burst}")


class RateLimiter:
    """Decides, per message, whether a device is within its limit for the topic's kind."""

    def __init__(
        self,
        limits: dict[Kind, Limit],
        *,
        max_devices: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = {k: v for k, v in limits.items() if v.rate > 0}
        self.max_devices = max_devices
        self.clock = clock
        self.dropped: Counter[tuple[str, str]] = Counter()  # (kind, reason) -> messages
        self._buckets: OrderedDict[str, dict[Kind, list[float]]] = OrderedDict()
        self._lock = threading.Lock()

    def allow(self, device_id: str, topic_kind: str) -> bool:
        """True if a message of ``topic_kind`` (a device topic's kind) from ``device_id``
        is within the limit (and spend it); False, counted, if it is to be dropped."""
        kind = _KIND_OF_TOPIC.get(topic_kind)
        limit = self.limits.get(kind) if kind else None
        if limit is None:
            return True
        now = self.clock()
        with self._lock:
            buckets = self._buckets.get(device_id)
            if buckets is None:
                buckets = self._buckets[device_id] = {}
                if len(self._buckets) > self.max_devices:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(device_id)
            tokens, then = buckets.get(kind, (float(limit.burst), now))
            tokens = min(float(limit.burst), tokens + (now - then) * limit.rate)
            if tokens < 1.0:
                buckets[kind] = [tokens, now]
                self.dropped[kind.value, DropReason.RATE_LIMIT.value] += 1
                return False
            buckets[kind] = [tokens - 1.0, now]
            return True

    def count_drop(self, topic_kind: str, reason: DropReason) -> None:
        kind = _KIND_OF_TOPIC.get(topic_kind, topic_kind)
        with self._lock:
            self.dropped[str(kind), reason.value] += 1

    def counts(self) -> Counter[tuple[str, str]]:
        """A copy of ``dropped``, safe to read while messages arrive."""
        with self._lock:
            return Counter(self.dropped)

    def devices(self) -> int:
        """Devices whose buckets are kept."""
        with self._lock:
            return len(self._buckets)
