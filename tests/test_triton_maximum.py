"""The Triton kernels' maxima propagate NaN (kernels._maximum, kernels._max), as torch.amax does.

tl.maximum and tl.max skip a NaN on a GPU (PTX max.f32): a row holding a NaN and a +inf then had the maximum
+inf and CE +inf, not NaN (tests/test_non_finite.py's two-value cases). Under the interpreter the reduction
runs as np.max (smskd_fast/backends/triton/interpreter_reductions.py); it is checked here against the
interpreter's own element-by-element fold of kernels._maximum, and both against torch.amax.
"""
from __future__ import annotations

import pytest
import torch

from triton_interpreter import DEVICE, INTERPRETED, needs_kernels, reruns_under_interpreter, run_under_interpreter

try:
    import triton
    import triton.language as tl

    from smskd_fast.backends.triton import kernels
except ImportError:  # the cases skip (needs_kernels); triton is optional
    triton = None

if triton is not None:
    @triton.jit
    def _maxima_kernel(x_ptr, pair_ptr, rows_ptr, all_ptr, ROWS: tl.constexpr, COLS: tl.constexpr):
        """Of a [ROWS, COLS] tile: _maximum of its two column halves, _max per row and _max of it all."""
        rows = tl.arange(0, ROWS)[:, None]
        half = tl.arange(0, COLS // 2)[None, :]
        left = tl.load(x_ptr + rows * COLS + half)
        right = tl.load(x_ptr + rows * COLS + COLS // 2 + half)
        tl.store(pair_ptr + rows * (COLS // 2) + half, kernels._maximum(left, right))
        x = tl.load(x_ptr + rows * COLS + tl.arange(0, COLS)[None, :])
        tl.store(rows_ptr + tl.arange(0, ROWS), kernels._max(x, 1))
        tl.store(all_ptr, kernels._max(x))


def tile_with_non_finite_values(seed):
    """8 x 16 logits, where each row holds a different mix of NaN, +inf and -inf (row 0 none, row 7 all -inf)."""
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(seed))
    nan, inf = float("nan"), float("inf")
    x[1, 3] = nan
    x[2, 12] = inf
    x[3, 3], x[3, 12] = nan, inf
    x[4, 12], x[4, 3] = nan, inf
    x[5, 0], x[5, 8] = -inf, nan
    x[6, :] = nan
    x[7, :] = -inf
    return x


def maxima(x):
    pair = torch.empty(8, 8, device=DEVICE)
    rows = torch.empty(8, device=DEVICE)
    whole = torch.empty(1, device=DEVICE)
    _maxima_kernel[(1,)](x.to(DEVICE), pair, rows, whole, ROWS=8, COLS=16)
    return pair.cpu(), rows.cpu(), whole.cpu()


def assert_maxima_of(x, got):
    pair, rows, whole = got
    want = (torch.maximum(x[:, :8], x[:, 8:]), torch.amax(x, 1), torch.amax(x).reshape(1))
    for g, w in zip((pair, rows, whole), want):
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)


@needs_kernels
@pytest.mark.parametrize("seed", [0, 1])
def test_maxima_propagate_nan_as_torch_amax_does(seed):
    x = tile_with_non_finite_values(seed)
    assert_maxima_of(x, maxima(x))


@needs_kernels
@pytest.mark.skipif(not INTERPRETED, reason="checks the interpreter's np.max shortcut; on a GPU the kernel compiles")
def test_the_interpreter_shortcut_gives_what_its_own_fold_gives(monkeypatch):
    from triton.runtime.interpreter import ReduceOps

    assert getattr(ReduceOps.apply_impl, "knows_nan_maximum", False), "the shortcut is not installed"
    x = tile_with_non_finite_values(2)
    shortcut = maxima(x)
    monkeypatch.setattr(ReduceOps, "apply_impl", ReduceOps.apply_impl.generic)
    folded = maxima(x)
    for a, b in zip(shortcut, folded):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert_maxima_of(x, folded)


@reruns_under_interpreter
def test_cases_under_the_interpreter():
    """Runs this file's cases under TRITON_INTERPRET=1 in a fresh interpreter (tests/triton_interpreter.py)."""
    run_under_interpreter(__file__)
