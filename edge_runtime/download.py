"""Fetching the artifacts of one goal in chunks: a window of requests in flight, requests
repeated when a link stalls, and files that fail their whole-file hash fetched again.

A chunk's own hash only proves it was not damaged on the way, not who sent it: anyone who
can publish on the device's chunk topic can send self-consistent lies. So when the whole
file fails, the chunks that cannot be trusted are dropped and asked for again, after a
backoff, with an event per failed attempt. Untrusted are the chunks that arrived unasked
or that another delivery contradicted; when no chunk is suspect (or on every second
failure in a row), all are. After ``budget`` failed attempts the transfer keeps going at
the slowest pace: it stops only when its goal is replaced or expires.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass

import eclm_wire as wire
from eclm_wire import EventCode
from edge_runtime.artifacts import Arrival, ArtifactStore, Download
from edge_runtime.errors import ConfigError, HashMismatch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    """How a file that fails its whole-file check is fetched again."""

    budget: int = 5  # failed attempts per artifact before the device reports it failing
    backoff: float = 0.5  # seconds before the first retry, doubled each time ...
    max_backoff: float = 30.0  # ... up to this, the pace once the budget is spent

    def __post_init__(self) -> None:
        if self.budget < 1 or not 0 <= self.backoff <= self.max_backoff:
            raise ConfigError(f"retry: budget >= 1 and 0 <= backoff <= max_backoff: {self}")

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1, 2, ...)."""
        if attempt > self.budget:
            return self.max_backoff
        return min(self.max_backoff, self.backoff * 2 ** (attempt - 1))


class TransferState(enum.Enum):
    FETCHING = "fetching"
    WAITING = "waiting"  # backing off after a failed whole-file check
    DONE = "done"


class Transfer:
    """Downloads ``refs`` one after another into ``store``.

    ``request(sha256, index)`` asks the cloud for one chunk; ``event(code, reason)``
    reports a failed attempt. The owner feeds it chunks (:meth:`on_chunk`) and calls
    :meth:`poll` now and then; :attr:`done` says when every file is in the store.
    """

    def __init__(
        self,
        store: ArtifactStore,
        refs: list[wire.ArtifactRef],
        *,
        request: Callable[[str, int], None],
        event: Callable[[EventCode, str], None],
        clock: Callable[[], float],
        window: int = 2,
        timeout: float = 10.0,
        retry: RetryPolicy = RetryPolicy(),
    ) -> None:
        if not refs:
            raise ConfigError("a transfer needs at least one artifact")
        self.store, self.request, self.event, self.clock = store, request, event, clock
        self.window, self.timeout, self.retry = window, timeout, retry
        self.pending = list(refs[1:])
        self.current: Download = store.download(refs[0])
        self.state = TransferState.FETCHING
        self.asked: list[int] = []  # chunks of ``current`` on their way
        self.queue: list[int] = []  # chunks of ``current`` not asked for yet
        self.suspects: set[int] = set()  # chunks of ``current`` that may be lies
        self.attempts = 0  # failed whole-file checks of ``current``
        self.failed_attempts = 0  # of every file of this transfer
        self.duplicates = 0  # chunks that arrived again (after a cut, say)
        self._resume_at = 0.0
        self._last_progress = clock()

    @property
    def done(self) -> bool:
        return self.state is TransferState.DONE

    @property
    def exhausted(self) -> bool:
        """True once the current file failed ``retry.budget`` times."""
        return self.attempts >= self.retry.budget

    def start(self) -> None:
        """Ask for the first chunks (or finish at once what a resumed download holds)."""
        self._advance()

    def on_chunk(self, sha256: str, index: int, data: bytes) -> bool:
        """Take a chunk; False if it is not one this transfer waits for. ArtifactError if
        it does not fit the file's declared size."""
        if self.done or self.current.ref.sha256 != sha256:
            return False
        if self.state is TransferState.WAITING and index not in self.current.digests:
            return False  # backing off: nothing new is taken until the retry asks again
        asked = index in self.asked
        arrival = self.current.add(index, data)
        if arrival is Arrival.CONFLICT:
            self.suspects.add(index)
            log.warning("chunk %d of %s arrived with other bytes", index, self.current.ref.name)
        elif arrival is Arrival.DUPLICATE:
            self.duplicates += 1
        elif not asked:
            self.suspects.add(index)
        if asked:
            self.asked.remove(index)
        self._last_progress = self.clock()
        if self.state is TransferState.FETCHING:
            self._advance()
        return True

    def poll(self) -> None:
        """Retry once a backoff is over; ask again for chunks a stalled link lost."""
        now = self.clock()
        if self.state is TransferState.WAITING and now >= self._resume_at:
            self.state = TransferState.FETCHING
            self.asked, self.queue = [], []
            self._advance()
        elif self.state is TransferState.FETCHING and now - self._last_progress > self.timeout:
            log.warning(
                "download of %s stalled; asking again for chunks %s",
                self.current.ref.name,
                self.asked,
            )
            for index in self.asked:
                self._ask(index)
            self._last_progress = now

    def _advance(self) -> None:
        """Keep ``window`` chunks of the current file on their way (a resumed download
        asks only for the chunks it lacks); verify each file once it has every chunk."""
        while self.current.complete:
            try:
                self.current.finish()
            except HashMismatch as exc:
                self._failed(exc)
                return
            if not self.pending:
                self.state = TransferState.DONE
                return
            self.current = self.store.download(self.pending.pop(0))
            self.asked, self.queue, self.suspects, self.attempts = [], [], set(), 0
        if not self.asked and not self.queue:
            self.queue = self.current.missing()
        while len(self.asked) < self.window and self.queue:
            index = self.queue.pop(0)
            if index not in self.current.digests:
                self._ask(index)
                self.asked.append(index)

    def _failed(self, exc: HashMismatch) -> None:
        self.attempts += 1
        self.failed_attempts += 1
        every = not self.suspects or self.attempts % 2 == 0
        dropped = self.current.drop(None if every else self.suspects)
        self.suspects = set()
        delay = self.retry.delay(self.attempts)
        self.state, self._resume_at = TransferState.WAITING, self.clock() + delay
        self.asked, self.queue = [], []
        reason = (
            f"{exc}; attempt {self.attempts}: dropped {dropped} of "
            f"{self.current.ref.chunk_count} chunks, asking again in {delay:g} s"
        )
        log.warning("%s", reason)
        self.event(EventCode.TRANSFER_RETRY, reason)
        if self.attempts == self.retry.budget:
            self.event(
                EventCode.TRANSFER_FAILING,
                f"{self.current.ref.name}: {self.attempts} attempts failed their whole-file "
                f"check; asking again every {self.retry.max_backoff:g} s",
            )

    def _ask(self, index: int) -> None:
        self.request(self.current.ref.sha256, index)
        self._last_progress = self.clock()
