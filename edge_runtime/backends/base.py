"""The program backend seam: load a program, run it, describe its inputs and outputs."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from edge_runtime.errors import BackendError

Source = str | Path | bytes


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one program input or output; ``-1`` marks a free dimension."""

    shape: tuple[int, ...]
    dtype: str


class Program(ABC):
    """One loaded program, ready to run."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @abstractmethod
    def _run(self, arrays: list[np.ndarray]) -> list[np.ndarray]: ...

    def run(self, *arrays: np.ndarray) -> list[np.ndarray]:
        """Run the program on numpy arrays; raise BackendError naming a wrong input."""
        if len(arrays) != len(self.inputs):
            raise BackendError(f"expected {len(self.inputs)} inputs, got {len(arrays)}")
        prepared = []
        for i, (array, spec) in enumerate(zip(arrays, self.inputs)):
            array = np.asarray(array)
            if str(array.dtype) != spec.dtype:
                raise BackendError(f"input {i}: expected dtype {spec.dtype}, got {array.dtype}")
            if len(array.shape) != len(spec.shape) or any(
                want not in (-1, got) for want, got in zip(spec.shape, array.shape)
            ):
                raise BackendError(
                    f"input {i}: expected shape {spec.shape} (-1 = any), got {array.shape}"
                )
            prepared.append(np.ascontiguousarray(array))
        return self._run(prepared)


class Backend(ABC):
    """A program format and the runtime that runs it."""

    name: str
    file_format: str

    @abstractmethod
    def load(self, source: Source) -> Program:
        """Load a program from a path or bytes; raise BackendError if it is not one."""


def read_source(source: Source) -> bytes:
    """The bytes of a path or bytes source, with a BackendError for an unreadable path."""
    if isinstance(source, bytes):
        return source
    try:
        return Path(source).read_bytes()
    except OSError as exc:
        raise BackendError(f"cannot read program {source}: {exc.strerror}") from exc
