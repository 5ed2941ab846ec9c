"""The optimizer and LR-schedule registries (training/optim.py): builders, closed-form rates,
and the error for an unknown name (the argument and every known name)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from smskd_fast.training import optim
from smskd_fast.training.config import (ConfigError, MethodConfig, ModelConfig, OptimizerConfig, RunConfig,
                                        ScheduleConfig, StageConfig, parse_config)
from smskd_fast.training.optim import OPTIMIZERS, SCHEDULES, build_optimizer, learning_rate, stage_learning_rate


def _stage(epochs: int = 10, lr: float = 0.1, **schedule) -> StageConfig:
    return StageConfig(methods=[MethodConfig("none")], epochs=epochs, optimizer=OptimizerConfig(lr=lr),
                       schedule=ScheduleConfig(**schedule))


def test_unknown_optimizer_names_the_argument_and_the_known_names():
    with pytest.raises(ValueError) as error:
        build_optimizer(OptimizerConfig(name="lamb"), nn.Linear(2, 2).parameters())
    message = str(error.value)
    assert message.startswith("optimizer.name:") and "'lamb'" in message
    assert "['adam', 'adamw', 'sgd']" in message


def test_unknown_schedule_names_the_argument_and_the_known_names():
    with pytest.raises(ValueError) as error:
        learning_rate(_stage(name="linear"), 0)
    message = str(error.value)
    assert message.startswith("schedule.name:") and "'linear'" in message
    assert "['constant', 'cosine', 'multistep']" in message


@pytest.mark.parametrize("name, cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                       ("adamw", torch.optim.AdamW)])
def test_each_optimizer_gets_the_spec_settings(name, cls):
    spec = OptimizerConfig(name=name, lr=0.03, momentum=0.8, weight_decay=1e-3, nesterov=True)
    model = nn.Linear(3, 2)
    optimizer = build_optimizer(spec, model.parameters())
    assert type(optimizer) is cls
    group = optimizer.param_groups[0]
    assert group["lr"] == 0.03 and group["weight_decay"] == 1e-3
    assert [id(p) for p in group["params"]] == [id(p) for p in model.parameters()]
    if name == "sgd":
        assert group["momentum"] == 0.8 and group["nesterov"] is True


def test_schedules_match_their_closed_forms():
    multistep = _stage(name="multistep", milestones=[3, 6], gamma=0.5)
    assert [learning_rate(multistep, e) for e in (0, 2, 3, 5, 6, 9)] == [0.1, 0.1, 0.05, 0.05, 0.025, 0.025]
    cosine = _stage(name="cosine")
    for epoch in range(10):
        assert learning_rate(cosine, epoch) == pytest.approx(0.05 * (1 + math.cos(math.pi * epoch / 10)), abs=1e-15)
    assert learning_rate(_stage(name="constant"), 7) == 0.1
    # schedule_scope "run": the stage's epoch is epoch start + epoch of one schedule over the run
    assert learning_rate(cosine, 2, start=10, span=30) == pytest.approx(0.05 * (1 + math.cos(math.pi * 12 / 30)))


def test_stage_learning_rate_follows_the_schedule_scope():
    stages = [_stage(epochs=4, name="cosine"), _stage(epochs=6, name="cosine")]
    per_stage = RunConfig(ModelConfig("digits_cnn_small"), stages, schedule_scope="stage")
    per_run = RunConfig(ModelConfig("digits_cnn_small"), stages, schedule_scope="run")
    assert stage_learning_rate(per_stage, 1, 2) == learning_rate(stages[1], 2)
    assert stage_learning_rate(per_run, 1, 2) == pytest.approx(0.05 * (1 + math.cos(math.pi * 6 / 10)))


def test_config_validation_uses_the_registry_names(monkeypatch):
    raw = {"student": {"name": "digits_cnn_small"}, "data": {"name": "digits"},
           "stages": [{"method": "none", "epochs": 1, "optimizer": {"name": "mine"}}]}
    with pytest.raises(ConfigError, match=r"stages\[0\]\.optimizer\.name.*'mine'"):
        parse_config(raw)
    monkeypatch.setitem(optim.OPTIMIZERS, "mine", OPTIMIZERS["sgd"])
    assert parse_config(raw).stages[0].optimizer.name == "mine"
    raw["stages"][0]["optimizer"]["name"] = "sgd"
    raw["stages"][0]["schedule"] = {"name": "warm"}
    with pytest.raises(ConfigError, match=r"stages\[0\]\.schedule\.name.*'warm'"):
        parse_config(raw)
    monkeypatch.setitem(optim.SCHEDULES, "warm", SCHEDULES["constant"])
    assert parse_config(raw).stages[0].schedule.name == "warm"
