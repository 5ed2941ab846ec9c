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
    ({"stages": [{"method": "kd", "methods": ["kd"], "epochs": 1}]},
     r"^stages\[0\]: has both 'method' and 'methods'; give one \('method: X' is short for 'methods: \[X\]'\)"),
    ({"stages": [{"name": "a", "method": "kd", "epochs": 1}, {"name": "a", "method": "kd", "epochs": 1}]},
     r"^stages: stage names must be unique"),
])
def test_errors_name_the_bad_key(changes, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(_raw(**changes))


def _later_stage(**changes):
    """Two stages, the second with `changes`: a mistake in a later stage is refused at load time."""
    return {"stages": [{"method": "kd", "epochs": 1}, {"method": "kd", "epochs": 1, **changes}]}


@pytest.mark.parametrize("changes, message", [
    (_later_stage(optimizer={"momentum": -1}), r"^stages\[1\]\.optimizer\.momentum: must be in \[0, 1\), got -1"),
    (_later_stage(optimizer={"momentum": 1}), r"^stages\[1\]\.optimizer\.momentum: must be in \[0, 1\), got 1"),
    (_later_stage(optimizer={"weight_decay": -1}), r"^stages\[1\]\.optimizer\.weight_decay: must be >= 0, got -1"),
    (_later_stage(optimizer={"nesterov": True, "momentum": 0}),
     r"^stages\[1\]\.optimizer\.nesterov: needs a momentum > 0, got momentum 0"),
    (_later_stage(optimizer={"lr": float("inf")}), r"^stages\[1\]\.optimizer\.lr: must be finite, got inf"),
    (_later_stage(schedule={"gamma": -1}), r"^stages\[1\]\.schedule\.gamma: must be > 0, got -1"),
    (_later_stage(schedule={"gamma": 0}), r"^stages\[1\]\.schedule\.gamma: must be > 0, got 0"),
    (_later_stage(schedule={"milestones": [-5, 3]}),
     r"^stages\[1\]\.schedule\.milestones: must be strictly increasing epochs >= 0, got \[-5, 3\]"),
    (_later_stage(schedule={"milestones": [3, 2]}), r"^stages\[1\]\.schedule\.milestones: must be strictly increasing"),
    (_later_stage(schedule={"milestones": [2, 2]}), r"^stages\[1\]\.schedule\.milestones: must be strictly increasing"),
    (_later_stage(method={"name": "kd", "weight": -3}), r"^stages\[1\]\.methods\[0\]\.weight: must be >= 0, got -3"),
    (_later_stage(method={"name": "kd", "weight": float("nan")}), r"^stages\[1\]\.methods\[0\]\.weight: must be >= 0, got nan"),
    (_later_stage(ce_weight=float("inf")), r"^stages\[1\]\.ce_weight: must be finite, got inf"),
    ({"teacher_training": {"epochs": 0}}, r"^teacher_training\.epochs: must be >= 1, got 0"),
    ({"teacher_training": {"epochs": -2}}, r"^teacher_training\.epochs: must be >= 1, got -2"),
    ({"teacher_training": {"epochs": 2, "optimizer": {"lr": -1}}}, r"^teacher_training\.optimizer\.lr: must be > 0, got -1"),
    ({"teacher_training": {"epochs": 2, "optimizer": {"name": "lion"}}}, r"^teacher_training\.optimizer\.name: must be one of"),
    ({"teacher_training": {"epochs": 2, "temperature": -1}}, r"^teacher_training\.temperature: must be > 0, got -1"),
    ({"teacher_training": {"epochs": 2, "weighting": "inverse"}}, r"^teacher_training\.weighting: must be one of"),
    ({"teacher_training": {"epochs": 2, "method": "kd"}},
     r"^teacher_training\.methods\[0\]\.name: must be 'none': the teacher trains alone, with cross-entropy; got 'kd'"),
    ({"data": {"train_subset": 0}}, r"^data\.train_subset: must be a sample count >= 1 or null \(all\), got 0"),
    ({"data": {"train_subset": -5}}, r"^data\.train_subset: must be a sample count >= 1 or null \(all\), got -5"),
    ({"data": {"test_subset": 0}}, r"^data\.test_subset: must be a sample count >= 1 or null \(all\), got 0"),
    ({"defaults": {"temprature": 2}}, r"^defaults\.temprature: unknown key; expected one of"),
    ({"defaults": {"optimizer": {"momentm": 0.5}}}, r"^defaults\.optimizer\.momentm: unknown key"),
    ({"defaults": {"optimizer": {"momentum": -1}}},
     r"^stages\[0\]\.optimizer\.momentum: must be in \[0, 1\), got -1\.0 \(from defaults\.optimizer\.momentum\)$"),
    ({"defaults": {"method": {"name": "kd", "weight": -1}}, "stages": [{"epochs": 1}]},
     r"^stages\[0\]\.methods\[0\]\.weight: must be >= 0, got -1\.0 \(from defaults\.method\)$"),
    ({"defaults": {"optimizer": {"lr": -1}}, "teacher_training": {"epochs": 1},
      "stages": [{"method": "kd", "epochs": 1, "optimizer": {"lr": 0.1}}]},
     r"^teacher_training\.optimizer\.lr: must be > 0, got -1\.0 \(from defaults\.optimizer\.lr\)$"),
    ({"defaults": {"optimizer": {"lr": 0.1}}, "stages": [{"method": "kd", "epochs": 1, "optimizer": {"lr": -1}}]},
     r"^stages\[0\]\.optimizer\.lr: must be > 0, got -1\.0$"),
    ({"defaults": {"epochs": "ten"}}, r"^defaults\.epochs: expected int, got str 'ten'"),
    ({"data": {"image_size": 0}}, r"^data\.image_size: must be >= 1 pixel, got 0"),
    (_later_stage(method={"name": "crd", "params": {"nce_kk": 5}}),
     r"^stages\[1\]\.methods\[0\]\.params: .*unexpected keyword argument 'nce_kk'"),
    (_later_stage(method={"name": "crd", "params": {"nce_k": 0}}),
     r"^stages\[1\]\.methods\[0\]\.params: crd parameter nce_k must be >= 1 .*got 0$"),
    (_later_stage(method={"name": "rkd", "params": {"distance_weight": "far"}}),
     r"^stages\[1\]\.methods\[0\]\.params: could not convert string to float: 'far'"),
    (_later_stage(optimizer={"name": "adam", "momentum": 0.5}),
     r"^stages\[1\]\.optimizer\.momentum: applies to sgd only \(adam keeps betas \(0\.9, 0\.999\)\); "
     r"leave it out or give 0\.9, got 0\.5$"),
    (_later_stage(optimizer={"name": "adamw", "nesterov": True}),
     r"^stages\[1\]\.optimizer\.nesterov: applies to sgd only, not adamw$"),
    (_later_stage(schedule={"name": "cosine", "milestones": [3]}),
     r"^stages\[1\]\.schedule\.milestones: apply to the multistep schedule only, not cosine; "
     r"leave them out or give \[\], got \[3\]$"),
    (_later_stage(schedule={"name": "constant", "gamma": 0.5}),
     r"^stages\[1\]\.schedule\.gamma: applies to the multistep schedule only, not constant; "
     r"leave it out or give 0\.1, got 0\.5$"),
    ({"defaults": {"schedule": {"milestones": [5]}}, "stages": [{"method": "kd", "epochs": 9,
                                                                  "schedule": {"name": "cosine"}}]},
     r"^stages\[0\]\.schedule\.milestones: apply to the multistep schedule only, not cosine; leave them out or "
     r"give \[\], got \[5\] \(from defaults\.schedule\.milestones\)$"),
])
def test_every_stage_teacher_training_data_and_defaults_are_checked_at_load_time(changes, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(_raw(**changes))


def test_accepted_edges_of_the_new_checks():
    config = parse_config(_raw(
        data={"train_subset": 1, "test_subset": 10 ** 9},  # more than the split: the whole split (DataConfig)
        teacher_training={"epochs": 1, "optimizer": {"momentum": 0, "weight_decay": 0}},
        stages=[{"method": {"name": "kd", "weight": 0}, "epochs": 1,
                 "schedule": {"milestones": [0, 5], "gamma": 2.0}, "optimizer": {"nesterov": True}}]))
    assert config.stages[0].methods[0].weight == 0 and config.stages[0].schedule.milestones == [0, 5]
    assert config.teacher_training.optimizer.momentum == 0
    config = parse_config(_raw(stages=[  # the defaults, given explicitly, are what adam and cosine do anyway
        {"method": {"name": "crd", "params": {"nce_k": 8}}, "epochs": 1,
         "optimizer": {"name": "adam", "momentum": 0.9, "nesterov": False},
         "schedule": {"name": "cosine", "milestones": [], "gamma": 0.1}}]))
    assert config.stages[0].optimizer.name == "adam" and config.stages[0].methods[0].params == {"nce_k": 8}


def test_a_stage_method_in_either_form_replaces_the_defaults_method():
    config = parse_config(_raw(defaults={"epochs": 1, "method": "kd"},
                               stages=[{"methods": ["sp", "kd"]}, {"method": "fitnet"}, {}]))
    assert [[m.name for m in stage.methods] for stage in config.stages] == [["sp", "kd"], ["fitnet"], ["kd"]]


@pytest.mark.parametrize("stage, override, message", [
    ({"method": {"name": "kd", "weight": 1.0}}, "stages.0.methods.0.weight=2",
     r"^--set stages\.0\.methods\.0\.weight: stages\.0 gives its methods by 'method' \(in the config file\), "
     r"not by 'methods' \('method: X' is short for 'methods: \[X\]'\); use stages\.0\.method\.weight=2$"),
    ({"method": "kd"}, "stages.0.methods.0.weight=2", r"; use stages\.0\.method\.weight=2$"),
    ({"method": "kd"}, "stages.0.methods.0=sp", r"; use stages\.0\.method=sp$"),
    ({"method": "kd"}, "stages.0.methods.1.weight=2",
     r"; set stages\.0\.method \(the stage's one method\), or the whole list with stages\.0\.methods=\[\.\.\.\]$"),
    ({"methods": [{"name": "kd", "weight": 1.0}]}, "stages.0.method.weight=3",
     r"^--set stages\.0\.method\.weight: stages\.0 gives its methods by 'methods' \(in the config file\), "
     r"not by 'method' .*; use stages\.0\.methods\.0\.weight=3$"),
    ({"methods": ["kd", "sp"]}, "stages.0.method.weight=3",
     r"; use stages\.0\.methods\.I\.weight=3, I the method's place in the list \['kd', 'sp'\] from 0$"),
])
def test_overriding_a_stage_method_in_the_other_form_names_the_path_that_works(stage, override, message):
    raw = _raw(stages=[{"epochs": 1, **stage}])
    with pytest.raises(ConfigError, match=message):
        apply_overrides(raw, [override])


def test_method_form_error_names_an_earlier_override_as_the_origin():
    with pytest.raises(ConfigError, match=r"gives its methods by 'method' \(from --set stages\.1\.method=sp\)"):
        apply_overrides(_raw(), ["stages.1.method=sp", "stages.1.methods.0.weight=2"])


def test_setting_a_whole_method_form_replaces_the_other_and_a_short_method_takes_fields():
    resolved = config_to_dict(parse_config(_raw()))  # a run's config.yaml lists `methods`, as on --resume
    config = parse_config(apply_overrides(resolved, ["stages.1.method={name: sp, weight: 2}"]))
    assert [(m.name, m.weight) for m in config.stages[1].methods] == [("sp", 2.0)]
    config = parse_config(apply_overrides(_raw(), ["stages.0.methods=[sp, kd]", "stages.1.method.weight=5"]))
    assert [m.name for m in config.stages[0].methods] == ["sp", "kd"]
    assert [(m.name, m.weight) for m in config.stages[1].methods] == [("fitnet", 5.0)]


def test_train_teacher_with_zero_epochs_is_refused_before_writing_a_model(tmp_path, capsys):
    from smskd_fast.cli import main

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(_raw(teacher_training={"epochs": 2}, plots=False, progress=False)))
    out = tmp_path / "teacher"
    assert main(["train-teacher", "--config", str(path), "--out", str(out), "--set", "teacher_training={epochs: 0}"]) == 2
    assert capsys.readouterr().err.strip() == "error: teacher_training.epochs: must be >= 1, got 0"
    assert not out.exists()


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
