"""The activation memory each part of a modular model needs on a device.

A program holds its weights and, while it runs, the tensors its operators produce. The
footprint counted here is the largest tensor any module inside a part produces for one
sample, at the sizes that part sees in the full model (after the strided stages before
it). It is a lower bound of the part's working memory: a runtime's memory plan also holds
that operator's input while it runs, and functional operations between modules (adds,
concatenations) are not hooked.
"""

from __future__ import annotations

from torch import nn

from cloud_trainer.model.modular import ModularNet, parts

# Bytes of one activation element: XNNPACK's int8 programs keep activations in int8
# between quantized operators, fp32 programs in fp32.
BYTES_PER_ACTIVATION = {"fp32": 4, "int8": 1}


def trace(net: ModularNet, record, modules=None) -> None:
    """Run one zero sample through ``net`` with ``record(module, inputs, output)`` hooked on
    ``modules`` (every module by default): what each part sees in the full model."""
    import torch

    hooks = [m.register_forward_hook(record) for m in (modules or list(net.modules()))]
    spec = net.spec
    try:
        with torch.no_grad():
            net(torch.zeros(1, spec.in_channels, spec.image_size, spec.image_size))
    finally:
        for hook in hooks:
            hook.remove()


def part_activations(net: ModularNet) -> dict[str, int]:
    """Elements of the largest tensor produced inside each part for one sample."""
    import torch

    largest: dict[nn.Module, int] = {}

    def record(module: nn.Module, _inputs, output) -> None:
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        sizes = [t.numel() for t in outputs if isinstance(t, torch.Tensor) and t.dim()]
        if sizes:
            largest[module] = max(largest.get(module, 0), *sizes)

    trace(net, record)
    return {
        name: max((largest.get(m, 0) for m in module.modules()), default=0)
        for name, module in parts(net).items()
    }


def activation_kb(elements: int, quant: str) -> float:
    """KB that ``elements`` activations take in a program of ``quant``."""
    return elements * BYTES_PER_ACTIVATION[quant] / 1024
