"""Distributed training on the CPU: torchrun, gloo, 2 ranks (smskd_fast/training/distributed.py).

Each torchrun launch costs a few seconds of process start-up; the module runs four
launches and two in-process runs on tiny digits subsets (about a minute on 2 cores).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from smskd_fast.training.data import load_splits
from smskd_fast.training.distributed import ShardedBatches, all_gather_rows, global_mean, shard_bounds, shard_sizes
from smskd_fast.training.models import MODELS
from smskd_fast.training.run_files import read_jsonl
from smskd_fast.training.trainer import SMSKDTrainer
from smskd_fast.training.config import load_config

from distributed_worker import DigitsMLP
from trainer_helpers import tiny_raw, write_teacher

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

# The 1-rank and 2-rank runs below differ only in the order of floating-point sums: the
# gradient is the all-reduced average of two half-batch means instead of one batch mean,
# and every loss term is evaluated on half batches, each rounding at float32's 6e-8.
# Measured over this 5-epoch run (2026-11-25): weights differ by at most 6e-8 (|w| <= 0.29)
# and the epoch metrics by at most 8e-6 relative (the small reference and CRD terms, which
# are differences of nearly equal float32 sums). The tolerances leave a margin of more than
# 10 above that. Accuracy counts samples and agrees exactly on every epoch (checked; a
# sample would have to sit within ~1e-6 of the decision boundary to flip).
LOSS_RTOL, LOSS_ATOL, WEIGHT_ATOL = 1e-4, 1e-6, 1e-6
LOSS_KEYS = ("train_loss", "train_ce", "train_kd", "train_ref", "train_method", "train_weight", "test_loss")
EXACT_KEYS = ("train_acc", "test_acc", "lr", "global_epoch", "stage", "epoch")


def torchrun(nproc: int, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={nproc}", *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"torchrun failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def teacher_file(workdir) -> Path:
    return write_teacher(workdir / "teacher.pt")


@pytest.fixture(scope="module")
def mlp_config(workdir, teacher_file) -> Path:
    """KD for 3 epochs, then KD + CRD against the stage-1 reference for 2; 91 samples in
    batches of 32 make a last global batch of 27, split 14 + 13 (unequal shards)."""
    raw = tiny_raw(teacher_file, [
        {"method": "kd", "epochs": 3},
        {"methods": [{"name": "kd"}, {"name": "crd", "params": {"nce_k": 32, "feat_dim": 16}}], "epochs": 2},
    ])
    raw["student"] = {"name": "digits_mlp"}
    raw["data"]["train_subset"] = 91
    path = workdir / "mlp.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def run_in_process(config: Path, run_dir: Path, resume: bool = False) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(MODELS, "digits_mlp", DigitsMLP)
        SMSKDTrainer(load_config(config), run_dir).run(resume=resume)


def student_weights(run_dir: Path):
    return torch.load(run_dir / "student.pt", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def one_rank_run(workdir, mlp_config) -> Path:
    run_in_process(mlp_config, workdir / "one_rank")
    return workdir / "one_rank"


@pytest.fixture(scope="module")
def two_rank_run(workdir, mlp_config) -> Path:
    run_dir = workdir / "two_ranks"
    torchrun(2, str(WORKER), str(run_dir / "ranks"), "--", "train", "--config", str(mlp_config), "--out", str(run_dir))
    return run_dir


def assert_same_metrics(actual, expected) -> None:
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        for key in EXACT_KEYS:
            assert got[key] == want[key], (key, got, want)
        for key in LOSS_KEYS:
            assert got[key] == pytest.approx(want[key], rel=LOSS_RTOL, abs=LOSS_ATOL), (key, got, want)


def assert_same_weights(actual, expected) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        # Scaled by the entry's magnitude: CRD's normalising constant is ~1e4, where one
        # float32 rounding step is ~1e-3; the weights themselves are below 1.
        scale = max(1.0, expected[key].abs().max().item()) if expected[key].numel() else 1.0
        difference = (actual[key] - expected[key]).abs().max().item() if expected[key].numel() else 0.0
        assert difference <= WEIGHT_ATOL * scale, f"{key}: max difference {difference:.3g} at scale {scale:.3g}"


def test_shard_bounds_cover_the_batch_in_order():
    for count in range(0, 12):
        for shards in range(1, 5):
            bounds = [shard_bounds(count, shard, shards) for shard in range(shards)]
            assert bounds[0][0] == 0 and bounds[-1][1] == count
            assert all(stop == next_start for (_, stop), (next_start, _) in zip(bounds, bounds[1:]))
            sizes = [stop - start for start, stop in bounds]
            assert max(sizes) - min(sizes) <= 1


def test_rank_shards_join_into_the_single_process_batches():
    """Each rank's shard of every step, put back together in rank order, is the single-process
    batch (same samples, same crops and flips); a last global batch smaller than the number of
    ranks is skipped (9 samples in batches of 4 on 2 ranks: 4, 4, then 1 skipped)."""
    data = load_splits("digits").train.subset(9)

    def epoch(shard: int, shards: int):
        generator = torch.Generator().manual_seed(7)
        batches = ShardedBatches(data, 4, generator, "crop_flip", 1, shard, shards, seed=7, epoch=0)
        return [(images, labels, indices, batches.loss_scale(len(labels))) for images, labels, indices in batches]

    single, ranks = epoch(0, 1), [epoch(shard, 2) for shard in range(2)]
    assert [len(step[1]) for step in single] == [4, 4, 1]
    assert len(ranks[0]) == len(ranks[1]) == 2
    for step, whole in enumerate(single[:2]):
        for part in range(3):
            assert torch.equal(torch.cat([ranks[0][step][part], ranks[1][step][part]]), whole[part])
        assert ranks[0][step][3] == ranks[1][step][3] == whole[3] == 1.0
    odd = ShardedBatches(data, 9, torch.Generator().manual_seed(7), "none", 1, 0, 2)
    assert [len(labels) for _, labels, _ in odd] == [5]
    assert odd.loss_scale(5) == pytest.approx(10 / 9)  # 5 of 9 rows: DDP's average of 2 ranks weights it 5/9


def test_collectives_are_the_identity_in_one_process():
    rows = torch.arange(6.0).view(3, 2)
    assert shard_sizes(3) == [3]
    assert all_gather_rows(rows)[0] is rows
    assert torch.equal(global_mean(rows), rows.mean())


def test_two_ranks_match_one_rank(one_rank_run, two_rank_run):
    """Same seed and global batch: 2 ranks (DDP, sharded batches, gathered CRD banks) give the
    1-rank metrics and weights within the rounding tolerance above, and the ranks agree exactly."""
    assert_same_metrics(read_jsonl(two_rank_run / "metrics.jsonl"), read_jsonl(one_rank_run / "metrics.jsonl"))
    assert_same_weights(student_weights(two_rank_run), student_weights(one_rank_run))
    ranks = two_rank_run / "ranks"
    for name in ("student", "stage1_kd_methods", "stage2_kd+crd_methods"):
        rank0, rank1 = (torch.load(ranks / f"rank{r}_{name}.pt", weights_only=True) for r in (0, 1))
        assert rank0.keys() == rank1.keys()
        for key in rank0:  # student, CRD heads and both CRD memory banks: identical on every rank
            assert torch.equal(rank0[key], rank1[key]), (name, key)
    one_rank_banks = torch.load(one_rank_run / "checkpoints" / "stage2.pt", weights_only=True)["methods"]
    two_rank_banks = torch.load(two_rank_run / "checkpoints" / "stage2.pt", weights_only=True)["methods"]
    assert "1.memory_student" in one_rank_banks
    assert_same_weights(two_rank_banks, one_rank_banks)


def test_rank_killed_mid_stage_then_resumed_on_one_or_two_ranks(workdir, mlp_config, one_rank_run, two_rank_run):
    """Rank 1 is SIGKILLed as it starts epoch 2 of stage 1; torchrun stops the job. Resumed on
    another world size (1 process) the run ends where the uninterrupted runs end (within the
    rounding tolerance); resumed on 2 ranks again it ends bit for bit where the uninterrupted
    2-rank run ends."""
    run_dir = workdir / "killed"
    result = torchrun(2, str(WORKER), str(run_dir / "ranks"), "--kill-rank", "1", "--kill-epoch", "2", "--",
                      "train", "--config", str(mlp_config), "--out", str(run_dir), check=False)
    assert result.returncode != 0
    latest = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)
    assert (latest["stage"], latest["epochs_done"]) == (0, 1)
    assert len(read_jsonl(run_dir / "metrics.jsonl")) == 1
    assert not (run_dir / "student.pt").exists()
    again_on_two = workdir / "killed_resumed_on_two"
    shutil.copytree(run_dir, again_on_two)

    run_in_process(mlp_config, run_dir, resume=True)
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["global_epoch"] for r in records] == [1, 2, 3, 4, 5]
    assert_same_metrics(records, read_jsonl(one_rank_run / "metrics.jsonl"))
    assert_same_weights(student_weights(run_dir), student_weights(two_rank_run))
    assert not list(run_dir.rglob("*.tmp"))

    torchrun(2, str(WORKER), str(again_on_two / "ranks"), "--", "train", "--resume", str(again_on_two))
    expected = student_weights(two_rank_run)
    for key, value in student_weights(again_on_two).items():
        assert torch.equal(value, expected[key]), key
    def without_timing(path: Path):
        return [{key: value for key, value in record.items() if key != "seconds"} for record in read_jsonl(path)]

    assert without_timing(again_on_two / "metrics.jsonl") == without_timing(two_rank_run / "metrics.jsonl")


def test_two_ranks_two_stages_end_to_end(workdir, teacher_file):
    """`smskd-fast train` under torchrun, 2 ranks, a BatchNorm student, KD then KD + FitNet
    (connector) + CRD against the stage-1 reference: rank 0 alone writes the run, and the
    ranks end every stage with identical students (BatchNorm statistics averaged) and
    identical method modules (connector, CRD heads and banks)."""
    raw = tiny_raw(teacher_file, [
        {"method": "kd", "epochs": 2},
        {"methods": [{"name": "kd"}, {"name": "fitnet", "weight": 1.0},
                     {"name": "crd", "params": {"nce_k": 32, "feat_dim": 16}}], "epochs": 2},
    ], plots=True)
    config = workdir / "cli.yaml"
    config.write_text(yaml.safe_dump(raw))
    run_dir, ranks = workdir / "cli_run", workdir / "cli_ranks"
    result = torchrun(2, str(WORKER), str(ranks), "--", "train", "--config", str(config), "--out", str(run_dir))
    assert result.stdout.count("run directory:") == 1  # only rank 0 reports
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [(r["stage"], r["epoch"]) for r in records] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert records[0]["train_ref"] == 0 and records[2]["train_ref"] > 0 and records[2]["train_method"] > 0
    for name in ("config.yaml", "teacher_eval.json", "student.pt", "summary.json", "tcp_weights.json",
                 "accuracy.png", "checkpoints/stage1.pt", "checkpoints/stage2.pt", "checkpoints/latest.pt"):
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.rglob("*.tmp"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 4 and summary["last_test_acc"] == records[-1]["test_acc"]
    stage2 = torch.load(run_dir / "checkpoints" / "stage2.pt", weights_only=True)
    assert not any(key.startswith("module.") for key in stage2["student"])  # unwrapped state dicts
    assert any(key.startswith("1.connectors.") for key in stage2["methods"])
    for name in ("student", "stage1_kd_methods", "stage2_kd+fitnet+crd_methods"):
        rank0, rank1 = (torch.load(ranks / f"rank{r}_{name}.pt", weights_only=True) for r in (0, 1))
        assert rank0.keys() == rank1.keys()
        for key in rank0:
            assert torch.equal(rank0[key], rank1[key]), (name, key)
    for key, value in stage2["student"].items():  # what rank 0 saved is what every rank trained
        assert torch.equal(value, torch.load(ranks / "rank0_student.pt", weights_only=True)[key]), key
    histogram = json.loads((run_dir / "tcp_weights.json").read_text())["counts"]
    assert sum(next(iter(histogram.values()))) == 96  # every training sample of both ranks counted once


def test_fused_loss_under_ddp_with_bf16_autocast(workdir):
    """smskd_loss on bf16 logits from autocast, student in DDP on 2 ranks: the all-reduced
    gradient is the same on both ranks and equals the float64 full-batch gradient to bf16
    accuracy. bf16 rounds the logits (|s| < 8 here) to 2^-9 relative, i.e. up to ~1.6e-2
    absolute; measured: loss 1.1e-3 relative, gradients 4e-3 absolute (max |grad| 0.79), so
    the tolerances below (1e-2 relative, 2e-2 absolute) keep a margin of about 5."""
    from distributed_loss_worker import LOSS_OPTIONS, models_and_batch

    from smskd_fast.loss.functional import smskd_loss

    out_dir = workdir / "bf16"
    out_dir.mkdir()
    torchrun(2, str(Path(__file__).resolve().parent / "distributed_loss_worker.py"), str(out_dir))
    ranks = [torch.load(out_dir / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert ranks[0]["dtype"] == "torch.bfloat16"
    for key in ("weight_grad", "bias_grad"):
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    (student, teacher, reference), inputs, target = models_and_batch()
    student, teacher, reference, inputs = student.double(), teacher.double(), reference.double(), inputs.double()
    expected = smskd_loss(student(inputs), target, teacher(inputs), reference(inputs), **LOSS_OPTIONS)
    expected.loss.backward()
    mean_loss = (ranks[0]["loss"] + ranks[1]["loss"]).double() / 2  # equal halves of the batch
    assert mean_loss.item() == pytest.approx(expected.loss.item(), rel=1e-2)
    torch.testing.assert_close(ranks[0]["weight_grad"].double(), student.weight.grad, rtol=0, atol=2e-2)
    torch.testing.assert_close(ranks[0]["bias_grad"].double(), student.bias.grad, rtol=0, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (host synchronisation is a GPU notion)")
def test_fused_loss_does_not_synchronise_the_host_on_cuda():
    """Forward and backward of smskd_loss (mean reduction, every term) issue no blocking
    device-to-host copy: torch's sync debug mode turns any into an error."""
    from smskd_fast.loss.functional import smskd_loss

    generator = torch.Generator(device="cuda").manual_seed(0)
    student = torch.randn(64, 100, device="cuda", generator=generator, requires_grad=True)
    teacher, reference = (torch.randn(64, 100, device="cuda", generator=generator) for _ in range(2))
    target = torch.randint(0, 100, (64,), device="cuda", generator=generator)
    target[:3] = -100
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for dtype in (torch.float32, torch.bfloat16):
            logits = student.detach().to(dtype).requires_grad_()
            output = smskd_loss(logits, target, teacher.to(dtype), reference.to(dtype))
            output.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert torch.isfinite(logits.grad.float()).all()


def test_two_ranks_with_logit_caches_train_like_two_ranks_without(workdir, teacher_file):
    """Rank 0 creates the teacher cache and each stage's reference cache, both ranks write their
    round-robin share of the shards, then each reads its rows; fp32 caches hold exactly the logits
    the models would compute, so the 2-rank run with caches ends with the weights of the 2-rank
    run without."""
    stages = [{"method": "kd", "epochs": 1}, {"method": "kd", "epochs": 2}]
    runs = {}
    for name, cache in (("plain", None), ("cached", {"teacher": {"dir": str(workdir / "ddp_teacher_cache"),
                                                                 "dtype": "float32", "shard_rows": 40},
                                                     "reference": {"dtype": "float32", "shard_rows": 40}})):
        raw = tiny_raw(teacher_file, stages)
        if cache:
            raw["cache"] = cache
        config = workdir / f"ddp_{name}.yaml"
        config.write_text(yaml.safe_dump(raw))
        run_dir = workdir / f"ddp_{name}_run"
        torchrun(2, str(WORKER), str(workdir / f"ddp_{name}_ranks"), "--", "train", "--config", str(config),
                 "--out", str(run_dir))
        runs[name] = run_dir
    assert len(list((workdir / "ddp_teacher_cache").glob("shard-*.npy"))) == 2 * 3
    assert len(list((runs["cached"] / "reference_cache" / "stage2").glob("shard-*.npy"))) == 2 * 3
    plain, cached = student_weights(runs["plain"]), student_weights(runs["cached"])
    for key in plain:
        assert torch.equal(plain[key], cached[key]), key
