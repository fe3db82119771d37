"""Helpers shared by the benchmark scripts: a model to measure and interleaved timing."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path


def load_or_init(model_dir: Path | None):
    """The trained model in ``model_dir``, or a fresh seeded one (timing ignores weights)."""
    import torch

    from cloud_trainer.modular import ModularNet
    from cloud_trainer.pipeline import load_model

    if model_dir:
        return load_model(model_dir)
    torch.manual_seed(0)
    return ModularNet().eval()


def time_interleaved(
    fns: dict[str, Callable[[], object]], *, rounds: int, inner: int
) -> dict[str, float]:
    """Median microseconds per call of each function, measured round-robin so that
    machine noise hits them all alike."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - start) / inner * 1e6)
    return {name: statistics.median(values) for name, values in samples.items()}


def print_json(figures: dict) -> None:
    """The last line of every benchmark: its figures as one JSON object."""
    print(json.dumps(figures, sort_keys=True))
