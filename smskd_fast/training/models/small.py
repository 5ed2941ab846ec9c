"""Small CNNs for the embedded 8x8 digits: a teacher and a much narrower student."""
from __future__ import annotations

from typing import Sequence

from torch import nn

from smskd_fast.training.models.common import PooledHead, conv_bn_relu, init_weights


class DigitsCNN(nn.Module):
    """Three conv stages (8x8, 4x4, 4x4) with the given widths, then a pooled linear head."""

    stage_names = ("stage1", "stage2", "stage3")
    embedding_name = "head.flatten"

    def __init__(self, widths: Sequence[int], num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.stage1 = conv_bn_relu(in_channels, widths[0])
        self.stage2 = conv_bn_relu(widths[0], widths[1], stride=2)
        self.stage3 = conv_bn_relu(widths[1], widths[2])
        self.head = PooledHead(widths[2], num_classes)
        init_weights(self)

    def forward(self, images):
        return self.head(self.stage3(self.stage2(self.stage1(images))))


def digits_cnn_large(num_classes: int = 10, in_channels: int = 1) -> DigitsCNN:
    return DigitsCNN((16, 32, 64), num_classes, in_channels)


def digits_cnn_small(num_classes: int = 10, in_channels: int = 1) -> DigitsCNN:
    return DigitsCNN((4, 8, 8), num_classes, in_channels)
