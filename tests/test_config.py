"""YAML config validation: every error names its key; overrides; the shipped configs parse."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from smskd_fast.training.config import ConfigError, apply_overrides, config_to_dict, load_config, parse_config

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def _raw(**changes):
    raw = {
        "student": {"name": "digits_cnn_small"},
        "teacher": {"name": "digits_cnn_large", "checkpoint": "teacher.pt"},
        "stages": [{"method": "kd", "epochs": 2}, {"method": "fitnet", "epochs": 1}],
    }
    raw.update(changes)
    return raw


def test_minimal_config_gets_defaults_and_expands_method_shorthand():
    config = parse_config(_raw())
    assert [m.name for m in config.stages[0].methods] == ["kd"]
    assert config.stages[1].weighting == "inverse_tcp"
    assert config.stages[0].optimizer.lr == 0.05
    assert config.data.name == "digits"
    assert config.stage_names() == ["stage1_kd", "stage2_fitnet"]


def test_defaults_are_merged_into_every_stage_and_stages_win():
    config = parse_config(_raw(defaults={"epochs": 4, "optimizer": {"lr": 0.1, "momentum": 0.5}},
                               stages=[{"method": "kd"}, {"method": "rkd", "optimizer": {"lr": 0.01}}]))
    assert [s.epochs for s in config.stages] == [4, 4]
    assert config.stages[1].optimizer.lr == 0.01 and config.stages[1].optimizer.momentum == 0.5


@pytest.mark.parametrize("changes, message", [
    ({"studnet": {"name": "x"}}, r"^studnet: unknown key; expected one of"),
    ({"stages": [{"method": "kd", "epochs": 2, "optimzer": {}}]}, r"^stages\[0\]\.optimzer: unknown key"),
    ({"stages": [{"method": "kd", "epochs": "ten"}]}, r"^stages\[0\]\.epochs: expected int, got str 'ten'"),
    ({"stages": [{"method": "kd"}]}, r"^stages\[0\]\.epochs: required key is missing"),
    ({"stages": [{"method": "kd", "epochs": 0}]}, r"^stages\[0\]\.epochs: must be >= 1"),
    ({"stages": [{"method": "kd", "epochs": 1, "weighting": "inverse"}]}, r"^stages\[0\]\.weighting: must be one of"),
    ({"stages": [{"method": "kdd", "epochs": 1}]}, r"^stages\[0\]\.methods\[0\]\.name: unknown method 'kdd'"),
    ({"stages": [{"method": {"name": "kd", "weight": "high"}, "epochs": 1}]},
     r"^stages\[0\]\.methods\[0\]\.weight: expected float, got str"),
    ({"stages": [{"method": "kd", "epochs": 1, "optimizer": {"lr": -1}}]}, r"^stages\[0\]\.optimizer\.lr: must be > 0"),
    ({"stages": []}, r"^stages: needs at least one stage"),
    ({"data": {"name": "mnist"}}, r"^data\.name: must be one of"),
    ({"data": {"batch_size": 0}}, r"^data\.batch_size: must be >= 1"),
    ({"seed": 1.5}, r"^seed: expected int, got float"),
    ({"schedule_scope": "global"}, r"^schedule_scope: must be one of \['stage', 'run'\]"),
    ({"data": {"validation_fraction": 1.0}}, r"^data\.validation_fraction: must be in \[0, 1\)"),
    ({"stages": [{"method": "kd", "methods": ["kd"], "epochs": 1}]}, r"^stages\[0\]: give either 'method' or 'methods'"),
    ({"stages": [{"name": "a", "method": "kd", "epochs": 1}, {"name": "a", "method": "kd", "epochs": 1}]},
     r"^stages: stage names must be unique"),
])
def test_errors_name_the_bad_key(changes, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(_raw(**changes))


def test_distillation_and_tcp_weighting_need_a_teacher():
    raw = _raw()
    del raw["teacher"]
    with pytest.raises(ConfigError, match=r"^teacher: is required: stages\[0\] uses method 'kd'"):
        parse_config(raw)
    raw["stages"] = [{"method": "none", "epochs": 1}, {"method": "none", "epochs": 1}]
    with pytest.raises(ConfigError, match=r"^teacher: is required: stages\[1\] weights its reference term"):
        parse_config(raw)
    raw["stages"][1]["weighting"] = "constant"
    assert parse_config(raw).teacher is None


def test_overrides_set_nested_values_and_list_items():
    raw = apply_overrides(_raw(), ["stages.1.epochs=5", "data.batch_size=16", "seed=3",
                                   "stages.0.method={name: kd, weight: 0.5}", "device=cpu"])
    config = parse_config(raw)
    assert config.stages[1].epochs == 5 and config.data.batch_size == 16 and config.seed == 3
    assert config.stages[0].methods[0].weight == 0.5


@pytest.mark.parametrize("override, message", [
    ("stages.7.epochs=1", r"stages\.7 is not an index of a list of 2 items"),
    ("seed", r"expected key\.path=value"),
    ("student.name.x=1", r"student\.name is not a mapping or list"),
])
def test_bad_overrides_are_reported(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(_raw(), [override])


def test_override_with_a_wrong_type_is_caught_by_validation():
    with pytest.raises(ConfigError, match=r"^stages\[1\]\.epochs: expected int, got str 'many'"):
        parse_config(apply_overrides(_raw(), ["stages.1.epochs=many"]))


def test_resolved_config_round_trips_through_yaml(tmp_path):
    config = parse_config(_raw(teacher_training={"epochs": 3}))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(config)))
    assert load_config(path) == config


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_are_valid(path):
    config = load_config(path)
    assert config.stages


def test_cifar_recipes_use_the_standard_schedule():
    recipes = [p for p in CONFIGS if p.stem.startswith("cifar100_")]
    assert len(recipes) == 4
    for path in recipes:
        config = load_config(path)
        assert config.data.name == "cifar100" and config.data.batch_size == 64
        for stage in config.stages + [config.teacher_training]:
            assert stage.epochs == 240 and stage.optimizer.lr == 0.05 and stage.optimizer.weight_decay == 5e-4
            assert stage.schedule.milestones == [150, 180, 210] and stage.schedule.gamma == 0.1
            assert stage.temperature == 4.0
