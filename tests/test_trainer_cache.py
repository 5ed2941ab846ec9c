"""The trainer with logit caches: same training as running the frozen models, reuse, refusal."""
from __future__ import annotations

import json
import sys

import pytest
import torch
import yaml

from smskd_fast.cli import main
from smskd_fast.training.config import parse_config
from smskd_fast.training.checkpoint import load_model_file
from smskd_fast.training.run_files import read_jsonl
from smskd_fast.training.trainer import SMSKDTrainer
from trainer_helpers import count_teacher_calls, record_loss_calls, tiny_raw, write_teacher

KD_THEN_SMSKD = [{"method": "kd", "epochs": 2}, {"method": "kd", "epochs": 2}]


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    return write_teacher(tmp_path_factory.mktemp("teacher") / "teacher.pt")


def _raw(teacher_file, tmp_path, stages=KD_THEN_SMSKD, teacher=None, reference=None, **changes):
    raw = tiny_raw(teacher_file, stages, **changes)
    if teacher is not None or reference is not None:
        raw["cache"] = {}
        if teacher is not None:
            raw["cache"]["teacher"] = {"dir": str(tmp_path / "teacher_cache"), "shard_rows": 40, **teacher}
        if reference is not None:
            raw["cache"]["reference"] = {"shard_rows": 40, **reference}
    return raw


def _train(raw, run_dir, log=lambda _: None):
    SMSKDTrainer(parse_config(raw), run_dir, log=log).run()
    return load_model_file(run_dir / "student.pt")["state_dict"]


def test_fp32_caches_give_the_same_weights_as_running_the_frozen_models(teacher_file, tmp_path, monkeypatch):
    plain = _train(_raw(teacher_file, tmp_path), tmp_path / "plain")
    calls = count_teacher_calls(monkeypatch)
    cached = _train(_raw(teacher_file, tmp_path, teacher={"dtype": "float32"}, reference={"dtype": "float32"}),
                    tmp_path / "cached")
    assert plain.keys() == cached.keys()
    for name in plain:
        assert torch.equal(plain[name], cached[name]), name
    # The teacher ran only to build its cache (inference mode), for the two probe batches and the test set:
    # never on a training batch. Built shards: 2 epochs x 3 shards of 40/40/16 rows.
    assert calls.count(True) == 2 * 3 and calls.count(False) == 2 + 1
    assert len(list((tmp_path / "teacher_cache").glob("shard-*.npy"))) == 6
    assert len(list((tmp_path / "cached" / "reference_cache" / "stage2").glob("shard-*.npy"))) == 6
    assert not (tmp_path / "cached" / "reference_cache" / "stage1").exists()  # stage 1 has no reference


def test_fp16_caches_give_close_weights(teacher_file, tmp_path):
    """fp16 rounds each stored logit to 11 significant bits (relative error <= 2^-11 ~ 5e-4), so
    the KD and reference target probabilities move by about 5e-4 of a logit's size, and each of
    the 12 SGD steps (lr <= 0.05) moves the weights by about lr * 5e-4 * p differently: the weights
    differ, but far less than 1e-5 (measured: 2.2e-7). Reading another epoch's views instead
    (a wrong cache row) moves them by 1.8e-4, so this bound does tell the two apart."""
    plain = _train(_raw(teacher_file, tmp_path), tmp_path / "plain")
    cached = _train(_raw(teacher_file, tmp_path, teacher={"dtype": "float16"}, reference={"dtype": "float16"}),
                    tmp_path / "cached")
    differences = [float((plain[n].float() - cached[n].float()).abs().max()) for n in plain
                   if plain[n].is_floating_point()]
    assert max(differences) > 0  # the rounding is real ...
    assert max(differences) < 1e-5  # ... and small: weights are O(0.1 .. 1)


def test_a_top_k_cache_with_every_class_matches_the_dense_cache(teacher_file, tmp_path):
    """With k = C the top-k KD term is the dense KL (topk.py), computed another way: close, not equal."""
    dense = _train(_raw(teacher_file, tmp_path, teacher={"dtype": "float32"}), tmp_path / "dense")
    topk = _train(_raw(teacher_file, tmp_path / "k10", teacher={"format": "topk", "k": 10, "dtype": "float32"}),
                  tmp_path / "topk")
    for name in dense:
        torch.testing.assert_close(topk[name], dense[name], rtol=1e-4, atol=1e-5)


def test_a_top_k_cache_run_feeds_the_top_k_teacher_to_the_loss(teacher_file, tmp_path, monkeypatch):
    seen = record_loss_calls(monkeypatch)
    raw = _raw(teacher_file, tmp_path, teacher={"format": "topk", "k": 3, "dtype": "float16"},
               reference={"dtype": "float16"})
    _train(raw, tmp_path / "run")
    assert seen and all(dense is None and topk is not None and topk.k == 3 for dense, topk, _ in seen)
    assert {weighting for *_, weighting in seen} == {"inverse_tcp"}  # TCP stays exact in the top-k form
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert len(metrics) == 4 and all(r["train_kd"] > 0 for r in metrics) and metrics[2]["train_ref"] > 0


def test_a_stage_that_needs_teacher_features_still_runs_the_teacher(teacher_file, tmp_path, monkeypatch):
    stages = [{"method": "kd", "epochs": 1}, {"method": "fitnet", "epochs": 1}]
    plain = _train(_raw(teacher_file, tmp_path, stages), tmp_path / "plain")
    calls = count_teacher_calls(monkeypatch)
    cached = _train(_raw(teacher_file, tmp_path, stages, teacher={"dtype": "float32"}), tmp_path / "cached")
    for name in plain:
        assert torch.equal(plain[name], cached[name]), name
    # 3 build shards, 2 probes + 1 test evaluation, and the fitnet stage's 3 training batches.
    assert calls.count(True) == 3 and calls.count(False) == 3 + 3


def _write_config(raw, path):
    path.write_text(yaml.safe_dump(raw))
    return path


def test_cache_build_needs_no_matplotlib(teacher_file, tmp_path, capsys, monkeypatch):
    """Building a cache plots nothing, so plots: true (the default) does not ask for matplotlib there."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as for a package not installed
    raw = _raw(teacher_file, tmp_path, teacher={"dtype": "float16"})
    raw["plots"] = True
    assert main(["cache", "build", "--config", str(_write_config(raw, tmp_path / "run.yaml"))]) == 0
    assert "6 shards (6 written now, 0 reused)" in capsys.readouterr().out


def test_cache_build_then_train_reuses_the_cache(teacher_file, tmp_path, capsys):
    config = _write_config(_raw(teacher_file, tmp_path, teacher={"dtype": "float16"}), tmp_path / "run.yaml")
    assert main(["cache", "build", "--config", str(config)]) == 0
    assert "6 shards (6 written now, 0 reused)" in capsys.readouterr().out
    shards = sorted((tmp_path / "teacher_cache").glob("shard-*.npy"))
    stamps = [path.stat().st_mtime_ns for path in shards]
    assert main(["cache", "build", "--config", str(config)]) == 0
    assert "6 shards (0 written now, 6 reused)" in capsys.readouterr().out
    killed = shards[3]  # as a build killed before this shard's rename leaves it: absent (tests/test_cache.py kills one)
    kept_bytes = killed.read_bytes()
    killed.unlink()
    assert main(["cache", "build", "--config", str(config)]) == 0
    assert "6 shards (1 written now, 5 reused)" in capsys.readouterr().out
    assert killed.read_bytes() == kept_bytes  # rebuilt to the same bytes: the views are replayable
    stamps[3] = killed.stat().st_mtime_ns
    logs = []
    _train(yaml.safe_load(config.read_text()), tmp_path / "run", log=logs.append)
    assert not any("logit cache" in line for line in logs)  # nothing rebuilt
    assert [path.stat().st_mtime_ns for path in shards] == stamps


@pytest.mark.parametrize("change, field", [({"seed": 2}, "augmentation_seed"), ("teacher", "model_hash"),
                                           ({"data": {"augment": "crop_flip"}}, "data_fingerprint")])
def test_a_cache_built_for_another_run_is_refused(teacher_file, tmp_path, capsys, change, field):
    raw = _raw(teacher_file, tmp_path, teacher={"dtype": "float16"})
    assert main(["cache", "build", "--config", str(_write_config(raw, tmp_path / "a.yaml"))]) == 0
    if change == "teacher":
        other = write_teacher(tmp_path / "other_teacher.pt", seed=1)
        raw["teacher"]["checkpoint"] = str(other)
    else:
        for key, value in change.items():
            raw[key] = {**raw[key], **value} if isinstance(value, dict) else value
    other_config = _write_config(raw, tmp_path / "b.yaml")
    capsys.readouterr()
    for command in (["cache", "build"], ["train", "--out", str(tmp_path / "run")]):
        assert main(command + ["--config", str(other_config)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("error: logit cache") and f"built with {field}=" in err


def test_a_corrupted_shard_is_refused(teacher_file, tmp_path, capsys):
    config = _write_config(_raw(teacher_file, tmp_path, teacher={"dtype": "float16"}), tmp_path / "run.yaml")
    assert main(["cache", "build", "--config", str(config)]) == 0
    shard = sorted((tmp_path / "teacher_cache").glob("shard-*.npy"))[2]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 1  # a failed run (cli.py)
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not match its checksum" in err


def test_cache_config_errors_name_the_key(teacher_file, tmp_path):
    from smskd_fast.training.config import ConfigError

    with pytest.raises(ConfigError, match=r"cache\.teacher\.k: must be >= 1"):
        parse_config(_raw(teacher_file, tmp_path, teacher={"format": "topk"}))
    with pytest.raises(ConfigError, match=r"cache\.reference\.format: must be 'dense'"):
        parse_config(_raw(teacher_file, tmp_path, reference={"format": "topk", "k": 3}))
    with pytest.raises(ConfigError, match=r"cache\.teacher\.dtype"):
        parse_config(_raw(teacher_file, tmp_path, teacher={"dtype": "bfloat16"}))


def test_a_run_with_caches_resumes_mid_stage_with_the_same_weights(teacher_file, tmp_path):
    raw = _raw(teacher_file, tmp_path, teacher={"dtype": "float32"}, reference={"dtype": "float32"})
    whole = _train(raw, tmp_path / "whole")
    assert SMSKDTrainer(parse_config(raw), tmp_path / "run", log=lambda _: None).run(max_epochs=3) is None
    logs = []
    SMSKDTrainer(parse_config(raw), tmp_path / "run", log=logs.append).run(resume=True)
    resumed = load_model_file(tmp_path / "run" / "student.pt")["state_dict"]
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name
    assert not any("logit cache" in line for line in logs)  # stage 2's reference cache was reused, not rebuilt


def test_training_the_teacher_ignores_the_teacher_cache(teacher_file, tmp_path):
    from smskd_fast.training.experiments import teacher_config

    config = teacher_config(parse_config(_raw(teacher_file, tmp_path, [{"method": "kd", "epochs": 1}],
                                              teacher={"dtype": "float16"})))
    assert config.cache is None
    SMSKDTrainer(config, tmp_path / "teacher_run", log=lambda _: None).run()
    assert not (tmp_path / "teacher_cache").exists()


def test_a_cache_built_for_more_epochs_serves_a_shorter_run(teacher_file, tmp_path, capsys):
    """A teacher cache of 3 epochs (9 shards) serves a run of 2 + 2 epochs: it reads epochs 0 and 1,
    writes nothing, and trains exactly as running the teacher does."""
    longer = _raw(teacher_file, tmp_path, [{"method": "kd", "epochs": 3}], teacher={"dtype": "float32"})
    assert main(["cache", "build", "--config", str(_write_config(longer, tmp_path / "long.yaml"))]) == 0
    assert "9 shards (9 written now, 0 reused)" in capsys.readouterr().out
    shards = sorted((tmp_path / "teacher_cache").glob("shard-*.npy"))
    stamps = [path.stat().st_mtime_ns for path in shards]
    plain = _train(_raw(teacher_file, tmp_path), tmp_path / "plain")
    logs = []
    cached = _train(_raw(teacher_file, tmp_path, teacher={"dtype": "float32"}), tmp_path / "cached", logs.append)
    for name in plain:
        assert torch.equal(plain[name], cached[name]), name
    assert not any("logit cache" in line for line in logs)
    assert [path.stat().st_mtime_ns for path in shards] == stamps


def test_a_cache_that_lacks_an_epoch_of_the_run_is_refused(teacher_file, tmp_path, capsys):
    raw = _raw(teacher_file, tmp_path, teacher={"dtype": "float16"})  # epochs 0 and 1
    assert main(["cache", "build", "--config", str(_write_config(raw, tmp_path / "a.yaml"))]) == 0
    longer = _write_config(_raw(teacher_file, tmp_path, [{"method": "kd", "epochs": 4}], teacher={"dtype": "float16"}),
                           tmp_path / "b.yaml")
    capsys.readouterr()
    for command in (["cache", "build"], ["train", "--out", str(tmp_path / "run")]):
        assert main(command + ["--config", str(longer)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("error: logit cache")
        assert "built with epochs=[0, 1] but this run needs [0, 1, 2, 3]: it lacks epochs [2, 3]" in err
    assert len(list((tmp_path / "teacher_cache").glob("shard-*.npy"))) == 6  # left as it was


def test_without_augmentation_one_stored_epoch_serves_every_epoch(teacher_file, tmp_path):
    """augment: none makes a sample's view the same in every epoch: the teacher cache holds epoch 0 only
    (3 shards, not 2 x 3) and training equals running the teacher, in every epoch of both stages."""
    no_augment = {"data": {**tiny_raw(teacher_file, KD_THEN_SMSKD)["data"], "augment": "none"}}
    plain = _train(_raw(teacher_file, tmp_path, **no_augment), tmp_path / "plain")
    cached = _train(_raw(teacher_file, tmp_path, teacher={"dtype": "float32"}, reference={"dtype": "float32"},
                         **no_augment), tmp_path / "cached")
    for name in plain:
        assert torch.equal(plain[name], cached[name]), name
    shards = sorted(path.name for path in (tmp_path / "teacher_cache").glob("shard-*.npy"))
    assert len(shards) == 3 and all(name.startswith("shard-e00000-") for name in shards)
    header = json.loads((tmp_path / "teacher_cache" / "header.json").read_text())["spec"]
    assert header["epoch_invariant"] is True and header["augmentation_seed"] is None and header["epochs"] == [0]
