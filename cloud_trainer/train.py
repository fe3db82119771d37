"""Supervised training on the cloud."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def train_classifier(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = False,
) -> nn.Module:
    """Train ``model`` with Adam and cross-entropy; returns it in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    epochs_iter = range(epochs)
    if progress:
        from tqdm import tqdm

        epochs_iter = tqdm(epochs_iter, desc="train", unit="epoch", leave=False)
    model.train()
    for _ in epochs_iter:
        order = torch.randperm(len(xs), generator=generator)
        for start in range(0, len(xs), batch_size):
            idx = order[start : start + batch_size]
            opt.zero_grad()
            loss_fn(model(xs[idx]), ys[idx]).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``."""
    return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())
