"""Triton's interpreter takes a scalar kernel argument (a one-element array) as a loop bound under NumPy >= 2.4
(smskd_fast/backends/triton/interpreter_index.py). Without it, triton 3.6 (torch 2.11's) failed every
column-block case with "only 0-dimensional arrays can be converted to Python scalars"; the conformance suite
runs those kernels under the interpreter (test_backend_conformance.py, C > 4096)."""
import numpy as np
import pytest

interpreter = pytest.importorskip("triton.runtime.interpreter")
interpreter_index = pytest.importorskip("smskd_fast.backends.triton.interpreter_index")


class ScalarArgument:
    """Stands in for triton.language.tensor holding a scalar as the interpreter does: handle.data, one element."""

    def __init__(self, value: int):
        self.handle = type("Handle", (), {"data": np.array([value], dtype=np.int32)})()


def patch_lang_tensor_of_triton_3_6(tensor, scope) -> None:
    """triton 3.6's conversion of an interpreted tensor to an index (3.8 squeezes the array first)."""
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))


@pytest.fixture
def patched_tensor_class(monkeypatch):
    """ScalarArgument with the index conversion of triton 3.6's interpreter, then the shim, as _patch_lang sets
    them for one kernel call (so the test means the same under CI's triton 3.8)."""
    monkeypatch.setattr(interpreter, "_patch_lang_tensor", patch_lang_tensor_of_triton_3_6)
    interpreter_index.install()
    scope = interpreter._LangPatchScope()
    interpreter._patch_lang_tensor(ScalarArgument, scope)
    yield ScalarArgument
    scope.restore()
    assert not hasattr(ScalarArgument, "__index__"), "the interpreter's restore left a patched __index__"


def test_the_shim_is_installed_where_numpy_refuses_the_interpreters_conversion():
    interpreter_index.install()
    refuses = interpreter_index.numpy_refuses_one_element_arrays()
    assert refuses == (tuple(int(p) for p in np.__version__.split(".")[:2]) >= (2, 4))
    assert getattr(interpreter._patch_lang_tensor, "squeezes_index", False) == refuses


def test_installing_twice_wraps_once():
    interpreter_index.install()
    first = interpreter._patch_lang_tensor
    interpreter_index.install()
    assert interpreter._patch_lang_tensor is first


def test_a_scalar_argument_bounds_a_column_loop(patched_tensor_class):
    num_classes = patched_tensor_class(4100)
    assert list(range(0, num_classes, 2048)) == [0, 2048, 4096]
    assert [0, 1, 2, 3][patched_tensor_class(2)] == 2
