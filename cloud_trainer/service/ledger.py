"""The service's side of adapter updates: each one validated, weighted by how stale its
base is, stored once in the database (that is its acknowledgment), and counted.

It stands where the coordinator expects an aggregator (``add``, ``aggregate``,
``samples_of``); warm starts come from the latest closed round of a domain, which every
worker reads from the same database.
"""

from __future__ import annotations

import logging

import numpy as np

import eclm_wire as wire
from cloud_trainer.federation.aggregation import DomainAggregator
from cloud_trainer.service.state import CloudState
from eclm_wire.enums import EventCode
from eclm_wire.errors import ProtocolError

log = logging.getLogger(__name__)


class UpdateLedger:
    """``checker`` validates (names, shapes, finite, norm, nonce); ``version()`` is the
    model version the fleet is on; an update trained more than ``max_staleness`` versions
    back is refused, a less stale one weighs ``1 / (1 + staleness)``."""

    def __init__(
        self,
        state: CloudState,
        checker: DomainAggregator,
        version,
        *,
        worker: str,
        max_staleness: int = 2,
    ) -> None:
        self.state, self.checker, self.version = state, checker, version
        self.worker, self.max_staleness = worker, max_staleness

    def add(self, update: wire.AdapterUpdate, *, redelivered: bool = False) -> None:
        """Store ``update`` once; ProtocolError (counted by code) if it is refused.
        StateError if the database fails (the caller does not acknowledge it then). A
        ``redelivered`` copy of one stored before (the broker's second try at a message
        whose acknowledgement was lost) is counted as such, not refused as a replay."""
        try:
            self.checker.check(update)
            weight = self.weight(update.base)
            if self.state.add_update(update, weight=weight, worker=self.worker) is None:
                if redelivered:
                    self.state.count("redelivered")
                    log.info("update from %s redelivered, stored before", update.device_id)
                    return
                raise ProtocolError(
                    "stored before: a replay or a redelivery",
                    field="nonce",
                    code=EventCode.REPLAYED,
                )
        except ProtocolError as exc:
            self.state.count(f"rejected:{exc.code}")
            self.state.count(f"refused:{update.domain}:{exc.code}")  # the dashboard's, by domain
            raise
        log.info(
            "update from %s for %s stored (%d samples, weight %.2f)",
            update.device_id,
            update.domain,
            update.samples,
            weight,
        )

    def weight(self, base: str) -> float:
        """What an update trained on ``base`` counts for now; ProtocolError if too stale."""
        trained_on = self.state.version_of_serial(int(base)) if base.isdigit() else None
        if trained_on is None:
            raise ProtocolError(
                f"{base!r} is no desired state this cloud issued",
                field="base",
                code=EventCode.UNKNOWN_BASE,
            )
        staleness = max(0, self.version() - trained_on)
        if staleness > self.max_staleness:
            raise ProtocolError(
                f"trained {staleness} model versions back (limit {self.max_staleness})",
                field="base",
                code=EventCode.STALE_BASE,
            )
        return 1.0 / (1 + staleness)

    def aggregate(self, domain: str) -> tuple[dict[str, np.ndarray], int] | None:
        """The latest closed round's aggregate for ``domain`` and the samples behind it."""
        from safetensors.numpy import load

        found = self.state.latest_aggregate(domain)
        return (load(found[0]), found[1]) if found else None

    def samples_of(self, domain: str, device_id: str) -> int:
        return self.state.samples_of(domain, device_id)
