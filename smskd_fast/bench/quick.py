"""A short side-by-side timing of the loss backends: `python -m smskd_fast.bench.quick`.

Times forward plus backward of the full SMSKD loss (CE + KD + TCP-weighted
reference term) for every available backend on this machine's device, next to
the eager composition of torch.nn.functional calls that computes the same loss,
and prints a table of medians and speed-ups. For the full benchmark grid see
benchmarks/.
"""
from __future__ import annotations

import argparse
import statistics
from typing import Callable, List, Sequence, Tuple

import torch

from smskd_fast.backends import available_backends
from smskd_fast.bench.harness import (eager_smskd_loss, environment, fused_smskd_loss, interleaved_seconds,
                                      positive_int)

DEFAULT_SHAPES = ((4096, 100), (1024, 1000), (256, 32000))


def parse_device(text: str) -> torch.device:
    """argparse type of --device: cpu, or cuda / cuda:N when a CUDA device is visible."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device is visible")
    return device


def backends_for(device: torch.device) -> List[str]:
    """The available backends that run on device (any index): not the CUDA kernel on the CPU,
    not the C++ CPU kernel on a GPU."""
    foreign = "cuda" if device.type == "cpu" else "cpu"
    return [name for name, status in available_backends().items() if status and name != foreign]


def timed_step(loss_fn: Callable[[], torch.Tensor], student: torch.Tensor, device: torch.device) -> Callable[[], None]:
    """One forward+backward, the gradient reset before it; on CUDA it waits for the device, so that
    the wall time is the kernels', not their launches'."""
    def step() -> None:
        student.grad = None
        loss_fn().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return step


def time_shape(n: int, c: int, dtype: torch.dtype, device: torch.device, repeats: int) -> List[Tuple[str, float]]:
    """(method, median seconds of forward+backward) for the eager composition and each backend.

    The eager baseline and the timing are benchmarking's, the ones benchmarks/ uses."""
    generator = torch.Generator().manual_seed(0)
    student, teacher, reference = (torch.randn(n, c, generator=generator).to(device, dtype) for _ in range(3))
    target = torch.randint(0, c, (n,), generator=generator).to(device)
    student.requires_grad_(True)
    steps = {"eager torch.nn.functional": timed_step(lambda: eager_smskd_loss(student, target, teacher, reference),
                                                     student, device)}
    for name in backends_for(device):
        steps[f"smskd_fast[{name}]"] = timed_step(
            lambda name=name: fused_smskd_loss(student, target, teacher, reference, backend=name), student, device)
    return [(method, statistics.median(times)) for method, times in interleaved_seconds(steps, repeats).items()]


def format_table(results: Sequence[Tuple[Tuple[int, int], List[Tuple[str, float]]]], dtype, device) -> str:
    """The Markdown table, under a line saying where, when and with which versions it was measured."""
    where = environment(str(device))
    lines = [f"forward+backward of the SMSKD loss, {dtype}, device={device} (median; speed-up vs eager)",
             f"{where['device_name']}, torch {where['torch']}, triton {where['triton']}, "
             f"{where['torch_threads']} torch threads, commit {where['commit']}, {where['date']}",
             "",
             f"| {'(N, C)':<14} | {'method':<28} | {'ms':>9} | {'vs eager':>8} |",
             f"|{'-' * 16}|{'-' * 30}|{'-' * 11}|{'-' * 10}|"]
    for (n, c), rows in results:
        eager = rows[0][1]
        for method, seconds in rows:
            lines.append(f"| {str((n, c)):<14} | {method:<28} | {seconds * 1e3:>9.2f} | {eager / seconds:>7.2f}x |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="smskd-fast bench", description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", type=parse_device, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda when visible)")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed rounds per shape (default 5)")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    print("backends:", {name: status.available for name, status in available_backends().items()})
    results = [((n, c), time_shape(n, c, dtype, args.device, args.repeats)) for n, c in DEFAULT_SHAPES]
    print(format_table(results, dtype, args.device))


if __name__ == "__main__":
    main()
