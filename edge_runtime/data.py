"""Labelled sample sets a device evaluates or adapts on, from files users provide."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from edge_runtime.errors import ConfigError


def load_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Load ``x`` (float32 samples) and ``y`` (integer labels) from an ``.npz`` file.

    Raises ConfigError naming the file and what is wrong with it.
    """
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "x" not in archive or "y" not in archive:
                raise ConfigError(f"{path}: needs arrays 'x' and 'y', has {sorted(archive.files)}")
            x, y = archive["x"], archive["y"]
    except (OSError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"{path}: not a readable .npz file: {exc}") from exc
    if len(x) != len(y) or len(x) == 0:
        raise ConfigError(f"{path}: x has {len(x)} samples and y has {len(y)}; need equal, > 0")
    if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1:
        raise ConfigError(f"{path}: y must be a 1-D integer array, got {y.dtype} {y.shape}")
    if not np.issubdtype(x.dtype, np.floating) or not np.isfinite(x).all():
        raise ConfigError(f"{path}: x must hold finite floating-point samples")
    return x.astype(np.float32), y.astype(np.int64)


def save_npz(path: str | Path, x: np.ndarray, y: np.ndarray) -> Path:
    """Write a sample set in the form :func:`load_npz` reads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=x.astype(np.float32), y=y.astype(np.int64))
    return path
