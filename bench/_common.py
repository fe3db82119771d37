"""Helpers shared by the benchmark scripts: a model to measure, its programs, timing."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

FORMATS = {"executorch": "pte", "litert": "tflite"}


def load_or_init(model_dir: Path | None, preset: str = "digits"):
    """The trained (or decomposed) model in ``model_dir``, or a fresh seeded ``preset``
    network (timing ignores weights)."""
    import torch

    from cloud_trainer.model.checkpoint import load_model
    from cloud_trainer.model.modular import ModularNet
    from cloud_trainer.model.modular import preset as preset_spec

    if model_dir:
        return load_model(model_dir)
    torch.manual_seed(0)
    return ModularNet(preset_spec(preset)).eval()


def model_args(parser) -> None:
    """``--model DIR`` and ``--preset NAME``: what a benchmark measures."""
    parser.add_argument("--model", type=Path, help="trained or decomposed model dir")
    parser.add_argument(
        "--preset", default="digits", help="without --model: a fresh network of this preset"
    )


def inputs_for(net, n: int, seed: int = 0) -> np.ndarray:
    """``n`` random samples shaped like the network's input (N, C, H, W)."""
    spec = net.spec
    shape = (n, spec.in_channels, spec.image_size, spec.image_size)
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def export_parts(net, store, backend: str) -> dict[str, str]:
    """Export every part of ``net`` in fp32 for ``backend``; part name -> sha256."""
    from cloud_trainer.export.modular import export_modular

    fmt = FORMATS[backend]
    calib = inputs_for(net, 64)
    records = export_modular(net, calib, store, variants=[(fmt, "fp32")])
    return {r.part: r.ref.sha256 for r in records if r.variant == f"{fmt}-fp32"}


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


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def print_json(figures: dict) -> None:
    """The last line of every benchmark: its figures as one JSON object."""
    print(json.dumps(figures, sort_keys=True))


def trained_model(model_dir: Path | None, work: Path, epochs: int, seed: int = 0) -> Path:
    """``model_dir`` if it holds a trained model, else a model trained into ``work/model``."""
    model_dir = model_dir or work / "model"
    if not (model_dir / "model.pt").is_file():
        from cloud_trainer.model.checkpoint import train_model

        print(f"training the modular model ({epochs} epochs) into {model_dir}", flush=True)
        train_model(model_dir, epochs=epochs, seed=seed)
    return model_dir
