"""A small real LiteRT program (an MLP on 8x8 digits) for delivery tests, exported once
per session: delivery tests need real bytes a real agent loads, not a trained model."""

from __future__ import annotations

import functools


@functools.cache
def mlp_program(width: int = 256) -> bytes:
    """A .tflite MLP 64 -> ``width`` -> 10 (about ``width`` x 300 bytes)."""
    import torch
    from torch import nn

    from cloud_trainer.export.programs import export_litert

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 10))
    return export_litert(net, torch.zeros(1, 64), name="delivery-test")
