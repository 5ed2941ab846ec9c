"""The triton ops traced with symbolic sizes, as torch.compile(dynamic=True) and opcheck's
test_aot_dispatch_dynamic trace them, without a GPU.

AOTAutograd decomposes a torch.library.triton_op into its body under
FunctionalTensorMode, on fake tensors whose sizes are SymInts, so the launch code
picks block sizes, warps and grids from a symbolic C and N. On an H200 this failed
with "unhashable type: non-nested SymInt" (issue 15) while CI's interpreter runs,
which launch the kernels directly, passed. Here the same trace runs on fake tensors
(FakeTensorMode with a ShapeEnv): fake CUDA tensors need no device for the forward
pass; the joint forward-backward graph runs on fake CPU tensors (autograd's engine
wants a real device for CUDA ones). Oracle: the launch tables (tile_config,
online_config, topk_config) at the sizes' hints, and the ShapeEnv's guards.
"""
from __future__ import annotations

import pytest
import sympy
import torch
from torch._dynamo.source import ConstantSource
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

from smskd_fast.backends.triton import backend as triton_backend

if not hasattr(torch.ops.smskd_fast, "smskd_loss_rows_triton"):
    pytest.skip("triton is not importable, so there are no triton ops to trace", allow_module_level=True)
if triton_backend.kernels_interpreted():
    pytest.skip("interpreted kernels are launched directly, not traced (TRITON_INTERPRET=1)", allow_module_level=True)

from functorch.compile import aot_function, make_boxed_func  # noqa: E402

from smskd_fast.backends.triton import launch as triton_launch
from smskd_fast.backends.triton import topk_launch as triton_topk_launch  # noqa: E402

N, K = 4, 8
SCALARS = (2.0, 0.5, 1.0, 0.7, "inverse_tcp", -100, True)


class SymbolicInputs:
    """Fake tensors of N x C rows whose N and C are the ShapeEnv's symbols (hints N and C)."""

    def __init__(self, num_classes: int, device: str):
        self.shape_env = ShapeEnv()
        self.mode = FakeTensorMode(shape_env=self.shape_env)
        self.rows = self.symbol(N, "N")
        self.classes = self.symbol(num_classes, "C")
        self.device = device

    def symbol(self, hint: int, name: str) -> torch.SymInt:
        expr = self.shape_env.create_symbol(hint, source=ConstantSource(name), dynamic_dim=DimDynamic.DYNAMIC)
        return self.shape_env.create_symintnode(expr, hint=hint)

    def empty(self, *sizes, dtype=torch.float32) -> torch.Tensor:
        with self.mode:
            return torch.empty(*sizes, dtype=dtype, device=self.device)

    def pinned_classes(self) -> list:
        """The guards that fix C to one value (a recompile per vocabulary size); ranges and divisibility are fine."""
        c = self.classes.node.expr
        pinned = [guard.expr for guard in self.shape_env.guards if isinstance(guard.expr, sympy.Eq)
                  and c in (guard.expr.lhs, guard.expr.rhs) and (guard.expr.lhs.is_number or guard.expr.rhs.is_number)]
        replaced = self.shape_env.replacements.get(c)
        return pinned + ([] if replaced is None or not replaced.is_number else [sympy.Eq(c, replaced)])


def trace(op, inputs: SymbolicInputs, args, backward: bool, grad_scale: bool = False):
    """The forward (and backward) graphs AOTAutograd traces for op(*args).loss.sum(), dynamic=True;
    with grad_scale, the last of args is the op's grad_scale (after the scalars)."""
    graphs = []

    def keep(graph, example_inputs):
        graphs.append(graph)
        return make_boxed_func(graph)

    def loss(*tensors):
        if grad_scale:
            return op(*tensors[:-1], *SCALARS, tensors[-1])[0].sum()
        return op(*tensors, *SCALARS)[0].sum()

    compiled = aot_function(loss, fw_compiler=keep, bw_compiler=keep, dynamic=True)
    with inputs.mode:
        out = compiled(*args)
        if backward:
            out.backward()
    return graphs


def kernel_launches(graph) -> dict:
    """{kernel name: [kwargs of each launch, in order]} of the graph's triton_kernel_wrapper_functional nodes."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    launches = {}
    for node in graph.graph.nodes:
        if node.target is torch.ops.higher_order.triton_kernel_wrapper_functional:
            kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
            launches.setdefault(kernel.fn.__name__, []).append(node.kwargs["kwargs"])
    return launches


def check_graphs(graphs, inputs: SymbolicInputs, kernel: str, constexprs: dict, backward: bool,
                 grad_scale: bool = False, passes: tuple = ({},)) -> None:
    """passes: the constexprs each launch of kernel has besides constexprs (the first's), one dict per launch."""
    assert len(graphs) == (2 if backward else 1)
    launches = kernel_launches(graphs[0])
    assert set(launches) == {"_check_targets_kernel", kernel}
    assert len(launches[kernel]) == len(passes)
    for index, (got, own) in enumerate(zip(launches[kernel], passes)):
        assert got["HAS_GRAD_SCALE"] is grad_scale
        if grad_scale and index == 0:  # it reads the graph's grad_scale input (a 0-d fp32 tensor), not the stand-in
            scale = got["grad_scale_ptr"]
            assert scale.op == "placeholder" and scale.meta["val"].shape == () and scale.meta["val"].dtype == torch.float32
        # the launch table's choice at the hint, as Python ints
        for name, value in (constexprs if index == 0 else {}).items() | own.items():
            assert type(got[name]) is type(value) and got[name] == value, (name, got[name], value)
        classes = got["num_classes"]  # C stays a symbol in the graph ...
        assert isinstance(classes, torch.fx.Node) and isinstance(classes.meta["val"], torch.SymInt), classes
    assert inputs.pinned_classes() == []  # ... and no guard fixes it


@pytest.mark.parametrize("grad_scale", [False, True], ids=["no_grad_scale", "grad_scale"])
@pytest.mark.parametrize("num_classes", [100, 5000])  # the tile kernel; the online kernel (C > TILE_MAX_C)
@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_dense_op_traces_with_symbolic_sizes(num_classes, device, grad_scale):
    inputs = SymbolicInputs(num_classes, device)
    n, c = inputs.rows, inputs.classes
    student = inputs.empty(n, c).requires_grad_(device == "cpu")
    args = (student, inputs.empty(n, dtype=torch.int64), inputs.empty(n, c), inputs.empty(n, c))
    args += (inputs.empty(()),) if grad_scale else ()
    graphs = trace(torch.ops.smskd_fast.smskd_loss_rows_triton, inputs, args, backward=device == "cpu",
                   grad_scale=grad_scale)
    row_align = triton_launch.row_alignment(num_classes)  # rows of C, contiguous, at offset 0
    if num_classes <= triton_launch.TILE_MAX_C:
        tile = triton_launch.tile_config(num_classes)
        check_graphs(graphs, inputs, "_smskd_rows_tile_kernel",
                     {"ROWS": tile.rows, "BLOCK_C": tile.block_c, "ROW_ALIGN": row_align}, device == "cpu", grad_scale)
    else:
        online = triton_launch.online_config(num_classes)
        check_graphs(graphs, inputs, "_smskd_rows_online_kernel",
                     {"BLOCK_C": online.block_c, "MAXIMA_COLUMNS": online.maxima_columns, "ROW_ALIGN": row_align},
                     device == "cpu", grad_scale)


@pytest.mark.parametrize("grad_scale", [False, True], ids=["no_grad_scale", "grad_scale"])
@pytest.mark.parametrize("num_classes", [100, 5000])  # the row in registers; column blocks
@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_topk_op_traces_with_symbolic_sizes(num_classes, device, grad_scale):
    inputs = SymbolicInputs(num_classes, device)
    n, c = inputs.rows, inputs.classes
    student = inputs.empty(n, c).requires_grad_(device == "cpu")
    args = (student, inputs.empty(n, dtype=torch.int64), inputs.empty(n, K), inputs.empty(n, K, dtype=torch.int64),
            inputs.empty(n), inputs.empty(n), inputs.empty(n), inputs.empty(n, c))
    args += (inputs.empty(()),) if grad_scale else ()
    graphs = trace(torch.ops.smskd_fast.smskd_loss_rows_topk_triton, inputs, args, backward=device == "cpu",
                   grad_scale=grad_scale)
    config = triton_topk_launch.topk_config(num_classes)
    exact_rest = triton_topk_launch.EXACT_REST_CONFIG
    check_graphs(graphs, inputs, "_smskd_topk_rows_kernel",
                 {"BLOCK_C": config.block_c, "WHOLE_ROW": config.whole_row}, device == "cpu", grad_scale,
                 passes=({"EXACT_REST": False},  # the rows, then the exact-rest pass over those the first flagged
                         {"EXACT_REST": True, "BLOCK_C": exact_rest.block_c, "WHOLE_ROW": False}))


def test_launch_tables_take_symbolic_sizes():
    """The table lookups give the ints they give for plain ints, guarding C to its power-of-two bucket only."""
    for num_classes in (2, 16, 17, 100, 1024, 1025, 4096, 4097):
        inputs = SymbolicInputs(num_classes, "cpu")
        assert triton_launch.tile_config(inputs.classes) == triton_launch.tile_config(num_classes)
        assert triton_topk_launch.topk_config(inputs.classes) == triton_topk_launch.topk_config(num_classes)
        assert inputs.pinned_classes() == []


def test_row_alignment_of_symbolic_storage_offsets():
    """ROW_ALIGN reads the logits' storage offsets: a backed symbolic offset gives the alignment of its hint
    (guarded), a data-dependent one (unbacked: a slice at a tensor's .item()) counts as unaligned (1)
    instead of failing the trace with a data-dependent guard."""
    inputs = SymbolicInputs(32000, "cpu")
    c = inputs.classes
    offset = inputs.symbol(24, "OFFSET")
    with inputs.mode:
        flat = torch.empty(inputs.rows * c + offset, dtype=torch.bfloat16)
        backed = flat.as_strided((inputs.rows, c), (c, 1), offset)
        assert triton_launch.logits_row_alignment(c, (backed, None)) == 8
        unbacked_offset = inputs.shape_env.create_unbacked_symint()
        torch._check(unbacked_offset >= 0)
        unbacked = flat.as_strided((inputs.rows, c), (c, 1), unbacked_offset)
        assert triton_launch.logits_row_alignment(c, (backed, unbacked)) == 1
