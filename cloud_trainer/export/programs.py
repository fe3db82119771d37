"""Export torch modules as ExecuTorch (.pte, XNNPACK) and LiteRT (.tflite) programs."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator

import torch
from torch import nn
from torch.export import Dim, export

from cloud_trainer.errors import ExportError

# ExecuTorch plans activation memory for the bound, in every program: the `cifar` preset's
# edge process (half its modules) peaked at 307 MB with 64, 264 MB with 16 and 252 MB with 8
# (bench/edge_memory.py; 228 MB of it is torch and the pybindings). Larger batches run in
# pieces of 8 on the device, which costs a few per-call overheads (~12 us each) a piece.
MAX_BATCH = 8


def batch_dim() -> tuple[dict[int, Dim], ...]:
    """Dynamic shapes for one input with a free batch dimension."""
    return ({0: Dim("batch", min=1, max=MAX_BATCH)},)


@contextlib.contextmanager
def quiet_native_output() -> Iterator[None]:
    """Send fd 1 and 2 to a temp file: the converters print per-pass progress natively.

    What was printed is replayed on stderr if the block raises, so no error text is lost.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                yield
        except BaseException:
            _restore(saved)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace")[-4000:])
            raise
        finally:
            _restore(saved)
            for fd in saved:  # each export would otherwise keep two descriptors open
                os.close(fd)


def _restore(saved: list[int]) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    for target, fd in zip((1, 2), saved, strict=False):
        with contextlib.suppress(OSError):
            os.dup2(fd, target)


def export_executorch(module: nn.Module, sample: torch.Tensor, *, name: str = "module") -> bytes:
    """An XNNPACK-lowered ``.pte`` with a free batch dimension; ``module`` in eval mode.

    Export may bound the batch below MAX_BATCH; the edge backend reads the bound back.
    """
    # A batch-1 sample would let export specialise the batch to the constant 1.
    if sample.shape[0] < 2:
        sample = sample.expand(2, *sample.shape[1:])
    # Standard strides: export derives the program's memory layout from them.
    sample = sample.clone(memory_format=torch.contiguous_format)
    try:
        with quiet_native_output():  # importing exir logs warnings nobody can act on
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import (
                XnnpackPartitioner,
            )
            from executorch.exir import to_edge_transform_and_lower

            program = export(module, (sample,), dynamic_shapes=batch_dim())
            lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
            return bytes(lowered.to_executorch().buffer)
    except Exception as exc:  # torch.export and exir raise many unrelated types
        raise ExportError(name, "executorch", f"{type(exc).__name__}: {exc}") from exc


def export_litert(module: nn.Module, sample: torch.Tensor, *, name: str = "module") -> bytes:
    """A ``.tflite`` with batch 1 (litert-torch cannot export a free batch dimension)."""
    import litert_torch

    try:
        with quiet_native_output():
            return bytes(litert_torch.convert(module.eval(), (sample[:1],)).model_content())
    except Exception as exc:  # the converter raises many unrelated types
        raise ExportError(name, "litert", f"{type(exc).__name__}: {exc}") from exc
