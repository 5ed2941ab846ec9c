"""VGG8 and VGG13 with BatchNorm as used for CIFAR in the KD literature."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from smskd_fast.training.models.common import PooledHead, conv_bn_relu, init_weights

VGG8_WIDTHS = ((64,), (128,), (256,), (512,), (512,))
VGG13_WIDTHS = ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512))


class VGG(nn.Module):
    """Five conv blocks; 2x2 max pooling after each of the first four; pooled head."""

    stage_names = ("block1", "block2", "block3", "block4")
    embedding_name = "head.flatten"

    def __init__(self, widths: Sequence[Sequence[int]], num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        blocks = []
        channels = in_channels
        for block_widths in widths:
            layers = []
            for width in block_widths:
                layers.append(conv_bn_relu(channels, width))
                channels = width
            blocks.append(nn.Sequential(*layers))
        self.block0, self.block1, self.block2, self.block3, self.block4 = blocks
        self.pool = nn.MaxPool2d(2)
        self.head = PooledHead(channels, num_classes)
        init_weights(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.block0(images))
        x = self.pool(self.block1(x))
        x = self.pool(self.block2(x))
        x = self.pool(self.block3(x))
        return self.head(self.block4(x))


def vgg8(num_classes: int = 100, in_channels: int = 3) -> VGG:
    return VGG(VGG8_WIDTHS, num_classes, in_channels)


def vgg13(num_classes: int = 100, in_channels: int = 3) -> VGG:
    return VGG(VGG13_WIDTHS, num_classes, in_channels)
