"""ShuffleNetV1 (groups 3) and ShuffleNetV2 (1x) for CIFAR, as used as KD students."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from smskd_fast.training.models.common import PooledHead, conv_bn_relu, init_weights


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    batch, channels, height, width = x.shape
    return x.view(batch, groups, channels // groups, height, width).transpose(1, 2).reshape(batch, channels, height, width)


class ShuffleV1Unit(nn.Module):
    """Grouped 1x1 -> shuffle -> depthwise 3x3 -> grouped 1x1; stride 2 concatenates an avg-pooled shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int, first: bool):
        super().__init__()
        self.stride, self.groups = stride, groups
        branch_out = out_channels - in_channels if stride == 2 else out_channels
        mid = out_channels // 4
        self.reduce = conv_bn_relu(in_channels, mid, 1, groups=1 if first else groups)
        self.depthwise = conv_bn_relu(mid, mid, 3, stride, groups=mid, relu=False)
        self.expand = conv_bn_relu(mid, branch_out, 1, groups=groups, relu=False)
        self.shortcut = nn.AvgPool2d(3, 2, 1) if stride == 2 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.expand(self.depthwise(channel_shuffle(self.reduce(x), self.groups)))
        if self.shortcut is None:
            return torch.relu(out + x)
        return torch.relu(torch.cat([out, self.shortcut(x)], dim=1))


class ShuffleNetV1(nn.Module):
    stage_names = ("layer1", "layer2", "layer3")
    embedding_name = "head.flatten"

    def __init__(self, num_classes: int = 100, in_channels: int = 3, widths: Sequence[int] = (240, 480, 960),
                 blocks: Sequence[int] = (4, 8, 4), groups: int = 3):
        super().__init__()
        self.stem = conv_bn_relu(in_channels, 24, 1)
        channels = 24
        layers = []
        for stage, (width, count) in enumerate(zip(widths, blocks)):
            units = []
            for index in range(count):
                units.append(ShuffleV1Unit(channels, width, 2 if index == 0 else 1, groups,
                                           first=stage == 0 and index == 0))
                channels = width
            layers.append(nn.Sequential(*units))
        self.layer1, self.layer2, self.layer3 = layers
        self.head = PooledHead(channels, num_classes)
        init_weights(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer3(self.layer2(self.layer1(self.stem(images)))))


class ShuffleV2Unit(nn.Module):
    """Stride 1: split channels, transform one half, concatenate, shuffle. Stride 2: two strided branches."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride = stride
        branch = out_channels // 2
        branch_in = in_channels if stride == 2 else in_channels // 2
        self.main = nn.Sequential(
            conv_bn_relu(branch_in, branch, 1),
            conv_bn_relu(branch, branch, 3, stride, groups=branch, relu=False),
            conv_bn_relu(branch, branch, 1),
        )
        self.side = (nn.Sequential(conv_bn_relu(in_channels, in_channels, 3, 2, groups=in_channels, relu=False),
                                   conv_bn_relu(in_channels, branch, 1))
                     if stride == 2 else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.side is None:
            kept, transformed = x.chunk(2, dim=1)
            out = torch.cat([kept, self.main(transformed)], dim=1)
        else:
            out = torch.cat([self.side(x), self.main(x)], dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    stage_names = ("layer1", "layer2", "layer3")
    embedding_name = "head.flatten"

    def __init__(self, num_classes: int = 100, in_channels: int = 3, widths: Sequence[int] = (116, 232, 464),
                 blocks: Sequence[int] = (4, 8, 4), last: int = 1024):
        super().__init__()
        self.stem = conv_bn_relu(in_channels, 24, 3)
        channels = 24
        layers = []
        for width, count in zip(widths, blocks):
            units = []
            for index in range(count):
                units.append(ShuffleV2Unit(channels, width, 2 if index == 0 else 1))
                channels = width
            layers.append(nn.Sequential(*units))
        self.layer1, self.layer2, self.layer3 = layers
        self.last = conv_bn_relu(channels, last, 1)
        self.head = PooledHead(last, num_classes)
        init_weights(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.last(self.layer3(self.layer2(self.layer1(self.stem(images))))))


def shufflenetv1(num_classes: int = 100, in_channels: int = 3) -> ShuffleNetV1:
    return ShuffleNetV1(num_classes, in_channels)


def shufflenetv2(num_classes: int = 100, in_channels: int = 3) -> ShuffleNetV2:
    return ShuffleNetV2(num_classes, in_channels)
