"""The cloud's steps, each usable from the CLI, the demo and tests: train, export, deploy."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from edge_runtime import protocol as wire
from edge_runtime.artifacts import ArtifactStore, atomic_write
from edge_runtime.data import save_npz

log = logging.getLogger(__name__)
FORMATS = ("pte", "tflite")


@dataclass(frozen=True)
class TrainResult:
    model_dir: Path
    accuracy: float
    seconds: float


def train_model(
    out: Path, *, epochs: int = 30, seed: int = 0, progress: bool = False
) -> TrainResult:
    """Train the digits model; write ``model.pt``, ``metrics.json`` and ``test.npz``."""
    import torch

    from cloud_trainer.data import load_digits_split
    from cloud_trainer.model import DigitsCNN
    from cloud_trainer.train import accuracy, train_classifier

    start = time.perf_counter()
    split = load_digits_split(seed=seed)
    model = train_classifier(
        DigitsCNN(split.num_classes),
        split.x_train,
        split.y_train,
        epochs=epochs,
        seed=seed,
        progress=progress,
    )
    acc = accuracy(model, split.x_test, split.y_test)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / "model.pt")
    save_npz(out / "test.npz", split.x_test, split.y_test)
    seconds = time.perf_counter() - start
    metrics = {
        "accuracy": acc,
        "seconds": seconds,
        "epochs": epochs,
        "seed": seed,
        "num_classes": split.num_classes,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return TrainResult(out, acc, seconds)


def export_model(
    model_dir: Path,
    store_dir: Path,
    *,
    formats: tuple[str, ...] = FORMATS,
    chunk_size: int = wire.DEFAULT_CHUNK_SIZE,
) -> list[wire.ArtifactRef]:
    """Export the trained model as programs into a content-addressed store.

    Writes ``index.json`` beside the objects listing the refs. Re-exporting identical
    bytes stores nothing new.
    """
    import numpy as np
    import torch

    from cloud_trainer.export import export_executorch, export_litert
    from cloud_trainer.model import DigitsCNN

    metrics = json.loads((model_dir / "metrics.json").read_text())
    model = DigitsCNN(metrics["num_classes"])
    model.load_state_dict(torch.load(model_dir / "model.pt", weights_only=True))
    sample = torch.from_numpy(np.load(model_dir / "test.npz")["x"][:2])
    exporters = {"pte": export_executorch, "tflite": export_litert}
    store = ArtifactStore(store_dir)
    refs = []
    for fmt in formats:
        data = exporters[fmt](model, sample, name="digits-cnn")
        sha = store.put(data)
        refs.append(
            wire.ArtifactRef(
                name=f"digits-cnn.{fmt}",
                sha256=sha,
                size=len(data),
                format=fmt,
                chunk_size=chunk_size,
            )
        )
        log.info("exported digits-cnn.%s: %d bytes, sha256 %s", fmt, len(data), sha[:12])
    atomic_write(
        store.root / "index.json", json.dumps([r.to_dict() for r in refs], indent=2).encode()
    )
    return refs


def load_index(store_dir: Path) -> list[wire.ArtifactRef]:
    """The refs an export wrote into ``store_dir``."""
    data = json.loads((store_dir / "index.json").read_text())
    return [wire.ArtifactRef.from_dict(item) for item in data]
