"""Adapter updates from devices, validated and aggregated per data domain.

Only each device's latest update per domain is kept, so a device that uploads often does
not outweigh the others; a strategy (``cloud_trainer.federation.strategies``) combines them. Every
update is checked first, and a refusal is a ProtocolError whose code is counted:

- ``invalid``: tensor names, shapes or dtypes unlike the head's, a wrong histogram;
- ``not-finite``: a NaN or infinity; ``too-large``: a tensor above the norm bound;
- ``stale-base``: trained on a head version the cloud no longer takes;
- ``replayed``: a nonce this device has used before (a copy the broker redelivers, with
  its DUP flag, is counted in ``redelivered`` instead: its acknowledgement was lost).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Collection

import numpy as np

import eclm_wire as wire
from cloud_trainer.errors import ConfigError
from cloud_trainer.federation.strategies import Contribution, Strategy, WeightedMean
from eclm_wire.codec import check_update
from eclm_wire.enums import EventCode
from eclm_wire.errors import ProtocolError
from edge_runtime.adapter import BIAS

__all__ = ["Contribution", "DomainAggregator"]

log = logging.getLogger(__name__)

# Nonces remembered per device. A replay of an update older than that many of the same
# device's uploads gets through this check (and only replaces that device's latest).
NONCE_MEMORY = 4096
_MEAN = WeightedMean()


class DomainAggregator:
    """``like`` is an adapter's weights (their names and shapes are what updates must
    have); ``strategy`` combines a domain's updates; ``max_norm`` bounds each tensor's L2
    norm (a larger one is refused); ``reference`` is the head the adapters started from,
    which clipping measures deltas from (default ``like``); ``bases`` tells which
    ``base`` versions updates may be trained on (a set, or a predicate; None: any)."""

    def __init__(
        self,
        like: dict[str, np.ndarray],
        *,
        strategy: Strategy = _MEAN,
        max_norm: float = 100.0,
        reference: dict[str, np.ndarray] | None = None,
        bases: Collection[str] | Callable[[str], bool] | None = None,
    ) -> None:
        if isinstance(bases, str):
            raise ConfigError("bases: a set of base versions or a predicate, not one string")
        self.like = like
        self.strategy = strategy
        self.max_norm = max_norm
        self.reference = like if reference is None else reference
        if bases is None or callable(bases):
            self._base_ok: Callable[[str], bool] | None = bases
        else:
            self._base_ok = frozenset(bases).__contains__
        self.rejected: Counter[str] = Counter()
        self.accepted = 0
        self.redelivered = 0  # copies the broker sent again of updates kept before
        self.epsilon: dict[str, float] = {}  # device -> the largest epsilon it reported
        self._latest: dict[str, dict[str, Contribution]] = {}  # domain -> device -> latest
        self._nonces: dict[str, dict[str, None]] = {}  # device -> nonces, oldest first
        self._lock = threading.Lock()

    def rebase(self, reference: dict[str, np.ndarray]) -> None:
        """A new head: clipping measures deltas from ``reference`` from now on."""
        if {k: v.shape for k, v in reference.items()} != {k: v.shape for k, v in self.like.items()}:
            raise ConfigError("reference: needs the names and shapes of the adapter")
        with self._lock:
            self.reference = reference

    def add(self, update: wire.AdapterUpdate, *, redelivered: bool = False) -> None:
        """Keep ``update`` as its device's latest for its domain; ProtocolError (counted by
        code in ``rejected``) if it is refused (see the module's docstring). A
        ``redelivered`` copy of one kept before is counted in ``redelivered`` instead."""
        try:
            kept = self._keep(update, self.check(update), redelivered)
        except ProtocolError as exc:
            with self._lock:
                self.rejected[exc.code] += 1
            raise
        if not kept:
            log.info("update from %s redelivered, kept before", update.device_id)
            return
        log.info(
            "update from %s for %s (%d samples, epsilon %g) accepted",
            update.device_id,
            update.domain,
            update.samples,
            update.epsilon,
        )

    def check(self, update: wire.AdapterUpdate) -> Contribution:
        """``update`` as a contribution if its tensors fit, are finite and within the norm
        bound, its histogram has one count per class and its base is taken; else
        ProtocolError. Nonces are not checked here: ``add`` remembers them."""
        weights = check_update(update.tensors(), self.like)
        for key, value in weights.items():
            norm = float(np.linalg.norm(value))
            if norm > self.max_norm:
                raise ProtocolError(
                    f"norm {norm:.1f} is above {self.max_norm:g}",
                    field=key,
                    code=EventCode.TOO_LARGE,
                )
        classes = self.like[BIAS].shape[0]
        if len(update.histogram) != classes:
            raise ProtocolError(
                f"expected {classes} classes, got {len(update.histogram)}", field="histogram"
            )
        if self._base_ok is not None and not self._base_ok(update.base):
            raise ProtocolError(
                f"trained on {update.base!r}, no longer taken",
                field="base",
                code=EventCode.STALE_BASE,
            )
        return Contribution(weights, update.samples, np.array(update.histogram))

    def _keep(self, update: wire.AdapterUpdate, contribution: Contribution, again: bool) -> bool:
        """Record ``update``'s nonce and keep it (True); ProtocolError if the nonce was
        seen, unless ``again``: a redelivery, counted and dropped (False)."""
        device = update.device_id
        with self._lock:
            seen = self._nonces.setdefault(device, {})
            if update.nonce:
                if update.nonce in seen and again:
                    self.redelivered += 1
                    return False
                if update.nonce in seen:
                    raise ProtocolError(
                        "this nonce came before: a replay", field="nonce", code=EventCode.REPLAYED
                    )
                seen[update.nonce] = None
                if len(seen) > NONCE_MEMORY:
                    del seen[next(iter(seen))]
            self._latest.setdefault(update.domain, {})[device] = contribution
            self.epsilon[device] = max(self.epsilon.get(device, 0.0), update.epsilon)
            self.accepted += 1
            return True

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
        """The strategy's combination of the devices' latest adapters for ``domain`` and
        the samples behind them; None if no device has sent one."""
        with self._lock:
            contributions = list(self._latest.get(domain, {}).values())
            reference = self.reference
        if not contributions:
            return None
        combined = self.strategy.aggregate(contributions, reference)
        return combined, sum(c.samples for c in contributions)
