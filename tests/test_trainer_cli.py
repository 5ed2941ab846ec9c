"""The smskd-fast command line: train, --set/--seed, resume, eval, train-teacher, errors, bench."""
from __future__ import annotations

import json
import sys
import types

import pytest
import yaml

from smskd_fast.cli import main
from smskd_fast.training.run_files import read_jsonl
from trainer_helpers import tiny_raw, write_teacher


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    teacher = write_teacher(folder / "teacher.pt")
    raw = tiny_raw(teacher, [{"method": "kd", "epochs": 1}, {"method": "sp", "epochs": 1}],
                   teacher_training={"epochs": 1})
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_train_with_overrides_then_eval(config_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--config", str(config_file), "--out", str(out), "--seed", "5",
                 "--set", "stages.1.epochs=2", "--device", "cpu"]) == 0
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["seed"] == 5 and resolved["stages"][1]["epochs"] == 2
    assert len(read_jsonl(out / "metrics.jsonl")) == 3
    printed = capsys.readouterr().out
    assert "test accuracy: last epoch" in printed
    assert main(["eval", str(out)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["test_acc"] == read_jsonl(out / "metrics.jsonl")[-1]["test_acc"]


def test_resume_from_the_command_line(config_file, tmp_path):
    from smskd_fast.training.config import load_config
    from smskd_fast.training.trainer import SMSKDTrainer

    out = tmp_path / "run"
    SMSKDTrainer(load_config(config_file), out, log=lambda _: None).run(max_epochs=1)
    assert main(["train", "--resume", str(out)]) == 0
    assert [r["global_epoch"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2]
    assert (out / "student.pt").is_file()


def test_resume_with_set_records_the_values_it_trains_with(config_file, tmp_path):
    """config.yaml is what eval and a later --resume read: it must hold the values given on resume."""
    from smskd_fast.training.config import load_config
    from smskd_fast.training.trainer import SMSKDTrainer

    out = tmp_path / "run"
    SMSKDTrainer(load_config(config_file), out, log=lambda _: None).run(max_epochs=1)
    assert main(["train", "--resume", str(out), "--set", "stages.1.epochs=2"]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["stages"][1]["epochs"] == 2
    assert read_jsonl(out / "config_changes.jsonl") == [
        {"from_global_epoch": 2, "changes": ["stages.1.epochs: 1 -> 2"]}]
    assert [r["global_epoch"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]


def test_train_teacher_writes_a_model_file(config_file, tmp_path, capsys):
    out = tmp_path / "teacher"
    assert main(["train-teacher", "--config", str(config_file), "--out", str(out)]) == 0
    assert (out / "student.pt").is_file()
    assert "teacher.checkpoint=" in capsys.readouterr().out


def test_config_errors_exit_with_the_key_named(config_file, tmp_path, capsys):
    assert main(["train", "--config", str(config_file), "--out", str(tmp_path / "r"),
                 "--set", "stages.0.weighting=sometimes"]) == 2
    assert "stages[0].weighting: must be one of" in capsys.readouterr().err


def test_bench_is_delegated_lazily(monkeypatch):
    import smskd_fast.bench

    seen = []
    fake = types.SimpleNamespace(main=lambda argv: seen.append(argv) or 0)
    # `from smskd_fast.bench import quick` reads the package attribute once the module is imported,
    # sys.modules before: both point at the fake, whatever other tests imported first.
    monkeypatch.setitem(sys.modules, "smskd_fast.bench.quick", fake)
    monkeypatch.setattr(smskd_fast.bench, "quick", fake, raising=False)
    assert main(["bench", "--quick"]) == 0
    assert seen == [["--quick"]]
