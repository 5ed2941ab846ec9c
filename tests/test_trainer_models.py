"""The model zoo: every model builds, runs, and declares feature points that exist."""
from __future__ import annotations

import pytest
import torch

from smskd_fast.training.models import MODELS, build_model, feature_points

# Parameter counts (millions) of the CIFAR-100 models as reported in the KD literature (CRD, Tian et al. 2020).
PUBLISHED_MILLIONS = {"resnet8x4": 1.23, "resnet32x4": 7.43, "resnet20": 0.28, "resnet56": 0.86,
                      "resnet110": 1.73, "wrn_16_2": 0.70, "wrn_40_2": 2.26, "vgg8": 3.96, "vgg13": 9.46,
                      "shufflenetv2": 1.36}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_forward_and_feature_points(name):
    digits = name.startswith("digits")
    channels, size, classes = (1, 8, 10) if digits else (3, 32, 100)
    model = build_model(name, classes, channels).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, channels, size, size))
    assert logits.shape == (2, classes)
    stages, embedding = feature_points(model)
    modules = dict(model.named_modules())
    assert stages and all(stage in modules for stage in stages) and embedding in modules
    if name in PUBLISHED_MILLIONS:
        millions = sum(p.numel() for p in model.parameters()) / 1e6
        assert millions == pytest.approx(PUBLISHED_MILLIONS[name], abs=0.015)


def test_torchvision_models_by_name():
    pytest.importorskip("torchvision")  # an optional package (tests/test_cli_errors.py: the error without it)
    model = build_model("torchvision:resnet18", 7)
    assert model.fc.out_features == 7
    with pytest.raises(ValueError, match="torchvision has no model 'resnet19'"):
        build_model("torchvision:resnet19", 7)
    with pytest.raises(ValueError, match="unknown model 'resnet9'"):
        build_model("resnet9", 7)
