"""Image-folder trees, torchvision's ``ImageFolder`` convention: ``ROOT/CLASS/*.png``.

Classes are the sub-folder names, sorted (hidden ones skipped); images are found at any
depth below their class folder by extension; other files are ignored. A tree whose only
sub-folders are ``train`` and ``test`` (or ``val``) holds its own held-out part. Images
of any size and mode are converted to grey or RGB and resized (shorter side, then a
centre crop) to a square. Needs Pillow, imported here only.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from edge_runtime.datasets import Samples
from edge_runtime.errors import DataError

EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
GREY = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
MAX_DEFAULT_SIZE = 32  # without a size asked for: the CIFAR size, not a photo's 4000 px
HELD_OUT = ("test", "val")


def _pillow(where: Path):
    try:
        from PIL import Image
    except ImportError:
        raise DataError(
            f"{where}: reading images needs Pillow, which is not installed: pip install Pillow "
            "(or give the data as .npz)"
        ) from None
    return Image


def read_image_tree(
    root: Path, *, size: int | None = None, channels: int | None = None
) -> tuple[Samples, Samples | None]:
    """The samples under ``root`` (and its held-out part, if it has ``train``/``test``)."""
    image = _pillow(root)
    subdirs = _subdirs(root)
    held_out = next((h for h in HELD_OUT if {d.name for d in subdirs} == {"train", h}), None)
    parts = [root / "train", root / held_out] if held_out else [root]
    listed = [_list(part) for part in parts]
    classes = tuple(sorted(listed[0]))
    if held_out and not set(listed[1]) <= set(classes):
        extra = sorted(set(listed[1]) - set(classes))
        raise DataError(f"{parts[1]}: classes {extra} are not in {parts[0]}")
    headers = [_header(image, f) for files in listed for fs in files.values() for f in fs]
    channels = channels or (1 if all(mode in GREY for mode, _ in headers) else 3)
    if channels not in (1, 3):
        raise DataError(f"{root}: images convert to 1 or 3 channels, {channels} asked for")
    size = size or _default_size([s for _, s in headers])
    samples = [_load(image, files, classes, size, channels) for files in listed]
    return samples[0], (samples[1] if held_out else None)


def _subdirs(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as exc:
        raise DataError(f"{folder}: cannot list the folder: {exc}") from exc


def _list(root: Path) -> dict[str, list[Path]]:
    """Image files per class folder; DataError for no class folder or an empty one."""
    classes = _subdirs(root)
    if not classes:
        raise DataError(
            f"{root}: no class sub-folders (an image folder holds one sub-folder per class)"
        )
    files = {}
    for folder in classes:
        found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in EXTENSIONS)
        if not found:
            raise DataError(f"{folder}: no images (looked for {', '.join(EXTENSIONS)})")
        files[folder.name] = found
    return files


def _header(image, path: Path) -> tuple[str, tuple[int, int]]:
    try:
        with image.open(path) as img:
            return img.mode, img.size
    except (OSError, SyntaxError, ValueError, image.DecompressionBombError) as exc:
        raise DataError(f"{path}: not a readable image: {exc}") from exc


def _default_size(sizes: list[tuple[int, int]]) -> int:
    """The shorter side of the commonest image size, even (the model halves it), capped."""
    (w, h), _ = Counter(sizes).most_common(1)[0]
    side = min(w, h, MAX_DEFAULT_SIZE)
    return max(2, side - side % 2)


def _load(image, files: dict[str, list[Path]], classes, size: int, channels: int) -> Samples:
    x, y = [], []
    for label, name in enumerate(classes):
        for path in files.get(name, []):
            x.append(_pixels(image, path, size, channels))
            y.append(label)
    return Samples(np.stack(x), np.asarray(y, dtype=np.int64), classes)


def _pixels(image, path: Path, size: int, channels: int) -> np.ndarray:
    """One image as (channels, size, size) float32 in [0, 1]."""
    try:
        with image.open(path) as img:
            img.load()
            img = _converted(image, img, channels)
            w, h = img.size
            scale = size / min(w, h)
            tw, th = max(size, round(w * scale)), max(size, round(h * scale))
            img = img.resize((tw, th), image.Resampling.BILINEAR)
            left, top = (tw - size) // 2, (th - size) // 2
            img = img.crop((left, top, left + size, top + size))
            arr = np.asarray(img, dtype=np.float32)
    except (OSError, SyntaxError, ValueError, image.DecompressionBombError) as exc:
        raise DataError(f"{path}: not a readable image: {exc}") from exc
    if img.mode != "F":
        arr = arr / 255.0
    arr = arr.reshape(size, size, -1).transpose(2, 0, 1)
    if arr.shape[0] != channels:  # grey read as 'F', asked for as RGB
        arr = np.repeat(arr, channels, axis=0)
    return np.clip(arr, 0.0, 1.0)


def _converted(image, img, channels: int):
    """``img`` in mode L or RGB, or F (in [0, 1]) for 16-bit and float grey, which L clips."""
    if img.mode.startswith("I") or img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        top = 1.0 if img.mode == "F" else (65535.0 if arr.max() > 255 else 255.0)
        return image.fromarray((arr / top).clip(0, 1).astype(np.float32))  # mode F
    return img.convert("L" if channels == 1 else "RGB")
