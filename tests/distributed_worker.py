"""One rank of the distributed trainer tests, started by torchrun (tests/test_distributed.py).

    torchrun --nproc_per_node=N tests/distributed_worker.py CONFIG.yaml RUN_DIR [--resume] [--kill-rank R --kill-epoch E]

Trains like `smskd-fast train`, with two test-only additions: a BatchNorm-free student
"digits_mlp" (BatchNorm normalises each rank's shard by its own statistics, so only a
model without it can match a single-process run to rounding), and RUN_DIR/ranks/ holding
each rank's final student and per-stage method states, so that the test can check the
ranks agree. --kill-rank R --kill-epoch E makes rank R SIGKILL itself when it starts its
E-th epoch (1-based, counted in this process): a rank dying mid-stage.
"""
from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

import torch
from torch import nn

from smskd_fast.config import load_config
from smskd_fast.models import MODELS
from smskd_fast.stages import SMSKDTrainer


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config", type=Path)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill-rank", type=int)
    parser.add_argument("--kill-epoch", type=int)
    args = parser.parse_args()
    register_test_models()
    rank = int(os.environ.get("RANK", "0"))
    ranks_dir = args.run_dir / "ranks"
    ranks_dir.mkdir(parents=True, exist_ok=True)

    train_epoch, check_frozen = SMSKDTrainer._train_epoch, SMSKDTrainer._check_frozen
    epochs_started = [0]

    def train_epoch_or_die(self, *inputs):
        epochs_started[0] += 1
        if rank == args.kill_rank and epochs_started[0] == args.kill_epoch:
            os.kill(os.getpid(), signal.SIGKILL)
        return train_epoch(self, *inputs)

    def check_frozen_and_dump(self, state, name):
        torch.save(state.methods.state_dict(), ranks_dir / f"rank{rank}_{name}_methods.pt")
        return check_frozen(self, state, name)

    SMSKDTrainer._train_epoch, SMSKDTrainer._check_frozen = train_epoch_or_die, check_frozen_and_dump
    trainer = SMSKDTrainer(load_config(args.config), args.run_dir)
    trainer.run(resume=args.resume)
    torch.save(trainer.student.state_dict(), ranks_dir / f"rank{rank}_student.pt")


if __name__ == "__main__":
    main()
