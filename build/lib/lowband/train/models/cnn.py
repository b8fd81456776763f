"""A small convolutional network for 28x28 grayscale digits (MNIST).

LeCun et al., "Gradient-Based Learning Applied to Document Recognition" (1998) in spirit:
two conv+pool stages and two linear layers, about 0.2M parameters.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class CNN(nn.Module):
    """``CNN()(images, labels) -> (logits, loss)``; images are (B, 1, 28, 28) floats."""

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc1 = nn.Linear(2 * width * 7 * 7, 64)
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, w, 14, 14)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 2w, 7, 7)
        logits = self.fc2(F.relu(self.fc1(x.flatten(1))))  # (B, classes)
        loss = None if targets is None else F.cross_entropy(logits, targets)
        return logits, loss
