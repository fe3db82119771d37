"""How the cloud combines the devices' adapters for one domain: aggregation strategies.

One seam in Flower's shape: a strategy implements one hook, :meth:`Strategy.combine`,
and the concrete driver :meth:`Strategy.aggregate` clips every contribution first (its
delta from the reference, the head the adapters started from, scaled down to L2 norm
``clip`` over all tensors together).

- ``mean`` (:class:`WeightedMean`): weighted by the samples behind each update (FedAvg).
  One device that scales its delta by 100 among n moves the result by 100/n of it.
- ``class-mean`` (:class:`ClassWeightedMean`): every class's row of the head weighted by
  the labels of that class behind each update, and by how many classes the device saw.
  Devices whose label mixes are skewed each learn a few classes; a plain mean dilutes
  what one device learned about a class by the devices that never saw it.
- ``median`` (:class:`CoordinateMedian`): per coordinate; holds while fewer than half
  of the contributions are bad.
- ``trimmed-mean`` (:class:`TrimmedMean`): per coordinate, the ``trim`` share of the
  largest and of the smallest values dropped, the rest averaged.

- ``krum`` (:class:`Krum`): the one contribution closest to its ``n - f - 2`` nearest
  neighbours (squared L2 distance over all tensors), ``f`` the ``malicious`` share of ``n``
  (Blanchard et al., 2017). Holds while ``2f + 2 < n``.
- ``multi-krum`` (:class:`MultiKrum`): the ``n - f`` contributions Krum scores best (or
  the ``keep`` share), averaged by their samples (Flower's ``aggregate_krum`` with
  ``to_keep``).

The coordinate-wise two and Krum ignore sample counts: a count is the sender's claim, and
weighting by it would give an attacker the weight it asks for. Where counts weigh
(``mean``, ``class-mean``, ``multi-krum``), the driver first caps each contribution's
count, and its histogram in proportion, at ``cap`` times the median count of the
contributions combined (0: no cap), so a device that claims 1000 times the samples of the
others weighs at most ``cap`` times the median device.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import ClassVar

import numpy as np

from cloud_trainer.errors import ConfigError
from edge_runtime.privacy import clip_delta


@dataclass(frozen=True)
class Contribution:
    """One device's latest adapter for a domain, and the labels it was trained on."""

    weights: dict[str, np.ndarray]
    samples: int
    histogram: np.ndarray


@dataclass(frozen=True)
class Strategy(ABC):
    """Combines contributions into one adapter; ``clip`` > 0 bounds each one's delta
    from the reference first (0: no clipping)."""

    name: ClassVar[str]
    clip: float = field(default=0.0, kw_only=True)
    cap: float = field(default=1.0, kw_only=True)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip >= 0):
            raise ConfigError(f"clip: must be >= 0, got {self.clip}")
        if not (math.isfinite(self.cap) and (self.cap == 0 or self.cap >= 1)):
            raise ConfigError(f"cap: must be 0 (no cap) or >= 1, got {self.cap}")

    @abstractmethod
    def combine(self, contributions: Sequence[Contribution]) -> dict[str, np.ndarray]:
        """One tensor per name from (at least one) already clipped contributions."""

    def aggregate(
        self,
        contributions: Sequence[Contribution],
        reference: dict[str, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        """Cap each contribution's claimed samples, clip its delta from ``reference``, then
        combine (float32)."""
        if not contributions:
            raise ConfigError("nothing to aggregate")
        if self.cap:
            contributions = cap_samples(contributions, self.cap)
        if self.clip:
            if reference is None:
                raise ConfigError("clip: needs a reference to measure deltas from")
            contributions = [
                replace(c, weights=clip_delta(c.weights, reference, self.clip))
                for c in contributions
            ]
        return {k: v.astype(np.float32) for k, v in self.combine(contributions).items()}


def cap_samples(contributions: Sequence[Contribution], cap: float) -> list[Contribution]:
    """``contributions`` with every count above ``cap`` times their median count cut down
    to it, and the histogram scaled with it (a count stays >= 1)."""
    bound = cap * float(np.median([c.samples for c in contributions]))
    capped = []
    for c in contributions:
        if c.samples > bound:
            scale = bound / c.samples
            c = replace(c, samples=max(1, int(bound)), histogram=c.histogram * scale)
        capped.append(c)
    return capped


def _stacked(contributions: Sequence[Contribution]) -> dict[str, np.ndarray]:
    """Per tensor name, the contributions' values stacked on a new first axis."""
    return {k: np.stack([c.weights[k] for c in contributions]) for k in contributions[0].weights}


@dataclass(frozen=True)
class WeightedMean(Strategy):
    """The mean weighted by the samples behind each contribution."""

    name: ClassVar[str] = "mean"

    def combine(self, contributions: Sequence[Contribution]) -> dict[str, np.ndarray]:
        return _weighted_mean(contributions)


def _weighted_mean(contributions: Sequence[Contribution]) -> dict[str, np.ndarray]:
    share = np.array([c.samples for c in contributions], np.float64)
    share /= share.sum()
    return {k: np.tensordot(share, v, axes=1) for k, v in _stacked(contributions).items()}


@dataclass(frozen=True)
class ClassWeightedMean(Strategy):
    """Per class: the rows of tensors with one row per class (``weight``, ``bias``)
    weighted by each contribution's labels of that class, times its coverage: (its
    effective number of classes / classes) ** ``coverage``. A device that saw few classes
    learned what they look like and little of what they are not, so its rows carry
    less. A class no contribution saw, and any other tensor, by the samples behind each
    (as ``mean``)."""

    name: ClassVar[str] = "class-mean"
    coverage: float = 4.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (math.isfinite(self.coverage) and self.coverage >= 0):
            raise ConfigError(f"coverage: must be >= 0, got {self.coverage}")

    def combine(self, contributions: Sequence[Contribution]) -> dict[str, np.ndarray]:
        counts = np.array([c.histogram for c in contributions], np.float64)  # (n, classes)
        samples = np.array([c.samples for c in contributions], np.float64)
        covered = np.array([effective_classes(h) for h in counts]) / counts.shape[1]
        by_class = counts * covered[:, None] ** self.coverage
        by_class = np.where(counts.sum(0) > 0, by_class, samples[:, None])
        by_class /= by_class.sum(0)
        share = samples / samples.sum()
        out = {}
        for k, v in _stacked(contributions).items():
            if v.ndim >= 2 and v.shape[1] == counts.shape[1]:  # (n, classes, ...)
                out[k] = np.einsum("nc,nc...->c...", by_class, v)
            else:
                out[k] = np.tensordot(share, v, axes=1)
        return out


def effective_classes(histogram: np.ndarray) -> float:
    """exp(entropy) of a label histogram: 1 for one class, k for k classes seen equally
    often (1 for no labels)."""
    total = histogram.sum()
    if total <= 0:
        return 1.0
    p = histogram[histogram > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


@dataclass(frozen=True)
class CoordinateMedian(Strategy):
    """The median of every coordinate, unweighted."""

    name: ClassVar[str] = "median"

    def combine(self, contributions: Sequence[Contribution]) -> dict[str, np.ndarray]:
        return {k: np.median(v, axis=0) for k, v in _stacked(contributions).items()}


@dataclass(frozen=True)
class TrimmedMean(Strategy):
    """Per coordinate, the mean of the values left after dropping the ``trim`` share
    (rounded down) of the largest and of the smallest, unweighted."""

    name: ClassVar[str] = "trimmed-mean"
    trim: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.trim < 0.5:
            raise ConfigError(f"trim: must be in [0, 0.5), got {self.trim}")

    def combine(self, contributions: Sequence[Contribution]) -> dict[str, np.ndarray]:
        n = len(contributions)
        cut = int(self.trim * n + 1e-9)  # 0.29 * 100 is 28.999...
        return {
            k: np.sort(v, axis=0)[cut : n - cut].mean(axis=0)
            for k, v in _stacked(contributions).items()
        }


def krum_scores(contributions: Sequence[Contribution], malicious: int) -> np.ndarray:
    """Each contribution's Krum score: the sum of its squared L2 distances (over all
    tensors) to its ``n - malicious - 2`` nearest others (at least one)."""
    flat = np.stack(
        [
            np.concatenate([c.weights[k].ravel() for k in contributions[0].weights])
            for c in contributions
        ]
    ).astype(np.float64)
    squares = (flat * flat).sum(1)
    distances = np.maximum(squares[:, None] + squares[None, :] - 2 * flat @ flat.T, 0)
    n = len(contributions)
    np.fill_diagonal(distances, np.inf)  # a contribution is not its own neighbour
    closest = max(1, min(n - 1, n - malicious - 2))
    if n == 1:
        return np.zeros(1)
    return np.sort(distances, axis=1)[:, :closest].sum(1)


@dataclass(frozen=True)
class Krum(Strategy):
    """The one contribution with the best Krum score, ``f`` = the ``malicious`` share of
    the contributions (rounded down); unweighted."""

    name: ClassVar[str] = "krum"
    malicious: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.malicious < 0.5:
            raise ConfigError(f"malicious: must be in [0, 0.5), got {self.malicious}")

    def faulty(self, n: int) -> int:
        return int(self.malicious * n + 1e-9)

    def combine(self, contributions: Sequence[Contribution]) -> dict[str, np.ndarray]:
        best = int(np.argmin(krum_scores(contributions, self.faulty(len(contributions)))))
        return dict(contributions[best].weights)


@dataclass(frozen=True)
class MultiKrum(Krum):
    """The contributions with the best Krum scores, averaged by their samples: the
    ``keep`` share of them (rounded down, at least one), or with ``keep`` 0 all but ``f``."""

    name: ClassVar[str] = "multi-krum"
    keep: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.keep <= 1:
            raise ConfigError(f"keep: must be in [0, 1], got {self.keep}")

    def combine(self, contributions: Sequence[Contribution]) -> dict[str, np.ndarray]:
        n = len(contributions)
        f = self.faulty(n)
        kept = max(1, int(self.keep * n + 1e-9)) if self.keep else n - f
        best = np.argsort(krum_scores(contributions, f), kind="stable")[:kept]
        return _weighted_mean([contributions[i] for i in best])


STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (WeightedMean, ClassWeightedMean, CoordinateMedian, TrimmedMean, Krum, MultiKrum)
}


def make_strategy(name: str, **params: float) -> Strategy:
    """The strategy registered as ``name`` with ``params``; ValueError naming an unknown
    name or parameter, or a bad value."""
    cls = STRATEGIES.get(name)
    if cls is None:
        raise ConfigError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")
    accepted = sorted(f.name for f in fields(cls))
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ConfigError(
            f"strategy {name!r} has no parameter {', '.join(unknown)}; it takes "
            f"{', '.join(accepted)}"
        )
    return cls(**params)
