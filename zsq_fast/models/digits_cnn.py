"""A small BatchNorm CNN for scikit-learn's bundled 8x8 digits, upsampled to 16x16 RGB (the demo model).

Small on purpose: it trains in seconds on two CPU cores, yet has the conv-BN-ReLU structure, a
stride-2 downsampling path and a linear head that the generators and quantizers work on.
"""
from __future__ import annotations

import torch
from torch import nn


def _conv_bn(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class DigitsCNN(nn.Module):
    """conv-BN-ReLU x4 (16, 32 s2, 32, 64 s2) -> global average pool -> linear."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_conv_bn(3, w, 1), *_conv_bn(w, 2 * w, 2), *_conv_bn(2 * w, 2 * w, 1), *_conv_bn(2 * w, 4 * w, 2)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.flatten(self.pool(self.features(x)), 1))


def digits_cnn(num_classes: int = 10) -> DigitsCNN:
    return DigitsCNN(num_classes)
