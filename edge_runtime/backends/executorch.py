"""ExecuTorch backend (XNNPACK programs, ``.pte``). The only edge module that imports torch.

It uses the pybindings directly rather than ``executorch.runtime``: that import pulls in
the whole exir compiler (~370 MB RSS) where the pybindings need ~236 MB.
"""

from __future__ import annotations

import logging

import numpy as np

from edge_runtime.adapter import BIAS, WEIGHT, AdapterTrainer
from edge_runtime.backends.base import (
    Backend,
    Program,
    Source,
    TensorSpec,
    read_source,
    without_notes,
)
from edge_runtime.errors import BackendError, BackendUnavailable

# Importing the pybindings imports torchao, which warns of CUDA kernels it cannot load, and
# torch, which warns of a deprecated registration: nothing a device or its user can act on.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)
# What the runtime writes to fd 2 as it sizes its thread pool: cpuinfo's probing of files
# an x86 or emulated board lacks, and "Resetting threadpool to N threads".
STARTUP_NOTES = (b"[cpuinfo_utils.cpp:", b"[threadpool.cpp:")

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
            without_notes(STARTUP_NOTES, _C._unsafe_reset_threadpool, threads)
        self.dynamic_batch = dynamic_batch

    def load(self, source: Source) -> Program:
        data = read_source(source)
        if len(data) < 8 or data[4:8] != b"ET12":
            raise BackendError("not an ExecuTorch program (no ET12 header)")
        return ExecuTorchProgram(data, dynamic_batch=self.dynamic_batch)


class ExecuTorchTrainer(AdapterTrainer):
    """Runs a joint forward-backward program (``cloud_trainer.export.adapter``; batch fixed
    at export). Not what boards train with: numpy is faster at the adapter's size."""

    def __init__(
        self, program: bytes, weight: np.ndarray, bias: np.ndarray, *, lr: float, batch: int
    ) -> None:
        from executorch.extension.training import (
            _load_for_executorch_for_training_from_buffer,
            get_sgd_optimizer,
        )

        self._data = program  # the loader does not copy: keep the bytes alive
        self._module = _load_for_executorch_for_training_from_buffer(program)
        # Parameters are filled by the first forward_backward; they are live views after.
        self._module.forward_backward(
            "forward", (torch.zeros(batch, weight.shape[1]), torch.zeros(batch, dtype=torch.long))
        )
        self._params = self._module.named_parameters()
        self._names = {WEIGHT: _one(self._params, "weight"), BIAS: _one(self._params, "bias")}
        self.set_weights({WEIGHT: weight, BIAS: bias})
        self._optimizer = get_sgd_optimizer(self._params, lr, 0, 0, 0, False)

    def weights(self) -> dict[str, np.ndarray]:
        return {k: self._params[name].detach().numpy().copy() for k, name in self._names.items()}

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        for key, name in self._names.items():
            self._params[name].copy_(torch.from_numpy(np.ascontiguousarray(weights[key])))

    def step(self, x: np.ndarray, y: np.ndarray) -> float:
        t = torch
        loss, _ = self._module.forward_backward("forward", (t.from_numpy(x), t.from_numpy(y)))
        value = float(loss)  # read before the step reuses the output's memory
        self._optimizer.step(self._module.named_gradients())
        return value


def _one(params: dict, suffix: str) -> str:
    names = [n for n in params if n.endswith(suffix)]
    if len(names) != 1:
        raise BackendError(f"training program has no single '*{suffix}' parameter: {list(params)}")
    return names[0]
