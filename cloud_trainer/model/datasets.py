"""What ``--data`` names: a built-in set (``digits``, ``rgb-digits``) or a user's files.

Users' files are an image-folder tree, a CIFAR-10/100 batch folder or an ``.npz``, read by
the edge's torch-free readers (:mod:`edge_runtime.datasets`) so that the cloud and the
devices read the same files the same way. A source without its own test part gets a
stratified held-out split. What was read is recorded with the model (metrics.json's
``data``), so that later commands reload the very split the model was trained on.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cloud_trainer.errors import ConfigError
from cloud_trainer.model.data import Split, fit_to, load_digits_split
from edge_runtime.cifar import is_cifar
from edge_runtime.datasets import read_dataset

BUILT_IN = ("digits", "rgb-digits")
TEST_FRACTION = 0.3


def load_split(
    data: str | Path | None = None,
    *,
    test_fraction: float = TEST_FRACTION,
    seed: int = 0,
    image_size: int | None = None,
    channels: int | None = None,
) -> Split:
    """Train and held-out samples of ``data`` (None: digits).

    ``image_size`` and ``channels`` are what the network takes (default: what the data
    has): an image folder is read at them; other images are resized, and grey ones
    repeated into colour. Raises DataError (the file and what is wrong) or ConfigError.
    """
    name = str(data) if data is not None else "digits"
    if name == "digits":
        split = load_digits_split(test_fraction=test_fraction, seed=seed)
    elif name == "rgb-digits":
        from cloud_trainer.model.rgbdigits import CLASSES, make_rgb_digits

        x, y = make_rgb_digits(seed)
        split = _stratified(x, y, CLASSES, "rgb-digits", test_fraction, seed)
    else:
        path = Path(data).expanduser().resolve()
        tree = path.is_dir() and not is_cifar(path)  # images are read at the size asked for
        found = read_dataset(
            path, size=image_size if tree else None, channels=channels if tree else None
        )
        if found.test is not None:
            t, h = found.train, found.test
            split = Split(t.x, t.y, h.x, h.y, found.classes, str(path))
        else:
            t = found.train
            split = _stratified(t.x, t.y, found.classes, str(path), test_fraction, seed)
    if image_size is not None or channels is not None:
        split = fit_to(split, image_size or split.image_size, channels)
    _check_wanted(split, name, image_size, channels)
    return split


def _stratified(x, y, classes, source: str, test_fraction: float, seed: int) -> Split:
    from sklearn.model_selection import train_test_split

    counts = np.bincount(y, minlength=len(classes))
    thin = [classes[i] for i, n in enumerate(counts) if n == 1]
    if thin:
        raise ConfigError(
            f"{source}: class {thin[0]!r} has 1 sample; a stratified held-out split needs "
            f"at least 2 per class ({len(thin)} such classes)"
        )
    try:
        x_tr, x_te, y_tr, y_te = train_test_split(
            x, y, test_size=test_fraction, random_state=seed, stratify=y
        )
    except ValueError as exc:  # too few samples for one per class on each side
        raise ConfigError(f"{source}: cannot hold out {test_fraction:.0%}: {exc}") from exc
    return Split(x_tr, y_tr, x_te, y_te, tuple(classes), source)


def _check_wanted(split: Split, name: str, image_size: int | None, channels: int | None) -> None:
    shape = split.x_train.shape[1:]
    if shape[1] != shape[2]:
        raise ConfigError(f"{name}: images are {shape[1]}x{shape[2]}; the model takes square ones")
    if image_size is not None and shape[1:] != (image_size, image_size):
        raise ConfigError(f"{name}: images are {shape[1]}x{shape[2]}, {image_size} asked for")
    if channels is not None and shape[0] != channels:
        raise ConfigError(f"{name}: has {shape[0]} channels, {channels} asked for")


def describe(split: Split, *, seed: int, test_fraction: float = TEST_FRACTION) -> dict:
    """The ``data`` record stored with a model: where its samples came from, their shape,
    class names and per-channel normalisation, and how to reload the same split."""
    return {
        "source": split.source,
        "channels": split.channels,
        "image_size": split.image_size,
        "classes": list(split.classes),
        "mean": [round(v, 6) for v in split.mean],
        "std": [round(v, 6) for v in split.std],
        "train_samples": len(split.y_train),
        "test_samples": len(split.y_test),
        "test_fraction": test_fraction,
        "seed": seed,
    }


def load_model_split(model_dir: Path) -> Split:
    """The split the model in ``model_dir`` was trained on (digits for models that predate
    the ``data`` record)."""
    metrics = json.loads((model_dir / "metrics.json").read_text())
    record = metrics.get("data")
    if record is None:
        spec = metrics.get("spec", {})
        return load_split(
            "digits",
            seed=metrics.get("seed", 0),
            image_size=spec.get("image_size"),
            channels=spec.get("in_channels"),
        )
    return load_split(
        record["source"],
        test_fraction=record["test_fraction"],
        seed=record["seed"],
        image_size=record["image_size"],
        channels=record["channels"],
    )
