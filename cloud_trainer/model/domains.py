"""Covariate shifts of image batches (N, 1, H, W) in [0, 1]: the data domains devices see."""

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
    """A quarter turn: a strong, label-preserving change of layout."""
    return np.ascontiguousarray(np.rot90(x, k=1, axes=(2, 3)))


def contrast(x: np.ndarray, rng: np.random.Generator, low: float = 0.4) -> np.ndarray:
    """Inverted and compressed intensities, as from a different sensor."""
    return (1.0 - low * x - (1 - low) * 0.5 * (x > 0.5)).astype(np.float32)


def occlude(x: np.ndarray, rng: np.random.Generator, size: int = 3) -> np.ndarray:
    out = x.copy()
    h, w = x.shape[2:]
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
