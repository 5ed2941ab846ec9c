"""Triton's CPU interpreter taught to take a scalar kernel argument as a loop bound under NumPy >= 2.4.

The interpreter holds a scalar as a one-element array and, in triton 3.6 (torch 2.11's), gives Python an
index with int(array), which NumPy 2.4 refuses ("only 0-dimensional arrays can be converted to Python
scalars"): every column-block kernel, whose loop is range(0, num_classes, BLOCK_C), then failed under
TRITON_INTERPRET=1. Triton 3.8 squeezes the array first; with NumPy >= 2.4 this makes every version do so
(under 3.8 it sets the same conversion again, restored in order). Nothing changes on a GPU, where the
interpreter is not used.
"""
from __future__ import annotations

import numpy as np


def numpy_refuses_one_element_arrays() -> bool:
    """Whether int() of a one-element array with a dimension raises (NumPy >= 2.4)."""
    try:
        int(np.zeros(1))
    except TypeError:
        return True
    return False


def install() -> None:
    """Makes the interpreter's tensors convert to an index through a squeezed array (once), where NumPy
    refuses the interpreter's own int(array). An interpreter without the function this wraps is left as it is."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None or getattr(patch_tensor, "squeezes_index", False) or not numpy_refuses_one_element_arrays():
        return

    def patch_lang_tensor(tensor, scope) -> None:
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor.squeezes_index = True
    interpreter._patch_lang_tensor = patch_lang_tensor
