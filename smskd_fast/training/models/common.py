"""Building blocks shared by the model zoo, and the feature-point convention.

Every model in the zoo names, as class attributes, where distillation methods
tap it: `stage_names` (outputs of successive stages, shallow to deep; feature
methods such as FitNet and AT use them) and `embedding_name` (the pooled
penultimate vector, used by relation methods such as RKD, SP, PKT and CRD).
"""
from __future__ import annotations

from typing import List

from torch import nn


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1, relu: bool = True) -> nn.Sequential:
    """Conv (no bias) -> BatchNorm -> optional ReLU, padding that keeps the size at stride 1."""
    layers: List[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class PooledHead(nn.Module):
    """Global average pool -> flatten (the embedding) -> linear classifier."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, features):
        return self.fc(self.flatten(self.pool(features)))


def init_weights(model: nn.Module) -> None:
    """He-normal convolutions, unit BatchNorm, zero biases: the usual CIFAR KD initialisation."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)
