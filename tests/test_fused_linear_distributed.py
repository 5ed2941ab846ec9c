"""fused_linear_smskd_loss under DDP (torchrun, gloo, 2 CPU ranks) with a top-k teacher cache.

The trainer refused fused_linear stages under DDP: the student's hidden_states()
bypassed DDP's forward, so DDP never armed the all-reduce and each rank would have
kept its own gradients. Now the hidden states come through DDP's forward
(distributed.student_hidden_states); these tests check the gradients against one
process on the whole batch, and a whole 2-rank trainer run against a 1-rank run.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from smskd_fast.training.config import parse_config
from smskd_fast.loss.functional import smskd_loss
from smskd_fast.training.models import build_model
from smskd_fast.training.checkpoint import load_model_file, save_model_file
from smskd_fast.training.run_files import read_jsonl
from smskd_fast.training.trainer import SMSKDTrainer

from test_distributed import assert_same_metrics, assert_same_weights, torchrun

TESTS = Path(__file__).resolve().parent
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


def test_two_ranks_give_the_float64_gradient_of_the_whole_batch(tmp_path):
    """Each rank: its shard of 6 sequences (rank 0's with 9 ignored tokens, rank 1's with 1), hidden
    states through DDP, fused loss with a top-k teacher and a reference, scaled by count_loss_scale.
    Both ranks end with the same gradients, equal to those of smskd_loss on the whole batch's
    materialised float64 logits (one process); the difference is float64 rounding."""
    from distributed_fused_linear_worker import BACKENDS, LOSS_OPTIONS, models_and_batch

    torchrun(2, str(TESTS / "distributed_fused_linear_worker.py"), str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    (student, _, reference), tokens, target, topk = models_and_batch()
    expected = smskd_loss(student(tokens), target, None, reference(tokens), teacher_topk=topk, backend="reference",
                          **LOSS_OPTIONS)
    assert float(expected.ref) > 0 and float(expected.kd) > 0
    expected.loss.backward()
    for backend in BACKENDS:
        for name, parameter in student.named_parameters():
            got = ranks[0][backend][name]
            assert torch.equal(got, ranks[1][backend][name]), (backend, name)
            torch.testing.assert_close(got, parameter.grad, rtol=1e-10, atol=1e-13, msg=lambda m: f"{backend} {name}: {m}")


def lm_teacher(path: Path) -> Path:
    """A tiny_lm_large with random weights (its top-k rows are as good a test as a trained one's)."""
    torch.manual_seed(5)
    save_model_file(build_model("tiny_lm_large", 256, 1), "tiny_lm_large", 256, 1, path)
    return path


def fused_lm_raw(teacher_file: Path, cache_dir: Path) -> dict:
    """Two fused_linear KD stages (the second against the stage-1 reference) on 48 text windows in
    global batches of 16, the teacher read from a top-8 cache."""
    stage = {"method": {"name": "kd", "weight": 0.5}, "epochs": 1, "fused_linear": True}
    return {
        "seed": 3, "plots": False, "progress": False, "threads": 1,
        "data": {"name": "text", "context_length": 16, "batch_size": 16, "eval_batch_size": 16,
                 "train_subset": 48, "test_subset": 16},
        "student": {"name": "tiny_lm_small"},
        "teacher": {"name": "tiny_lm_large", "checkpoint": str(teacher_file)},
        # SGD: Adam divides each gradient entry by its own running scale, which turns the rounding
        # differences of near-zero entries into full-size steps; SGD keeps them at rounding size.
        "defaults": {"optimizer": {"name": "sgd", "lr": 0.5, "momentum": 0.9, "weight_decay": 0.0},
                     "schedule": {"name": "constant"}, "temperature": 2.0, "ce_weight": 0.5},
        "cache": {"teacher": {"dir": str(cache_dir), "format": "topk", "k": 8, "dtype": "float32",
                              "shard_rows": 40}},
        "stages": [stage, stage],
    }


def test_two_rank_fused_linear_run_with_a_top_k_cache_matches_one_rank(tmp_path):
    """`smskd-fast train` under torchrun with fused_linear stages and a top-k teacher cache (rank 0
    builds it with rank 1): the ranks end with identical students, and the run ends where a
    1-process run ends, within test_distributed's rounding tolerances (float32; the gradient is the
    average of two half-batch means instead of one mean)."""
    teacher_file = lm_teacher(tmp_path / "teacher.pt")
    one_rank, two_ranks = tmp_path / "one_rank", tmp_path / "two_ranks"
    SMSKDTrainer(parse_config(fused_lm_raw(teacher_file, tmp_path / "cache_one")), one_rank,
                 log=lambda _: None).run()
    config = tmp_path / "fused.yaml"
    config.write_text(yaml.safe_dump(fused_lm_raw(teacher_file, tmp_path / "cache_two")))
    torchrun(2, str(TESTS / "distributed_worker.py"), str(tmp_path / "ranks"), "--", "train", "--config",
             str(config), "--out", str(two_ranks))
    rank0, rank1 = (torch.load(tmp_path / "ranks" / f"rank{r}_student.pt", weights_only=True) for r in (0, 1))
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    records = read_jsonl(two_ranks / "metrics.jsonl")
    assert_same_metrics(records, read_jsonl(one_rank / "metrics.jsonl"))
    assert records[1]["train_ref"] > 0 and records[0]["train_kd"] > 0
    assert_same_weights(load_model_file(two_ranks / "student.pt")["state_dict"],
                        load_model_file(one_rank / "student.pt")["state_dict"])
    assert list((tmp_path / "cache_two").glob("shard-*.npy"))
