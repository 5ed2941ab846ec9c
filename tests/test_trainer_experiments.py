"""Comparison variants: fair epoch budgets and the intended differences from SMSKD."""
from __future__ import annotations

from pathlib import Path

from smskd_fast.training.config import load_config
from smskd_fast.training.experiments import ALL_VARIANTS, format_table, teacher_config, variant_configs

DEMO = Path(__file__).resolve().parent.parent / "configs" / "digits_demo.yaml"


def test_variants_share_the_epoch_budget_and_differ_only_as_named():
    config = load_config(DEMO)
    variants = variant_configs(config, "teacher.pt", ALL_VARIANTS)
    total = sum(stage.epochs for stage in config.stages)
    for name, variant in variants.items():
        assert variant.teacher.checkpoint == "teacher.pt"
        epochs = sum(stage.epochs for stage in variant.stages)
        assert epochs == (config.stages[0].epochs if name == "kd_short" else total), name
    assert [m.name for m in variants["student_alone"].stages[0].methods] == ["none"]
    assert variants["kd"].stages[0].methods == [config.stages[0].methods[0]]  # the config's KD weight
    assert [m.name for m in variants["summed"].stages[0].methods] == ["kd", "fitnet", "rkd"]
    assert all(not s.reference for s in variants["sequential_no_reference"].stages)
    assert variants["smskd"].stages == config.stages
    assert {s.weighting for s in variants["smskd_tcp"].stages} == {"tcp"}
    assert {s.weighting for s in variants["smskd_constant"].stages} == {"constant"}


def test_teacher_config_trains_the_teacher_alone():
    config = load_config(DEMO)
    teacher = teacher_config(config)
    assert teacher.student.name == config.teacher.name and teacher.teacher is None
    assert [m.name for m in teacher.stages[0].methods] == ["none"]
    assert teacher.stages[0].epochs == config.teacher_training.epochs


def test_table_reports_mean_and_spread_over_seeds():
    rows = [{"variant": "kd", "seed": s, "last_test_acc": acc, "best_test_acc": acc + 1, "epochs": 30}
            for s, acc in enumerate([90.0, 92.0, 94.0])]
    table = format_table(rows)
    assert "92.00 +- 2.00" in table and "93.00 +- 2.00" in table


def test_single_method_baselines_keep_their_own_stage_settings():
    cifar = load_config(DEMO.parent / "cifar100_resnet32x4_resnet8x4.yaml")  # KD stage: CE 0.1; FitNet stage: CE 1
    variants = variant_configs(cifar, "teacher.pt", ["student_alone", "kd", "only_fitnet", "only_rkd"])
    assert variants["kd"].stages[0].ce_weight == 0.1
    assert variants["only_fitnet"].stages[0].ce_weight == 1.0
    assert variants["only_fitnet"].stages[0].methods == cifar.stages[1].methods
    assert variants["student_alone"].stages[0].ce_weight == 1.0
    assert all(v.stages[0].epochs == 720 for v in variants.values())



def test_demo_reuses_only_runs_of_its_own_config(tmp_path, monkeypatch, capsys):
    """Each config gets its own default folder; a folder holding runs of other values is refused,
    not reported as this config's results."""
    from smskd_fast.cli import main

    monkeypatch.chdir(tmp_path)
    quick = ["teacher_training.epochs=1", "stages.0.epochs=1", "stages.1.epochs=1", "stages.2.epochs=1",
             "data.train_subset=300", "data.test_subset=100", "plots=false"]
    sets = [item for entry in quick for item in ("--set", entry)]
    assert main(["demo", "--config", str(DEMO), *sets]) == 0
    table = (tmp_path / "runs" / "demo" / "digits_demo" / "table.txt").read_text()
    assert main(["demo", "--config", str(DEMO), *sets]) == 0  # the same config: its runs are read back
    assert (tmp_path / "runs" / "demo" / "digits_demo" / "table.txt").read_text() == table
    capsys.readouterr()
    assert main(["demo", "--config", str(DEMO), *sets, "--set", "teacher_training.epochs=2"]) == 2
    assert ("error: runs/demo/digits_demo/seed0/teacher holds a run of another config "
            "(stages.0.epochs: 1 -> 2)") in capsys.readouterr().err
