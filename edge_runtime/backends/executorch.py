"""ExecuTorch backend (XNNPACK programs, ``.pte``). The only edge module that imports torch.

It uses the pybindings directly rather than ``executorch.runtime``: that import pulls in
the whole exir compiler (~370 MB RSS) where the pybindings need ~236 MB.
"""

from __future__ import annotations

import numpy as np

from edge_runtime.backends.base import Backend, Program, Source, TensorSpec, read_source
from edge_runtime.errors import BackendError, BackendUnavailable

try:
    import torch
    from executorch.extension.pybindings import _C
except ImportError as exc:  # pragma: no cover - depends on the install
    raise BackendUnavailable(
        "the ExecuTorch backend needs torch and executorch: "
        "pip install 'eclm-fleet[edge-executorch]'"
    ) from exc

_DTYPES = {6: "float32", 4: "int64", 3: "int32", 1: "int8", 0: "uint8", 11: "bool"}


class ExecuTorchProgram(Program):
    def __init__(self, data: bytes, *, dynamic_batch: bool) -> None:
        # The Method does not keep its Program (or the bytes) alive: a freed one segfaults.
        self._data = data
        try:
            self._program = _C._load_program_from_buffer(data)
            self._method = self._program.load_method("forward")
        except (RuntimeError, ValueError) as exc:
            raise BackendError(f"not a loadable ExecuTorch program: {exc}") from exc
        meta = self._method.method_meta()
        # A free batch dimension is memory-planned for an upper bound that export may set
        # far below the one asked for (15 for a small CNN asked for 1024): read it back.
        self.max_batch = int(meta.input_tensor_meta(0).sizes()[0])
        self.pads_batch = not dynamic_batch
        self.inputs = tuple(
            _spec(meta.input_tensor_meta(i), dynamic_batch) for i in range(meta.num_inputs())
        )
        self.outputs = tuple(
            _spec(meta.output_tensor_meta(i), dynamic_batch) for i in range(meta.num_outputs())
        )

    def _run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        try:
            out = self._method.call([torch.from_numpy(a) for a in arrays])
        except RuntimeError as exc:
            raise BackendError(f"ExecuTorch execution failed: {exc}") from exc
        return [t.numpy() for t in out]


def _spec(info, dynamic_batch: bool) -> TensorSpec:
    shape = tuple(info.sizes())
    if dynamic_batch and shape:
        shape = (-1, *shape[1:])
    return TensorSpec(shape, _DTYPES.get(int(info.dtype()), f"dtype{int(info.dtype())}"))


class ExecuTorchBackend(Backend):
    """Runs ``.pte`` programs with the ExecuTorch runtime.

    ``threads`` resizes XNNPACK's process-wide pool: on a 2-core board the default pool
    delays every other thread badly while a program runs, so serving processes use 1.
    ``dynamic_batch`` says the programs were exported with a free batch dimension.
    """

    name = "executorch"
    file_format = "pte"

    def __init__(self, *, threads: int | None = None, dynamic_batch: bool = True) -> None:
        if threads is not None:
            _C._unsafe_reset_threadpool(threads)
        self.dynamic_batch = dynamic_batch

    def load(self, source: Source) -> Program:
        data = read_source(source)
        if len(data) < 8 or data[4:8] != b"ET12":
            raise BackendError("not an ExecuTorch program (no ET12 header)")
        return ExecuTorchProgram(data, dynamic_batch=self.dynamic_batch)
