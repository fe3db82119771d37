"""Chains per-module programs into a sub-model: stem, routed modular layers, head.

Layer ``l`` computes ``h + sum_i w_i * block_i(h)`` with ``w`` the softmax of the router's
logits over the modules present, exactly as the cloud's torch model does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from edge_runtime.backends import Program
from edge_runtime.errors import BackendError


def part_name(layer: int, module: int | None = None) -> str:
    """The part naming the cloud uses: ``stem``, ``layer{l}.router``, ``layer{l}.block{m}``."""
    return f"layer{layer}.router" if module is None else f"layer{layer}.block{module}"


def part_names(selection) -> list[str]:
    """Every part a sub-model calls, in call order."""
    names = ["stem"]
    for layer, present in enumerate(selection):
        names += [part_name(layer)] + [part_name(layer, m) for m in present]
    return names + ["head"]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def pooled_features(h: np.ndarray) -> np.ndarray:
    """2x2 average pooling and flattening of the last layer's output: the adapter's input."""
    n, c, height, width = h.shape
    pooled = h.reshape(n, c, height // 2, 2, width // 2, 2).mean(axis=(3, 5))
    return pooled.reshape(n, -1)


@dataclass(frozen=True)
class ComposedModel:
    """Programs for ``stem``, ``head`` and the routers and blocks of ``selection``."""

    programs: Mapping[str, Program]
    selection: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        needed = self.part_names()
        missing = [name for name in needed if name not in self.programs]
        if missing:
            raise BackendError(f"sub-model needs programs for {missing}")
        if any(not layer for layer in self.selection):
            raise BackendError("every layer needs at least one module")

    def part_names(self) -> list[str]:
        return part_names(self.selection)

    def trunk(self, x: np.ndarray) -> np.ndarray:
        """The last modular layer's output."""
        h = self.programs["stem"].run(x)[0]
        for layer, present in enumerate(self.selection):
            logits = self.programs[part_name(layer)].run(h)[0]
            weights = softmax(logits[:, list(present)])
            mixed = h.copy()
            for i, m in enumerate(present):
                out = self.programs[part_name(layer, m)].run(h)[0]
                mixed += weights[:, i, None, None, None] * out
            h = mixed
        return h

    def run(self, x: np.ndarray) -> np.ndarray:
        """Class logits for a batch."""
        return self.programs["head"].run(self.trunk(x))[0]

    def features(self, x: np.ndarray) -> np.ndarray:
        """The head's input features for a batch (what an adapter head trains on)."""
        return pooled_features(self.trunk(x))
