"""Small top-k cases through the CUDA kernel, for compute-sanitizer (memcheck, racecheck).

Run it as benchmarks/gpu/cuda_checks.sh does, with PyTorch's caching allocator off
so that memcheck sees every allocation's true bounds:

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 9 \\
        python benchmarks/gpu/topk_sanitizer_case.py

Covers every row layout (C from 7 to 40000), the three dtypes in turn, with and without
target and reference, k = 1 / k > threads per row / k = C, misaligned and padded
rows, no gradient, and out-of-range and duplicate indices (clamped, never a fault).
Values are checked by tests/test_cuda_topk.py; this only has to run clean.
"""
from __future__ import annotations

import itertools

import torch

import smskd_fast  # noqa: F401  (loads the operators)
from smskd_fast.backends.topk import TopKTeacher
from smskd_fast.ops.extension import require_extension

require_extension()
OP = torch.ops.smskd_fast.smskd_loss_rows_topk


def case(n, c, k, dtype, *, target, reference, pad, compute_grad=True, bad_indices=False):
    g = torch.Generator(device="cuda").manual_seed(c + k)
    wide = lambda: (3 * torch.randn(n, c + pad, generator=g, device="cuda")).to(dtype)[:, pad:]  # noqa: E731
    student = wide()
    y = torch.randint(0, c, (n,), generator=g, device="cuda")
    y[::3] = -100
    topk = TopKTeacher.from_logits(torch.randn(n, c, generator=g, device="cuda"), y, k, 2.0)
    indices = topk.indices
    if bad_indices:
        indices = indices.clone()
        indices[:, 0] = c + 5
        indices[:, -1] = -3
        indices[1] = 0  # all duplicates
    out = OP(student, y if target else None, topk.values, indices, topk.true_logit, topk.log_sum_exp,
             topk.log_sum_exp_at_temperature, wide() if reference else None, 2.0, 0.5, 1.0, 0.7, "inverse_tcp",
             -100, compute_grad)
    torch.cuda.synchronize()
    return out


def main() -> None:
    count = 0
    dtypes = itertools.cycle((torch.float32, torch.bfloat16, torch.float16))
    for c, (target, reference), pad in itertools.product((7, 100, 513, 2049, 5003, 40000),
                                                         ((True, True), (False, False)), (0, 1)):
        dtype = next(dtypes)
        for k in sorted({1, min(c, 40), c if c <= 513 else 300}):
            case(6, c, k, dtype, target=target, reference=reference, pad=pad)
            count += 1
    case(5, 3000, 20, torch.bfloat16, target=True, reference=True, pad=3, compute_grad=False)
    case(5, 3000, 20, torch.float32, target=True, reference=True, pad=0, bad_indices=True)
    case(5, 60, 8, torch.float32, target=False, reference=True, pad=0, bad_indices=True)
    print(f"top-k sanitizer cases ran: {count + 3}")


if __name__ == "__main__":
    main()
