"""torch.func.vmap of the fused ops (smskd_fast/ops/vmap_rules.py): one op call on the batch's rows.

Oracles: the op called sample by sample (what vmap's fallback ran before the rule), the same bits
for every per-row and reduced output; the gradient it returns to one rounding where the rule scales
it per sample after the call (a batched grad_scale, or a mean whose samples count different valid
rows); and, through vmap and loss.backward(), the float64 reference backend's gradient. A
TorchDispatchMode counts the op's calls: one per vmap, not one per sample.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import smskd_fast
from smskd_fast.ops import vmap_rules
from smskd_fast.ops.extension import extension_loaded
from tolerances import cross_backend_tolerance
from triton_interpreter import DEVICE, needs_kernels, reruns_under_interpreter, run_under_interpreter

FUSED = [pytest.param("cpu", marks=pytest.mark.skipif(not extension_loaded() or DEVICE != "cpu",
                                                      reason="needs the compiled smskd_fast._C and CPU tensors")),
         pytest.param("triton", marks=needs_kernels)]
OP_NAMES = {("cpu", "dense"): "smskd_loss_rows", ("cpu", "topk"): "smskd_loss_rows_topk",
            ("triton", "dense"): "smskd_loss_rows_triton", ("triton", "topk"): "smskd_loss_rows_topk_triton"}
BATCH, ROWS, CLASSES, K = 3, 5, 13, 4
TEMPERATURE = 2.0
IGNORE = -100
TOLERANCE = dict(rtol=2e-5, atol=2e-6)  # float32 kernels against the float64 reference


class OpCalls(TorchDispatchMode):
    """Counts the calls of the smskd_fast loss ops that reach the kernels."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "smskd_fast":
            self.count += 1
        return func(*args, **(kwargs or {}))


class RowPasses(TorchDispatchMode):
    """The names of the operations, views left out, whose output has `elements` elements (a pass over every
    gradient row)."""

    def __init__(self, elements: int):
        super().__init__()
        self.elements, self.names = elements, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        if isinstance(output, torch.Tensor) and output.numel() == self.elements and not func.is_view:
            self.names.append(func.name())
        return output


def samples(dtype=torch.float32):
    """B samples of (N, C) logits; sample 0 has an ignored row, sample 2 is all ignored (its mean is 0)."""
    generator = torch.Generator().manual_seed(11)
    student, teacher, reference = (torch.randn(BATCH, ROWS, CLASSES, generator=generator).mul(2).to(DEVICE, dtype)
                                   for _ in range(3))
    target = torch.randint(0, CLASSES, (BATCH, ROWS), generator=generator).to(DEVICE)
    target[0, 1] = IGNORE
    target[2] = IGNORE
    return student, target, teacher, reference


def topk_fields(teacher, target):
    """The teacher's rows in top-k form (smskd_fast.TopKTeacher), as the op's five tensor arguments."""
    topk = smskd_fast.TopKTeacher.from_logits(teacher, target, K, TEMPERATURE)
    return (topk.values, topk.indices, topk.true_logit, topk.log_sum_exp, topk.log_sum_exp_at_temperature)


def op_call(backend, form, reduction, grad_scale=None, compute_grad=True):
    """f(student, target, teacher, reference) calling the op once on (N, C) rows."""
    op = getattr(torch.ops.smskd_fast, OP_NAMES[backend, form])

    def call(student, target, teacher, reference, scale=grad_scale):
        teacher_args = (teacher, reference) if form == "dense" else (*topk_fields(teacher, target), reference)
        return op(student, target, *teacher_args, TEMPERATURE, 1.0, 0.5, 0.7, "inverse_tcp", IGNORE,
                  compute_grad, scale, reduction)

    return call


def per_sample(call, in_dims, *args):
    """The outputs of call on each sample, stacked: what vmap computes."""
    outputs = [call(*(arg.select(dim, b) if dim is not None else arg for arg, dim in zip(args, in_dims)))
               for b in range(BATCH)]
    return [torch.stack(column) for column in zip(*outputs)]


def mean_scale(target, dim):
    """Each sample's 1 / max(rows whose target is not ignored, 1), shaped to scale its (N, C) gradient."""
    valid = (target.movedim(dim, 0) != IGNORE).sum(dim=1).float()
    return valid.clamp(min=1).reciprocal().view(-1, 1, 1)


def vmapped(call, in_dims, *args):
    """vmap(call)(*args), and how many op calls it made: counted in a second run under a dispatch mode,
    where the rule scales a gradient out of place (vmap_rules._call_with_row_scale), to the same bits."""
    outputs = list(torch.func.vmap(call, in_dims=in_dims)(*args))
    with OpCalls() as calls:
        counted = torch.func.vmap(call, in_dims=in_dims)(*args)
    for output, again in zip(outputs, counted):
        torch.testing.assert_close(again, output, rtol=0, atol=0)
    return outputs, calls.count


def op_calls_of(function, *args) -> int:
    """How many smskd_fast op calls function(*args) makes (its outputs dropped)."""
    with OpCalls() as calls:
        function(*args)
    return calls.count


# Which arguments carry the batch (student, target, teacher, reference), and where.
BATCHINGS = {
    "student": (0, None, None, None),
    "student_and_target": (0, 0, None, None),
    "all_at_dim_1": (1, 1, 1, 1),
    "teacher_and_reference": (None, None, 0, 0),
}


def arguments_for(batching, dtype=torch.float32):
    """The samples with each unbatched argument as sample 0 and each batched one at its batch dimension."""
    student, target, teacher, reference = samples(dtype)
    return [value.movedim(0, dim) if dim is not None else value[0]
            for value, dim in zip((student, target, teacher, reference), BATCHINGS[batching])]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("form", ["dense", "topk"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("batching", list(BATCHINGS))
def test_one_call_equals_the_op_per_sample(backend, form, reduction, batching):
    in_dims = BATCHINGS[batching]
    args = arguments_for(batching)
    call = op_call(backend, form, reduction)
    outputs, calls = vmapped(call, in_dims, *args)
    expected = per_sample(call, in_dims, *args)
    assert calls == 1
    for name, output, wanted in zip(smskd_fast.ops.schema.PER_ROW_OUTPUTS, outputs, expected):
        torch.testing.assert_close(output, wanted, rtol=0, atol=0, msg=name)
    if reduction == "mean" and in_dims[1] is not None:
        # The samples count different valid rows: the sum's gradient times each sample's 1/n, rounded once
        # (the op folds its one 1/n into the kernel's arithmetic instead: a few fp32 ulps apart).
        summed = per_sample(op_call(backend, form, "sum"), in_dims, *args)[-1]
        torch.testing.assert_close(outputs[-1], summed * mean_scale(args[1], in_dims[1]), rtol=0, atol=0)
        torch.testing.assert_close(outputs[-1], expected[-1], **cross_backend_tolerance())
    else:
        torch.testing.assert_close(outputs[-1], expected[-1], rtol=0, atol=0)
    assert outputs[-1].abs().sum() > 0


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_a_factor_per_sample_scales_the_gradient_after_the_call(backend, dtype, reduction):
    """A batched grad_scale ("none") or a per-sample mean: the per-row outputs are the op's own bits; the
    gradient is the unscaled one times each sample's factor in fp32, rounded once to the logits' dtype,
    and within two roundings (plus the kernels' fp32 error) of the op's, which folds the factor in."""
    args = arguments_for("student_and_target", dtype)
    scale = torch.tensor([0.5, 0.25, 3.0], device=DEVICE) if reduction == "none" else None
    call = op_call(backend, "dense", reduction, grad_scale=scale)
    in_dims = (0, 0, None, None, None if scale is None else 0)
    outputs, calls = vmapped(call, in_dims, *args, scale)
    expected = per_sample(call, in_dims, *args, scale)
    assert calls == 1
    for output, wanted in zip(outputs[:-1], expected[:-1]):
        torch.testing.assert_close(output, wanted, rtol=0, atol=0)
    unscaled = per_sample(op_call(backend, "dense", "sum"), in_dims[:4], *args)[-1]
    factor = scale.view(-1, 1, 1) if scale is not None else mean_scale(args[1], 0)
    torch.testing.assert_close(outputs[-1], (unscaled.float() * factor).to(dtype), rtol=0, atol=0)
    rtol = 2 * torch.finfo(dtype).eps if dtype != torch.float32 else cross_backend_tolerance()["rtol"]
    torch.testing.assert_close(outputs[-1].float(), expected[-1].float(), rtol=rtol, atol=1e-5)


SMALL_LIMIT = 1024  # vmap_rules.SHARED_BYTES_PER_SAMPLE in the tests of its per-sample path (small shapes)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_a_large_shared_teacher_goes_sample_by_sample(backend, reduction, monkeypatch):
    """A teacher and reference shared by the samples, of more than SHARED_BYTES_PER_SAMPLE each: B calls
    (copying them to every sample's rows costs more than the calls), the op's own bits per sample; the
    same logits batched: one call."""
    monkeypatch.setattr(vmap_rules, "SHARED_BYTES_PER_SAMPLE", SMALL_LIMIT)
    rows, classes = 4, SMALL_LIMIT // 16 + 8  # 4 rows of fp32: just over the limit
    generator = torch.Generator().manual_seed(3)
    student, teacher, reference = (torch.randn(BATCH, rows, classes, generator=generator).to(DEVICE) for _ in range(3))
    target = torch.randint(0, classes, (BATCH, rows), generator=generator).to(DEVICE)
    target[1, 0] = IGNORE
    call = op_call(backend, "dense", reduction)
    for in_dims, teachers, expected_calls in (((0, 0, None, None), (teacher[0], reference[0]), BATCH),
                                              ((0, 0, 0, 0), (teacher, reference), 1)):
        outputs, calls = vmapped(call, in_dims, student, target, *teachers)
        assert calls == expected_calls
        expected = per_sample(call, in_dims, student, target, *teachers)
        for output, wanted in zip(outputs[:-1], expected[:-1]):
            torch.testing.assert_close(output, wanted, rtol=0, atol=0)
        torch.testing.assert_close(outputs[-1], expected[-1], **(
            cross_backend_tolerance() if reduction == "mean" and expected_calls == 1 else dict(rtol=0, atol=0)))


@pytest.mark.parametrize("backend", FUSED)
def test_backward_of_per_sample_means_touches_no_row(backend):
    """loss.backward() of per-sample means whose samples count different rows (an ignored row, an all-ignored
    sample): the gradient written in forward, times each sample's 1/n, is d loss / d student already, and
    backward hands it over as it is (RowScaledOpUnderAutograd; row_factor's 1 on ignored rows): no
    operation over the rows on the CPU (on CUDA the scaling kernel reads no row whose factor is 1)."""
    student, target, teacher, reference = samples()
    leaf = student.clone().requires_grad_()
    outputs = torch.func.vmap(op_call(backend, "dense", "mean"), in_dims=(0, 0, None, None))(
        leaf, target, teacher[0], reference[0])
    written = outputs[-1].detach().clone()
    with RowPasses(student.numel()) as passes:
        outputs[0].sum().backward()
    if DEVICE == "cpu":
        assert passes.names == [], passes.names
    torch.testing.assert_close(leaf.grad, written, rtol=0, atol=0)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("form", ["dense", "topk"])
def test_without_the_gradient_each_sample_has_an_empty_one(backend, form):
    args = arguments_for("student_and_target")
    call = op_call(backend, form, "sum", compute_grad=False)
    outputs, calls = vmapped(call, BATCHINGS["student_and_target"], *args)
    expected = per_sample(call, BATCHINGS["student_and_target"], *args)
    assert calls == 1
    assert outputs[-1].shape == expected[-1].shape == (BATCH, 0, CLASSES)
    for output, wanted in zip(outputs[:-1], expected[:-1]):
        torch.testing.assert_close(output, wanted, rtol=0, atol=0)


def refused_calls(backend):
    """name -> (vmap'd call, the same call on the sample the op refuses): arguments the op refuses."""
    student, target, teacher, reference = samples()
    dense = op_call(backend, "dense", "none")
    bad_target = target.clone()
    bad_target[2, 3] = CLASSES + 20
    wrong_rows = torch.randn(ROWS + 1, CLASSES, device=DEVICE)
    float64_scale = torch.ones(BATCH, dtype=torch.float64, device=DEVICE)
    matrix_scale = torch.ones(BATCH, 1, 1, device=DEVICE)
    mean_with_scale = op_call(backend, "dense", "mean", grad_scale=torch.tensor(0.5, device=DEVICE))
    return {
        "grad_scale with a mean": (lambda: torch.func.vmap(mean_with_scale, in_dims=(0, 0, None, None))(
            student, target, teacher[0], reference[0]), lambda: mean_with_scale(student[0], target[0], teacher[0],
                                                                                  reference[0])),
        "unknown reduction": (lambda: torch.func.vmap(op_call(backend, "dense", "avg"), in_dims=(0, 0, None, None))(
            student, target, teacher[0], reference[0]),
            lambda: op_call(backend, "dense", "avg")(student[0], target[0], teacher[0], reference[0])),
        "target out of range": (lambda: torch.func.vmap(dense, in_dims=(0, 0, None, None))(
            student, bad_target, teacher[0], reference[0]), lambda: dense(student[2], bad_target[2], teacher[0],
                                                                            reference[0])),
        "teacher of other rows": (lambda: torch.func.vmap(dense, in_dims=(0, 0, None, None))(
            student, target, wrong_rows, reference[0]), lambda: dense(student[0], target[0], wrong_rows, reference[0])),
        "grad_scale in float64": (lambda: torch.func.vmap(dense, in_dims=(0, 0, None, None, 0))(
            student, target, teacher[0], reference[0], float64_scale),
            lambda: dense(student[0], target[0], teacher[0], reference[0], float64_scale[0])),
        "grad_scale of a (1, 1) matrix": (lambda: torch.func.vmap(dense, in_dims=(0, 0, None, None, 0))(
            student, target, teacher[0], reference[0], matrix_scale),
            lambda: dense(student[0], target[0], teacher[0], reference[0], matrix_scale[0])),
        "0-d target of a one-row sample": (lambda: torch.func.vmap(dense, in_dims=(0, 0, None, None))(
            student[:, :1], target[:, 0], teacher[0, :1], reference[0, :1]),
            lambda: dense(student[0, :1], target[0, 0], teacher[0, :1], reference[0, :1])),
    }


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("case", ["grad_scale with a mean", "unknown reduction", "target out of range",
                                  "teacher of other rows", "grad_scale in float64", "grad_scale of a (1, 1) matrix",
                                  "0-d target of a one-row sample"])
def test_arguments_the_op_refuses_get_its_own_message_under_vmap(backend, case):
    """Such calls go sample by sample (the rule's checks, or its retry after the flattened call failed): the
    error is the op's own for the sample at fault, with the sample's shapes and row positions."""
    batched, alone = refused_calls(backend)[case]
    with pytest.raises(Exception) as per_sample:
        alone()
    with pytest.raises(per_sample.type) as under_vmap:
        batched()
    assert str(under_vmap.value) == str(per_sample.value)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("form", ["dense", "topk"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("overwrite", [False, True], ids=["functional", "overwrite_allowed"])
def test_backward_through_vmap_of_the_loss(backend, form, reduction, overwrite):
    """vmap(smskd_loss) over students and targets, then loss.backward(): the batched student reported
    requires_grad=False, so the fused backends computed no gradient and backward failed. Now each sample's
    gradient is the float64 reference's; overwrite_student_logits=True takes the functional op under vmap
    (its autograd.Function has no batching rule) and leaves the students as they were."""
    if overwrite and backend == "cpu":
        pytest.skip("the cpu backend has no in-place path (CUDA and Triton only): nothing to step aside")
    student, target, teacher, reference = samples()

    def loss(chosen, s, y, **options):
        frozen = teacher[0].to(s.dtype)
        teacher_args = dict(teacher_logits=frozen) if form == "dense" else dict(
            teacher_topk=smskd_fast.TopKTeacher.from_logits(frozen, target[0], K, TEMPERATURE))
        return smskd_fast.smskd_loss(s, y, reference_logits=reference[0].to(s.dtype), temperature=TEMPERATURE,
                                     reduction=reduction, backend=chosen, **teacher_args, **options).loss

    leaf = student.clone().requires_grad_()  # a shared teacher and reference of 260 bytes each: one call
    batched = torch.func.vmap(lambda s, y: loss(backend, s, y, overwrite_student_logits=overwrite))
    assert op_calls_of(batched, leaf, target) == 1
    values = batched(leaf, target)
    values.sum().backward()
    torch.testing.assert_close(leaf.detach(), student, rtol=0, atol=0)

    reference_leaf = student.double().requires_grad_()
    expected = torch.stack([loss("reference", reference_leaf[b], target[b]) for b in range(BATCH)])
    expected.sum().backward()
    torch.testing.assert_close(values.double(), expected.detach(), **TOLERANCE)
    torch.testing.assert_close(leaf.grad.double(), reference_leaf.grad, **TOLERANCE)
    assert leaf.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_backward_through_vmap_sample_by_sample(backend, reduction, monkeypatch):
    """The large shared teacher's path: each sample's gradient through vmap and loss.backward() is the
    float64 reference's."""
    monkeypatch.setattr(vmap_rules, "SHARED_BYTES_PER_SAMPLE", SMALL_LIMIT)
    rows, classes = 4, SMALL_LIMIT // 16 + 8
    generator = torch.Generator().manual_seed(4)
    student, teacher, reference = (torch.randn(BATCH, rows, classes, generator=generator).to(DEVICE) for _ in range(3))
    target = torch.randint(0, classes, (BATCH, rows), generator=generator).to(DEVICE)
    target[1, 0] = IGNORE

    def loss(chosen, s, y):
        return smskd_fast.smskd_loss(s, y, teacher[0].to(s.dtype), reference[0].to(s.dtype), temperature=TEMPERATURE,
                                     reduction=reduction, backend=chosen).loss

    leaf = student.clone().requires_grad_()
    batched = torch.func.vmap(lambda s, y: loss(backend, s, y))
    assert op_calls_of(batched, leaf, target) == BATCH
    values = batched(leaf, target)
    values.sum().backward()
    reference_leaf = student.double().requires_grad_()
    expected = torch.stack([loss("reference", reference_leaf[b], target[b]) for b in range(BATCH)])
    expected.sum().backward()
    torch.testing.assert_close(values.double(), expected.detach(), **TOLERANCE)
    torch.testing.assert_close(leaf.grad.double(), reference_leaf.grad, **TOLERANCE)


@pytest.mark.parametrize("backend", FUSED)
def test_nested_vmap_is_one_call(backend):
    """vmap(vmap(loss)) over (2, B, N, C) students: the inner rule's call is batched again by the outer one,
    one call in all; values and gradient as the reference's per sample."""
    student, target, teacher, reference = samples()
    students = torch.stack((student, 0.5 * student - 1))
    targets = torch.stack((target, target.flip(0)))

    def loss(chosen, s, y):
        return smskd_fast.smskd_loss(s, y, teacher[0].to(s.dtype), reference[0].to(s.dtype), temperature=TEMPERATURE,
                                     backend=chosen).loss

    leaf = students.clone().requires_grad_()
    batched = torch.func.vmap(torch.func.vmap(lambda s, y: loss(backend, s, y)))
    assert op_calls_of(batched, leaf, targets) == 1
    values = batched(leaf, targets)
    assert values.shape == (2, BATCH)
    values.sum().backward()
    reference_leaf = students.double().requires_grad_()
    expected = torch.stack([torch.stack([loss("reference", reference_leaf[a, b], targets[a, b]) for b in range(BATCH)])
                            for a in range(2)])
    expected.sum().backward()
    torch.testing.assert_close(values.double(), expected.detach(), **TOLERANCE)
    torch.testing.assert_close(leaf.grad.double(), reference_leaf.grad, **TOLERANCE)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("overwrite", [False, True], ids=["functional", "overwrite_allowed"])
def test_backward_through_vmap_over_teachers_of_one_student(backend, overwrite):
    """One student (unbatched, requiring grad) against B teachers and references: vmap over the frozen
    models, then backward: the student's gradient is the sum of the samples' (it failed: the backends
    applied their autograd.Function under vmap)."""
    student, target, teacher, reference = samples()

    def loss(chosen, s, t, r, **options):
        return smskd_fast.smskd_loss(s, target[0], t.to(s.dtype), r.to(s.dtype), temperature=TEMPERATURE,
                                     backend=chosen, **options).loss

    leaf = student[0].clone().requires_grad_()
    values = torch.func.vmap(lambda t, r: loss(backend, leaf, t, r, overwrite_student_logits=overwrite))(
        teacher, reference)
    values.sum().backward()
    torch.testing.assert_close(leaf.detach(), student[0], rtol=0, atol=0)
    reference_leaf = student[0].double().requires_grad_()
    expected = torch.stack([loss("reference", reference_leaf, teacher[b], reference[b]) for b in range(BATCH)])
    expected.sum().backward()
    torch.testing.assert_close(values.double(), expected.detach(), **TOLERANCE)
    torch.testing.assert_close(leaf.grad.double(), reference_leaf.grad, **TOLERANCE)


@pytest.mark.parametrize("backend", FUSED)
def test_a_uint8_target_counts_its_ignored_rows_as_the_op_does(backend):
    """A uint8 target: ignore_index -100 is compared as int64 (in uint8 it would wrap to 156, and a sample of
    class 156 would count no valid row)."""
    classes = 200
    generator = torch.Generator().manual_seed(8)
    student, teacher, reference = (torch.randn(BATCH, ROWS, classes, generator=generator).to(DEVICE) for _ in range(3))
    target = torch.randint(0, classes, (BATCH, ROWS), generator=generator).to(DEVICE, torch.uint8)
    target[1] = 156
    call = op_call(backend, "dense", "mean")
    in_dims = (0, 0, None, None)
    outputs, _ = vmapped(call, in_dims, student, target, teacher[0], reference[0])
    expected = per_sample(call, in_dims, student, target, teacher[0], reference[0])
    for output, wanted in zip(outputs[:-1], expected[:-1]):
        torch.testing.assert_close(output, wanted, rtol=0, atol=0)
    torch.testing.assert_close(outputs[-1], expected[-1], **cross_backend_tolerance())


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("limit", ["default", "lowered"])
def test_an_empty_batch_has_empty_outputs_of_the_samples_shapes(backend, limit, monkeypatch):
    """An empty batch is one call of no rows, whatever the size of the shared inputs (per-sample calls would
    be none, with nothing to stack); what the op refuses is still refused, in its words."""
    if limit == "lowered":
        monkeypatch.setattr(vmap_rules, "SHARED_BYTES_PER_SAMPLE", SMALL_LIMIT)
    student, target, teacher, reference = samples()
    for compute_grad, grad_rows in ((True, ROWS), (False, 0)):
        outputs = torch.func.vmap(op_call(backend, "dense", "none", compute_grad=compute_grad),
                                  in_dims=(0, 0, None, None))(student[:0], target[:0], teacher[0], reference[0])
        assert [tuple(output.shape) for output in outputs] == [(0, ROWS)] * 6 + [(0, grad_rows, CLASSES)]
    for reduction, words in (("avg", "reduction must be one of"), ("mean", "grad_scale must be None when")):
        scaled = op_call(backend, "dense", reduction, grad_scale=torch.tensor(0.5, device=DEVICE))
        with pytest.raises(ValueError, match=words):
            torch.func.vmap(scaled, in_dims=(0, 0, None, None))(student[:0], target[:0], teacher[0], reference[0])


@pytest.mark.parametrize("backend", FUSED)
def test_an_infinite_grad_scale_leaves_ignored_rows_zero(backend):
    """A batched grad_scale of inf: the ignored row of that sample is 0, as the op writes it whatever its
    grad_scale (0 * inf would be NaN); the samples scaled by 1 are the op's bits."""
    args = arguments_for("student_and_target")
    scale = torch.tensor([float("inf"), 1.0, 1.0], device=DEVICE)
    call = op_call(backend, "dense", "none")
    in_dims = (0, 0, None, None, 0)
    outputs, _ = vmapped(call, in_dims, *args, scale)
    expected = per_sample(call, in_dims, *args, scale)
    assert args[1][0, 1] == IGNORE and (expected[-1][0, 1] == 0).all()
    assert (outputs[-1][0, 1] == 0).all()
    torch.testing.assert_close(outputs[-1][1:], expected[-1][1:], rtol=0, atol=0)


@reruns_under_interpreter
def test_cases_under_the_interpreter():
    run_under_interpreter(__file__)
