"""One rank of the DDP + bf16 autocast test of the fused loss (tests/test_distributed.py).

    torchrun --nproc_per_node=2 tests/distributed_loss_worker.py OUT_DIR

A linear student wrapped in DDP and a frozen teacher and reference produce bf16 logits
under torch.autocast("cpu", bfloat16) for this rank's half of a fixed batch; smskd_loss
runs on them and the backward pass all-reduces the student's gradient. Each rank saves
its loss and the gradient it ends with in OUT_DIR/rank{R}.pt.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from smskd_fast.training.distributed import shard_bounds
from smskd_fast.loss.functional import smskd_loss

BATCH, FEATURES, CLASSES = 12, 16, 10
LOSS_OPTIONS = dict(temperature=2.0, ce_weight=0.5, kd_weight=0.5, ref_weight=1.0, weighting="inverse_tcp")


def models_and_batch():
    """The same student, teacher, reference and batch on every rank (and in the test)."""
    generator = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(3):
        layer = nn.Linear(FEATURES, CLASSES)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(CLASSES, FEATURES, generator=generator))
            layer.bias.copy_(torch.randn(CLASSES, generator=generator))
        layers.append(layer)
    inputs = torch.randn(BATCH, FEATURES, generator=generator)
    target = torch.randint(0, CLASSES, (BATCH,), generator=generator)
    return layers, inputs, target


def main(out_dir: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    (student, teacher, reference), inputs, target = models_and_batch()
    for frozen in (teacher, reference):
        frozen.requires_grad_(False)
    start, stop = shard_bounds(BATCH, rank, world)
    model = nn.parallel.DistributedDataParallel(student)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        student_logits = model(inputs[start:stop])
        teacher_logits, reference_logits = teacher(inputs[start:stop]), reference(inputs[start:stop])
        output = smskd_loss(student_logits, target[start:stop], teacher_logits, reference_logits, **LOSS_OPTIONS)
    output.loss.backward()
    torch.save({"dtype": str(student_logits.dtype), "loss": output.loss.detach().float(),
                "weight_grad": student.weight.grad, "bias_grad": student.bias.grad}, out_dir / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
