"""One rank of the DDP test of apply_smskd_loss (tests/test_huggingface_dropin.py).

    torchrun --nproc_per_node=2 tests/distributed_huggingface_worker.py OUT_DIR

The float64 tiny Llamas of test_huggingface_recipe (student, teacher, reference), the student
patched by apply_smskd_loss and wrapped in DDP; each rank takes its contiguous half of the batch
and, as transformers.Trainer does with average_tokens_across_devices, passes the global number of
real next tokens as num_items_in_batch and multiplies the loss by the world size (DDP averages).
Each rank saves its gradients in OUT_DIR/rank{R}.pt.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from smskd_fast.training.distributed import shard_bounds
from smskd_fast.huggingface import apply_smskd_loss
from test_huggingface_recipe import batch, tiny_llama

BATCH = 4


def main(out_dir: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    student, teacher, reference = tiny_llama(16, 0), tiny_llama(24, 1), tiny_llama(16, 2)
    apply_smskd_loss(student, teacher=teacher, reference=reference, temperature=2.0, chunk_size=5)
    model = torch.nn.parallel.DistributedDataParallel(student)
    inputs = batch(size=BATCH)
    real = (inputs["labels"][:, 1:] != -100).sum()
    start, stop = shard_bounds(BATCH, rank, world)
    shard = {key: value[start:stop] for key, value in inputs.items()}
    loss = model(**shard, num_items_in_batch=real).loss * world
    loss.backward()
    torch.save({name: p.grad for name, p in student.named_parameters()}, out_dir / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
