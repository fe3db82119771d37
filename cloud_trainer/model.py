"""The cloud model. A small CNN for 8x8 digits; the modular model replaces it."""

from __future__ import annotations

import torch
from torch import nn


class DigitsCNN(nn.Module):
    """Conv(1->16) -> Conv(16->32) -> Linear, for (N, 1, 8, 8) images."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * width * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
