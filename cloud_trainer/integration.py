"""What the cloud's integration does to the model: a head moved toward the devices'
clean-domain aggregate, and the targets that carry a new head (exported in each format a
device runs). The service (:mod:`cloud_trainer.service`) decides when.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import numpy as np

from cloud_trainer.rollout import Target


def blend_head(net, weights: dict[str, np.ndarray], blend: float):
    """A copy of ``net`` whose head moved ``blend`` of the way toward ``weights``."""
    net = copy.deepcopy(net)
    fc = net.head.fc
    for name, value in weights.items():
        old = getattr(fc, name).detach().numpy()
        getattr(fc, name).data[...] = _tensor(old + blend * (value - old))
    return net


def with_head(net, targets: dict[str, Target], model_dir: Path, store: Path) -> dict[str, Target]:
    """``targets`` with ``net``'s head: its program in each format a target runs, and its
    weights as the adapter artifact (exported once per format)."""
    from cloud_trainer.pipeline import export_part, head_ref

    refs = {"adapter": head_ref(net, _store(store))}
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


def _tensor(array: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _store(path: Path):
    from edge_runtime.artifacts import ArtifactStore

    return ArtifactStore(path)
