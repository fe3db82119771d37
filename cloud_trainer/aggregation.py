"""Adapter updates from devices, validated and aggregated per data domain.

Each device's latest update per domain counts, weighted by the labelled samples it was
trained on, so a device that uploads often does not outweigh the others.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass

import numpy as np

from edge_runtime import protocol as wire
from edge_runtime.adapter import BIAS, check_update
from edge_runtime.errors import ProtocolError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Contribution:
    weights: dict[str, np.ndarray]
    samples: int
    histogram: np.ndarray


class DomainAggregator:
    """``like`` is an adapter's weights (their names and shapes are what updates must
    have); ``max_norm`` bounds each tensor's L2 norm (a larger one is refused)."""

    def __init__(self, like: dict[str, np.ndarray], *, max_norm: float = 100.0) -> None:
        self.like = like
        self.max_norm = max_norm
        self.rejected: Counter[str] = Counter()
        self.accepted = 0
        self._latest: dict[str, dict[str, Contribution]] = {}  # domain -> device -> latest
        self._lock = threading.Lock()

    def add(self, update: wire.AdapterUpdate) -> None:
        """Keep ``update`` as its device's latest for its domain; ProtocolError (counted by
        code in ``rejected``) if its tensors do not fit, are not finite or too large."""
        try:
            weights = check_update(update.tensors(), self.like)
            for key, value in weights.items():
                norm = float(np.linalg.norm(value))
                if norm > self.max_norm:
                    raise ProtocolError(
                        f"norm {norm:.1f} is above {self.max_norm:g}", field=key, code="too-large"
                    )
            classes = self.like[BIAS].shape[0]
            if len(update.histogram) != classes:
                raise ProtocolError(
                    f"expected {classes} classes, got {len(update.histogram)}",
                    field="histogram",
                )
        except ProtocolError as exc:
            self.rejected[exc.code] += 1
            raise
        contribution = Contribution(weights, update.samples, np.array(update.histogram))
        with self._lock:
            self._latest.setdefault(update.domain, {})[update.device_id] = contribution
            self.accepted += 1
        log.info(
            "update from %s for %s (%d samples) accepted",
            update.device_id,
            update.domain,
            update.samples,
        )

    def domains(self) -> list[str]:
        with self._lock:
            return sorted(self._latest)

    def contributors(self, domain: str) -> set[str]:
        with self._lock:
            return set(self._latest.get(domain, {}))

    def samples_of(self, domain: str, device_id: str) -> int:
        """The labels behind ``device_id``'s latest update for ``domain`` (0: none)."""
        with self._lock:
            latest = self._latest.get(domain, {}).get(device_id)
        return latest.samples if latest else 0

    def aggregate(self, domain: str) -> tuple[dict[str, np.ndarray], int] | None:
        """The sample-weighted mean of the devices' latest adapters for ``domain`` and the
        samples behind it; None if no device has sent one."""
        with self._lock:
            contributions = list(self._latest.get(domain, {}).values())
        if not contributions:
            return None
        total = sum(c.samples for c in contributions)
        mean = {
            key: sum(c.weights[key] * (c.samples / total) for c in contributions).astype(np.float32)
            for key in self.like
        }
        return mean, total
