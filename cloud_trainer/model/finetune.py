"""Bring your own network: decompose it, check the decomposition, fine-tune it as a modular
model by the sandwich rule with distillation (``sandwich.py``), and write the model dir.

The model dir is what ``checkpoint.train_model`` writes (``model.pt``, ``metrics.json`` with
the spec, ``importance.npz``, ``test.npz``), so export, select, deploy and serve take it
as they take a natively trained model.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cloud_trainer.model.checkpoint import write_model_dir
from cloud_trainer.model.data import Split

EXACTNESS_SAMPLES = 64


@dataclass(frozen=True)
class DecomposeResult:
    model_dir: Path
    exactness: float  # max abs logit difference, decomposed vs original, before fine-tuning
    original_accuracy: float
    accuracy: float  # the full decomposed model after fine-tuning
    half_accuracy: float  # every other module in each layer
    smallest_accuracy: float  # one module per layer
    seconds: float

    def summary(self) -> str:
        return (
            f"decomposed in {self.seconds:.1f}s; before fine-tuning, max abs logit difference "
            f"to the original {self.exactness:.2e}\nheld-out accuracy: original "
            f"{self.original_accuracy:.4f}, full {self.accuracy:.4f}, half the modules "
            f"{self.half_accuracy:.4f}, one module per layer {self.smallest_accuracy:.4f}\n"
            f"wrote {self.model_dir}/model.pt, metrics.json, importance.npz, test.npz"
        )


def default_data(image_size: int, seed: int = 0) -> Split:
    """Digits at ``image_size`` with the grey channel repeated into RGB (without ``--data``)."""
    from cloud_trainer.model.datasets import load_split

    return load_split("digits", image_size=image_size, channels=3, seed=seed)


def rgb(split: Split) -> Split:
    """``split`` with one channel repeated three times (the networks take RGB)."""
    from cloud_trainer.model.data import fit_to

    return fit_to(split, split.image_size, 3)


def train_original(net, x: np.ndarray, y: np.ndarray, *, epochs: int, seed: int, lr=3e-3):
    """Plain training of a network built from scratch (``--weights none``), so that the
    original has an accuracy to keep and real batch-norm statistics to fold."""
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    for _ in range(epochs):
        order = torch.from_numpy(rng.permutation(len(xs)))
        for start in range(0, len(xs), 64):
            idx = order[start : start + 64]
            loss = torch.nn.functional.cross_entropy(net(xs[idx]), ys[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def decompose_model(
    out: Path,
    *,
    arch: str,
    modules: int,
    weights: Path | None = None,
    data: Split | None = None,
    epochs: int = 5,
    width: float = 1.0,
    image_size: int = 32,
    seed: int = 0,
    lr: float = 1e-3,
    progress: bool = False,
) -> DecomposeResult:
    """Decompose ``arch`` (weights from the ``weights`` checkpoint, or trained from scratch
    on ``data`` for ``epochs`` when None) into ``modules`` per layer, fine-tune, write ``out``.

    ``data`` is the user's split at the network's input (None: digits, see ``default_data``);
    its classes decide the classifier's size, so a checkpoint must have as many.
    """
    import torch

    from cloud_trainer.model.datasets import describe
    from cloud_trainer.model.decompose import (
        decompose,
        max_logit_difference,
        original_for,
        spec_for,
    )
    from cloud_trainer.model.networks import load_weights
    from cloud_trainer.model.sandwich import SandwichConfig, train_sandwich
    from cloud_trainer.model.train import accuracy

    start = time.perf_counter()
    torch.manual_seed(seed)
    split = rgb(data) if data is not None else default_data(image_size, seed)
    spec = spec_for(
        arch,
        modules=modules,
        num_classes=split.num_classes,
        width=width,
        image_size=split.x_train.shape[2],
        in_channels=split.x_train.shape[1],
    )
    original = original_for(spec)
    if weights is not None:
        load_weights(original, weights)
    else:
        train_original(original, split.x_train, split.y_train, epochs=epochs, seed=seed)
    original.eval()
    net = decompose(original, spec)
    exactness = max_logit_difference(original, net, split.x_test[:EXACTNESS_SAMPLES])
    original_acc = accuracy(original, split.x_test, split.y_test)
    config = SandwichConfig(epochs=epochs, lr=lr, seed=seed)
    net = train_sandwich(net, original, split.x_train, split.y_train, config, progress=progress)
    accuracies = sub_model_accuracies(net, split)
    result = DecomposeResult(out, exactness, original_acc, *accuracies, 0.0)
    write_model_dir(out, net, split, seed)
    metrics = {
        **{k: v for k, v in asdict(result).items() if k not in ("model_dir", "seconds")},
        "seconds": time.perf_counter() - start,
        "epochs": epochs,
        "seed": seed,
        "weights": str(weights) if weights else "none",
        "spec": asdict(spec),
        "data": describe(split, seed=seed),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return DecomposeResult(**{**asdict(result), "seconds": metrics["seconds"]})


def sub_model_accuracies(net, split: Split) -> tuple[float, float, float]:
    """Held-out accuracy of the full model, every other module, and one module per layer."""
    from cloud_trainer.model.train import accuracy

    m, layers = net.spec.modules_per_layer, net.spec.layers
    half = tuple(tuple(range(0, m, 2)) for _ in range(layers))
    smallest = tuple((0,) for _ in range(layers))
    return tuple(
        accuracy(net, split.x_test, split.y_test, selection) for selection in (None, half, smallest)
    )
