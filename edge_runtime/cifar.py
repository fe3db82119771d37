"""CIFAR-10/100 "python version" batch folders, unpickled without running arbitrary code.

CIFAR-10: ``data_batch_1`` .. ``data_batch_5``, ``test_batch`` and ``batches.meta``
(``label_names``). CIFAR-100: ``train``, ``test`` and ``meta`` (``fine_label_names``).
Each batch is a pickled dict with ``data`` (N, 3072) uint8, channel-major, and ``labels``
(CIFAR-10) or ``fine_labels`` (CIFAR-100). The pickles come from the internet: the
unpickler below resolves only the few numpy names an array needs, nothing else.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import re
from pathlib import Path

import numpy as np

from edge_runtime.datasets import Samples
from edge_runtime.errors import DataError

_BATCH = re.compile(r"data_batch_(\d+)$")
# The C unpickler sizes its memo to the largest index a PUT names: 4 bytes of a damaged
# file could ask for gigabytes. A CIFAR batch memoizes ~20,000 objects (its file names).
MAX_MEMO_INDEX = 1 << 22


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as Python 3 pickles bytes with, and no other codec."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refused _codecs.encode with {encoding!r}")
    return text.encode("latin1")


def _numpy_names() -> dict[tuple[str, str], object]:
    try:  # numpy >= 2 keeps the private module as _core; the pickles say core
        from numpy._core import multiarray
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]
    names: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1,  # bytes pickled by Python 3 at protocol <= 2
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        names[(module, "_reconstruct")] = multiarray._reconstruct
        names[(module, "scalar")] = multiarray.scalar
    return names


class _SafeUnpickler(pickle.Unpickler):
    """Builtin containers, bytes, str, numbers and numpy arrays; any other global is refused."""

    allowed = _numpy_names()

    def find_class(self, module: str, name: str):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name}") from None


def is_cifar(folder: Path) -> bool:
    """True if ``folder`` holds CIFAR-10 or CIFAR-100 batch files."""
    return (folder / "data_batch_1").is_file() or (folder / "train").is_file()


def read_cifar(folder: Path) -> tuple[Samples, Samples | None]:
    """The training batches and the test batch (None if absent) of a CIFAR folder."""
    batches = sorted(
        (p for p in folder.iterdir() if _BATCH.match(p.name)),
        key=lambda p: int(_BATCH.match(p.name).group(1)),
    )
    fine = not batches  # CIFAR-100 names its files train/test and its labels fine_labels
    train_files = batches or [folder / "train"]
    test_file = folder / ("test" if fine else "test_batch")
    names = _class_names(folder / ("meta" if fine else "batches.meta"))
    parts = [_read_batch(p) for p in train_files]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    test = _read_batch(test_file) if test_file.is_file() else None
    top = max(int(y.max()), int(test[1].max()) if test else 0)
    if names is None:
        names = tuple(str(i) for i in range(top + 1))
    elif top >= len(names):
        raise DataError(f"{folder}: label {top} but the meta file names {len(names)} classes")
    return Samples(x, y, names), (Samples(*test, names) if test else None)


def _unpickle(path: Path) -> dict:
    try:
        data = path.read_bytes()
        _check_memo(data)
        # encoding="bytes": the batches were pickled by Python 2; their keys are bytes
        record = _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file: {exc}") from exc
    except Exception as exc:
        # Broad on purpose: only the few callables above run, so whatever a damaged pickle
        # raises (UnpicklingError, EOFError, OverflowError, MemoryError from a huge empty
        # array numpy is asked for...) is the file's fault, not a bug of ours.
        raise DataError(f"{path}: not a readable CIFAR pickle: {exc!r}") from exc
    if not isinstance(record, dict):
        raise DataError(f"{path}: a CIFAR pickle holds a dict, this one a {type(record).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in record.items()}


def _check_memo(data: bytes) -> None:
    """Refuse a pickle whose memo indices would make the unpickler allocate gigabytes
    (read by pickletools, which parses opcodes without building anything)."""
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and int(arg) > MAX_MEMO_INDEX:
            raise pickle.UnpicklingError(f"memo index {arg} is out of any CIFAR batch's range")
        if op.name == "STOP":
            return


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    record = _unpickle(path)
    if "data" not in record:
        raise DataError(f"{path}: no 'data' in this CIFAR pickle (has {sorted(map(str, record))})")
    key = "fine_labels" if "fine_labels" in record else "labels"
    if key not in record:
        raise DataError(f"{path}: no 'labels' or 'fine_labels' in this CIFAR pickle")
    data = record["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise DataError(f"{path}: 'data' must be a (N, 3072) uint8 array")
    if data.shape[1] != 3 * 32 * 32 or len(data) == 0:
        raise DataError(f"{path}: 'data' is {data.shape}; CIFAR rows hold 3072 bytes, N > 0")
    try:
        labels = np.asarray(record[key], dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as exc:
        raise DataError(f"{path}: '{key}' must be a list of integers: {exc}") from exc
    if labels.shape != (len(data),) or labels.min() < 0:
        raise DataError(
            f"{path}: '{key}' has {labels.size} entries for {len(data)} images (or negatives)"
        )
    x = data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0
    return x, labels


def _class_names(path: Path) -> tuple[str, ...] | None:
    if not path.is_file():
        return None
    record = _unpickle(path)
    names = record.get("fine_label_names", record.get("label_names"))
    if not isinstance(names, list) or not all(isinstance(n, (bytes, str)) for n in names):
        raise DataError(f"{path}: no list of 'label_names' or 'fine_label_names'")
    return tuple(n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names)
