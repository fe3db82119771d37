"""What one agent counts, for benches, experiments and tests (never sent on the wire)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class AgentStats:
    """Counters of one agent since it started. Not frozen: they are bumped in place, each
    by one writer (the worker thread, or the serving thread for ``uploads``), so no lock:
    a reader sees each counter whole, maybe one step behind."""

    installs: int = 0  # desired states that passed their health check and went live
    swaps: int = 0  # module sets switched to on a resource reading
    budget_violations: int = 0  # readings after which the sub-model stayed too large
    uploads: int = 0  # adapter updates sent to the cloud
    offers_received: int = 0  # adapter offers (warm starts) that arrived
    warm_starts: int = 0  # offers taken into an adapter
    refusals: int = 0  # messages refused (each reported, within the event bound)
    repairs: int = 0  # stored objects found damaged and moved aside
    duplicate_chunks: int = 0  # chunks that arrived again (after a cut, say)
    transfer_retries: int = 0  # files that failed their whole-file check, fetched again
    broadcast_chunks: int = 0  # chunks taken from an artifact's shared (broadcast) topic
    asked_chunks: int = 0  # chunks asked for on the device's own topic (repair, single)
    http_bytes: int = 0  # bytes fetched from a content server (HTTPS)

    def snapshot(self) -> dict[str, int]:
        """Every counter by name."""
        return asdict(self)
