"""The trainer on a sequence task: byte-level causal language models distilled in 2 SMSKD stages.

A tiny teacher is trained through the trainer itself; then a student is distilled with
KD and KD plus the reference term, and the run is checked against independent
computations (the text file's bytes, torch's cross_entropy, the stage-1 checkpoint).
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import smskd_fast.loss.fused_linear as fused_linear_module
import smskd_fast.training.steps as steps_module
from smskd_fast.training.config import ConfigError, StageConfig, MethodConfig, parse_config
from smskd_fast.training.data import TEXT_FILE, TEXT_TEST_FRACTION, load_splits
from smskd_fast.training.experiments import teacher_config
from smskd_fast.training.models import build_model
from smskd_fast.training.checkpoint import load_model_file
from smskd_fast.training.run_files import read_jsonl
from smskd_fast.training.logit_cache import model_hash
from smskd_fast.training.steps import fused_linear_stage_loss, stage_loss
from smskd_fast.training.trainer import SMSKDTrainer
from trainer_helpers import count_teacher_calls, record_frozen_checks, record_loss_calls

CONTEXT = 32
TRAIN_WINDOWS = 64


def lm_raw(teacher_file=None, stages=None, **changes):
    raw = {
        "seed": 3, "plots": False, "progress": False, "threads": 1,
        "data": {"name": "text", "context_length": CONTEXT, "batch_size": 16, "eval_batch_size": 32,
                 "train_subset": TRAIN_WINDOWS, "test_subset": 16},
        "student": {"name": "tiny_lm_small"},
        "teacher": {"name": "tiny_lm_large", "checkpoint": None if teacher_file is None else str(teacher_file)},
        "defaults": {"optimizer": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.0},
                     "schedule": {"name": "constant"}, "temperature": 2.0, "ce_weight": 0.5},
        "teacher_training": {"epochs": 3, "ce_weight": 1.0},
        "stages": stages or [{"method": {"name": "kd", "weight": 0.5}, "epochs": 3},
                             {"method": {"name": "kd", "weight": 0.5}, "epochs": 2}],
    }
    raw.update(changes)
    return raw


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """tiny_lm_large trained briefly (CE only) by the trainer itself."""
    run = tmp_path_factory.mktemp("lm_teacher")
    config = teacher_config(parse_config(lm_raw()))
    SMSKDTrainer(config, run, log=lambda _: None).run()
    return run / "student.pt"


def independent_test_windows():
    """The test split built straight from the file's bytes (not through TokenSet)."""
    data = TEXT_FILE.read_bytes()
    test = list(data[int(len(data) * (1 - TEXT_TEST_FRACTION)):])
    windows = [test[i * CONTEXT:i * CONTEXT + CONTEXT + 1] for i in range((len(test) - 1) // CONTEXT)]
    return torch.tensor(windows[:16], dtype=torch.int64)


def test_token_windows_are_the_text_shifted_by_one():
    splits = load_splits("text", context_length=CONTEXT)
    data = TEXT_FILE.read_bytes()
    tokens, targets = splits.train.batch(torch.tensor([0, 5]))
    assert tokens.shape == targets.shape == (2, CONTEXT) and tokens.dtype == torch.int64
    assert bytes(tokens[1].tolist()) == data[5 * CONTEXT:6 * CONTEXT]
    assert bytes(targets[1].tolist()) == data[5 * CONTEXT + 1:6 * CONTEXT + 1]
    assert torch.equal(splits.test.batch(torch.arange(16))[0], independent_test_windows()[:, :-1])
    assert splits.train.num_classes == 256 and splits.train.task == "sequence"


def test_language_models_are_causal():
    torch.manual_seed(0)
    model = build_model("tiny_lm_large", 256, 1).eval()
    tokens = torch.randint(0, 256, (2, 24))
    changed = tokens.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 256
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    assert before.shape == (2, 24, 256)
    assert torch.equal(before[:, :10], after[:, :10])  # earlier positions do not see the change
    assert not torch.allclose(before[:, 10:], after[:, 10:])
    assert sum(p.numel() for p in build_model("tiny_lm_small", 256, 1).parameters()) < \
        sum(p.numel() for p in model.parameters()) / 10


def test_two_stage_lm_run(teacher_file, tmp_path, monkeypatch):
    config = parse_config(lm_raw(teacher_file))
    trainer = SMSKDTrainer(config, tmp_path / "run", log=lambda _: None)
    teacher_before = model_hash(trainer.teacher)
    seen = record_frozen_checks(monkeypatch)
    summary = trainer.run()
    run = tmp_path / "run"
    records = read_jsonl(run / "metrics.jsonl")
    assert [(r["stage"], r["epoch"]) for r in records] == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2)]
    for record in records:
        assert all(math.isfinite(record[k]) for k in ("train_loss", "train_ce", "train_kd", "test_loss"))
        assert record["test_perplexity"] == pytest.approx(math.exp(record["test_loss"]), rel=1e-12)
    stage1 = [r["train_loss"] for r in records if r["stage"] == 1]
    assert stage1[-1] < stage1[0]
    assert all(r["train_ref"] == 0.0 for r in records[:3]) and all(r["train_ref"] > 0.0 for r in records[3:])
    assert all(r["train_kd"] > 0.0 for r in records)

    # The reference of stage 2 is the stage-1 student, frozen; the teacher is unchanged.
    (name1, ref1), (name2, ref2) = seen
    assert ref1 is None and ref2 is not None and not ref2.training
    assert not any(p.requires_grad for p in ref2.parameters())
    stage1_state = torch.load(run / "checkpoints" / "stage1.pt", weights_only=True)["student"]
    assert all(torch.equal(ref2.state_dict()[k], stage1_state[k]) for k in stage1_state)
    assert model_hash(trainer.teacher) == teacher_before

    # Perplexity and token accuracy, recomputed from the raw bytes with torch's cross_entropy.
    entry = load_model_file(run / "student.pt", "tiny_lm_small")
    student = build_model("tiny_lm_small", entry["num_classes"], entry["in_channels"])
    student.load_state_dict(entry["state_dict"])
    windows = independent_test_windows()
    with torch.no_grad():
        logits = student.eval()(windows[:, :-1])
    ce = F.cross_entropy(logits.reshape(-1, 256), windows[:, 1:].reshape(-1))
    accuracy = 100.0 * (logits.argmax(-1) == windows[:, 1:]).double().mean()
    assert summary["last_test_perplexity"] == pytest.approx(math.exp(float(ce)), rel=1e-5)
    assert summary["last_test_acc"] == pytest.approx(float(accuracy), abs=1e-9)
    assert summary["best_test_perplexity"] == min(r["test_perplexity"] for r in records)
    teacher_eval = json.loads((run / "teacher_eval.json").read_text())
    assert teacher_eval["perplexity"] < 256  # better than uniform over the bytes

    # The TCP weights of the last stage-2 epoch cover every training token once.
    weights = json.loads((run / "tcp_weights.json").read_text())
    assert sum(weights["counts"]["stage2_kd"]) == TRAIN_WINDOWS * CONTEXT


def test_fused_linear_stage_loss_equals_the_logits_path(teacher_file, monkeypatch):
    """float64, several chunks: same loss terms, weights and student gradients."""
    monkeypatch.setattr(fused_linear_module, "DEFAULT_CHUNK_ELEMENTS", 256 * 7)  # 7 tokens per chunk
    torch.manual_seed(0)
    student, reference = build_model("tiny_lm_small", 256, 1).double(), build_model("tiny_lm_small", 256, 1).double()
    teacher = build_model("tiny_lm_large", 256, 1)
    teacher.load_state_dict(load_model_file(teacher_file)["state_dict"])
    teacher, reference = teacher.double().eval().requires_grad_(False), reference.eval().requires_grad_(False)
    tokens, target = load_splits("text", context_length=CONTEXT).train.batch(torch.arange(3))
    stage = StageConfig(methods=[MethodConfig(name="kd")], epochs=1, temperature=2.0, ce_weight=0.3,
                        ref_weight=0.7, weighting="inverse_tcp")
    with torch.no_grad():
        teacher_logits, reference_logits = teacher(tokens), reference(tokens)
    expected = stage_loss(student(tokens), target, teacher_logits, reference_logits, stage, 0.6)
    expected_grads = torch.autograd.grad(expected.loss, list(student.parameters()))
    fused, predictions = fused_linear_stage_loss(student, teacher, reference, tokens, target, stage, 0.6)
    fused_grads = torch.autograd.grad(fused.loss, list(student.parameters()))
    for field in ("loss", "ce", "kd", "ref", "tcp", "weight"):
        torch.testing.assert_close(getattr(fused, field), getattr(expected, field), rtol=1e-12, atol=1e-12)
    assert float(expected.ref) > 0 and float(expected.weight.std()) > 0
    for got, want in zip(fused_grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        assert torch.equal(predictions, student(tokens).argmax(-1))


def test_fused_linear_run_matches_the_logits_run(teacher_file, tmp_path):
    records = {}
    for fused in (False, True):
        stages = [{"method": {"name": "kd", "weight": 0.5}, "epochs": 1, "fused_linear": fused},
                  {"method": {"name": "kd", "weight": 0.5}, "epochs": 1, "fused_linear": fused}]
        config = parse_config(lm_raw(teacher_file, stages))
        SMSKDTrainer(config, tmp_path / str(fused), log=lambda _: None).run()
        records[fused] = read_jsonl(tmp_path / str(fused) / "metrics.jsonl")
    for plain, fused in zip(records[False], records[True]):
        for key in ("train_loss", "train_ce", "train_kd", "train_ref", "train_weight", "test_loss"):
            assert fused[key] == pytest.approx(plain[key], rel=1e-4), key
        assert fused["train_acc"] == pytest.approx(plain["train_acc"], abs=0.1)


def test_sequence_config_errors(teacher_file, tmp_path):
    with pytest.raises(ConfigError, match=r"stages\[1\].methods\[0\].name: data set 'text' takes only"):
        parse_config(lm_raw(teacher_file, [{"method": "kd", "epochs": 1}, {"method": "fitnet", "epochs": 1}]))
    with pytest.raises(ConfigError, match="data.augment: must be 'none' for data set 'text'"):
        parse_config(lm_raw(teacher_file, data={"name": "text", "augment": "crop"}))
    with pytest.raises(ConfigError, match=r"stages\[0\].methods\[0\].name: fused_linear takes only"):
        parse_config(lm_raw(teacher_file, [{"method": "rkd", "epochs": 1, "fused_linear": True}],
                            data={"name": "digits"}, student={"name": "digits_cnn_small"},
                            teacher={"name": "digits_cnn_large", "checkpoint": str(teacher_file)}))
    config = parse_config(lm_raw(None, [{"method": "none", "epochs": 1, "fused_linear": True}],
                                 data={"name": "digits"}, student={"name": "digits_cnn_small"}, teacher=None,
                                 teacher_training=None))
    with pytest.raises(ValueError, match="fused_linear: the student 'digits_cnn_small' does not expose"):
        SMSKDTrainer(config, tmp_path / "run", log=lambda _: None)


# ----- logit caches on text (smskd_fast/training/frozen_logits.py): a sample's rows are its L tokens' logits -----

def cached_lm_raw(teacher_file, tmp_path, stages=None, teacher=None, reference=None, **changes):
    """lm_raw with a teacher and/or reference cache (64 windows in shards of 40: 2 shards per epoch)."""
    cache = {}
    if teacher is not None:
        cache["teacher"] = {"dir": str(tmp_path / "teacher_cache"), "shard_rows": 40, **teacher}
    if reference is not None:
        cache["reference"] = {"shard_rows": 40, **reference}
    return lm_raw(teacher_file, stages, **({"cache": cache} if cache else {}), **changes)


def train_lm(raw, run_dir, log=lambda _: None):
    SMSKDTrainer(parse_config(raw), run_dir, log=log).run()
    return load_model_file(run_dir / "student.pt")["state_dict"]


class RunWeights(dict):
    """A run's final student weights, and its run directory."""

    def __init__(self, weights, run_dir):
        super().__init__(weights)
        self.run_dir = run_dir


@pytest.fixture(scope="module")
def plain_lm_run(teacher_file, tmp_path_factory):
    """The default 2-stage LM run (3 + 2 epochs) with the teacher and the reference running."""
    run_dir = tmp_path_factory.mktemp("plain_lm") / "run"
    return RunWeights(train_lm(lm_raw(teacher_file), run_dir), run_dir)


def test_text_run_with_fp32_caches_gives_the_weights_of_running_the_frozen_models(
        teacher_file, plain_lm_run, tmp_path, monkeypatch):
    calls = count_teacher_calls(monkeypatch)
    raw = cached_lm_raw(teacher_file, tmp_path, teacher={"dtype": "float32"}, reference={"dtype": "float32"})
    cached = train_lm(raw, tmp_path / "cached")
    for name in plain_lm_run:
        assert torch.equal(plain_lm_run[name], cached[name]), name
    # Text has no augmentation, so one stored epoch serves all 3: 2 shards, each built by one teacher call
    # in inference mode; the other teacher calls are the 2 stage probes and the test evaluation.
    assert calls.count(True) == 2 and calls.count(False) == 2 + 1
    shards = sorted(path.name for path in (tmp_path / "teacher_cache").glob("shard-*.npy"))
    assert shards == ["shard-e00000-s000000000.npy", "shard-e00000-s000000040.npy"]
    assert len(list((tmp_path / "cached" / "reference_cache" / "stage2").glob("shard-*.npy"))) == 2
    # The views depend on neither the epoch nor the seed: a run with another seed and fewer epochs reuses it.
    logs = []
    train_lm({**raw, "seed": 11, "stages": [{"method": "kd", "epochs": 1}]}, tmp_path / "other_seed", logs.append)
    assert not any("teacher logit cache" in line for line in logs)


def test_text_run_with_fp16_caches_trains_like_running_the_frozen_models(teacher_file, plain_lm_run, tmp_path):
    """fp16 rounds each stored logit to 11 significant bits (relative error <= 2^-11 ~ 5e-4). The
    weights are not the place to compare: AdamW divides each step by the gradient's running RMS,
    so a weight whose gradient is near zero moves by up to lr = 3e-3 on a change of its sign
    (measured: 5.8e-3 after 20 steps in an MLP weight, while every loss agreed to 2e-5). The
    per-epoch losses, averaged over all tokens, are smooth in the targets: measured relative
    differences <= 2.4e-5 (train ref), <= 6e-6 (train kd), <= 2e-6 (train and test loss); 1e-4
    bounds them. Shifting the cached rows by one sample moves the KD loss by far more."""
    cached = train_lm(cached_lm_raw(teacher_file, tmp_path, teacher={"dtype": "float16"},
                                    reference={"dtype": "float16"}), tmp_path / "cached")
    assert any(not torch.equal(plain_lm_run[n], cached[n]) for n in plain_lm_run)  # the rounding is real
    plain_records = read_jsonl(plain_lm_run.run_dir / "metrics.jsonl")
    for plain, fp16 in zip(plain_records, read_jsonl(tmp_path / "cached" / "metrics.jsonl"), strict=True):
        for key in ("train_loss", "train_ce", "train_kd", "train_ref", "train_weight", "test_loss"):
            assert fp16[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-12), key


def test_text_top_k_cache_with_every_token_class_trains_like_the_dense_teacher(teacher_file, plain_lm_run, tmp_path):
    """k = V = 256: the top-k KD term is the dense KL computed another way (topk.py), so the per-epoch
    losses agree with running the teacher (measured relative differences <= 1e-6)."""
    train_lm(cached_lm_raw(teacher_file, tmp_path, teacher={"format": "topk", "k": 256, "dtype": "float32"}),
             tmp_path / "topk")
    plain_records = read_jsonl(plain_lm_run.run_dir / "metrics.jsonl")
    for plain, topk in zip(plain_records, read_jsonl(tmp_path / "topk" / "metrics.jsonl"), strict=True):
        for key in ("train_loss", "train_ce", "train_kd", "train_ref", "train_weight", "test_loss"):
            assert topk[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-12), key


def test_text_top_k_cache_feeds_each_token_s_top_k_to_the_loss(teacher_file, tmp_path, monkeypatch):
    seen = record_loss_calls(monkeypatch)
    stages = [{"method": {"name": "kd", "weight": 0.5}, "epochs": 1}, {"method": {"name": "kd", "weight": 0.5},
                                                                       "epochs": 1}]
    train_lm(cached_lm_raw(teacher_file, tmp_path, stages, teacher={"format": "topk", "k": 8, "dtype": "float16"},
                           reference={"dtype": "float16"}), tmp_path / "run")
    assert len(seen) == 2 * TRAIN_WINDOWS // 16
    for dense, topk, weighting in seen:
        assert dense is None and topk.values.shape == topk.indices.shape == (16, CONTEXT, 8)
        assert topk.true_logit.shape == topk.log_sum_exp_at_temperature.shape == (16, CONTEXT)
        assert weighting == "inverse_tcp"
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert all(r["train_kd"] > 0 for r in metrics) and metrics[1]["train_ref"] > 0


FUSED_STAGES = [{"method": {"name": "kd", "weight": 0.5}, "epochs": 1, "fused_linear": True},
                {"method": {"name": "kd", "weight": 0.5}, "epochs": 1, "fused_linear": True}]


def spy_fused_loss(monkeypatch):
    """Records the keyword arguments the trainer's fused_linear stages pass to fused_linear_smskd_loss."""
    seen = []
    original = steps_module.fused_linear_smskd_loss

    def spy(hidden, weight, target, teacher_hidden, teacher_weight, teacher_logits, reference_hidden,
            reference_weight, **kwargs):
        seen.append(dict(teacher_hidden=teacher_hidden, teacher_logits=teacher_logits,
                         reference_hidden=reference_hidden, **kwargs))
        return original(hidden, weight, target, teacher_hidden, teacher_weight, teacher_logits, reference_hidden,
                        reference_weight, **kwargs)

    monkeypatch.setattr(steps_module, "fused_linear_smskd_loss", spy)
    return seen


def test_fused_linear_stages_with_fp32_caches_give_the_weights_of_running_the_frozen_models(
        teacher_file, tmp_path, monkeypatch):
    plain = train_lm(lm_raw(teacher_file, FUSED_STAGES), tmp_path / "plain")
    seen = spy_fused_loss(monkeypatch)
    cached = train_lm(cached_lm_raw(teacher_file, tmp_path, FUSED_STAGES, teacher={"dtype": "float32"},
                                    reference={"dtype": "float32"}), tmp_path / "cached")
    for name in plain:
        assert torch.equal(plain[name], cached[name]), name
    steps = TRAIN_WINDOWS // 16
    assert len(seen) == 2 * steps
    for call in seen:  # the frozen models' logits came from the caches: no hidden states were computed
        assert call["teacher_hidden"] is None and call["reference_hidden"] is None
        assert call["teacher_logits"].shape == (16, CONTEXT, 256) and call["teacher_topk"] is None
    assert all(call["reference_logits"] is None for call in seen[:steps])  # stage 1 has no reference
    assert all(call["reference_logits"].shape == (16, CONTEXT, 256) for call in seen[steps:])


def test_fused_linear_stages_with_top_k_and_fp16_caches_match_the_logits_path(teacher_file, tmp_path, monkeypatch):
    """The same caches (top-8 fp16 teacher, fp16 reference) read by the fused path and the logits
    path: same losses to rel 1e-4 (as test_fused_linear_run_matches_the_logits_run without caches).
    The fp16 rows reach the fused loss as fp16 and are converted a chunk at a time."""
    records = {}
    seen = spy_fused_loss(monkeypatch)
    for fused in (False, True):
        stages = [{**stage, "fused_linear": fused} for stage in FUSED_STAGES]
        train_lm(cached_lm_raw(teacher_file, tmp_path, stages, teacher={"format": "topk", "k": 8, "dtype": "float16"},
                               reference={"dtype": "float16"}), tmp_path / str(fused))
        records[fused] = read_jsonl(tmp_path / str(fused) / "metrics.jsonl")
    for plain, fused in zip(records[False], records[True], strict=True):
        for key in ("train_loss", "train_ce", "train_kd", "train_ref", "train_weight", "test_loss"):
            assert fused[key] == pytest.approx(plain[key], rel=1e-4), key
    assert records[True][1]["train_ref"] > 0
    assert seen and all(call["teacher_topk"].values.shape == (16, CONTEXT, 8) and call["teacher_logits"] is None
                        for call in seen)
    assert {call["reference_logits"].dtype for call in seen if call["reference_logits"] is not None} == {torch.float16}


def test_cache_build_on_text_stores_one_epoch_of_token_rows(teacher_file, tmp_path, capsys):
    import yaml

    from smskd_fast.cli import main

    raw = cached_lm_raw(teacher_file, tmp_path, teacher={"format": "topk", "k": 8})
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["cache", "build", "--config", str(config)]) == 0
    assert ("2 shards (2 written now, 0 reused), topk float16, one view per sample (no augmentation), serving "
            f"every epoch, {TRAIN_WINDOWS} samples x {CONTEXT} tokens") in capsys.readouterr().out
