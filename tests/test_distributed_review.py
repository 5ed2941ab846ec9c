"""Distributed evaluation and training against one process (2 gloo ranks on the CPU).

The evaluation tests run DistributedContext.evaluate on 2 spawned ranks
(distributed_review_worker.py) and compare it with evaluation.evaluate on the whole
data set in this process; the non-finite test runs `smskd-fast train` under torchrun
(distributed_worker.py) against a trainer in this process.
"""
from __future__ import annotations

import math
import re

import pytest
import torch
import yaml

from smskd_fast.training.config import parse_config
from smskd_fast.training.evaluation import evaluate
from smskd_fast.training.models import MODELS
from smskd_fast.training.nonfinite import NonFiniteLossError
from smskd_fast.training.trainer import SMSKDTrainer

from distributed_review_worker import accuracy_case, perplexity_case, run_ranks
from distributed_worker import DigitsMLP, poison_training_step
from test_distributed import WORKER, torchrun
from trainer_helpers import tiny_raw, write_teacher

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
CPU = torch.device("cpu")
LOSS_RTOL = 1e-6  # evaluate sums each batch's losses in float32 (6e-8); the ranks' batches start elsewhere


def test_two_rank_test_accuracy_is_exactly_the_one_process_accuracy(tmp_path):
    """78 of 119 right, 40 of them on rank 0's 60 images: every rank reports 100 * 78 / 119, the float
    one process computes (docs/distributed.md: accuracy identical), not a re-weighted mean of the
    ranks' percentages that differs from it in the last bit."""
    model, data = accuracy_case()
    expected = evaluate(model, data, 16, CPU)
    assert expected["acc"] == 100.0 * 78 / 119
    for result in run_ranks("evaluate_accuracy_case", tmp_path):
        assert result["acc"] == expected["acc"]
        assert result["loss"] == pytest.approx(expected["loss"], rel=LOSS_RTOL)


def test_two_rank_test_perplexity_is_exp_of_the_whole_test_loss(tmp_path):
    """Perplexity is exp of the mean token loss over the whole test set; the shards' perplexities
    averaged (what each rank would report otherwise) are far above it when the shards' losses differ."""
    model, data = perplexity_case()
    expected = evaluate(model, data, 2, CPU)
    for result in run_ranks("evaluate_perplexity_case", tmp_path):
        assert result["loss"] == pytest.approx(expected["loss"], rel=LOSS_RTOL)
        assert result["acc"] == expected["acc"]
        assert result["perplexity"] == pytest.approx(expected["perplexity"], rel=LOSS_RTOL)
        assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-12)


def _nan_config(tmp_path, stages, samples: int):
    """The tiny run (digits_mlp student, `samples` training samples) as a parsed raw config and its YAML file."""
    raw = tiny_raw(write_teacher(tmp_path / "teacher.pt"), stages)
    raw["student"], raw["data"]["train_subset"] = {"name": "digits_mlp"}, samples
    config = tmp_path / "nan.yaml"
    config.write_text(yaml.safe_dump(raw))
    return raw, config


def _one_process_error(raw, tmp_path, nan_step: int) -> str:
    """The NonFiniteLossError of one process whose input is NaN on training step `nan_step` (0: every step)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(MODELS, "digits_mlp", DigitsMLP)
        trainer = SMSKDTrainer(parse_config(raw), tmp_path / "one_rank", log=lambda _: None)
        poison_training_step(trainer.student, nan_step)
        with pytest.raises(NonFiniteLossError) as caught:
            trainer.run()
    return str(caught.value)


def _two_rank_errors(config, tmp_path, nan_step: int) -> list:
    """Both ranks' error lines when rank 1's input is NaN on step `nan_step` (0: every step); the run must fail."""
    result = torchrun(2, str(WORKER), str(tmp_path / "ranks"), "--nan-rank", "1", "--nan-step", str(nan_step), "--",
                      "train", "--config", str(config), "--out", str(tmp_path / "two_ranks"), check=False)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode != 0 and len(errors) == 2, result.stderr
    return errors


def test_a_non_finite_loss_on_one_rank_is_reported_like_one_process(tmp_path):
    """Rank 1's input turns NaN on stage 2's step 2 (91 samples, global batches of 32): the run stops
    on both ranks, and every rank's error names what one process names, the NaN loss and the 32
    samples of the global batch, not a rank's own finite loss and its half of the batch."""
    raw, config = _nan_config(tmp_path, [{"method": "kd", "epochs": 1}, {"method": "kd", "epochs": 1}], 91)
    error = _one_process_error(raw, tmp_path, 5)
    samples = re.search(r"on the batch of training samples (\[[^]]*\])", error).group(1)
    assert "step 2/3: the loss is nan" in error and len(samples.split(",")) == 32
    for error in _two_rank_errors(config, tmp_path, 5):
        assert "step 2/3: the loss is nan" in error and f"training samples {samples}." in error, error


def test_an_epoch_whose_every_step_is_skipped_stops_with_two_ranks_as_with_one(tmp_path):
    """65 samples in global batches of 32: the last global batch (1 sample) is fewer than the 2 ranks and is not
    run. With rank 1's input NaN on every step and `nonfinite: skip`, every step run is skipped: the model has
    diverged, as one process says (which skips its 3 steps). The check counted the 3 planned steps, not the 2
    run, so two ranks went on with an untrained student."""
    raw, config = _nan_config(tmp_path, [{"method": "kd", "epochs": 1, "nonfinite": "skip"}], 65)
    assert "non-finite on every one of the 3 steps" in _one_process_error(raw, tmp_path, 0)
    for error in _two_rank_errors(config, tmp_path, 0):
        assert "non-finite on every one of the 2 steps" in error, error
