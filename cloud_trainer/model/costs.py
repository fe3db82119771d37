"""What each part of the modular model costs on a device: memory (its program and its
largest activation) and estimated latency."""

from __future__ import annotations

from torch import nn

from cloud_trainer.model.footprint import activation_kb, part_activations, trace
from cloud_trainer.model.modular import ModularNet, part_name, parts
from cloud_trainer.model.selection import Cost, CostTable
from device_profiles import DeviceProfile

# Multiply-accumulates per millisecond of one reference x86-64 core (speed_factor 1.0),
# calibrated on the slower backend: the `cifar` preset's 151 M per sample ran in 4.6 ms as
# one fused ExecuTorch program on this project's 2-core reference machine (LiteRT: 1.8 ms),
# README "The benches at real size". The old 5e6 estimated 30.5 ms and refused the preset on
# boards that run it well within their budget.
REF_MACS_PER_MS = 3e7
# What one program call costs beyond its arithmetic, per backend (measured on the
# reference machine, DESIGN.md section 6).
CALL_OVERHEAD_MS = {"executorch": 0.012, "litert": 0.002}
BYTES_PER_PARAM = {"fp32": 4.0, "int8": 1.0}
PROGRAM_OVERHEAD_KB = 1.0


def part_macs(net: ModularNet) -> dict[str, int]:
    """Multiply-accumulates of one sample through each part, at the sizes it sees in the
    full model (strided layers work on smaller maps)."""
    import torch

    counts: dict[nn.Module, int] = {}

    def count(module: nn.Module, _inputs, output: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            per_pixel = module.in_channels // module.groups * module.out_channels * k
            counts[module] = per_pixel * output.shape[2] * output.shape[3]
        else:
            counts[module] = module.in_features * module.out_features

    trace(net, count, [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))])
    return {
        name: sum(counts.get(m, 0) for m in module.modules()) for name, module in parts(net).items()
    }


def part_cost(
    module: nn.Module,
    macs: int,
    profile: DeviceProfile,
    backend: str,
    quant: str,
    activations: int = 0,
) -> Cost:
    """Memory: the program (weights and overhead) plus ``activations`` elements, the
    largest tensor the part produces (see ``footprint``); latency: its arithmetic at the
    board's speed plus one call."""
    params = sum(p.numel() for p in module.parameters())
    program = params * BYTES_PER_PARAM[quant] / 1024 + PROGRAM_OVERHEAD_KB
    memory = program + activation_kb(activations, quant)
    latency = macs / REF_MACS_PER_MS + CALL_OVERHEAD_MS[backend]
    return Cost(memory, latency / profile.speed_factor)


def cost_table(
    net: ModularNet,
    profile: DeviceProfile,
    *,
    backend: str | None = None,
    quant: str = "fp32",
    measured_ms: dict[str, float] | None = None,
) -> CostTable:
    """Costs of every part on ``profile``; ``measured_ms`` (part -> ms, reported by the
    device) replaces the estimate where present."""
    backend = backend or profile.backends[0]
    measured_ms = measured_ms or {}
    costs = {}
    macs, activations = part_macs(net), part_activations(net)
    for name, module in parts(net).items():
        cost = part_cost(module, macs[name], profile, backend, quant, activations[name])
        if name in measured_ms:
            cost = Cost(cost.memory_kb, float(measured_ms[name]))
        costs[name] = cost
    modular = {
        part_name(layer, m) for layer, present in enumerate(net.full_selection()) for m in present
    }
    fixed = costs["stem"]
    for name, cost in costs.items():  # routers, shortcuts and the head run in every sub-model
        if name != "stem" and name not in modular:
            fixed = fixed + cost
    modules = tuple(
        tuple(costs[part_name(layer, m)] for m in range(net.spec.modules_per_layer))
        for layer in range(net.spec.layers)
    )
    return CostTable(fixed, modules)
