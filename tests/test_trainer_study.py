"""The study command: runs, resumes without retraining, and its statistics match independent oracles."""
from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from smskd_fast.training import study as study_module
from smskd_fast.cli import main
from smskd_fast.training.config import load_config
from smskd_fast.training.data import TokenSet, load_splits, split_validation
from smskd_fast.training.stats import paired_comparison, summarize_values, t_cdf, t_quantile

DEMO = Path(__file__).resolve().parent.parent / "configs" / "digits_demo.yaml"
ONE_EPOCH = ["teacher_training.epochs=1", "stages.0.epochs=1", "stages.1.epochs=1", "stages.2.epochs=1",
             "data.validation_fraction=0.2", "data.train_subset=400", "data.test_subset=200"]

# Two-sided 95% quantiles t_{0.975, df} from printed tables (e.g. NIST/SEMATECH e-Handbook, table 1.3.6.7.2).
T_TABLE = {1: 12.706, 2: 4.303, 4: 2.776, 9: 2.262, 29: 2.045}


@pytest.mark.parametrize("df", sorted(T_TABLE))
def test_t_quantile_matches_the_printed_table(df):
    assert t_quantile(0.975, df) == pytest.approx(T_TABLE[df], abs=5e-4)
    assert t_cdf(t_quantile(0.975, df), df) == pytest.approx(0.975, abs=1e-10)


def test_t_cdf_matches_closed_forms_and_a_monte_carlo_estimate():
    for t in (-3.0, -0.4, 0.0, 1.1, 5.0):  # df 1 is Cauchy, df 2 has a closed form
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    draws = np.random.default_rng(0).standard_t(4, size=400_000)
    for t in (-2.0, 0.5, 1.5):  # 4 standard errors of a proportion at n = 400000 are below 0.0032
        assert t_cdf(t, 4) == pytest.approx(float((draws <= t).mean()), abs=0.0032)


def test_summary_and_paired_test_match_numpy():
    a = [95.1, 96.3, 94.8, 95.9, 96.0]
    b = [94.2, 95.9, 94.9, 95.0, 95.1]
    summary = summarize_values(a)
    assert summary.mean == pytest.approx(float(np.mean(a)))
    assert summary.std == pytest.approx(float(np.std(a, ddof=1)))
    half = T_TABLE[4] * float(np.std(a, ddof=1)) / math.sqrt(5)
    assert summary.low == pytest.approx(float(np.mean(a)) - half, abs=1e-3)
    assert summary.high == pytest.approx(float(np.mean(a)) + half, abs=1e-3)
    paired = paired_comparison(a, b)
    d = np.subtract(a, b)
    t = float(d.mean() / (d.std(ddof=1) / math.sqrt(5)))
    assert paired.t == pytest.approx(t)
    assert paired.differences == pytest.approx(list(d))
    # p from the t statistic: at |t| = t_{0.975, 4} the two-sided p is 0.05 by definition.
    assert 2 * t_cdf(-T_TABLE[4], 4) == pytest.approx(0.05, abs=1e-4)
    assert paired.p_value == pytest.approx(2 * t_cdf(-abs(t), 4))
    assert paired_comparison([1.0, 2.0], [1.0, 2.0]).p_value == 1.0


def test_validation_split_is_held_out_of_training_and_the_same_for_every_seed():
    splits = load_splits("digits")
    train, validation = split_validation(splits.train, 0.2)
    assert len(train) + len(validation) == len(splits.train) and len(validation) == round(0.2 * len(splits.train))
    rows = {tuple(image.flatten().tolist()) + (int(label),) for image, label in zip(train.images, train.labels)}
    held = [tuple(image.flatten().tolist()) + (int(label),)
            for image, label in zip(validation.images, validation.labels)]
    assert sum(row in rows for row in held) <= 2  # only exact duplicate digits, if any, coincide
    again, _ = split_validation(splits.train, 0.2)
    assert torch.equal(again.labels, train.labels)
    text = TokenSet(torch.arange(50, dtype=torch.uint8).reshape(10, 5))
    text_train, text_validation = split_validation(text, 0.3)
    assert torch.equal(text_validation.windows, text.windows[7:])  # the contiguous tail
    assert split_validation(text, 0.0) == (text, None)
    with pytest.raises(ValueError, match="validation_fraction"):
        split_validation(text, 1.0)


def test_study_runs_resumes_without_retraining_and_reports(tmp_path, monkeypatch):
    config = load_config(DEMO, ONE_EPOCH)
    calls = []
    real = study_module.train_variant

    def counting(*args):
        calls.append(args[2:4])
        return real(*args)

    monkeypatch.setattr(study_module, "train_variant", counting)
    out = tmp_path / "study"
    analysis = study_module.run_study(config, out, [0, 1], ["student_alone", "smskd"], jobs=1, log=lambda _: None)
    assert sorted(calls) == [("smskd", 0), ("smskd", 1), ("student_alone", 0), ("student_alone", 1)]
    assert analysis["computed"] == 4 and analysis["selection_metric"] == "last_val_acc"
    assert analysis["best_baseline"] == "student_alone"
    for name in ("study.txt", "study.json", "study.png", "configs/smskd.yaml", "configs/student_alone.yaml"):
        assert (out / name).is_file(), name
    rows = {(r["variant"], r["seed"]): r for r in analysis["rows"]}
    for variant in ("student_alone", "smskd"):  # the stored row is the run's own summary
        for seed in (0, 1):
            summary = json.loads((out / f"seed{seed}" / variant / "summary.json").read_text())
            assert rows[(variant, seed)]["last_test_acc"] == summary["last_test_acc"]
            assert rows[(variant, seed)]["last_val_acc"] == summary["last_val_acc"]
    smskd = [rows[("smskd", s)]["last_test_acc"] for s in (0, 1)]
    alone = [rows[("student_alone", s)]["last_test_acc"] for s in (0, 1)]
    summary = analysis["summaries"]["smskd"]["last_test_acc"]
    assert summary["mean"] == pytest.approx(statistics.mean(smskd))
    assert summary["high"] - summary["mean"] == pytest.approx(T_TABLE[1] * statistics.stdev(smskd) / math.sqrt(2),
                                                              rel=1e-4)
    paired = analysis["paired"]["smskd"]["last_test_acc"]
    assert paired["differences"] == pytest.approx([x - y for x, y in zip(smskd, alone)])

    calls.clear()
    again = study_module.run_study(config, out, [0, 1], ["student_alone", "smskd"], jobs=1, log=lambda _: None)
    assert calls == [] and again["computed"] == 0
    assert again["summaries"] == analysis["summaries"]


def test_study_cli_names_its_outputs(tmp_path, capsys):
    sets = [item for entry in ONE_EPOCH for item in ("--set", entry)]
    code = main(["study", "--config", str(DEMO), "--out", str(tmp_path / "s"), "--seeds", "0", "1",
                 "--variants", "student_alone", "kd", *sets])
    assert code == 0
    printed = capsys.readouterr().out
    assert "paired against" in printed and "study.png" in printed
    assert (tmp_path / "s" / "study.txt").read_text() in printed


def test_study_without_matplotlib_is_refused_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as for a package not installed
    sets = [item for entry in ONE_EPOCH for item in ("--set", entry)]
    code = main(["study", "--config", str(DEMO), "--out", str(tmp_path / "s"), "--seeds", "0", "1", *sets])
    assert code == 2
    assert capsys.readouterr().err.strip().startswith("error: the study's plot (study.png) needs matplotlib")
    assert not (tmp_path / "s").exists()


def test_run_schedule_scope_gives_the_stages_one_schedule_over_the_run():
    from smskd_fast.training.optim import learning_rate

    config = load_config(DEMO)  # three 10-epoch cosine stages at lr 0.05
    single = [0.5 * 0.05 * (1 + math.cos(math.pi * e / 30)) for e in range(30)]
    run = [learning_rate(stage, e, 10 * i, 30) for i, stage in enumerate(config.stages) for e in range(10)]
    per_stage = [learning_rate(stage, e) for stage in config.stages for e in range(10)]
    assert run == pytest.approx(single)
    assert per_stage[10] == pytest.approx(0.05) and per_stage[9] < 0.01  # the restart the run scope removes


def test_trainer_follows_the_run_schedule_and_reports_validation_accuracy(tmp_path):
    from smskd_fast.training.run_files import read_jsonl
    from smskd_fast.training.trainer import SMSKDTrainer
    from trainer_helpers import tiny_config, write_teacher

    teacher = write_teacher(tmp_path / "teacher.pt")
    config = tiny_config(teacher, [{"method": "kd", "epochs": 2}, {"method": "kd", "epochs": 2}],
                         schedule_scope="run")
    config.data.validation_fraction = 0.25
    summary = SMSKDTrainer(config, tmp_path / "run", log=lambda _: None).run()
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["lr"] for r in records] == pytest.approx([0.5 * 0.05 * (1 + math.cos(math.pi * e / 4))
                                                        for e in range(4)])
    assert summary["last_val_acc"] == records[-1]["val_acc"] and "val_loss" in records[-1]


def test_parallel_seeds_give_the_serial_results(tmp_path):
    config = load_config(DEMO, ONE_EPOCH)
    serial = study_module.run_study(config, tmp_path / "serial", [0, 1], ["kd"], jobs=1, log=lambda _: None)
    parallel = study_module.run_study(config, tmp_path / "parallel", [0, 1], ["kd"], jobs=2, log=lambda _: None)
    assert parallel["computed"] == 2
    for row in ("teacher", "kd"):
        assert parallel["summaries"][row]["values"] == serial["summaries"][row]["values"]


def test_a_rerun_of_another_config_is_refused_before_anything_is_written(tmp_path):
    """Stored results of other values (here the learning rate) must not pass for this config's."""
    from smskd_fast.training.config import ConfigError

    out = tmp_path / "study"
    study_module.run_study(load_config(DEMO, ONE_EPOCH), out, [0], ["kd"], log=lambda _: None)
    recorded = (out / "configs" / "kd.yaml").read_bytes()
    changed = load_config(DEMO, ONE_EPOCH + ["defaults.optimizer.lr=0.5"])
    with pytest.raises(ConfigError, match=r"seed0/kd holds a run of another config \(stages\.0\.optimizer\.lr: "
                                          r"0\.05 -> 0\.5.*choose another --out"):
        study_module.run_study(changed, out, [0], ["kd"], log=lambda _: None)
    assert (out / "configs" / "kd.yaml").read_bytes() == recorded
    # Values that change how a run reports or how fast it goes are not another config.
    again = study_module.run_study(load_config(DEMO, ONE_EPOCH + ["threads=1", "plots=false"]), out, [0], ["kd"],
                                   log=lambda _: None)
    assert again["computed"] == 0


def test_a_shared_teacher_serves_every_seed_through_the_cache_when_views_are_augmented(tmp_path):
    """With augmentation the cached teacher logits depend on the student seed's views: each
    student seed gets its own cache of the one teacher, and the runs match runs without a cache."""
    sets = ONE_EPOCH + ["data.augment=crop", "data.validation_fraction=0.0"]
    cached = load_config(DEMO, sets + [f"cache={{teacher: {{dir: {tmp_path / 'cache'}, format: dense, "
                                       f"dtype: float32}}}}"])
    with_cache = study_module.run_study(cached, tmp_path / "cached", [0, 1], ["kd"], teacher_seed=0,
                                        log=lambda _: None)
    without = study_module.run_study(load_config(DEMO, sets), tmp_path / "plain", [0, 1], ["kd"], teacher_seed=0,
                                     log=lambda _: None)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["seed0_student0", "seed0_student1"]
    assert with_cache["summaries"]["kd"]["values"] == without["summaries"]["kd"]["values"]
