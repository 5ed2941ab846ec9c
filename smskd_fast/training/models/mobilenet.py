"""MobileNetV2 for CIFAR (stride-1 stem; width 0.5 and expansion 6 as in the KD literature)."""
from __future__ import annotations

import torch
from torch import nn

from smskd_fast.training.models.common import PooledHead, conv_bn_relu, init_weights

# (expansion, output channels, blocks, first stride) per stage; expansion None means the model's.
STAGES = ((1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2),
          (None, 96, 3, 1), (None, 160, 3, 2), (None, 320, 1, 1))


class InvertedResidual(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        self.body = nn.Sequential(
            conv_bn_relu(in_channels, hidden, 1),
            conv_bn_relu(hidden, hidden, 3, stride, groups=hidden),
            conv_bn_relu(hidden, out_channels, 1, relu=False),
        )
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.residual else out


class MobileNetV2(nn.Module):
    stage_names = ("stages.1", "stages.2", "stages.4", "stages.6")
    embedding_name = "head.flatten"

    def __init__(self, num_classes: int = 100, in_channels: int = 3, width: float = 0.5, expansion: int = 6):
        super().__init__()
        channels = int(32 * width)
        self.stem = conv_bn_relu(in_channels, channels)
        stages = []
        for stage_expansion, out, blocks, stride in STAGES:
            out = int(out * width)
            layers = []
            for index in range(blocks):
                layers.append(InvertedResidual(channels, out, stride if index == 0 else 1,
                                               stage_expansion or expansion))
                channels = out
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.last = conv_bn_relu(channels, 1280, 1)
        self.head = PooledHead(1280, num_classes)
        init_weights(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.last(self.stages(self.stem(images))))


def mobilenetv2(num_classes: int = 100, in_channels: int = 3) -> MobileNetV2:
    return MobileNetV2(num_classes, in_channels)
