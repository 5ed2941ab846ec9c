"""The training steps (training/steps.py) return (loss, parts, predictions): checked against the
float64 closed form of SPEC.md section 2 (tests/closed_form.py), with the student's gradient."""
from __future__ import annotations

from typing import List

import numpy as np
import pytest
import torch
from torch import nn

from closed_form import closed_form
from smskd_fast.training.config import MethodConfig, StageConfig
from smskd_fast.training.frozen_models import StageFrozenModels, freeze
from smskd_fast.training.methods import FeatureTaps
from smskd_fast.training.stage import StageState
from smskd_fast.training.steps import fused_linear_step, logits_step, step_for

TEMPERATURE, CE_WEIGHT, REF_WEIGHT = 3.0, 0.7, 0.9


class _Method(nn.Module):
    """A stand-in method: a fused KD weight and a loss of its own (0.25 * mean of the squared logits)."""

    student_layers: List[str] = []
    teacher_layers: List[str] = []

    def __init__(self, kd_weight: float, own_loss: bool):
        super().__init__()
        self.fused_kd_weight, self.own_loss = kd_weight, own_loss

    def loss(self, inputs) -> torch.Tensor:
        return 0.25 * inputs.student_logits.square().mean() if self.own_loss else inputs.student_logits.new_zeros(())


class _TinyLM(nn.Module):
    """Token embeddings and a linear head: hidden_states() and `head`, what fused_linear stages need."""

    def __init__(self, vocabulary: int, width: int):
        super().__init__()
        self.embed, self.head = nn.Embedding(vocabulary, width), nn.Linear(width, vocabulary)

    def hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.embed(tokens))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden_states(tokens))


def _stage(fused_linear: bool = False) -> StageConfig:
    return StageConfig(methods=[MethodConfig("kd")], epochs=1, temperature=TEMPERATURE, ce_weight=CE_WEIGHT,
                       ref_weight=REF_WEIGHT, fused_linear=fused_linear)


def _state(student: nn.Module, teacher: nn.Module, reference: nn.Module, methods: List[nn.Module]) -> StageState:
    frozen = StageFrozenModels(freeze(teacher), None, freeze(reference))
    return StageState(nn.ModuleList(methods), torch.optim.SGD(student.parameters(), lr=0.1),
                      FeatureTaps(student, [], "student"), FeatureTaps(teacher, [], "teacher"), student, frozen)


def _check_parts(result, expected, method_loss: float) -> None:
    for name in ("ce", "kd", "ref"):
        assert float(getattr(result.parts, name)) == pytest.approx(expected[name].mean(), rel=1e-10, abs=1e-12)
    np.testing.assert_allclose(result.parts.weight.detach().reshape(-1).numpy(), expected["weight"], rtol=1e-10)
    assert float(result.parts.method.detach()) == pytest.approx(method_loss, rel=1e-10)
    assert float(result.loss.detach()) == pytest.approx(expected["loss"].mean() + method_loss, rel=1e-10)


@pytest.mark.parametrize("own_loss", [False, True])
def test_logits_step_equals_the_closed_form(own_loss):
    torch.manual_seed(0)
    rows, features, classes = 12, 5, 7
    student, teacher, reference = (nn.Linear(features, classes).double() for _ in range(3))
    inputs = torch.randn(rows, features, dtype=torch.float64)
    target = torch.randint(0, classes, (rows,))
    state = _state(student, teacher, reference, [_Method(0.4, own_loss), _Method(0.2, False)])
    result = logits_step(student, state, _stage(), "reference", 0, inputs, target, torch.arange(rows))

    s, t, r = (model(inputs).detach().numpy() for model in (student, teacher, reference))
    expected, grad = closed_form(s, target.numpy(), t, r, T=TEMPERATURE, ce_weight=CE_WEIGHT, kd_weight=0.6,
                                 ref_weight=REF_WEIGHT, weighting="inverse_tcp")
    method_loss = 0.25 * float((torch.from_numpy(s) ** 2).mean()) if own_loss else 0.0
    _check_parts(result, expected, method_loss)
    np.testing.assert_array_equal(result.predictions.numpy(), s.argmax(-1))

    result.loss.backward()  # d loss / d W = (G / N + d method / d s)^T x
    grad_logits = grad / rows + (0.5 * s / s.size if own_loss else 0.0)
    np.testing.assert_allclose(student.weight.grad.numpy(), grad_logits.T @ inputs.numpy(), rtol=1e-9, atol=1e-12)


def test_fused_linear_step_equals_the_closed_form_on_the_projected_logits():
    torch.manual_seed(1)
    batch, length, vocabulary, width = 3, 4, 11, 6
    student, teacher, reference = (_TinyLM(vocabulary, width).double() for _ in range(3))
    tokens = torch.randint(0, vocabulary, (batch, length))
    target = torch.randint(0, vocabulary, (batch, length))
    state = _state(student, teacher, reference, [_Method(0.5, False)])
    result = fused_linear_step(student, state, _stage(fused_linear=True), "reference", 0, tokens, target,
                               torch.arange(batch))

    s, t, r = (model(tokens).detach().reshape(-1, vocabulary).numpy() for model in (student, teacher, reference))
    expected, grad = closed_form(s, target.reshape(-1).numpy(), t, r, T=TEMPERATURE, ce_weight=CE_WEIGHT,
                                 kd_weight=0.5, ref_weight=REF_WEIGHT, weighting="inverse_tcp")
    _check_parts(result, expected, 0.0)
    assert result.predictions.shape == (batch, length)
    np.testing.assert_array_equal(result.predictions.reshape(-1).numpy(), s.argmax(-1))

    result.loss.backward()
    hidden = student.hidden_states(tokens).detach().reshape(-1, width).numpy()
    np.testing.assert_allclose(student.head.weight.grad.numpy(), (grad / s.shape[0]).T @ hidden, rtol=1e-9,
                               atol=1e-12)


def test_step_for_picks_the_stage_loss_path():
    assert step_for(_stage()) is logits_step
    assert step_for(_stage(fused_linear=True)) is fused_linear_step
