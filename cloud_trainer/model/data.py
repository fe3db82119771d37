"""Data sets for the cloud: scikit-learn's digits (shipped with the package, no download).

Users' data (image folders, CIFAR batches, ``.npz``) and the RGB digits load through
:func:`cloud_trainer.model.datasets.load_split`, into the same :class:`Split`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np


@dataclass(frozen=True)
class Split:
    """Train and held-out samples, images shaped (N, C, H, W) float32 in [0, 1].

    ``classes`` names the labels (empty: the labels are their own names); ``source`` says
    where the samples came from, as :func:`cloud_trainer.model.datasets.load_split` takes it.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...] = field(default=())
    source: str = "digits"

    @property
    def num_classes(self) -> int:
        top = int(max(self.y_train.max(), self.y_test.max())) + 1
        return max(top, len(self.classes))

    @property
    def channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> int:
        """The side of the (square) images."""
        return int(self.x_train.shape[2])

    @property
    def mean(self) -> tuple[float, ...]:
        """Per-channel mean of the training images (the normalisation stored with a model)."""
        return tuple(float(v) for v in self.x_train.mean(axis=(0, 2, 3)))

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(float(v) for v in self.x_train.std(axis=(0, 2, 3)))


def load_digits_split(*, test_fraction: float = 0.3, seed: int = 0) -> Split:
    """The 1,797 8x8 digit images of scikit-learn, split stratified by class."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # reshape, not [:, None]: a size-1 axis with an odd stride reads as channels-last to
    # torch.export, and the ExecuTorch program then expects another memory layout.
    x = (digits.images / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return Split(x_tr, y_tr, x_te, y_te, tuple(str(i) for i in range(10)), "digits")


def resize(x: np.ndarray, size: int) -> np.ndarray:
    """Images (N, C, H, W) resized to ``size`` x ``size`` (area-averaged when shrinking)."""
    import torch

    if x.shape[2:] == (size, size):
        return x
    t = torch.from_numpy(np.ascontiguousarray(x))
    shrink = size < x.shape[2]
    mode = "area" if shrink else "bilinear"
    kwargs = {} if shrink else {"align_corners": False}
    out = torch.nn.functional.interpolate(t, size=(size, size), mode=mode, **kwargs)
    return np.ascontiguousarray(out.numpy().astype(np.float32))


def fit_to(split: Split, size: int, channels: int | None = None) -> Split:
    """``split`` with every image at the network's input size (and grey images repeated
    into ``channels`` colour channels when the network takes colour)."""

    def fit(x: np.ndarray) -> np.ndarray:
        x = resize(x, size)
        if channels and x.shape[1] == 1 and channels > 1:
            x = np.ascontiguousarray(np.repeat(x, channels, axis=1))
        return x

    return replace(split, x_train=fit(split.x_train), x_test=fit(split.x_test))
