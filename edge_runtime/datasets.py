"""Labelled image sets users have, read without torch: an image-folder tree, CIFAR-10/100
"python version" batch folders, or an ``.npz`` with ``x`` (N, C, H, W) and ``y``.

Every reader returns samples shaped (N, C, H, W), float32 in [0, 1], with integer labels
and class names, or raises :class:`~edge_runtime.errors.DataError` naming the file and
what is wrong. Images need Pillow; the message says so where it is missing. The cloud
reads its training data through the same code (``cloud_trainer.model.datasets``).
"""

from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_runtime.errors import DataError

FORMATS = ("folder", "cifar", "npz")


@dataclass(frozen=True)
class Samples:
    """Images ``x`` (N, C, H, W) float32 in [0, 1], labels ``y`` (N,) int64 in
    ``range(len(classes))``."""

    x: np.ndarray
    y: np.ndarray
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.x.ndim != 4 or len(self.x) != len(self.y) or len(self.y) == 0:
            raise DataError(f"samples: x {self.x.shape} and y {self.y.shape} do not pair up")

    @property
    def channels(self) -> int:
        return int(self.x.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.x.shape[2]), int(self.x.shape[3])


@dataclass(frozen=True)
class DataSet:
    """What a source holds: its samples, and its own held-out part if it has one."""

    path: Path
    format: str  # one of FORMATS
    train: Samples
    test: Samples | None = None

    @property
    def classes(self) -> tuple[str, ...]:
        return self.train.classes


def read_dataset(
    path: str | Path, *, size: int | None = None, channels: int | None = None
) -> DataSet:
    """The data set at ``path``: a ``.npz`` file, a CIFAR batch folder, or an image folder.

    ``size`` and ``channels`` resize and convert images (folders only; CIFAR and ``.npz``
    must already have them, or DataError says what they have).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix != ".npz":
            raise DataError(f"{path}: a data file must be .npz (or give an image or CIFAR folder)")
        data = DataSet(path, "npz", read_npz(path))
    else:
        from edge_runtime import cifar, images

        if cifar.is_cifar(path):
            train, test = cifar.read_cifar(path)
            data = DataSet(path, "cifar", train, test)
        else:
            train, test = images.read_image_tree(path, size=size, channels=channels)
            data = DataSet(path, "folder", train, test)
    _check_shape(data, size, channels)
    return data


def load_eval_set(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``x, y`` a device evaluates on: the held-out part of the data set at ``path`` if it
    has one, else all of it (what ``eclm edge run --eval-data`` reads)."""
    data = read_dataset(path)
    samples = data.test or data.train
    return samples.x, samples.y


def read_npz(path: Path) -> Samples:
    """``x`` (N, C, H, W) floats in [0, 1] or uint8, ``y`` integer labels, and optional
    ``classes`` (names). No pickles: object arrays are refused."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in ("x", "y") if k not in archive.files]
            if missing:
                raise DataError(f"{path}: needs arrays 'x' and 'y', has {sorted(archive.files)}")
            x, y = archive["x"], archive["y"]
            names = archive["classes"] if "classes" in archive.files else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(f"{path}: not a readable .npz file: {exc}") from exc
    except (NotImplementedError, RuntimeError) as exc:  # zipfile: a feature it lacks
        raise DataError(f"{path}: not a readable .npz file: {exc}") from exc
    if x.ndim != 4:
        raise DataError(f"{path}: x must be (N, C, H, W), got shape {x.shape}")
    y = _labels(path, y, len(x))
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    elif not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{path}: x must be floats in [0, 1] or uint8, got {x.dtype}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"{path}: x holds non-finite values (nan or inf)")
    classes = _class_names(path, names, y)
    return Samples(np.ascontiguousarray(x), y, classes)


def _labels(path: Path, y: np.ndarray, n: int) -> np.ndarray:
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: y must be a 1-D integer array, got {y.dtype} {y.shape}")
    if len(y) != n or n == 0:
        raise DataError(f"{path}: x has {n} samples and y has {len(y)}; need equal, > 0")
    if y.min() < 0:
        raise DataError(f"{path}: y holds negative labels ({int(y.min())})")
    return y.astype(np.int64)


def _class_names(path: Path, names: np.ndarray | None, y: np.ndarray) -> tuple[str, ...]:
    if names is None:
        return tuple(str(i) for i in range(int(y.max()) + 1))
    if names.ndim != 1 or names.dtype.kind not in "US":
        raise DataError(f"{path}: classes must be a 1-D array of names, got {names.dtype}")
    if int(y.max()) >= len(names):
        raise DataError(f"{path}: label {int(y.max())} but only {len(names)} class names")
    return tuple(str(n) for n in names.tolist())


def _check_shape(data: DataSet, size: int | None, channels: int | None) -> None:
    parts = [data.train] + ([data.test] if data.test is not None else [])
    for part in parts:
        if channels is not None and part.channels != channels:
            raise DataError(f"{data.path}: has {part.channels} channels, {channels} asked for")
        if size is not None and part.image_size != (size, size):
            raise DataError(f"{data.path}: images are {part.image_size}, {size}x{size} asked for")
    if data.test is not None and data.test.x.shape[1:] != data.train.x.shape[1:]:
        raise DataError(
            f"{data.path}: train and test samples differ in shape "
            f"({data.train.x.shape[1:]} vs {data.test.x.shape[1:]})"
        )
