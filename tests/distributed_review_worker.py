"""Ranks of tests/test_distributed_review.py: gloo process groups of CPU processes started with spawn.

run_ranks(task, out) starts `world` processes that each set torchrun's variables, build the
DistributedContext with DistributedContext.from_environment and save task(context) to
out/rank<R>.pt; it returns the saved results in rank order. Tasks are functions of this
module, named, so that spawned processes import them.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch
import torch.multiprocessing as mp
from torch import nn

from smskd_fast.training.data import ImageSet, TokenSet
from smskd_fast.training.distributed import DistributedContext
from smskd_fast.training.evaluation import evaluate

JOIN_SECONDS = 120


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, task: str, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    context, _ = DistributedContext.from_environment(torch.device("cpu"))
    torch.save(TASKS[task](context), Path(out) / f"rank{rank}.pt")


def run_ranks(task: str, out: Path, world: int = 2) -> List[Any]:
    """task(context) on `world` gloo ranks; their results in rank order (fails after JOIN_SECONDS)."""
    processes = mp.start_processes(_rank_main, args=(world, _free_port(), task, str(out)), nprocs=world,
                                   join=False, start_method="spawn")
    for _ in range(JOIN_SECONDS):
        if processes.join(timeout=1):
            return [torch.load(Path(out) / f"rank{rank}.pt", weights_only=True) for rank in range(world)]
    for process in processes.processes:
        process.kill()
    raise TimeoutError(f"{task}: the ranks did not finish within {JOIN_SECONDS} s")


class LookupClassifier(nn.Module):
    """Image i (one pixel holding i) -> the class predicted[i], with logits 5 * one-hot."""

    def __init__(self, predicted: torch.Tensor, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("predicted", predicted)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        classes = self.predicted[images.reshape(images.shape[0]).round().long()]
        return 5.0 * nn.functional.one_hot(classes, self.num_classes).float()


class EchoLM(nn.Module):
    """Predicts that the next token repeats the current one: logits 8 * one-hot(token)."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return 8.0 * nn.functional.one_hot(tokens, 256).float()


ACCURACY_ROWS = 119  # ranks of 2 get 60 and 59 images


def accuracy_case():
    """A classifier right on 40 of rank 0's 60 images and 38 of rank 1's 59: the accuracies
    100 * 40 / 60 and 100 * 38 / 59, averaged back with the shard sizes, are not exactly
    100 * 78 / 119 in float64."""
    labels = torch.arange(ACCURACY_ROWS) % 10
    right = torch.zeros(ACCURACY_ROWS, dtype=torch.bool)
    right[:40] = True
    right[60:98] = True
    predicted = torch.where(right, labels, (labels + 1) % 10)
    images = torch.arange(ACCURACY_ROWS, dtype=torch.uint8).view(-1, 1, 1, 1)
    data = ImageSet(labels=labels, num_classes=10, mean=(0.0,), std=(1.0,), images=images, scale=1.0)
    return LookupClassifier(predicted, 10), data


def perplexity_case():
    """Text of 7 windows of 8 tokens: the first 4 repeat one byte (EchoLM is right and sure), the
    last 3 are random bytes (EchoLM is wrong and sure): the ranks' mean losses are far apart."""
    windows = torch.randint(0, 256, (7, 9), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    windows[:4] = torch.arange(4, dtype=torch.uint8)[:, None] + 65
    return EchoLM(), TokenSet(windows)


def evaluate_accuracy_case(context: DistributedContext) -> Dict[str, float]:
    model, data = accuracy_case()
    return context.evaluate(evaluate, model, data, 16, torch.device("cpu"))


def evaluate_perplexity_case(context: DistributedContext) -> Dict[str, float]:
    model, data = perplexity_case()
    return context.evaluate(evaluate, model, data, 2, torch.device("cpu"))


TASKS: Dict[str, Callable[[DistributedContext], Any]] = {
    "evaluate_accuracy_case": evaluate_accuracy_case,
    "evaluate_perplexity_case": evaluate_perplexity_case,
}
