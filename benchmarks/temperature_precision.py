"""float32 precision of the KD term at high temperatures, against float64 and PyTorch's fp32 composition.

T^2 * KL(softmax(t/T) || softmax(s/T)) is, in any one-pass form, a difference of terms of size
~|logit|/T whose result is ~1/T^2 of them: float32's rounding shows from T ~ 100 on. Prints, per
temperature, the float64 reference and the relative error of the cpu backend (float32 inputs) and of
torch.nn.functional's float32 composition on the same values.

    PYTHONPATH=. python benchmarks/temperature_precision.py > benchmarks/results/temperature_precision.txt
"""
from __future__ import annotations

import datetime

import torch

import smskd_fast
from smskd_fast.provenance import git_commit

TEMPERATURES = (1.0, 4.0, 10.0, 100.0, 1e3, 1e4, 1e5)


def main() -> None:
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {git_commit()}, "
          f"torch {torch.__version__}, CPU; 64 x 1000 logits, 3 * randn, kd_loss mean")
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(64, 1000, generator=g) * 3, torch.randn(64, 1000, generator=g) * 3
    print("| T | float64 reference | cpu float32, relative error | torch fp32 composition, relative error |")
    print("|---:|---:|---:|---:|")
    for T in TEMPERATURES:
        want = smskd_fast.kd_loss(s.double(), t.double(), temperature=T, backend="reference").item()
        cpu = smskd_fast.kd_loss(s, t, temperature=T, backend="cpu").item()
        composed = (T * T * torch.nn.functional.kl_div(torch.log_softmax(s / T, -1), torch.log_softmax(t / T, -1),
                                                       log_target=True, reduction="batchmean")).item()
        print(f"| {T:g} | {want:.6g} | {cpu:.6g}, {abs(cpu / want - 1):.1e} | {composed:.6g}, "
              f"{abs(composed / want - 1):.1e} |")


if __name__ == "__main__":
    main()
