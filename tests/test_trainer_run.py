"""End-to-end SMSKD runs on tiny digits data: files, frozen reference, TCP weights in the loss."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import smskd_fast.training.steps as steps_module
from smskd_fast.training.checkpoint import load_model_file
from smskd_fast.training.run_files import read_jsonl
from smskd_fast.training.logit_cache import model_hash
from smskd_fast.training.trainer import SMSKDTrainer
from trainer_helpers import DiskFullAfter, record_frozen_checks, tiny_config, write_teacher

TWO_STAGES = [{"method": "kd", "epochs": 2}, {"method": "fitnet", "epochs": 2}]


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    return write_teacher(tmp_path_factory.mktemp("teacher") / "teacher.pt")


def test_two_stage_run_writes_the_run_directory(teacher_file, tmp_path):
    config = tiny_config(teacher_file, TWO_STAGES, plots=True)
    summary = SMSKDTrainer(config, tmp_path / "run", log=lambda _: None).run()
    run = tmp_path / "run"
    records = read_jsonl(run / "metrics.jsonl")
    assert [(r["stage"], r["epoch"], r["global_epoch"]) for r in records] == [(1, 1, 1), (1, 2, 2), (2, 1, 3), (2, 2, 4)]
    assert records[0]["train_ref"] == 0.0 and records[2]["train_ref"] > 0.0  # reference term from stage 2 on
    assert summary["last_test_acc"] == records[-1]["test_acc"]
    assert summary["best_test_acc"] == max(r["test_acc"] for r in records)
    assert [s["name"] for s in summary["stages"]] == ["stage1_kd", "stage2_fitnet"]
    for name in ("config.yaml", "summary.json", "student.pt", "tcp_weights.json", "teacher_eval.json",
                 "accuracy.png", "loss.png", "tcp_weights.png", "checkpoints/stage1.pt",
                 "checkpoints/stage2.pt", "checkpoints/latest.pt"):
        assert (run / name).is_file(), name
    assert not list(run.rglob("*.tmp"))
    for name in ("accuracy.png", "loss.png", "tcp_weights.png"):
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    weights = json.loads((run / "tcp_weights.json").read_text())
    assert sum(weights["counts"]["stage2_fitnet"]) == 96  # the last epoch: every training sample once
    assert "stage1_kd" not in weights["counts"]  # no reference in stage 1, so no weights to show
    final = load_model_file(run / "student.pt", "digits_cnn_small")
    stage2 = torch.load(run / "checkpoints" / "stage2.pt", weights_only=True)["student"]
    assert all(torch.equal(final["state_dict"][k], stage2[k]) for k in stage2)


def test_reference_is_frozen_copy_of_the_previous_stage_and_stays_unchanged(teacher_file, tmp_path, monkeypatch):
    config = tiny_config(teacher_file, TWO_STAGES)
    trainer = SMSKDTrainer(config, tmp_path / "run", log=lambda _: None)
    seen = record_frozen_checks(monkeypatch)
    trainer.run()
    assert seen[0] == ("stage1_kd", None)
    name, reference = seen[1]
    assert name == "stage2_fitnet" and reference is not None
    assert not reference.training
    assert not any(p.requires_grad for p in reference.parameters())
    stage1 = torch.load(tmp_path / "run" / "checkpoints" / "stage1.pt", weights_only=True)["student"]
    assert all(torch.equal(reference.state_dict()[k], stage1[k]) for k in stage1)  # weights and BN statistics
    final = torch.load(tmp_path / "run" / "checkpoints" / "stage2.pt", weights_only=True)["student"]
    assert not all(torch.equal(final[k], stage1[k]) for k in stage1)  # the student did move


def test_a_changed_reference_is_detected(teacher_file, tmp_path):
    config = tiny_config(teacher_file, [{"method": "kd", "epochs": 1}, {"method": "kd", "epochs": 1}])
    trainer = SMSKDTrainer(config, tmp_path / "run", log=lambda _: None)
    original = SMSKDTrainer._train_epoch

    def tamper(self, index, epoch, state, histogram):
        record = original(self, index, epoch, state, histogram)
        if state.frozen.reference is not None:
            with torch.no_grad():
                next(state.frozen.reference.parameters()).add_(1.0)
        return record

    SMSKDTrainer._train_epoch = tamper
    try:
        with pytest.raises(RuntimeError, match="frozen reference model changed"):
            trainer.run()
    finally:
        SMSKDTrainer._train_epoch = original


def test_tcp_weights_of_the_teacher_reach_the_reference_term(teacher_file, tmp_path, monkeypatch):
    config = tiny_config(teacher_file, [{"method": "kd", "epochs": 1}, {"method": "rkd", "epochs": 1}])
    calls = []
    real_loss = steps_module.smskd_loss

    def recording_loss(student, target, teacher, reference, **options):
        out = real_loss(student, target, teacher, reference, **options)
        calls.append((teacher, reference, target, options, out))
        return out

    monkeypatch.setattr(steps_module, "smskd_loss", recording_loss)
    trainer = SMSKDTrainer(config, tmp_path / "run", log=lambda _: None)
    teacher_before = model_hash(trainer.teacher)
    trainer.run()
    assert model_hash(trainer.teacher) == teacher_before
    stage1, stage2 = calls[:3], calls[3:]
    assert len(stage2) == 3  # 96 samples / batch 32
    assert all(reference is None and options["ref_weight"] == 0.0 for _, reference, _, options, _ in stage1)
    for teacher, reference, target, options, out in stage2:
        assert reference is not None and options["weighting"] == "inverse_tcp" and options["ref_weight"] == 1.0
        tcp = torch.softmax(teacher.double(), -1).gather(1, target[:, None]).squeeze(1)
        assert torch.allclose(out.weight.double(), 1 - tcp, atol=1e-6)
        assert out.weight.std() > 0  # the weights differ per sample
        assert out.ref > 0


def test_student_alone_needs_no_teacher(tmp_path):
    from smskd_fast.training.config import parse_config

    config = parse_config({"student": {"name": "digits_cnn_small"}, "plots": False, "progress": False,
                           "data": {"train_subset": 64, "test_subset": 32, "batch_size": 32},
                           "stages": [{"method": "none", "epochs": 1}]})
    summary = SMSKDTrainer(config, tmp_path / "run", log=lambda _: None).run()
    assert summary["epochs"] == 1 and "teacher_test_acc" not in summary


def test_cpu_runs_are_reproducible(teacher_file, tmp_path):
    config = tiny_config(teacher_file, [{"method": "kd", "epochs": 1}, {"method": "at", "epochs": 1}])
    states = []
    for name in ("a", "b"):
        trainer = SMSKDTrainer(config, tmp_path / name, log=lambda _: None)
        trainer.run()
        states.append(trainer.student.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_existing_run_directory_is_not_overwritten(teacher_file, tmp_path):
    config = tiny_config(teacher_file, [{"method": "kd", "epochs": 1}])
    SMSKDTrainer(config, tmp_path / "run", log=lambda _: None).run()
    with pytest.raises(FileExistsError, match="already holds a run"):
        SMSKDTrainer(config, tmp_path / "run", log=lambda _: None).run()


@pytest.mark.parametrize("methods", [["dkd"], ["pkt"], ["sp"], ["at"], ["kd", "fitnet", "rkd", "crd"]],
                         ids=lambda m: "+".join(m))
def test_every_method_trains_in_a_stage_after_a_kd_stage(teacher_file, tmp_path, methods):
    method_entries = [{"name": m, "params": {"feat_dim": 8, "nce_k": 16}} if m == "crd" else m for m in methods]
    config = tiny_config(teacher_file, [{"method": "kd", "epochs": 1}, {"methods": method_entries, "epochs": 1}],
                         data={"name": "digits", "batch_size": 32, "train_subset": 64, "test_subset": 32})
    trainer = SMSKDTrainer(config, tmp_path / "run", log=lambda _: None)
    before = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    trainer.run()
    record = read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]
    assert record["train_method"] > 0  # every listed set has a non-fused method
    assert record["train_ref"] > 0
    assert any(not torch.equal(before[k], v) for k, v in trainer.student.state_dict().items())


def test_a_wrong_layer_name_in_a_later_stage_fails_before_training(teacher_file, tmp_path):
    stages = [{"method": "kd", "epochs": 1},
              {"method": {"name": "fitnet", "student_layers": ["stage7"], "teacher_layers": ["stage2"]}, "epochs": 1}]
    with pytest.raises(KeyError, match="student has no layer named 'stage7'; available layer names: stage1"):
        SMSKDTrainer(tiny_config(teacher_file, stages), tmp_path / "run", log=lambda _: None)
    assert not (tmp_path / "run").exists()


def test_a_full_disk_while_plotting_leaves_no_broken_png_and_resume_plots(teacher_file, tmp_path, monkeypatch):
    """The plots are run files too: written atomically, a failed write named as for a checkpoint."""
    from smskd_fast.training import atomic_io

    config = tiny_config(teacher_file, TWO_STAGES, plots=True)
    run = tmp_path / "run"
    real_open = open

    def full_disk_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        return DiskFullAfter(handle, 0) if Path(file).name.startswith("accuracy.png") else handle

    monkeypatch.setattr(atomic_io, "open", full_disk_open, raising=False)
    with pytest.raises(atomic_io.CheckpointWriteError,
                       match=f"could not write {run / 'accuracy.png'} \\(No space left on device\\); "
                             "no earlier accuracy.png existed"):
        SMSKDTrainer(config, run, log=lambda _: None).run()
    assert not (run / "accuracy.png").exists() and not list(run.rglob("*.tmp"))
    monkeypatch.undo()
    SMSKDTrainer(config, run, log=lambda _: None).run(resume=True)
    for name in ("accuracy.png", "loss.png", "tcp_weights.png"):
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
