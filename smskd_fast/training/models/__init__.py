"""The model zoo: CIFAR KD models, small digits CNNs, any torchvision model by name, and
small causal language models (SEQUENCE_MODELS: tokens (B, L) -> logits (B, L, V))."""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

from torch import nn

from smskd_fast.training.models.mobilenet import mobilenetv2
from smskd_fast.training.models.resnet import resnet8x4, resnet20, resnet32x4, resnet56, resnet110
from smskd_fast.training.models.shufflenet import shufflenetv1, shufflenetv2
from smskd_fast.training.models.small import digits_cnn_large, digits_cnn_small
from smskd_fast.training.models.transformer import tiny_lm_large, tiny_lm_small
from smskd_fast.training.models.vgg import vgg8, vgg13
from smskd_fast.training.models.wrn import wrn_16_2, wrn_40_2
from smskd_fast.training.optional_packages import require_torchvision

__all__ = ["MODELS", "SEQUENCE_MODELS", "build_model", "model_names", "feature_points"]

MODELS: Dict[str, Callable[..., nn.Module]] = {
    "resnet8x4": resnet8x4, "resnet32x4": resnet32x4,
    "resnet20": resnet20, "resnet56": resnet56, "resnet110": resnet110,
    "wrn_16_2": wrn_16_2, "wrn_40_2": wrn_40_2,
    "vgg8": vgg8, "vgg13": vgg13,
    "mobilenetv2": mobilenetv2, "shufflenetv1": shufflenetv1, "shufflenetv2": shufflenetv2,
    "digits_cnn_large": digits_cnn_large, "digits_cnn_small": digits_cnn_small,
}
SEQUENCE_MODELS: Dict[str, Callable[..., nn.Module]] = {
    "tiny_lm_large": tiny_lm_large, "tiny_lm_small": tiny_lm_small,
}
TORCHVISION_PREFIX = "torchvision:"


def model_names() -> list:
    return sorted(MODELS) + sorted(SEQUENCE_MODELS) + [TORCHVISION_PREFIX + "<name>"]


def build_model(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """A freshly initialised model; "torchvision:resnet18" builds torchvision's resnet18 (no weights)."""
    if name.startswith(TORCHVISION_PREFIX):
        torchvision = require_torchvision(f"model {name!r}")
        tv_name = name[len(TORCHVISION_PREFIX):]
        if tv_name not in torchvision.models.list_models():
            raise ValueError(f"torchvision has no model {tv_name!r}; see torchvision.models.list_models()")
        if in_channels != 3:
            raise ValueError(f"torchvision models take 3 input channels, the data has {in_channels}")
        return torchvision.models.get_model(tv_name, weights=None, num_classes=num_classes)
    factory = MODELS.get(name) or SEQUENCE_MODELS.get(name)
    if factory is None:
        raise ValueError(f"unknown model {name!r}; choose one of {model_names()}")
    return factory(num_classes=num_classes, in_channels=in_channels)


def feature_points(model: nn.Module) -> Tuple[Tuple[str, ...], Optional[str]]:
    """(stage output names, embedding name) that a zoo model declares; ((), None) for others."""
    return tuple(getattr(model, "stage_names", ())), getattr(model, "embedding_name", None)
