"""What the cloud's integration does to the model: a head moved toward the devices'
clean-domain aggregate. The service (:mod:`cloud_trainer.service.worker`) decides when,
and exports the new head with :func:`cloud_trainer.export.plan.with_head`.
"""

from __future__ import annotations

import copy

import numpy as np


def blend_head(net, weights: dict[str, np.ndarray], blend: float):
    """A copy of ``net`` whose head moved ``blend`` of the way toward ``weights``."""
    net = copy.deepcopy(net)
    fc = net.head.fc
    for name, value in weights.items():
        old = getattr(fc, name).detach().numpy()
        getattr(fc, name).data[...] = _tensor(old + blend * (value - old))
    return net


def _tensor(array: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
