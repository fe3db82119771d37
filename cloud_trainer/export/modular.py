"""Export every part of the modular model as its own program, in every format and precision.

Artifacts are content-addressed; a cache maps (part weights, input shape, variant,
calibration data, exporter version) to the artifact, so re-exporting an unchanged part
runs no exporter at all. ``modular.json`` in the store lists the parts and their refs.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

import eclm_wire as wire
from cloud_trainer.errors import ExportError
from cloud_trainer.export.programs import (
    MAX_BATCH,
    batch_dim,
    export_executorch,
    export_litert,
    quiet_native_output,
)
from cloud_trainer.model.modular import ModularNet, parts
from edge_runtime.artifacts import ArtifactStore, atomic_write, sha256_bytes

EXPORTER_VERSION = "3"  # 3: free batch bounded at 8 (programs.MAX_BATCH)
VARIANTS = (("pte", "fp32"), ("pte", "int8"), ("tflite", "fp32"), ("tflite", "int8"))


def variant_name(fmt: str, quant: str) -> str:
    return f"{fmt}-{quant}"


def export_program(
    module: nn.Module, sample: torch.Tensor, fmt: str, quant: str, *, calib: torch.Tensor, name: str
) -> bytes:
    """One program for ``module``: ExecuTorch or LiteRT, fp32 or int8."""
    module = module.eval()
    if (fmt, quant) == ("pte", "fp32"):
        return export_executorch(module, sample, name=name)
    if (fmt, quant) == ("pte", "int8"):
        return _executorch_int8(module, sample, calib, name)
    if (fmt, quant) == ("tflite", "fp32"):
        return export_litert(module, sample, name=name)
    if (fmt, quant) == ("tflite", "int8"):
        return _litert_int8(export_litert(module, sample, name=name), name)
    raise ExportError(name, fmt, f"unknown variant {fmt}/{quant}")


def _executorch_int8(
    module: nn.Module, sample: torch.Tensor, calib: torch.Tensor, name: str
) -> bytes:
    """Static per-channel int8 through pt2e and the XNNPACK quantizer (float I/O)."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    try:
        with quiet_native_output():
            quantizer = XNNPACKQuantizer().set_global(
                get_symmetric_quantization_config(is_per_channel=True)
            )
            exported = torch.export.export(module.eval(), (sample,), dynamic_shapes=batch_dim())
            prepared = prepare_pt2e(exported.module(), quantizer)
            for batch in calib.split(MAX_BATCH):
                prepared(batch)
            converted = convert_pt2e(prepared)
    except Exception as exc:  # pt2e raises many unrelated types
        raise ExportError(name, "executorch-int8", f"{type(exc).__name__}: {exc}") from exc
    return export_executorch(converted, sample, name=name)


def _litert_int8(fp32: bytes, name: str) -> bytes:
    """Dynamic-range int8 weights (float activations, float I/O) via ai-edge-quantizer."""
    try:
        from ai_edge_quantizer import quantizer, recipe

        with quiet_native_output():
            result = quantizer.Quantizer(fp32, recipe.dynamic_wi8_afp32()).quantize()
        return bytes(result.quantized_model)
    except Exception as exc:  # the quantizer raises many unrelated types
        raise ExportError(name, "litert-int8", f"{type(exc).__name__}: {exc}") from exc


def weights_key(module: nn.Module, *extra: object) -> str:
    """A hash of the module's class, weights and whatever else decides its program."""
    digest = hashlib.sha256(f"{type(module).__name__}|{EXPORTER_VERSION}".encode())
    for key, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"|{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.numpy().tobytes())
    for item in extra:
        digest.update(f"|{item}".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class ExportRecord:
    part: str
    variant: str
    ref: wire.ArtifactRef
    seconds: float
    cached: bool


class ModularExporter:
    """Exports parts into a store, reusing programs whose inputs have not changed."""

    def __init__(self, store: ArtifactStore, *, chunk_size: int = wire.DEFAULT_CHUNK_SIZE):
        self.store = store
        self.chunk_size = chunk_size
        (store.root / "cache").mkdir(parents=True, exist_ok=True)

    def export(
        self,
        name: str,
        module: nn.Module,
        sample: torch.Tensor,
        fmt: str,
        quant: str,
        calib: torch.Tensor,
    ) -> ExportRecord:
        calib_key = sha256_bytes(calib.numpy().tobytes()) if quant == "int8" else ""
        key = weights_key(module, name, tuple(sample.shape[1:]), fmt, quant, calib_key)
        cache = self.store.root / "cache" / key
        start = time.perf_counter()
        sha = cache.read_text().strip() if cache.exists() else ""
        cached = bool(sha) and self.store.has(sha)
        if cached:
            size = self.store.path(sha).stat().st_size
        else:
            data = export_program(module, sample, fmt, quant, calib=calib, name=name)
            sha, size = self.store.put(data), len(data)
            atomic_write(cache, sha.encode())
        ref = wire.ArtifactRef(
            name=f"{name}.{variant_name(fmt, quant)}.{fmt}"[:128],
            sha256=sha,
            size=size,
            format=fmt,
            chunk_size=self.chunk_size,
        )
        return ExportRecord(
            name, variant_name(fmt, quant), ref, time.perf_counter() - start, cached
        )


@torch.no_grad()
def part_inputs(net: ModularNet, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input each part sees for samples ``x`` in the full model."""
    layer_inputs: list[torch.Tensor] = []
    inputs = {"stem": x, "head": net.trunk(x, None, layer_inputs=layer_inputs)}
    for name in parts(net):
        if name.startswith("layer"):
            inputs[name] = layer_inputs[int(name.removeprefix("layer").split(".")[0])]
    return inputs


def export_modular(
    net: ModularNet,
    calib_x: np.ndarray,
    store: ArtifactStore,
    *,
    variants: Iterable[tuple[str, str]] = VARIANTS,
    on_record: Callable[[ExportRecord], None] | None = None,
) -> list[ExportRecord]:
    """Export every part in every variant; write ``modular.json`` listing them. (No
    adapter training program: boards train the adapter in numpy, which is faster at its
    size than ExecuTorch's training runtime; see ``bench/adapter.py``.)"""
    net = net.eval()
    exporter = ModularExporter(store)
    calib = torch.from_numpy(calib_x[:64])
    inputs = part_inputs(net, calib)
    jobs = [
        (name, module, inputs[name], fmt, quant)
        for fmt, quant in variants
        for name, module in parts(net).items()
    ]
    records = []
    for name, module, data, fmt, quant in jobs:
        records.append(exporter.export(name, module, data[:2], fmt, quant, calib=data))
        if on_record:
            on_record(records[-1])
    index = {"spec": asdict(net.spec), "parts": {}}
    for record in records:
        index["parts"].setdefault(record.part, {})[record.variant] = record.ref.to_dict()
    atomic_write(store.root / "modular.json", json.dumps(index, indent=2).encode())
    return records
