"""Listening for artifacts the cloud sends once to many devices.

Before asking, the device subscribes to each missing artifact's shared topic
(``eclm/v1/artifacts/{sha256}/#``), then sends one shared fetch request per artifact. The
cloud gathers the requests of a wave and publishes each artifact's chunks once there. A
:class:`Reception` writes whatever arrives into the artifacts' downloads (the same
partial files a :class:`~edge_runtime.download.Transfer` resumes), and is over once every
artifact is whole, or its broadcast said it is done, or nothing came for ``wait``
seconds. What is still missing then is fetched chunk by chunk on the device's own topic.

The shared topic adds no trust: only the cloud may write it (broker ACL), each chunk
carries its hash, and a file is taken only if its whole sha256 matches the signed state.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import eclm_wire as wire
from edge_runtime.artifacts import Arrival, ArtifactStore, Download
from edge_runtime.errors import HashMismatch

log = logging.getLogger(__name__)


class Reception:
    """The broadcast phase of fetching ``refs``: listen, ask once each, take what comes."""

    def __init__(
        self,
        store: ArtifactStore,
        refs: list[wire.ArtifactRef],
        *,
        listen: Callable[[list[str], bool], None],
        ask: Callable[[str, int], None],
        clock: Callable[[], float],
        wait: float,
    ) -> None:
        """``listen(shas, on)`` subscribes to (or leaves) their shared topics; ``ask(sha)``
        sends a shared fetch request for one artifact from ``first_chunk`` on (what a
        resumed download lacks starts there)."""
        self.store, self.listen, self.ask, self.clock, self.wait = store, listen, ask, clock, wait
        self.downloads: dict[str, Download] = {r.sha256: store.download(r) for r in refs}
        self.over: set[str] = set()  # whole, or its broadcast is done
        self.received = 0  # chunks taken
        self.duplicates = 0
        self._last = clock()
        self._closed = False

    def start(self) -> None:
        shas = list(self.downloads)
        self.listen(shas, True)
        for sha in shas:
            self._check(sha)  # a resumed download may be whole already
            if sha not in self.over:
                self.ask(sha, min(self.downloads[sha].missing()))
        self._last = self.clock()

    @property
    def done(self) -> bool:
        """Whether to stop listening: every artifact whole or broadcast, or a silence."""
        return len(self.over) == len(self.downloads) or self.clock() - self._last > self.wait

    def missing(self) -> int:
        """Chunks not held yet, over every artifact still on its way."""
        return sum(len(d.missing()) for s, d in self.downloads.items() if not self.store.has(s))

    def on_chunk(self, sha: str, index: int, data: bytes) -> bool:
        """Take a chunk; False if no artifact of this reception is waiting for it.
        ArtifactError if it does not fit the file's declared size."""
        download = self.downloads.get(sha)
        if download is None or self._closed or self.store.has(sha):
            return False
        if index in download.digests:
            self.duplicates += 1
        elif download.add(index, data) is Arrival.NEW:
            self.received += 1
        self._last = self.clock()
        self._check(sha)
        return True

    def on_done(self, done: wire.BroadcastDone) -> None:
        """The cloud sent all of ``done.sha256`` once: what is missing now stays missing."""
        if done.sha256 in self.downloads and done.sha256 not in self.over:
            self._last = self.clock()
            left = len(self.downloads[done.sha256].missing())
            if done.again and left:
                return  # another broadcast follows for those who asked meanwhile: wait
            self.over.add(done.sha256)
            if left:
                log.info("broadcast of %s over; %d chunks to fetch", done.sha256[:12], left)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.listen(list(self.downloads), False)

    def _check(self, sha: str) -> None:
        """Move a whole download into the store; one that fails its sha256 loses all its
        chunks, which the device then fetches on its own topic."""
        download = self.downloads[sha]
        if self.store.has(sha):
            self.over.add(sha)
            return
        if not download.complete:
            return
        try:
            download.finish()
        except HashMismatch as exc:
            log.warning("broadcast %s: %s; fetching it on the device's own topic", sha[:12], exc)
            download.drop(None)
        self.over.add(sha)
