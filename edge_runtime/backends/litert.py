"""LiteRT backend (``.tflite`` flatbuffers) through ``ai_edge_litert``; no torch anywhere.

``tflite_runtime`` is accepted as a fallback import for boards that only have it (it
cannot load models under numpy 2, so it is the second choice).

``delegates``: ``"default"`` lets LiteRT apply its default delegates (XNNPACK), after
:mod:`~edge_runtime.backends.delegates` has checked them on the programs in a child process,
falling back to ``"none"`` when they crash or disagree; ``"none"`` runs LiteRT's builtin
kernels only (``BUILTIN_WITHOUT_DEFAULT_DELEGATES``: needed under qemu and on boards whose
XNNPACK build misbehaves).
"""

from __future__ import annotations

import sys
import threading

import numpy as np

from edge_runtime.backends import delegates as checks
from edge_runtime.backends.base import (
    Backend,
    Program,
    Source,
    TensorSpec,
    read_source,
    without_notes,
)
from edge_runtime.errors import BackendError, BackendUnavailable, ConfigError

try:
    from ai_edge_litert.interpreter import Interpreter
except ImportError:  # pragma: no cover - depends on the install
    try:
        from tflite_runtime.interpreter import Interpreter  # type: ignore[no-redef]
    except ImportError as exc:
        raise BackendUnavailable(
            "the LiteRT backend needs ai-edge-litert: pip install 'eclm-fleet[edge]'"
        ) from exc


_MODES = checks.MODES
# What LiteRT writes to fd 2 the first time a process applies its default delegate.
STARTUP_NOTES = (b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.",)
_first = threading.Event()  # set once a program of this process has been loaded


class LiteRTProgram(Program):
    """A LiteRT interpreter for one program.

    Programs converted from torch have a fixed batch (litert-torch cannot export a free
    one). Another batch size gets an interpreter resized to it where the program allows
    (convolution blocks do; programs with a flatten do not), else runs in padded pieces.
    """

    RESIZED_KEPT = 4

    def __init__(self, data: bytes, *, threads: int, delegates: str = checks.DEFAULT) -> None:
        self._data = data
        self._threads = threads
        self._resolver = resolver(delegates)
        if _first.is_set():
            self._it = self._interpreter()
        else:
            self._it = without_notes(STARTUP_NOTES, self._interpreter)
            _first.set()
        self._in = self._it.get_input_details()
        self._out = self._it.get_output_details()
        self.max_batch = int(self._in[0]["shape"][0]) if len(self._in[0]["shape"]) else 1
        self._resized: dict[int, Interpreter] = {}
        self._resizable = len(self._in) == 1
        # One interpreter serves one call at a time; invoke() releases the GIL.
        self._lock = threading.Lock()
        self.inputs = tuple(_spec(d) for d in self._in)
        self.outputs = tuple(_spec(d) for d in self._out)

    def _interpreter(self, batch: int | None = None) -> Interpreter:
        try:
            it = Interpreter(
                model_content=self._data,
                num_threads=self._threads,
                experimental_op_resolver_type=self._resolver,
            )
            if batch is not None:
                detail = it.get_input_details()[0]
                it.resize_tensor_input(detail["index"], [batch, *detail["shape"][1:]])
            it.allocate_tensors()
        except (RuntimeError, ValueError) as exc:
            raise BackendError(f"not a loadable LiteRT program: {exc}") from exc
        return it

    def _run_pieces(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        n = arrays[0].shape[0]
        if n != self.max_batch and self._resizable:
            it = self._resized.get(n)
            if it is None:
                try:
                    it = self._interpreter(n)
                except BackendError:
                    self._resizable = False  # this program's shapes are baked in
                    return super()._run_pieces(arrays)
                if len(self._resized) >= self.RESIZED_KEPT:
                    self._resized.pop(next(iter(self._resized)))
                self._resized[n] = it
            return self._invoke(it, arrays)
        return super()._run_pieces(arrays)

    def _run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        return self._invoke(self._it, arrays)

    def _invoke(self, it: Interpreter, arrays: list[np.ndarray]) -> list[np.ndarray]:
        with self._lock:
            for detail, array in zip(self._in, arrays, strict=True):
                it.set_tensor(detail["index"], array)
            try:
                it.invoke()
            except RuntimeError as exc:
                raise BackendError(f"LiteRT invoke failed: {exc}") from exc
            # get_tensor copies, so no reference to the interpreter's buffers outlives us.
            return [it.get_tensor(d["index"]) for d in self._out]


def resolver(mode: str):
    """LiteRT's op resolver for a ``delegates`` mode."""
    kinds = sys.modules[Interpreter.__module__].OpResolverType
    if mode == checks.NONE:
        return kinds.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    return kinds.AUTO


def _spec(detail: dict) -> TensorSpec:
    shape = tuple(int(s) for s in detail["shape"])
    return TensorSpec((-1, *shape[1:]) if shape else shape, np.dtype(detail["dtype"]).name)


class LiteRTBackend(Backend):
    """Runs ``.tflite`` programs with the LiteRT interpreter."""

    name = "litert"
    file_format = "tflite"

    def __init__(
        self,
        *,
        threads: int = 1,
        delegates: str = checks.DEFAULT,
        check: checks.DelegateCheck | None = checks.CHILD,
    ) -> None:
        """``check`` None trusts the default delegates without the child's check."""
        if delegates not in _MODES:
            raise ConfigError(f"litert delegates: {delegates!r}, not one of {', '.join(_MODES)}")
        self.threads, self.delegates, self.check = threads, delegates, check

    def vet(self, programs: dict[str, bytes]) -> None:
        """Check the default delegates on ``programs`` before any runs in this process
        (a crash there would take the agent with it); switch to ``"none"`` if broken."""
        if self.delegates == checks.NONE or self.check is None:
            return
        if checks.verdict(programs, self.check) == checks.NONE:
            self.delegates = checks.NONE

    def load(self, source: Source) -> Program:
        data = read_source(source)
        if len(data) < 8 or data[4:8] != b"TFL3":
            raise BackendError("not a LiteRT program (no TFL3 identifier)")
        return LiteRTProgram(data, threads=self.threads, delegates=self.delegates)
