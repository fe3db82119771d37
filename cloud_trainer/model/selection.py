"""Per-device module selection: the most important modules that fit the device's budget.

The search is exact: per layer every non-empty subset is a candidate; layers are combined
keeping only the Pareto front of (importance, memory, latency) within the budget. A larger
budget only adds feasible candidates, so it never lowers the chosen importance.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from cloud_trainer.errors import SelectionError
from device_profiles import Budget


@dataclass(frozen=True)
class Cost:
    memory_kb: float
    latency_ms: float

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.memory_kb + other.memory_kb, self.latency_ms + other.latency_ms)


@dataclass(frozen=True)
class CostTable:
    """What each part costs on one device: ``fixed`` (stem, routers, head) and each module."""

    fixed: Cost
    modules: tuple[tuple[Cost, ...], ...]


@dataclass(frozen=True)
class Selection:
    """The modules chosen per layer and what the sub-model costs."""

    modules: tuple[tuple[int, ...], ...]
    importance: float
    cost: Cost

    @property
    def module_count(self) -> int:
        return sum(len(layer) for layer in self.modules)


def expected_importance(importance: np.ndarray, histogram) -> np.ndarray:
    """Importance per (layer, module) weighted by the device's label histogram."""
    hist = np.asarray(histogram, dtype=np.float64)
    classes = importance.shape[2]
    if hist.shape != (classes,):
        raise SelectionError(f"histogram: expected {classes} counts, got shape {hist.shape}")
    if not np.isfinite(hist).all() or (hist < 0).any() or hist.sum() <= 0:
        raise SelectionError("histogram: counts must be finite, >= 0 and not all zero")
    return importance @ (hist / hist.sum())


def select_modules(
    importance: np.ndarray, histogram, costs: CostTable, budget: Budget
) -> Selection:
    """The sub-model of highest expected importance within ``budget`` (>= 1 module/layer)."""
    scores = expected_importance(importance, histogram)
    front: list[tuple[float, Cost, tuple]] = [(0.0, costs.fixed, ())]
    for layer, layer_costs in enumerate(costs.modules):
        options = []
        for size in range(1, len(layer_costs) + 1):
            for subset in itertools.combinations(range(len(layer_costs)), size):
                cost = Cost(0.0, 0.0)
                for m in subset:
                    cost = cost + layer_costs[m]
                options.append((float(scores[layer, list(subset)].sum()), cost, subset))
        merged = [
            (s + s2, c + c2, chosen + (subset,))
            for s, c, chosen in front
            for s2, c2, subset in options
            if _fits(c + c2, budget)
        ]
        if not merged:
            raise SelectionError(_too_small(costs, budget))
        front = _pareto(merged)
    best = max(front, key=lambda item: (item[0], -item[1].memory_kb, -item[1].latency_ms))
    return Selection(modules=best[2], importance=best[0], cost=best[1])


def _fits(cost: Cost, budget: Budget) -> bool:
    return cost.memory_kb <= budget.model_memory_kb and cost.latency_ms <= budget.latency_ms


def _pareto(items: list[tuple[float, Cost, tuple]]) -> list[tuple[float, Cost, tuple]]:
    """Drop every item another beats or equals on importance, memory and latency."""
    items.sort(key=lambda i: (-i[0], i[1].memory_kb, i[1].latency_ms))
    kept: list[tuple[float, Cost, tuple]] = []
    for item in items:
        _, cost, _ = item
        if not any(
            k[1].memory_kb <= cost.memory_kb and k[1].latency_ms <= cost.latency_ms for k in kept
        ):
            kept.append(item)
    return kept


def smallest_memory_kb(costs: CostTable) -> float:
    """The memory of the smallest sub-model there is (the smallest module per layer)."""
    return costs.fixed.memory_kb + sum(min(c.memory_kb for c in layer) for layer in costs.modules)


def _too_small(costs: CostTable, budget: Budget) -> str:
    smallest = costs.fixed
    fastest = costs.fixed
    for layer in costs.modules:
        smallest = smallest + min(layer, key=lambda c: c.memory_kb)
        fastest = fastest + min(layer, key=lambda c: c.latency_ms)
    return (
        f"no sub-model fits the budget of {budget.model_memory_kb} KB and "
        f"{budget.latency_ms} ms: the smallest possible is {smallest.memory_kb:.1f} KB, "
        f"the fastest {fastest.latency_ms:.3f} ms"
    )
