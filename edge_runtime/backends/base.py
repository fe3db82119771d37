"""The program backend seam: load a program, run it, describe its inputs and outputs."""

from __future__ import annotations

import functools
import os
import sys
import tempfile
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_runtime.errors import BackendError

Source = str | Path | bytes


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one program input or output; ``-1`` marks a free dimension."""

    shape: tuple[int, ...]
    dtype: str


class Program(ABC):
    """One loaded program, ready to run on batches of any size.

    A program holds at most ``max_batch`` samples per call (fixed-batch programs exactly
    that many, padded); larger batches run in pieces.
    """

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch: int = 1
    pads_batch: bool = True

    @abstractmethod
    def _run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Run one piece of at most ``max_batch`` samples (exactly that many if padded)."""

    def run(self, *arrays: np.ndarray) -> list[np.ndarray]:
        """Run the program on numpy arrays; raise BackendError naming a wrong input."""
        if len(arrays) != len(self.inputs):
            raise BackendError(f"expected {len(self.inputs)} inputs, got {len(arrays)}")
        prepared = []
        for i, (array, spec) in enumerate(zip(arrays, self.inputs, strict=False)):
            array = np.asarray(array)
            # dtype.name builds a new string on every call (~10 us); compare dtype objects.
            if array.dtype != _dtype(spec.dtype):
                raise BackendError(f"input {i}: expected dtype {spec.dtype}, got {array.dtype}")
            if len(array.shape) != len(spec.shape) or any(
                want not in (-1, got) for want, got in zip(spec.shape, array.shape, strict=False)
            ):
                raise BackendError(
                    f"input {i}: expected shape {spec.shape} (-1 = any), got {array.shape}"
                )
            prepared.append(array)
        return self._run_pieces(prepared)

    def _run_pieces(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        n, size = arrays[0].shape[0], self.max_batch
        if n == size or (n < size and not self.pads_batch):
            return self._run([_standard(a) for a in arrays])
        pieces = []
        for start in range(0, n, size):
            piece = [a[start : start + size] for a in arrays]
            short = size - piece[0].shape[0]
            if short and self.pads_batch:
                piece = [
                    np.concatenate([p, np.zeros((short, *p.shape[1:]), p.dtype)]) for p in piece
                ]
            pieces.append(self._run([_standard(p) for p in piece]))
        return [np.concatenate([p[k] for p in pieces])[:n] for k in range(len(self.outputs))]


@functools.cache
def _dtype(name: str) -> np.dtype:
    return np.dtype(name)


def _standard(array: np.ndarray) -> np.ndarray:
    """C-ordered with standard strides, size-1 axes included (runtimes read layout from
    strides, and numpy calls an array with an odd stride on a size-1 axis contiguous)."""
    if _strides_standard(array):
        return array
    return np.array(array, order="C", copy=True)


def _strides_standard(array: np.ndarray) -> bool:
    expected = array.itemsize
    for size, stride in zip(reversed(array.shape), reversed(array.strides), strict=True):
        if stride != expected:
            return False
        expected *= size
    return True


class Backend(ABC):
    """A program format and the runtime that runs it."""

    name: str
    file_format: str

    @abstractmethod
    def load(self, source: Source) -> Program:
        """Load a program from a path or bytes; raise BackendError if it is not one."""

    def vet(self, programs: dict[str, bytes]) -> None:  # noqa: B027 - most need no check
        """Called with a sub-model's programs (sha256 -> bytes) before any is loaded: a
        backend whose runtime may crash the process checks them out of process here, and
        changes how it runs them, or raises BackendError."""


def read_source(source: Source) -> bytes:
    """The bytes of a path or bytes source, with a BackendError for an unreadable path."""
    if isinstance(source, bytes):
        return source
    try:
        return Path(source).read_bytes()
    except OSError as exc:
        raise BackendError(f"cannot read program {source}: {exc.strerror}") from exc


_NOTES_LOCK = threading.Lock()  # fd 2 is the process's: one block at a time moves it


def without_notes(notes: tuple[bytes, ...], call, *args):
    """``call(*args)`` with fd 2 in a temp file; every line that does not start with one of
    ``notes`` (a runtime's start-up chatter) goes on to fd 2 after it (a log file, where
    a command routes it there), another thread's too if one wrote meanwhile."""
    with _NOTES_LOCK, tempfile.TemporaryFile() as sink:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            return call(*args)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            kept = [x for x in sink.read().splitlines(keepends=True) if not x.startswith(notes)]
            if kept:
                os.write(2, b"".join(kept))
