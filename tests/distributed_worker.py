"""One rank of the distributed trainer tests, started by torchrun (tests/test_distributed.py).

    torchrun --nproc_per_node=N tests/distributed_worker.py RANKS_DIR [--kill-rank R --kill-epoch E]
        [--nan-rank R --nan-step S] -- CLI ARGS

Runs `smskd-fast CLI ARGS` (e.g. `train --config F --out D`) with two test-only additions:
a BatchNorm-free student "digits_mlp" (BatchNorm normalises each rank's shard by its own
statistics, so only a model without it can match a single-process run to rounding), and
RANKS_DIR holding each rank's final student and per-stage method states, so that the
test can check that the ranks agree. --kill-rank R --kill-epoch E makes rank R SIGKILL
itself when it starts its E-th epoch (1-based, counted in this process): a rank dying
mid-stage. --nan-rank R --nan-step S makes the student's input NaN on rank R's S-th training
step (1-based, counted in this process; 0: every step): a non-finite loss on one rank only.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import torch
from torch import nn

from smskd_fast import cli
from smskd_fast.training.models import MODELS
from smskd_fast.training.trainer import SMSKDTrainer


class DigitsMLP(nn.Module):
    """8x8 digits -> 32 hidden units -> classes; "act" is its embedding (for CRD)."""

    stage_names = ("act",)
    embedding_name = "act"

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.flatten = nn.Flatten()
        self.hidden = nn.Linear(in_channels * 64, 32)
        self.act = nn.ReLU()
        self.out = nn.Linear(32, num_classes)

    def forward(self, images):
        return self.out(self.act(self.hidden(self.flatten(images))))


def register_test_models() -> None:
    MODELS["digits_mlp"] = DigitsMLP


def poison_training_step(student: nn.Module, step: int) -> None:
    """Makes the student's input NaN on its `step`-th forward pass in training mode (1-based; 0: every one)."""
    calls = [0]

    def hook(module, inputs):
        if not module.training:  # probe batches and evaluation
            return None
        calls[0] += 1
        return (inputs[0] * float("nan"),) if step in (0, calls[0]) else None

    student.register_forward_pre_hook(hook)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("ranks_dir", type=Path)
    parser.add_argument("--kill-rank", type=int)
    parser.add_argument("--kill-epoch", type=int)
    parser.add_argument("--nan-rank", type=int)
    parser.add_argument("--nan-step", type=int)
    separator = sys.argv.index("--")
    args, cli_args = parser.parse_args(sys.argv[1:separator]), sys.argv[separator + 1:]
    register_test_models()
    rank = int(os.environ.get("RANK", "0"))
    args.ranks_dir.mkdir(parents=True, exist_ok=True)

    run, train_epoch, finish_stage = SMSKDTrainer.run, SMSKDTrainer._train_epoch, SMSKDTrainer._finish_stage
    epochs_started = [0]

    def train_epoch_or_die(self, *inputs):
        epochs_started[0] += 1
        if rank == args.kill_rank and epochs_started[0] == args.kill_epoch:
            os.kill(os.getpid(), signal.SIGKILL)
        return train_epoch(self, *inputs)

    def finish_stage_and_dump(self, index, state):
        name = self.stage_names[index]
        torch.save(state.methods.state_dict(), args.ranks_dir / f"rank{rank}_{name}_methods.pt")
        return finish_stage(self, index, state)

    def run_and_dump(self, *inputs, **options):
        if rank == args.nan_rank:
            poison_training_step(self.student, args.nan_step)
        summary = run(self, *inputs, **options)
        torch.save(self.student.state_dict(), args.ranks_dir / f"rank{rank}_student.pt")
        return summary

    SMSKDTrainer.run, SMSKDTrainer._train_epoch = run_and_dump, train_epoch_or_die
    SMSKDTrainer._finish_stage = finish_stage_and_dump
    return cli.main(cli_args)


if __name__ == "__main__":
    sys.exit(main())
