"""Bringing the store to what a desired state needs, and keeping it there.

A :class:`Goal` is a desired state and the artifacts it needs. :class:`Keeper` re-hashes
each of them, fetches what is missing or damaged (a :class:`~edge_runtime.download.Transfer`)
and hands the goal to ``install`` once the store holds all of it. It also keeps the set
that serves whole: a part found damaged later (on a swap, or by the periodic re-hash) is
moved aside and fetched again while the programs already loaded keep serving.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import eclm_wire as wire
from eclm_wire import EventCode, Phase
from edge_runtime.artifacts import ArtifactStore, Check
from edge_runtime.broadcast import Reception
from edge_runtime.content import ContentAccess, HttpFetch
from edge_runtime.download import RetryPolicy, Transfer
from edge_runtime.errors import ContentError
from edge_runtime.reporting import Reporter
from edge_runtime.stats import AgentStats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Goal:
    """A desired state whose artifacts the store must hold: installed once they are all
    there, or (``install`` False) only repaired because it serves already."""

    desired: wire.DesiredState
    backend: str
    refs: list[wire.ArtifactRef]
    install: bool = True

    def repair(self) -> Goal:
        return Goal(self.desired, self.backend, self.refs, install=False)


class Keeper:
    """Owns the goal on its way and the transfer for it (one of each at a time)."""

    def __init__(
        self,
        store: ArtifactStore,
        voice: Reporter,
        *,
        install: Callable[[Goal], None],
        request: Callable[[str, int], None],
        clock: Callable[[], float],
        window: int = 2,
        timeout: float = 10.0,
        retry: RetryPolicy | None = None,
        scrub_interval: float = 3600.0,
        stats: AgentStats | None = None,
        listen: Callable[[list[str], bool], None] | None = None,
        ask_shared: Callable[[str, int], None] | None = None,
        broadcast_wait: float = 0.0,
        content: ContentAccess | None = None,
    ) -> None:
        """With ``listen``, ``ask_shared`` and ``broadcast_wait`` > 0 a goal to install
        first listens for broadcasts (:mod:`~edge_runtime.broadcast`), then fetches what
        is missing with ``request``; repairs of the serving set always use ``request``.
        With ``content``, a goal whose desired state names a content server is fetched
        from it over HTTPS first (:mod:`~edge_runtime.content`), over MQTT if it fails."""
        self.store, self.voice, self.install, self.request = store, voice, install, request
        self.listen, self.ask_shared, self.broadcast_wait = listen, ask_shared, broadcast_wait
        self.reception: Reception | None = None
        self.content, self.http = content, None
        self._gave_up = -1  # the serial whose content server failed: MQTT only for it
        self.clock, self.window, self.timeout = clock, window, timeout
        self.retry, self.scrub_interval = retry or RetryPolicy(), scrub_interval
        self.goal: Goal | None = None
        self.transfer: Transfer | None = None
        self.active: Goal | None = None  # what serves, kept whole
        self.stats = stats or AgentStats()  # repairs, duplicate chunks, retries
        self._last_scrub = clock()

    def drop(self) -> None:
        """Forget the goal on its way (what serves keeps serving)."""
        if self.reception is not None:
            self.reception.close()
        if self.http is not None:
            self.http.cancel()
        self.goal = self.transfer = self.reception = self.http = None

    def served(self, goal: Goal) -> None:
        """``goal`` was installed and serves now."""
        self.active = goal.repair()
        self._last_scrub = self.clock()

    def want(self, goal: Goal) -> None:
        """Install ``goal`` if the store holds all of it (each object re-hashed), else
        fetch what is missing or damaged first."""
        missing = {r.sha256: r for r in goal.refs if self.check(r) is not Check.GOOD}
        if not missing:
            self.drop()
            if goal.install:
                self.install(goal)
            return
        refs = list(missing.values())
        self.drop()
        self.goal = goal
        detail = f"fetching {len(refs)} artifacts ({sum(r.size for r in refs)} bytes)"
        if goal.install:
            self.voice.set(phase=Phase.DOWNLOADING, serial=goal.desired.serial, detail=detail)
        else:
            self.voice.set(detail=f"repairing the serving set: {detail}")
        if self._by_http(goal, refs):
            return
        self._by_mqtt(goal, refs)
        self._after()

    def _by_http(self, goal: Goal, refs: list[wire.ArtifactRef]) -> bool:
        """Start fetching ``refs`` from the content server ``goal`` names, if any."""
        source, serial = goal.desired.source, goal.desired.serial
        if not (goal.install and source and self.content) or self._gave_up == serial:
            return False
        try:
            self.http = HttpFetch(self.store, refs, source, self.content).start()
        except ContentError as exc:
            log.warning("%s; fetching over MQTT", exc)
            self._gave_up = serial
            return False
        return True

    def _by_mqtt(self, goal: Goal, refs: list[wire.ArtifactRef]) -> None:
        if goal.install and self.listen and self.ask_shared and self.broadcast_wait > 0:
            self.reception = Reception(
                self.store,
                refs,
                listen=self.listen,
                ask=self.ask_shared,
                clock=self.clock,
                wait=self.broadcast_wait,
            )
            self.reception.start()
        else:
            self._fetch(refs)

    def _fetch(self, refs: list[wire.ArtifactRef]) -> None:
        """Fetch ``refs`` chunk by chunk on the device's own topic (resuming what is held)."""
        self.transfer = Transfer(
            self.store,
            refs,
            request=self._ask,
            event=self._event,
            clock=self.clock,
            window=self.window,
            timeout=self.timeout,
            retry=self.retry,
        )
        self.transfer.start()

    def _ask(self, sha: str, index: int) -> None:
        self.stats.asked_chunks += 1
        self.request(sha, index)

    def on_done(self, done: wire.BroadcastDone) -> None:
        """A broadcast ended: fetch at once what it did not bring."""
        if self.reception is not None:
            self.reception.on_done(done)
            self._after()

    def check(self, ref: wire.ArtifactRef) -> Check:
        """Re-hash one stored object; a damaged one is moved aside and reported."""
        found = self.store.verify(ref.sha256)
        if found is Check.DAMAGED:
            self.damaged(ref.sha256, ref.name)
        return found

    def damaged(self, sha: str, name: str) -> None:
        """Report an object found damaged (and already moved aside)."""
        self.stats.repairs += 1
        self.voice.event(
            EventCode.ARTIFACT_DAMAGED,
            f"{name} ({sha[:12]}) was damaged on disk: moved aside, fetching it again",
        )

    def on_chunk(self, sha: str, index: int, data: bytes) -> None:
        reception = self.reception
        if reception is not None:
            taken, duplicates = reception.received, reception.duplicates
            if reception.on_chunk(sha, index, data):
                self.stats.broadcast_chunks += reception.received - taken
                self.stats.duplicate_chunks += reception.duplicates - duplicates
                self._after()
                return
        transfer = self.transfer
        if transfer is None:
            log.debug("chunk %d of %s arrived with no download for it", index, sha[:12])
            return
        duplicates = transfer.duplicates
        if not transfer.on_chunk(sha, index, data):
            log.debug("chunk %d of %s is not awaited", index, sha[:12])
            return
        self.stats.duplicate_chunks += transfer.duplicates - duplicates
        self._after()

    def idle(self) -> None:
        """Retry and re-ask for the transfer; drop a goal that expired; keep the serving
        set whole (re-hashed every ``scrub_interval`` seconds)."""
        transfer, goal = self.transfer, self.goal
        if transfer is not None and goal is not None:
            if goal.desired.expires and goal.desired.expires < time.time():
                self.drop()
                self.voice.set(phase=Phase.FAILED, detail=f"serial {goal.desired.serial} expired")
            else:
                transfer.poll()
                self._after()
        elif self.reception is not None or self.http is not None:
            self._after()
        active = self.active
        if active is None or self.goal is not None:
            return
        if self.clock() - self._last_scrub >= self.scrub_interval:
            self._last_scrub = self.clock()
            for ref in active.refs:
                self.check(ref)
        if not all(self.store.has(r.sha256) for r in active.refs):
            self.want(active)

    def _after(self) -> None:
        """Install (or only note the repair) once the transfer holds every artifact;
        after a broadcast, fetch what it did not bring."""
        reception, goal, http = self.reception, self.goal, self.http
        if http is not None and goal is not None and http.finished.is_set():
            self.http = None
            self.stats.http_bytes += http.received
            if not http.ok:
                self._gave_up = goal.desired.serial
                self.voice.event(EventCode.TRANSFER_RETRY, f"content server: {http.error}"[:1000])
            self.want(goal)  # installs what the server brought; MQTT fetches the rest
            return
        if reception is not None and goal is not None and reception.done:
            reception.close()
            self.reception = None
            left = [r for r in goal.refs if not self.store.has(r.sha256)]
            if left:
                log.info("%d chunks missing after the broadcast", reception.missing())
                self._fetch(left)
            else:
                self._arrived(goal)
                return
        transfer = self.transfer
        if transfer is None or goal is None or not transfer.done:
            return
        if goal.install:
            self._arrived(goal)
        else:
            self.drop()
            log.info("repaired the serving set of serial %d", goal.desired.serial)
            self.voice.set(detail=f"repaired the serving set of serial {goal.desired.serial}")

    def _arrived(self, goal: Goal) -> None:
        """Install ``goal`` once its artifacts are in: each one passed its whole-file hash
        on the way in (or when :meth:`want` took the goal), and loading hashes every
        program again as it reads it, so hashing them all here as well would only repeat
        that. One that went missing meanwhile is fetched again."""
        self.drop()
        if all(self.store.has(r.sha256) for r in goal.refs):
            self.install(goal)
        else:
            self.want(goal)

    def _event(self, code: EventCode, reason: str) -> None:
        self.voice.event(code, reason, self.voice.topic("fetch"))
        if code is EventCode.TRANSFER_RETRY:
            self.stats.transfer_retries += 1
        goal = self.goal
        if code is EventCode.TRANSFER_FAILING and goal is not None and goal.install:
            self.voice.set(phase=Phase.FAILED, detail=f"{reason} (still trying)"[:1000])
