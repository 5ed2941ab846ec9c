"""Triton's CPU interpreter taught that kernels._max is one NumPy reduction, np.max.

The interpreter (TRITON_INTERPRET=1) runs tl.max, tl.min and tl.sum as NumPy reductions but folds any
other combine function element by element in Python. kernels._max reduces with kernels._maximum, the
NaN-propagating maximum, and so made every interpreted kernel about ten times slower (the tests run the
kernels this way). np.max is the same reduction: it propagates NaN, as PTX max.NaN does. Nothing changes
on a GPU, where the interpreter is not used.
"""
from __future__ import annotations

import numpy as np

from smskd_fast.backends.triton import kernels


def install() -> None:
    """Makes the interpreter reduce with np.max where the combine function is kernels._maximum (once). An
    interpreter without the reduction class or method this patches keeps its own fold: slower, as right."""
    try:
        from triton.runtime.interpreter import ReduceOps
    except ImportError:
        return
    generic_apply = getattr(ReduceOps, "apply_impl", None)
    if generic_apply is None or not hasattr(ReduceOps, "min_max") or getattr(generic_apply, "knows_nan_maximum", False):
        return

    def apply_impl(self, input):
        if self.combine_fn is kernels._maximum:
            return self.min_max(input[0], val_reduce_op=np.max)
        return generic_apply(self, input)

    apply_impl.knows_nan_maximum = True
    apply_impl.generic = generic_apply  # the interpreter's own fold, for tests/test_triton_maximum.py
    ReduceOps.apply_impl = apply_impl
