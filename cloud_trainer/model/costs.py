"""What each part of the modular model costs on a device: memory and estimated latency."""

from __future__ import annotations

from torch import nn

from cloud_trainer.model.modular import ModularNet, part_name, parts
from cloud_trainer.model.selection import Cost, CostTable
from device_profiles import DeviceProfile

# Multiply-accumulates per millisecond of one reference x86-64 core (speed_factor 1.0)
# running XNNPACK fp32 kernels on small convolutions; deliberately conservative.
REF_MACS_PER_MS = 5e6
# What one program call costs beyond its arithmetic, per backend (measured on the
# reference machine, DESIGN.md section 6).
CALL_OVERHEAD_MS = {"executorch": 0.012, "litert": 0.002}
BYTES_PER_PARAM = {"fp32": 4.0, "int8": 1.0}
PROGRAM_OVERHEAD_KB = 1.0


def macs(module: nn.Module, spec) -> int:
    """Multiply-accumulates of one sample through ``module`` (convs at full resolution)."""
    pixels = spec.image_size**2
    total = 0
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            k = layer.kernel_size[0] * layer.kernel_size[1]
            total += layer.in_channels * layer.out_channels * k * pixels
        elif isinstance(layer, nn.Linear):
            total += layer.in_features * layer.out_features
    return total


def part_cost(module: nn.Module, spec, profile: DeviceProfile, backend: str, quant: str) -> Cost:
    params = sum(p.numel() for p in module.parameters())
    memory = params * BYTES_PER_PARAM[quant] / 1024 + PROGRAM_OVERHEAD_KB
    latency = macs(module, spec) / REF_MACS_PER_MS + CALL_OVERHEAD_MS[backend]
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
    for name, module in parts(net).items():
        cost = part_cost(module, net.spec, profile, backend, quant)
        if name in measured_ms:
            cost = Cost(cost.memory_kb, float(measured_ms[name]))
        costs[name] = cost
    fixed = costs["stem"] + costs["head"]
    for layer in range(net.spec.layers):
        fixed = fixed + costs[part_name(layer)]
    modules = tuple(
        tuple(costs[part_name(layer, m)] for m in range(net.spec.modules_per_layer))
        for layer in range(net.spec.layers)
    )
    return CostTable(fixed, modules)
