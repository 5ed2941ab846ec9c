"""Multi-process training with torch.distributed: what the trainer needs under torchrun.

`torchrun --nproc_per_node=N -m smskd_fast train --config FILE` starts N processes
that each build a SMSKDTrainer. DistributedContext.from_environment reads torchrun's
RANK / WORLD_SIZE / LOCAL_RANK, starts the process group (NCCL on CUDA, one GPU per
process; gloo on the CPU) and gives the trainer narrow hooks:

- batches: every rank draws the same global permutation and the same augmentation of
  each global batch (the single-process code path, unchanged), and keeps its own
  contiguous shard of the batch; loss_scale makes DDP's gradient average equal the
  global-batch mean when the shards differ in size.
- wrap: DistributedDataParallel over the student *and* the stage's method modules
  (connectors, CRD heads) together, so all trainable parameters are all-reduced in
  one bucketed backward; the frozen teacher and reference are never wrapped.
- reduce_totals / evaluate / average_batchnorm_statistics: metrics summed over ranks,
  the test set sharded, and BatchNorm running statistics averaged once per epoch, so
  every rank holds the same model when it is evaluated and saved.
- is_main / barrier: only rank 0 writes files (atomically, through checkpoint.py and run_files.py); the others
  wait at a barrier where they would read what rank 0 wrote.

all_gather_rows, global_mean and shard_sizes serve methods whose state spans the
whole batch (CRD's memory bank). student_hidden_states serves fused_linear stages:
their loss projects the student's hidden states with its head inside
fused_linear_smskd_loss, so the hidden states must come through DDP's forward
(which arms the all-reduce of every parameter's gradient, the head's included);
count_loss_scale makes a mean over items that the ranks hold in different numbers
(tokens that are not ignore_index) average to the global mean. Without a process
group every hook is the identity, so single-process runs are unchanged bit for bit.
"""
from __future__ import annotations

import atexit
import gc
import inspect
import math
import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Tuple

import torch
import torch.distributed as dist
from torch import nn

from smskd_fast.training.data import augment, augmentation_draws, iterate_batches

__all__ = ["DistributedContext", "ShardedBatches", "shard_bounds", "is_distributed", "rank", "world_size",
           "shard_sizes", "all_gather_rows", "global_mean", "student_hidden_states", "count_loss_scale"]


def is_distributed() -> bool:
    """True inside a started process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def shard_bounds(count: int, shard: int, shards: int) -> Tuple[int, int]:
    """[start, stop) of shard `shard` when `count` rows are cut into `shards` contiguous
    pieces whose sizes differ by at most one (the first count % shards are one longer)."""
    base, extra = divmod(count, shards)
    start = shard * base + min(shard, extra)
    return start, start + base + (1 if shard < extra else 0)


def _collective_device() -> torch.device:
    """Where collective buffers live: the current GPU for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard_sizes(local_rows: int) -> List[int]:
    """Every rank's number of rows, in rank order ([local_rows] in a single process)."""
    if not is_distributed():
        return [local_rows]
    sizes = torch.tensor([local_rows], dtype=torch.int64, device=_collective_device())
    gathered = [torch.empty_like(sizes) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, sizes)
    return [int(size) for size in gathered]


def all_gather_rows(*tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """Each tensor's rows from every rank, concatenated in rank order (the global batch
    order, since shards are contiguous); rows may differ in number between ranks.
    Not differentiable: for state updates such as a memory bank."""
    if not is_distributed():
        return tensors
    sizes = shard_sizes(int(tensors[0].shape[0]))
    longest = max(sizes)
    gathered = []
    for tensor in tensors:
        padded = tensor.new_zeros((longest,) + tuple(tensor.shape[1:]))
        padded[:tensor.shape[0]] = tensor
        pieces = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(pieces, padded.contiguous())
        gathered.append(torch.cat([piece[:size] for piece, size in zip(pieces, sizes)]))
    return tuple(gathered)


def global_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over the elements of every rank (values.mean() in a single process)."""
    if not is_distributed():
        return values.mean()
    total = torch.stack([values.sum().to(torch.float64), torch.tensor(float(values.numel()), dtype=torch.float64,
                                                                       device=values.device)])
    dist.all_reduce(total)
    return (total[0] / total[1]).to(values.dtype)


def count_loss_scale(count: torch.Tensor) -> torch.Tensor:
    """Factor on this rank's mean over its `count` items (a tensor, e.g. the number of tokens that are
    not ignore_index) so that DDP's average over ranks of the gradients is the gradient of the mean
    over every rank's items: count * world size / total count (1 in a single process). A device
    tensor all the way: no host synchronisation."""
    if not is_distributed():
        return torch.ones((), dtype=torch.float64, device=count.device)
    total = count.detach().to(torch.float64).reshape(1).to(_collective_device())
    local = total.clone()
    dist.all_reduce(total)
    return (local * dist.get_world_size() / total.clamp(min=1)).reshape(()).to(count.device)


def student_hidden_states(forward: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The student's hidden_states(inputs) through `forward`, what DistributedContext.wrap returned:
    under DDP through its forward, so that the backward pass all-reduces the gradients of every
    parameter, the head's too (used by the loss after the forward); else the student's own method."""
    if isinstance(forward, nn.parallel.DistributedDataParallel):
        return forward(inputs, hidden_states=True)
    return forward.hidden_states(inputs)


class ShardedBatches:
    """One epoch of training batches for this rank.

    The global batches are exactly those of a single process (the order drawn from
    `generator`, each sample's augmentation from (seed, epoch, sample index)), so a run is replayable
    and independent of the number of ranks; this rank keeps the rows
    shard_bounds(global batch size, rank, world). A final global batch smaller than
    the world size is skipped (some rank would get no rows). global_size is the size
    of the global batch just yielded.
    """

    def __init__(self, dataset, batch_size: int, generator: torch.Generator, augment_kind: str,
                 crop_padding: int, shard: int = 0, shards: int = 1, *, seed: int = 0, epoch: int = 0):
        self.dataset, self.batch_size, self.generator = dataset, batch_size, generator
        self.augment_kind, self.crop_padding = augment_kind, crop_padding
        self.seed, self.epoch = seed, epoch  # each sample's view: augmentation_draws(seed, epoch, index)
        self.shard, self.shards = shard, shards
        self.global_size = 0

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for images, labels, indices in iterate_batches(self.dataset, self.batch_size, shuffle=True,
                                                       generator=self.generator):
            draws = augmentation_draws(self.seed, self.epoch, indices)
            images = augment(images, self.augment_kind, draws, self.crop_padding)
            count = int(labels.shape[0])
            if count < self.shards:
                continue
            start, stop = shard_bounds(count, self.shard, self.shards)
            self.global_size = count
            yield images[start:stop], labels[start:stop], indices[start:stop]

    def loss_scale(self, local_rows: int) -> float:
        """Factor on this rank's mean loss so that DDP's average over ranks of the gradients
        is the gradient of the global-batch mean (exactly 1.0 for equal shards)."""
        return local_rows * self.shards / self.global_size


def _items_per_sample(dataset) -> int:
    """How many items evaluation counts per sample: 1 (an image's label) or L (a window's tokens)."""
    return int(dataset.batch(torch.arange(1))[1].numel()) if len(dataset) else 0


class DatasetShard:
    """Rows [start, stop) of a data set, with the data set's interface (batch, len, normalize, ...)."""

    def __init__(self, dataset, start: int, stop: int):
        self.dataset, self.start, self.stop = dataset, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def batch(self, indices: torch.Tensor):
        return self.dataset.batch(indices + self.start)

    def __getattr__(self, name: str):
        return getattr(self.dataset, name)


# torch >= 2.14 names the option forward_sync_buffers (broadcast_buffers is deprecated there)
_NO_FORWARD_BUFFER_SYNC = ({"forward_sync_buffers": False}
                           if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
                           else {"broadcast_buffers": False})


class _TrainedModules(nn.Module):
    """The student and the stage's method modules as one module for DDP: its forward is the
    student's (or, with hidden_states=True, the student's hidden_states, for fused_linear stages),
    and the methods' parameters (used by their losses after the forward) get their gradients
    all-reduced in the same backward pass."""

    def __init__(self, student: nn.Module, methods: nn.Module):
        super().__init__()
        self.student, self.methods = student, methods

    def forward(self, inputs: torch.Tensor, hidden_states: bool = False) -> torch.Tensor:
        return self.student.hidden_states(inputs) if hidden_states else self.student(inputs)


@dataclass
class DistributedContext:
    """This process's place in the run (rank 0 of 1 without torchrun) and the trainer's hooks."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls, device: torch.device) -> Tuple["DistributedContext", torch.device]:
        """The context from torchrun's environment variables, and the device this rank uses.

        With WORLD_SIZE > 1 it starts the default process group (once per process): NCCL
        when the config's device is CUDA, and then this rank uses cuda:LOCAL_RANK; gloo on
        the CPU. Without torchrun (or with one process) nothing is started.
        """
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(), device
        rank_, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            if local >= torch.cuda.device_count():
                raise ValueError(f"LOCAL_RANK {local} has no GPU: this node has {torch.cuda.device_count()}; "
                                 "start at most one process per GPU (--nproc_per_node)")
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            atexit.register(_destroy_process_group)
        return cls(rank_, world, local), device

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that writes files and logs."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def batches(self, dataset, batch_size: int, generator: torch.Generator, augment_kind: str,
                crop_padding: int, seed: int, epoch: int) -> ShardedBatches:
        """This rank's shards of the epoch's global batches (batch_size is the global batch); the
        order comes from generator, each sample's augmentation from (seed, epoch, its index)."""
        return ShardedBatches(dataset, batch_size, generator, augment_kind, crop_padding, self.rank, self.world_size,
                              seed=seed, epoch=epoch)

    def wrap(self, student: nn.Module, methods: nn.Module, device: torch.device) -> nn.Module:
        """What the training step calls for the student's forward pass: the student itself in a
        single process, else DDP over the student and the methods (buffers are not broadcast:
        CRD's memory bank is kept equal by all_gather_rows, BatchNorm statistics are averaged
        by average_batchnorm_statistics)."""
        if not self.enabled:
            return student
        return nn.parallel.DistributedDataParallel(
            _TrainedModules(student, methods), device_ids=[device] if device.type == "cuda" else None,
            **_NO_FORWARD_BUFFER_SYNC)

    def reduce_totals(self, sums: Dict[str, float], *counts: int) -> Tuple[Dict[str, float], ...]:
        """Per-epoch sums and counts added over ranks (in float64)."""
        if not self.enabled:
            return (sums, *counts)
        values = torch.tensor(list(sums.values()) + [float(count) for count in counts], dtype=torch.float64,
                              device=_collective_device())
        dist.all_reduce(values)
        totals = values.tolist()
        return (dict(zip(sums, totals[:len(sums)])), *(int(round(count)) for count in totals[len(sums):]))

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sums `tensor` over ranks in place (e.g. the per-epoch TCP weight histogram)."""
        if self.enabled:
            buffer = tensor.to(_collective_device())
            dist.all_reduce(buffer)
            tensor.copy_(buffer)
        return tensor

    def evaluate(self, evaluate_fn: Callable[..., Dict[str, float]], model: nn.Module, dataset, batch_size: int,
                 device: torch.device) -> Dict[str, float]:
        """evaluate_fn (evaluation.evaluate: mean loss, accuracy in %, and perplexity for sequence data)
        on this rank's contiguous shard of `dataset`, combined over ranks into the whole data set's
        figures as one process computes them: accuracy from the total count of correct items,
        perplexity as exp of the whole data set's mean loss."""
        if not self.enabled:
            return evaluate_fn(model, dataset, batch_size, device)
        start, stop = shard_bounds(len(dataset), self.rank, self.world_size)
        local = evaluate_fn(model, DatasetShard(dataset, start, stop), batch_size, device)  # an empty shard gives 0s
        items = (stop - start) * _items_per_sample(dataset)
        totals, correct, count = self.reduce_totals({"loss": local["loss"] * items},
                                                    round(local["acc"] * items / 100.0), items)
        result = {"loss": totals["loss"] / max(count, 1), "acc": 100.0 * correct / max(count, 1)}
        if "perplexity" in local:
            result["perplexity"] = math.exp(result["loss"])
        return result

    def average_batchnorm_statistics(self, *modules: nn.Module) -> None:
        """Running means and variances of every BatchNorm layer averaged over ranks: each rank
        normalised its own shard in training, and the saved and evaluated model must be one."""
        if not self.enabled:
            return
        buffers = [buffer for module in modules for layer in module.modules()
                   if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.track_running_stats
                   for buffer in (layer.running_mean, layer.running_var)]
        if not buffers:
            return
        flat = torch.cat([buffer.detach().reshape(-1).to(torch.float64) for buffer in buffers])
        flat = flat.to(_collective_device())
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for buffer in buffers:
            buffer.copy_(flat[offset:offset + buffer.numel()].view_as(buffer))
            offset += buffer.numel()


def _destroy_process_group() -> None:
    """At exit, while the interpreter is whole: free unreachable DDP wrappers (their reducers
    hold the group), then the group itself, so no gloo/NCCL thread outlives Python."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
