"""Chains per-module programs into a sub-model: stem, routed modular layers, head.

Layer ``l`` computes ``post(base + sum_i w_i * block_i(h))`` with ``w`` the softmax of the
router's logits over the modules present, exactly as the cloud's torch model does; ``base``
is the layer's shortcut program where the layout names one, else ``h`` when the shapes match,
else zero. The layout (signed, in each module set of the desired state) says each layer's
``post`` activation and how the last layer's output is pooled into the adapter's features.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

import eclm_wire as wire
from edge_runtime.backends import Program
from edge_runtime.errors import BackendError

POSTS = wire.ACTIVATIONS


def part_name(layer: int, module: int | None = None) -> str:
    """The part naming the cloud uses: ``stem``, ``layer{l}.router``, ``layer{l}.block{m}``."""
    return f"layer{layer}.router" if module is None else f"layer{layer}.block{module}"


def pool_grid(size: int) -> int:
    """The side of the grid a ``size``-wide map is pooled to for routers and the head: the
    largest divisor of ``size`` up to 4 that still pools at least 2x2, else 1 (global)."""
    return next((g for g in (4, 3, 2) if size % g == 0 and size // g >= 2), 1)


@dataclass(frozen=True)
class Layout:
    """How a model's programs chain beyond the part names (the digits model's by default)."""

    posts: tuple[str, ...] = ()  # per layer: "none", "relu" or "relu6"; () = none everywhere
    pool: int = 2  # average-pooling window from the last layer's output to the features
    shortcuts: tuple[int, ...] = ()  # layers with a ``layer{l}.shortcut`` program

    def __post_init__(self) -> None:
        if any(post not in POSTS for post in self.posts):
            raise BackendError(f"layout: unknown activation in {self.posts}; known: {POSTS}")

    @classmethod
    def of(cls, option: wire.ModuleSet) -> Layout:
        return cls(option.posts, option.pool, option.shortcuts)

    def post(self, layer: int) -> str:
        return self.posts[layer] if layer < len(self.posts) else "none"


DEFAULT_LAYOUT = Layout()


def part_names(selection, layout: Layout = DEFAULT_LAYOUT) -> list[str]:
    """Every part a sub-model calls, in call order."""
    names = ["stem"]
    for layer, present in enumerate(selection):
        names.append(part_name(layer))
        if layer in layout.shortcuts:
            names.append(f"layer{layer}.shortcut")
        names += [part_name(layer, m) for m in present]
    return names + ["head"]


TRUNK = "trunk"  # a fused program of a whole module set's trunk, standing in for its parts


def trunk_part(selection) -> str:
    """The part name of ``selection``'s fused trunk program: ``trunk.0_2-1_3``."""
    return f"{TRUNK}." + "-".join("_".join(str(m) for m in layer) for layer in selection)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def activate(x: np.ndarray, post: str) -> np.ndarray:
    if post == "relu":
        return np.maximum(x, 0.0, out=x)
    if post == "relu6":
        return np.clip(x, 0.0, 6.0, out=x)
    return x


def pooled_features(h: np.ndarray, pool: int = 2) -> np.ndarray:
    """Average pooling (window ``pool``) and flattening of the last layer's output: the
    adapter's input."""
    n, c, height, width = h.shape
    p = pool
    pooled = h.reshape(n, c, height // p, p, width // p, p).mean(axis=(3, 5))
    return pooled.reshape(n, -1)


@dataclass(frozen=True)
class ComposedModel:
    """Programs for ``stem``, ``head`` and the routers and blocks of ``selection``, or for
    ``trunk`` (the whole selection fused into one program) and ``head``."""

    programs: Mapping[str, Program]
    selection: tuple[tuple[int, ...], ...]
    layout: Layout = DEFAULT_LAYOUT

    def __post_init__(self) -> None:
        needed = self.part_names()
        missing = [name for name in needed if name not in self.programs]
        if missing:
            raise BackendError(f"sub-model needs programs for {missing}")
        if any(not layer for layer in self.selection):
            raise BackendError("every layer needs at least one module")

    def part_names(self) -> list[str]:
        if TRUNK in self.programs:
            return [TRUNK, "head"]
        return part_names(self.selection, self.layout)

    def trunk(self, x: np.ndarray) -> np.ndarray:
        """The last modular layer's output."""
        return self.prefix(x, len(self.selection))

    def prefix(self, x: np.ndarray, split: int) -> np.ndarray:
        """The input of layer ``split`` (the stem's output for 0, the trunk's for the
        number of layers): what a device sends when the cloud runs the layers from
        ``split`` on. BackendError for a split a fused trunk has no boundary at."""
        if not 0 <= split <= len(self.selection):
            raise BackendError(f"split {split}: the layer boundaries are 0..{len(self.selection)}")
        if TRUNK in self.programs:  # one call instead of one per part
            if split != len(self.selection):
                raise BackendError(f"split {split}: a fused trunk has no inner boundary")
            return self.programs[TRUNK].run(x)[0]
        h = self.programs["stem"].run(x)[0]
        for layer, present in enumerate(self.selection[:split]):
            logits = self.programs[part_name(layer)].run(h)[0]
            weights = softmax(logits[:, list(present)])
            outputs = [self.programs[part_name(layer, m)].run(h)[0] for m in present]
            if layer in self.layout.shortcuts:
                mixed = self.programs[f"layer{layer}.shortcut"].run(h)[0]
            elif h.shape == outputs[0].shape:
                mixed = h
            else:
                mixed = None
            # In place: both runtimes return fresh arrays (checked), so every array here is
            # this call's own, never the caller's ``x``; a temporary the size of a feature
            # map cost more than the arithmetic at batch 1 (149 against 105 us a call of
            # the cifar half set with the programs' time taken out).
            for i, out in enumerate(outputs):
                np.multiply(out, weights[:, i, None, None, None], out=out)
                mixed = out if mixed is None else np.add(mixed, out, out=mixed)
            h = activate(mixed, self.layout.post(layer))
        return h

    def run(self, x: np.ndarray) -> np.ndarray:
        """Class logits for a batch."""
        return self.programs["head"].run(self.trunk(x))[0]

    def features(self, x: np.ndarray) -> np.ndarray:
        """The head's input features for a batch (what an adapter head trains on)."""
        return pooled_features(self.trunk(x), self.layout.pool)
