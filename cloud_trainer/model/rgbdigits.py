"""RGB digits: a 3x32x32 colour data set built from real material that ships, no download.

In the manner of MNIST-M (Ganin & Lempitsky, 2015): each of scikit-learn's 1,797 8x8 grey
digits is upscaled to 32x32 and blended over a random 32x32 patch of one of the two colour
photos scikit-learn ships (``load_sample_images``: china.jpg and flower.jpg, 427x640), as
``|patch - digit|`` per channel, so the stroke inverts the photo's colours where it lies.
The same seed gives the same images, bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cloud_trainer.errors import ConfigError

SIZE = 32
CLASSES = tuple(str(i) for i in range(10))


def make_rgb_digits(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``x`` (1797, 3, 32, 32) float32 in [0, 1] and ``y`` (1797,) int64 digit labels."""
    from scipy.ndimage import zoom
    from sklearn.datasets import load_digits, load_sample_images

    digits = load_digits()
    # bilinear 8 -> 32, as MNIST-M's digits are smooth strokes, not 4x4 blocks
    strokes = zoom(digits.images / 16.0, (1, SIZE / 8, SIZE / 8), order=1).clip(0.0, 1.0)
    photos = [np.asarray(p, dtype=np.float64) / 255.0 for p in load_sample_images().images]
    rng = np.random.default_rng(seed)
    which = rng.integers(0, len(photos), len(strokes))
    x = np.empty((len(strokes), 3, SIZE, SIZE), np.float32)
    for i, (stroke, p) in enumerate(zip(strokes, which, strict=True)):
        photo = photos[p]
        r = rng.integers(0, photo.shape[0] - SIZE + 1)
        c = rng.integers(0, photo.shape[1] - SIZE + 1)
        patch = photo[r : r + SIZE, c : c + SIZE].transpose(2, 0, 1)
        x[i] = np.abs(patch - stroke[None])
    return x, digits.target.astype(np.int64)


def write_rgb_digits(out: Path, *, fmt: str = "folder", seed: int = 0) -> Path:
    """Write the set as an image folder (``out/<digit>/<n>.png``) or ``out`` as ``.npz``
    (``x``, ``y``, ``classes``); returns what was written. Either reads back with
    ``--data``."""
    x, y = make_rgb_digits(seed)
    if fmt == "npz":
        path = out if out.suffix == ".npz" else out / "rgb-digits.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, x=x, y=y, classes=np.array(CLASSES))
        return path
    if fmt != "folder":
        raise ConfigError(f"format: 'folder' or 'npz', got {fmt!r}")
    from PIL import Image

    for label in CLASSES:
        (out / label).mkdir(parents=True, exist_ok=True)
    pixels = np.rint(x.transpose(0, 2, 3, 1) * 255).astype(np.uint8)
    for i, (img, label) in enumerate(zip(pixels, y, strict=True)):
        Image.fromarray(img).save(out / CLASSES[label] / f"{i:04d}.png")
    return out
