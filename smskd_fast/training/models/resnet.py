"""CIFAR ResNets of the KD literature: resnet20/56/110 (widths 16-32-64) and resnet8x4/32x4 (x4 widths)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from smskd_fast.training.models.common import PooledHead, conv_bn_relu, init_weights


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn_relu(in_channels, out_channels, stride=stride),
                                  conv_bn_relu(out_channels, out_channels, relu=False))
        self.shortcut = (nn.Identity() if stride == 1 and in_channels == out_channels
                         else conv_bn_relu(in_channels, out_channels, 1, stride, relu=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class CifarResNet(nn.Module):
    """Stem, three stages of (depth - 2) / 6 basic blocks (strides 1, 2, 2), pooled head."""

    stage_names = ("layer1", "layer2", "layer3")
    embedding_name = "head.flatten"

    def __init__(self, depth: int, widths: Sequence[int], num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        blocks = (depth - 2) // 6
        self.stem = conv_bn_relu(in_channels, widths[0])
        self.layer1 = self._stage(widths[0], widths[1], blocks, 1)
        self.layer2 = self._stage(widths[1], widths[2], blocks, 2)
        self.layer3 = self._stage(widths[2], widths[3], blocks, 2)
        self.head = PooledHead(widths[3], num_classes)
        init_weights(self)

    @staticmethod
    def _stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
        return nn.Sequential(*[BasicBlock(in_channels if i == 0 else out_channels, out_channels,
                                          stride if i == 0 else 1) for i in range(blocks)])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer3(self.layer2(self.layer1(self.stem(images)))))


def resnet20(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(20, (16, 16, 32, 64), num_classes, in_channels)


def resnet56(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(56, (16, 16, 32, 64), num_classes, in_channels)


def resnet110(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(110, (16, 16, 32, 64), num_classes, in_channels)


def resnet8x4(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(8, (32, 64, 128, 256), num_classes, in_channels)


def resnet32x4(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(32, (32, 64, 128, 256), num_classes, in_channels)
