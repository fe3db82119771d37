"""Covariate shifts of image batches (N, C, H, W) in [0, 1]: the data domains devices see.

Each works for any number of channels and any image size (grey 8x8 digits, RGB 32x32),
and keeps the batch's shape.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from cloud_trainer.errors import ConfigError

Shift = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def clean(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return x


def noise(x: np.ndarray, rng: np.random.Generator, sigma: float = 0.3) -> np.ndarray:
    return np.clip(x + rng.normal(0.0, sigma, x.shape), 0.0, 1.0).astype(np.float32)


def rotate(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A quarter turn (a half turn for non-square images, to keep their shape): a strong,
    label-preserving change of layout."""
    k = 1 if x.shape[2] == x.shape[3] else 2
    return np.ascontiguousarray(np.rot90(x, k=k, axes=(2, 3)))


def contrast(x: np.ndarray, rng: np.random.Generator, low: float = 0.4) -> np.ndarray:
    """Inverted and compressed intensities, as from a different sensor (per channel)."""
    return (1.0 - low * x - (1 - low) * 0.5 * (x > 0.5)).astype(np.float32)


def occlude(x: np.ndarray, rng: np.random.Generator, size: int | None = None) -> np.ndarray:
    """A blanked square in every channel, 3/8 of the shorter side unless ``size`` is given
    (3 pixels of an 8x8 digit, 12 of a 32x32 image)."""
    out = x.copy()
    h, w = x.shape[2:]
    size = size or max(1, round(3 * min(h, w) / 8))
    for i in range(len(x)):
        r, c = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
        out[i, :, r : r + size, c : c + size] = 0.0
    return out


DOMAINS: dict[str, Shift] = {
    "clean": clean,
    "noise": noise,
    "rotate": rotate,
    "contrast": contrast,
    "occlude": occlude,
}


def apply(domain: str, x: np.ndarray, seed: int = 0) -> np.ndarray:
    """``x`` as seen in ``domain``; raises ValueError naming the known domains."""
    if domain not in DOMAINS:
        raise ConfigError(f"unknown domain {domain!r}; known: {', '.join(DOMAINS)}")
    return DOMAINS[domain](x, np.random.default_rng(seed)).astype(np.float32)
