"""Sending an artifact once to every device that wants it at the same time.

A device that listens on an artifact's shared topic asks for it with a shared fetch
request. The first such request opens a *gathering* for that sha256: requests that follow
join it, and once no new one came for ``gather`` seconds (at most ``gather_max`` after
the first), or once every device a rollout wave said to expect has asked, the artifact's
chunks are published once on ``eclm/v1/artifacts/{sha256}/chunks/{i}``, then a
:class:`~eclm_wire.BroadcastDone` (a gathering of one device gets them on its own
topic). A device that missed chunks (it asked while the broadcast was under way, or its
link was cut) fetches just those on its own topic.

The quiet wait is what lets a wave's subscribers be in place: each device subscribes
before it asks, and the broker takes a client's packets in order. Bytes out of the cloud
grow with the gatherings (about one per wave), not with the devices. Devices that asked
while a broadcast was under way get one more together (its done message says so, so
that devices missing chunks keep listening instead of asking on their own topics).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import eclm_wire as wire
from cloud_trainer.errors import ConfigError
from edge_runtime.artifacts import ArtifactStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BroadcastPolicy:
    """When a gathering of shared requests for one artifact is sent."""

    gather: float = 0.2  # seconds without a new request before the broadcast starts ...
    gather_max: float = 2.0  # ... but at most this long after the first request
    expect_for: float = 60.0  # how long a wave's expected devices are remembered
    expect_wait: float = 3.0  # after a wave is assigned, wait this long for all of it

    def __post_init__(self) -> None:
        if not 0 <= self.gather <= self.gather_max or not self.expect_for > 0:
            raise ConfigError(
                f"broadcast: 0 <= gather <= gather_max and expect_for > 0, got {self}"
            )


@dataclass
class _Gathering:
    first: float
    last: float
    devices: set[str] = field(default_factory=set)
    chunk: int = 1 << 40  # the first chunk any of them lacks (a resumed download has some)


class Broadcaster:
    """Gathers shared fetch requests per artifact and sends each gathering once."""

    def __init__(
        self,
        publish: Callable[..., object],
        store: ArtifactStore,
        chunk_size: int,
        policy: BroadcastPolicy = BroadcastPolicy(),
        clock: Callable[[], float] = time.monotonic,
        alone: Callable[[str, str], None] | None = None,
    ) -> None:
        """``publish(topic, payload, qos=1)`` sends one message (a paho client's);
        ``alone(device_id, sha256, first_chunk)`` sends an artifact from ``first_chunk``
        on to the one device of a gathering on its own topic (None: broadcast it all the same)."""
        self.publish, self.store, self.chunk_size, self.alone = publish, store, chunk_size, alone
        self.policy, self.clock = policy, clock
        self.sent: Counter[str] = Counter()  # broadcasts per sha256
        self.bytes_sent = 0  # chunk bytes published on shared topics
        self.requests = 0  # shared requests taken
        self._gathering: dict[str, _Gathering] = {}
        self._sending: dict[str, set[str]] = {}  # sha -> devices that asked meanwhile
        self._expected: dict[str, tuple[set[str], float]] = {}  # sha -> (devices, until)
        self._held: set[str] = set()  # a wave is being assigned: wait for all of it
        self._released: dict[str, float] = {}  # sha -> when its wave was assigned
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="cloud-broadcast", daemon=True)

    def start(self) -> Broadcaster:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    @property
    def idle(self) -> bool:
        """Whether no gathering waits and nothing is being sent."""
        with self._cond:
            return not self._gathering and not self._sending

    def expect(self, wanted: dict[str, Iterable[str]]) -> None:
        """A wave starts: ``wanted[sha256]`` are the devices about to ask for it. Their
        gatherings wait until :meth:`release` (the wave is assigned), then for a quiet
        ``gather``; one that every expected device joined is sent at once."""
        until = self.clock() + self.policy.expect_for
        with self._cond:
            for sha, devices in wanted.items():
                self._expected[sha] = (set(devices), until)
                self._held.add(sha)
            self._cond.notify_all()

    def release(self) -> None:
        """The wave :meth:`expect` announced is assigned: its gatherings may go."""
        now = self.clock()
        with self._cond:
            for sha in self._held:
                self._released[sha] = now
            self._held.clear()
            self._cond.notify_all()

    def want(self, request: wire.FetchRequest) -> None:
        """Take one shared request (from the MQTT thread: only notes it)."""
        now = self.clock()
        with self._cond:
            self.requests += 1
            if request.sha256 in self._sending:  # under way: it gets the rest, then repairs
                self._sending[request.sha256].add(request.device_id)
                return
            gathering = self._gathering.setdefault(request.sha256, _Gathering(now, now))
            gathering.last = now
            gathering.devices.add(request.device_id)
            gathering.chunk = min(gathering.chunk, request.first_chunk)
            self._cond.notify_all()

    def _due(self, sha: str, gathering: _Gathering, now: float) -> float:
        """When ``gathering`` is to be sent (now or earlier: at once)."""
        expected, until = self._expected.get(sha, (set(), 0.0))
        if expected and until >= now:
            if expected <= gathering.devices:
                return now
            if sha in self._held:  # the wave is still being assigned
                return until
            # assigned: wait for the expected devices (slow ones join the next broadcast)
            released = self._released.get(sha, gathering.last)
            return max(released + self.policy.expect_wait, gathering.last + self.policy.gather)
        return min(gathering.last + self.policy.gather, gathering.first + self.policy.gather_max)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopped:
                        return
                    now = self.clock()
                    due = {s: self._due(s, g, now) for s, g in self._gathering.items()}
                    ready = [s for s, at in due.items() if at <= now]
                    if ready:
                        sha = min(ready, key=due.__getitem__)
                        gathering = self._gathering.pop(sha)
                        self._sending[sha] = set()
                        break
                    self._cond.wait(min(due.values()) - now if due else None)
            try:
                if len(gathering.devices) == 1 and self.alone is not None:
                    # no one to share with
                    self.alone(next(iter(gathering.devices)), sha, gathering.chunk)
                else:
                    self._send(sha, gathering.devices, gathering.chunk)
            except Exception:  # one place where sender bugs are caught and logged
                log.exception("broadcasting %s failed", sha[:12])
            finally:
                with self._cond:
                    late = self._sending.pop(sha, set())
                    if late:  # they listen on: one more broadcast (or send) for them all
                        now = self.clock()
                        again = self._gathering.setdefault(sha, _Gathering(now, now))
                        again.devices |= late
                        again.chunk = 0
            if late:
                log.info("%d devices asked for %s during its broadcast", len(late), sha[:12])

    def _send(self, sha: str, devices: set[str], first: int = 0) -> None:
        if not self.store.has(sha):
            log.warning("%d devices asked for unknown artifact %s", len(devices), sha[:12])
            return
        size = self.store.path(sha).stat().st_size
        total = -(-size // self.chunk_size)
        for index in range(min(first, total), total):
            chunk = wire.pack_chunk(self.store.read_chunk(sha, index, self.chunk_size))
            self.publish(wire.artifact_topic(sha, index), chunk, qos=1)
            self.bytes_sent += len(chunk)
        with self._cond:  # those who asked meanwhile get it again: others keep listening
            again = bool(self._sending.get(sha))
        done = wire.BroadcastDone(sha256=sha, chunks=total, devices=len(devices), again=again)
        self.publish(wire.artifact_done_topic(sha), done.encode(), qos=1)
        self.sent[sha] += 1
        log.info("broadcast %s (%d chunks) to %d devices", sha[:12], total, len(devices))
