"""Per-device module selection: the most important modules that fit the device's budget.

Per layer every non-empty subset is a candidate. Where there are at most ``EXACT_LIMIT``
sub-models in all (the native presets), the search is exact: layers are combined keeping
only the Pareto front of (importance, memory, latency) within the budget. Beyond that (a
decomposed ResNet-34 has 15^16) that front grows without bound (minutes for 16 layers of
4), so a dynamic programme runs on a grid of ``GRID_PER_LAYER`` x layers cells of all
modules' memory and latency, every cost rounded *up* to whole cells: the choice always fits
the budget, and its importance is at least that of the best sub-model fitting a budget
smaller by 1/``GRID_PER_LAYER`` of all modules' memory and latency (each layer's rounding
adds under one cell; the fixed parts are not rounded). Either way a larger budget only adds
feasible candidates, so it never lowers the chosen importance.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from cloud_trainer.errors import SelectionError
from device_profiles import Budget

EXACT_LIMIT = 1_000_000
GRID_PER_LAYER = 40


@dataclass(frozen=True)
class Cost:
    """Memory in KB (the unit of the wire's module sets) and estimated latency."""

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
    options = [
        _options(scores[layer], layer_costs) for layer, layer_costs in enumerate(costs.modules)
    ]
    if math.prod(len(o) for o in options) > EXACT_LIMIT:
        chosen = _grid_select(options, costs, budget)
        if chosen is None:
            raise SelectionError(_too_small(costs, budget))
        return chosen
    front: list[tuple[float, Cost, tuple]] = [(0.0, costs.fixed, ())]
    for options_l in options:
        merged = [
            (s + s2, c + c2, chosen + (subset,))
            for s, c, chosen in front
            for s2, c2, subset in options_l
            if _fits(c + c2, budget)
        ]
        if not merged:
            raise SelectionError(_too_small(costs, budget))
        front = _pareto(merged)
    best = max(front, key=lambda item: (item[0], -item[1].memory_kb, -item[1].latency_ms))
    return Selection(modules=best[2], importance=best[0], cost=best[1])


def _grid_select(options: list[list], costs: CostTable, budget: Budget) -> Selection | None:
    """The dynamic programme of the module docstring; None when nothing fits."""
    cells = GRID_PER_LAYER * len(options)
    full = costs.fixed
    for layer in costs.modules:
        for cost in layer:
            full = full + cost
    if _fits(full, budget):  # importance is never negative: every module is worth taking
        every = [layer[-1] for layer in options]  # the last subset is the whole layer
        return Selection(tuple(o[2] for o in every), sum(o[0] for o in every), full)
    # The grid spans the modules' costs only: the fixed parts are taken off the budget.
    room = (
        budget.model_memory_kb - costs.fixed.memory_kb,
        budget.latency_ms - costs.fixed.latency_ms,
    )
    span = (full.memory_kb - costs.fixed.memory_kb, full.latency_ms - costs.fixed.latency_ms)
    step = (max(span[0], 1e-12) / cells, max(span[1], 1e-12) / cells)

    def units(cost: Cost) -> tuple[int, int]:
        return math.ceil(cost.memory_kb / step[0]), math.ceil(cost.latency_ms / step[1])

    if min(room) < 0:
        return None
    top = cells + sum(len(layer) for layer in costs.modules) + 1  # all modules, rounded up
    rows = min(math.floor(room[0] / step[0]), top) + 1
    cols = min(math.floor(room[1] / step[1]), top) + 1
    # best[i, j]: the highest importance with rounded costs of at most (i, j) cells.
    best = np.zeros((rows, cols), np.float32)
    choices = []
    for layer_options in options:
        new = np.full((rows, cols), -np.inf, np.float32)
        arg = np.zeros((rows, cols), np.int32)
        for k, (score, cost, _) in enumerate(layer_options):
            dm, dl = units(cost)
            if dm >= rows or dl >= cols:
                continue
            cand = best[: rows - dm, : cols - dl] + np.float32(score)
            better = cand > new[dm:, dl:]
            np.copyto(new[dm:, dl:], cand, where=better)
            np.copyto(arg[dm:, dl:], k, where=better)
        best = new
        choices.append(arg)
    if not np.isfinite(best[-1, -1]):
        return None
    i, j, chosen = rows - 1, cols - 1, []
    for layer_options, arg in zip(reversed(options), reversed(choices), strict=True):
        option = layer_options[arg[i, j]]
        chosen.append(option)
        dm, dl = units(option[1])
        i, j = i - dm, j - dl
    chosen.reverse()
    total = costs.fixed
    for _, cost, _ in chosen:
        total = total + cost
    return Selection(tuple(o[2] for o in chosen), sum(o[0] for o in chosen), total)


def _options(scores: np.ndarray, layer_costs: tuple[Cost, ...]) -> list[tuple[float, Cost, tuple]]:
    """(importance, cost, modules) of every non-empty subset of one layer's modules."""
    options = []
    for size in range(1, len(layer_costs) + 1):
        for subset in itertools.combinations(range(len(layer_costs)), size):
            cost = Cost(0.0, 0.0)
            for m in subset:
                cost = cost + layer_costs[m]
            options.append((float(scores[list(subset)].sum()), cost, subset))
    return options


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
        f"no sub-model fits the budget of {budget.model_memory_mb:g} MB and "
        f"{budget.latency_ms:g} ms: the smallest possible is {smallest.memory_kb / 1024:.3f} MB, "
        f"the fastest {fastest.latency_ms:.3f} ms"
    )
