"""The trained model on disk: training it, loading it, its module importance and head."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cloud_trainer.errors import ConfigError
from cloud_trainer.model.data import Split
from edge_runtime.data import save_npz


@dataclass(frozen=True)
class TrainResult:
    model_dir: Path
    accuracy: float
    half_accuracy: float
    seconds: float


def train_model(
    out: Path,
    *,
    epochs: int = 25,
    seed: int = 0,
    progress: bool = False,
    spec=None,
    preset_name: str = "digits",
    data: str | Path | None = None,
) -> TrainResult:
    """Train the modular model (the ``preset_name`` network unless ``spec`` is given) on
    ``data`` (a built-in name or a user's files, see
    :func:`~cloud_trainer.model.datasets.load_split`; default digits) and record module
    importance; samples are resized to the network's input.

    Writes ``model.pt``, ``metrics.json`` (with the spec and the data record),
    ``importance.npz`` (per class, and per domain) and ``test.npz`` (the held-out split,
    for devices to evaluate on).
    """
    from cloud_trainer.model.data import fit_to
    from cloud_trainer.model.datasets import describe, load_split
    from cloud_trainer.model.modular import ModularNet, preset
    from cloud_trainer.model.train import accuracy, train_modular

    start = time.perf_counter()
    # the network's input size first: an image folder is read at it, other data resized
    split = load_split(data, seed=seed, image_size=(spec or preset(preset_name)).image_size)
    spec = spec or preset(preset_name, in_channels=split.channels, num_classes=split.num_classes)
    split = fit_to(split, spec.image_size, spec.in_channels)
    net = train_modular(
        ModularNet(spec), split.x_train, split.y_train, epochs=epochs, seed=seed, progress=progress
    )
    half = tuple(tuple(range(0, spec.modules_per_layer, 2)) for _ in range(spec.layers))
    acc = accuracy(net, split.x_test, split.y_test)
    half_acc = accuracy(net, split.x_test, split.y_test, half)
    write_model_dir(out, net, split, seed)
    seconds = time.perf_counter() - start
    metrics = {
        "accuracy": acc,
        "half_accuracy": half_acc,
        "seconds": seconds,
        "epochs": epochs,
        "seed": seed,
        "spec": asdict(spec),
        "data": describe(split, seed=seed),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return TrainResult(out, acc, half_acc, seconds)


def write_model_dir(out: Path, net, split: Split, seed: int) -> None:
    """``model.pt``, ``importance.npz`` (per class and per domain) and ``test.npz``."""
    import torch

    from cloud_trainer.model.domains import DOMAINS, apply
    from cloud_trainer.model.train import module_importance

    out.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), out / "model.pt")
    importance = {
        f"domain:{d}": module_importance(net, apply(d, split.x_train, seed), split.y_train)
        for d in DOMAINS
    }
    importance["class"] = importance["domain:clean"]
    np.savez(out / "importance.npz", **importance)
    save_npz(out / "test.npz", split.x_test, split.y_test)


def load_model(model_dir: Path):
    """The trained ModularNet in ``model_dir`` (eval mode)."""
    import torch

    from cloud_trainer.model.modular import ModularNet, ModularSpec

    metrics = json.loads((model_dir / "metrics.json").read_text())
    net = ModularNet(ModularSpec(**metrics["spec"]))
    net.load_state_dict(torch.load(model_dir / "model.pt", weights_only=True))
    return net.eval()


def load_importance(model_dir: Path, domain: str | None = None) -> np.ndarray:
    """Module importance (layers, modules, classes), per class or for one domain."""
    with np.load(model_dir / "importance.npz") as data:
        key = f"domain:{domain}" if domain else "class"
        if key not in data:
            known = sorted(k.split(":", 1)[1] for k in data.files if k.startswith("domain:"))
            raise ConfigError(f"no importance recorded for domain {domain!r}; known: {known}")
        return data[key]


def head_weights(net) -> dict[str, np.ndarray]:
    """The head's linear layer as ``weight`` and ``bias``: the shape of every adapter."""
    fc = net.head.fc
    return {"weight": fc.weight.detach().numpy(), "bias": fc.bias.detach().numpy()}
