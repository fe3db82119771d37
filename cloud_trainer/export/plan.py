"""Planning a device's sub-model: select modules under its budget, export them, and the
head's artifacts. Each step is usable from the CLI, the service, the lab and tests."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

import eclm_wire as wire
from cloud_trainer.model.checkpoint import head_weights, load_importance, load_model
from device_profiles import DeviceProfile
from edge_runtime.artifacts import ArtifactStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """What one device should run after the rollout."""

    artifacts: tuple[wire.ArtifactRef, ...]
    options: tuple[wire.ModuleSet, ...] = ()
    profile: str = ""


def select_for(
    model_dir: Path,
    profile: DeviceProfile,
    histogram,
    *,
    domain: str | None = None,
    backend: str | None = None,
    quant: str = "fp32",
    measured_ms: dict[str, float] | None = None,
):
    """The sub-model for a device: its budget, its label histogram (None: every class
    alike), optionally its data domain."""
    from cloud_trainer.model.costs import cost_table
    from cloud_trainer.model.selection import select_modules

    net = load_model(model_dir)
    costs = cost_table(net, profile, backend=backend, quant=quant, measured_ms=measured_ms)
    importance = load_importance(model_dir, domain)
    if histogram is None:
        histogram = np.ones(importance.shape[2])
    return select_modules(importance, histogram, costs, profile.budget)


def export_model(model_dir: Path, store_dir: Path, *, variants=None, progress: bool = False):
    """Export every part of the trained model into a content-addressed store."""
    from cloud_trainer.export.modular import VARIANTS, export_modular
    from cloud_trainer.model.modular import parts

    net = load_model(model_dir)
    calib = np.load(model_dir / "test.npz")["x"]
    variants = tuple(variants or VARIANTS)
    bar = None
    if progress:
        from tqdm import tqdm

        total = len(variants) * len(parts(net))
        bar = tqdm(total=total, desc="export", unit="program", leave=False)
    try:
        return export_modular(
            net,
            calib,
            ArtifactStore(store_dir),
            variants=variants,
            on_record=(lambda _: bar.update(1)) if bar else None,
        )
    finally:
        if bar:
            bar.close()


def export_fused_for(
    model_dir: Path, store_dir: Path, modules, fmt: str, quant: str = "fp32"
) -> wire.ArtifactRef:
    """One program of the whole selected sub-model, stored (and cached) for delivery."""
    from cloud_trainer.model.modular import SubModel

    net = load_model(model_dir)
    calib = np.load(model_dir / "test.npz")["x"]
    tag = "-".join("".join(map(str, layer)) for layer in modules)
    return store_program(store_dir, f"submodel-{tag}", SubModel(net, modules), calib, fmt, quant)


def store_program(store_dir: Path, name: str, module, calib, fmt: str, quant: str = "fp32"):
    """``module`` as one program, exported on (up to 64 of) the samples ``calib`` (numpy or
    torch: what the module takes), stored and cached for delivery."""
    import torch

    from cloud_trainer.export.modular import ModularExporter

    x = torch.as_tensor(calib[:64])
    record = ModularExporter(ArtifactStore(store_dir)).export(
        name, module, x[:2], fmt, quant, calib=x
    )
    return record.ref


def plan_device(
    model_dir: Path,
    store_dir: Path,
    profile: DeviceProfile,
    histogram=None,
    *,
    domain: str | None = None,
):
    """Select a device's sub-model and export it in each format its profile can run.

    Returns the Selection and the refs to put in its desired state.
    """
    from edge_runtime.backends import FORMAT_OF

    selection = select_for(model_dir, profile, histogram, domain=domain)
    refs = [
        export_fused_for(model_dir, store_dir, selection.modules, FORMAT_OF[backend])
        for backend in profile.backends
    ]
    return selection, refs


BUDGET_SCALES = (1.0, 0.6, 0.35)


def plan_device_modular(
    model_dir: Path,
    store_dir: Path,
    profile: DeviceProfile,
    histogram=None,
    *,
    domain: str | None = None,
    scales=BUDGET_SCALES,
    fused: bool = False,
):
    """The module sets a device may switch between (its selection at its full budget, and
    selections at smaller shares of that selection's size, down to the smallest sub-model
    there is, for when the board runs short) and the per-part programs they need, for each
    format its profile can run. Returns ``(options, refs)`` for a modular desired state.

    ``fused`` adds one fused trunk program per module set and format: the device runs it
    in place of that set's parts once loaded (two calls per inference instead of one per
    part), at the cost of its export and its bytes."""
    from cloud_trainer.export.modular import export_modular
    from cloud_trainer.model.costs import cost_table
    from cloud_trainer.model.selection import SelectionError, smallest_memory_kb
    from edge_runtime.backends import FORMAT_OF
    from edge_runtime.composer import part_names

    selections: dict[tuple, float] = {}  # modules -> KB
    ceiling = profile.budget.model_memory_kb
    for scale in scales:
        budget = replace(profile.budget, model_memory_mb=ceiling * scale / 1024)
        try:
            chosen = select_for(
                model_dir, replace(profile, budget=budget), histogram, domain=domain
            )
        except SelectionError:
            if not selections:
                raise
            break
        if not selections:
            ceiling = chosen.cost.memory_kb
        selections.setdefault(chosen.modules, chosen.cost.memory_kb)
    smallest = math.ceil(smallest_memory_kb(cost_table(load_model(model_dir), profile)))
    if min(selections.values()) > smallest:  # the last resort when memory runs out
        budget = replace(profile.budget, model_memory_mb=smallest / 1024)
        chosen = select_for(model_dir, replace(profile, budget=budget), histogram, domain=domain)
        selections.setdefault(chosen.modules, chosen.cost.memory_kb)
    net = load_model(model_dir)
    layout = net.layout()
    options = tuple(
        wire.ModuleSet(
            layers=tuple(wire.LayerModules(modules=m) for m in modules),
            memory_kb=round(kb, 1),
            posts=layout.posts,
            pool=layout.pool,
            shortcuts=layout.shortcuts,
        )
        for modules, kb in selections.items()
    )
    needed = {p for modules in selections for p in part_names(modules, layout)}
    variants = [(FORMAT_OF[b], "fp32") for b in profile.backends]
    calib = np.load(model_dir / "test.npz")["x"]
    records = export_modular(net, calib, ArtifactStore(store_dir), variants=variants)
    refs = [replace(r.ref, part=r.part) for r in records if r.part in needed]
    if fused:
        refs += [
            fused_trunk(net, calib, store_dir, option.selection, fmt)
            for option in options
            for fmt, _ in variants
        ]
    return options, [*refs, head_ref(net, ArtifactStore(store_dir))]


def fused_trunk(net, calib: np.ndarray, store_dir: Path, selection, fmt: str) -> wire.ArtifactRef:
    """``selection``'s stem and layers as one fp32 program, stored (and cached)."""
    from cloud_trainer.model.modular import Trunk
    from edge_runtime.composer import trunk_part

    name = trunk_part(selection)
    ref = store_program(store_dir, name, Trunk(net, selection), calib, fmt)
    return replace(ref, part=name)


def head_ref(net, store: ArtifactStore) -> wire.ArtifactRef:
    """The head's weights as safetensors, stored: where a device's adapters start from."""
    from safetensors.numpy import save

    data = save(head_weights(net))
    return wire.ArtifactRef(
        name="adapter-head",
        sha256=store.put(data),
        size=len(data),
        format="safetensors",
        part="adapter",
    )


def export_part(net, model_dir: Path, store_dir: Path, part: str, fmt: str) -> wire.ArtifactRef:
    """One part of ``net`` (say a new head) as an fp32 program, stored for delivery."""
    import torch

    from cloud_trainer.export.modular import part_inputs
    from cloud_trainer.model.modular import parts

    x = torch.from_numpy(np.load(model_dir / "test.npz")["x"][:64])
    data = part_inputs(net.eval(), x)[part]
    return replace(store_program(store_dir, part, parts(net)[part], data, fmt), part=part)


def with_head(net, targets: dict[str, Target], model_dir: Path, store: Path) -> dict[str, Target]:
    """``targets`` with ``net``'s head: its program in each format a target runs, and its
    weights as the adapter artifact (exported once per format)."""
    refs = {"adapter": head_ref(net, ArtifactStore(store))}
    out = {}
    for device, target in targets.items():
        formats = {r.format for r in target.artifacts if r.part == "head"}
        new = [r for r in target.artifacts if r.part not in ("head", "adapter")]
        for fmt in sorted(formats):
            if fmt not in refs:
                refs[fmt] = export_part(net, model_dir, store, "head", fmt)
            new.append(refs[fmt])
        new.append(refs["adapter"])
        out[device] = replace(target, artifacts=tuple(new))
    return out
