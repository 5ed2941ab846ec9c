"""One rank of the DDP test of fused_linear_smskd_loss (tests/test_fused_linear_distributed.py).

    torchrun --nproc_per_node=2 tests/distributed_fused_linear_worker.py OUT_DIR

A tiny causal LM student (float64) wrapped as the trainer wraps it
(DistributedContext.wrap), its hidden states taken through DDP's forward
(student_hidden_states), the teacher in the top-k form of a logit cache, a frozen
reference model: fused_linear_smskd_loss on this rank's contiguous shard of a fixed
batch, scaled by count_loss_scale (the shards hold different numbers of real,
non-ignored tokens), then backward, for each row backend. Each rank saves its
student's gradients in OUT_DIR/rank{R}.pt.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from smskd_fast.training.distributed import DistributedContext, count_loss_scale, shard_bounds, student_hidden_states
from smskd_fast.loss.fused_linear import fused_linear_smskd_loss
from smskd_fast.training.models import build_model
from smskd_fast.backends.topk import TopKTeacher

VOCAB, BATCH, LENGTH, TOP_K = 256, 6, 10, 8
BACKENDS = ("auto", "reference")
LOSS_OPTIONS = dict(temperature=2.0, ce_weight=0.5, kd_weight=0.7, ref_weight=1.0, weighting="inverse_tcp")


def models_and_batch():
    """The same float64 student, teacher, reference and batch on every rank (and in the test); rank 0's
    half of the batch has more ignored tokens (-100) than rank 1's."""
    models = []
    for seed, name in ((0, "tiny_lm_small"), (1, "tiny_lm_large"), (2, "tiny_lm_small")):
        torch.manual_seed(seed)
        models.append(build_model(name, VOCAB, 1).double())
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=generator)
    target = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=generator)
    target[0, :7] = -100
    target[1, ::3] = -100
    target[4, -1] = -100
    student, teacher, reference = models
    with torch.no_grad():
        topk = TopKTeacher.from_logits(teacher(tokens), target, TOP_K, LOSS_OPTIONS["temperature"])
    return (student, teacher.requires_grad_(False), reference.requires_grad_(False)), tokens, target, topk


def shard_of(topk: TopKTeacher, start: int, stop: int) -> TopKTeacher:
    return TopKTeacher(*(field[start:stop] for field in (topk.values, topk.indices, topk.true_logit,
                                                          topk.log_sum_exp, topk.log_sum_exp_at_temperature)))


def main(out_dir: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    (student, _, reference), tokens, target, topk = models_and_batch()
    start, stop = shard_bounds(BATCH, rank, world)
    tokens, target, topk = tokens[start:stop], target[start:stop], shard_of(topk, start, stop)
    wrapped = DistributedContext(rank, world, 0).wrap(student, nn.ModuleList(), torch.device("cpu"))
    saved = {}
    for backend in BACKENDS:
        student.zero_grad(set_to_none=True)
        hidden = student_hidden_states(wrapped, tokens)
        with torch.no_grad():
            reference_hidden = reference.hidden_states(tokens)
        out = fused_linear_smskd_loss(hidden, student.head.weight, target, reference_hidden=reference_hidden,
                                      reference_head_weight=reference.head.weight, teacher_topk=topk,
                                      backend=backend, chunk_size=7, **LOSS_OPTIONS)
        (out.loss * count_loss_scale((target != -100).sum())).backward()
        saved[backend] = {name: parameter.grad.clone() for name, parameter in student.named_parameters()}
    torch.save(saved, out_dir / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
