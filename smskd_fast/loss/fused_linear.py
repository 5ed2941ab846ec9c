"""fused_linear_smskd_loss: the SMSKD loss straight from hidden states, one token chunk at a time.

For language models the logits (tokens x vocabulary, for student, teacher and
reference) take more memory than the models. Here each chunk of rows is
projected to logits, the row kernel of the chosen backend computes the loss and
d loss / d logits, and those are folded into the gradients of the student's
hidden states, head weight and bias at once, so that peak memory holds one
chunk's logits instead of all of them.

Precision of the weight gradient: it accumulates in the head weight's own dtype,
in one buffer, by an in-place addmm_ per chunk (no V x H temporary). Each chunk's
product is summed in the matmul's float32 accumulator and the running total is
rounded to the weight's dtype once per chunk, so K chunks add at most K roundings
of it: |error| <= K * u * sum_rows |d logits|^T |hidden|, u = 2^-8 in bf16 (2^-11
fp16, 2^-24 fp32; tests/tolerances.py, chunked_accumulation_excess). The unfused
path rounds once. For bf16 weights a float32 accumulator would avoid this, but it
takes 4 instead of 2 bytes x V x H and needs a bf16 copy at the end while it is
alive: 4 bytes x V x H more at the peak, 2 GiB at V = 128256, H = 4096, which alone
breaks the fused path's target of a quarter of the unfused peak there. The bias
gradient (V values) accumulates in float32 (float64 for float64).

The chunk loop issues no host synchronisation (no .item(), no data-dependent
shapes or Python branches on tensor values): on a GPU the host queues every
chunk's kernels without waiting (tests/test_fused_linear_sync.py).
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Dict, List, Optional, Tuple

import torch

from smskd_fast.loss import validation
from smskd_fast.loss.derivative_modes import check_reverse_mode_only
from smskd_fast.backends import resolve_backend
from smskd_fast.backends.base import LossOptions, RowInputs, needs_student_grad
from smskd_fast.loss.functional import SMSKDLossOutput
from smskd_fast.ops import schema
from smskd_fast.ops.registration import refuse_double_backward, row_factor
from smskd_fast.ops.scale_rows import scale_rows_
from smskd_fast.ops.reduction import as_class_indices, mean_reduction_scale
from smskd_fast.backends.topk import TopKTeacher

__all__ = ["fused_linear_smskd_loss", "chunk_rows"]

# CPU: rows per chunk are chosen so that one chunk's logits hold about this many values. Not
# fewer: glibc's malloc keeps freed buffers under its (dynamic, up to 32 MiB) mmap threshold
# in the heap, so chunks much smaller than 32 MiB raise the resident set instead of lowering
# it (benchmarks/results/fused_linear_cpu_chunk64_glibc_retention_t1024.md).
DEFAULT_CHUNK_ELEMENTS = 1 << 24
# GPU: at most this many bytes of chunk buffers (see chunk_rows), and a modelled peak of at most
# 1/PEAK_SHARE of the unfused path's.
DEFAULT_DEVICE_CHUNK_BYTES = 1 << 30
PEAK_SHARE = 4
DEVICE_ROW_MULTIPLE = 256


def chunk_rows(device_type: str, rows: int, vocabulary: int, hidden: int, dtype: torch.dtype, *, heads: int = 3,
               budget_bytes: Optional[int] = None) -> int:
    """Rows per chunk when the caller gives no chunk_size (at most `rows`, at least 1).

    CPU: DEFAULT_CHUNK_ELEMENTS // V rows (2^24 logits; see the constant for why not fewer).

    GPU (any other device type), with b = itemsize of dtype and N = rows: a chunk of c rows
    holds `heads` logits tensors (the student's, and the teacher's and reference's when they
    are dense) plus one more for the row gradient or a backend's scratch, R = (heads + 1) V b
    bytes per row. Both paths also hold the gradients of the head and the hidden states,
    G = (V + N) H b; the unfused path holds R for every row. So the peaks are modelled as

        fused = c R + G,    unfused = N R + G,

    and c is the largest number of rows with c R <= budget_bytes (default
    DEFAULT_DEVICE_CHUNK_BYTES = 1 GiB) and fused <= unfused / PEAK_SHARE (= 4), i.e.
    c <= (N R + G) / (4 R) - G / R, rounded down to whole tiles of 256 rows, but never
    fewer than 256 rows while the byte budget allows them: below that the matmuls lose
    efficiency. Each chunk's weight-gradient matmul does 2 V H c flops and reads and writes
    the V x H gradient (2 V H b bytes): c / b flops per byte, above an H200's ~200 (989
    Tflop/s over 4.8 TB/s) from c = 512 in bf16, so it runs compute-bound, and the other two
    matmuls (c x V x H) are whole tiles. At 8192 tokens in bf16 this gives 1024 rows at
    V = 128256 (H = 2048 or 4096) and 1536 / 1024 at V = 32000 (H = 2048 / 4096) with three
    heads; 1280 / 768 and 1280 / 512 in the KD-only form (two heads).
    """
    if device_type == "cpu":
        return max(1, min(rows, DEFAULT_CHUNK_ELEMENTS // vocabulary))
    item = torch.empty((), dtype=dtype).element_size()
    per_row = (heads + 1) * vocabulary * item
    gradients = (vocabulary + rows) * hidden * item
    by_budget = (DEFAULT_DEVICE_CHUNK_BYTES if budget_bytes is None else budget_bytes) // per_row
    by_share = ((rows * per_row + gradients) // PEAK_SHARE - gradients) // per_row
    if by_budget < DEVICE_ROW_MULTIPLE:
        return max(1, min(rows, by_budget))
    fit = max(DEVICE_ROW_MULTIPLE, min(by_budget, by_share))
    return min(rows, fit - fit % DEVICE_ROW_MULTIPLE)


class _Head:
    """A frozen or trainable projection hidden -> logits, or precomputed logits."""

    WIDTH = 4 + len(TopKTeacher.TENSOR_FIELDS)  # len(tensors())

    def __init__(self, hidden=None, weight=None, bias=None, logits=None, topk: Optional[TopKTeacher] = None):
        self.hidden, self.weight, self.bias, self.logits, self.topk = hidden, weight, bias, logits, topk

    def tensors(self) -> Tuple[Optional[torch.Tensor], ...]:
        """Every tensor the loss reads (None where absent): what backward saves to recompute from."""
        topk = (None,) * len(TopKTeacher.TENSOR_FIELDS) if self.topk is None else self.topk.tensors()
        return (self.hidden, self.weight, self.bias, self.logits, *topk)

    @classmethod
    def of(cls, tensors) -> "_Head":
        """The head whose tensors() these are."""
        hidden, weight, bias, logits, *topk = tensors
        return cls(hidden, weight, bias, logits, None if topk[0] is None else TopKTeacher(*topk))

    def chunk_topk(self, start: int, end: int) -> Optional[TopKTeacher]:
        """The rows [start, end) of a teacher given in top-k form."""
        if self.topk is None:
            return None
        return self.topk.map_tensors(lambda field: field[start:end])

    def present(self) -> bool:
        return self.logits is not None or self.hidden is not None

    def chunk_logits(self, start: int, end: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
        if self.logits is not None:
            return self.logits[start:end].to(dtype)
        if self.hidden is None:
            return None
        logits = torch.nn.functional.linear(self.hidden[start:end], self.weight, self.bias)
        return logits.to(dtype)


def _chunk_pass(student: _Head, teacher: _Head, reference: _Head, target: torch.Tensor,
                options: LossOptions, backend: str, chunk_size: int,
                row_scale: Optional[torch.Tensor], need: Tuple[bool, bool, bool],
                grad_scale: Optional[torch.Tensor] = None):
    """Per-row loss terms over all chunks; with row_scale, also the scaled parameter gradients.

    row_scale (N,) multiplies each row's gradient (1/n_valid for "mean", 1 for
    "sum", grad_output for "none"); grad_scale, the 0-d value that row_scale holds
    on every valid row ("mean"), is folded into the kernels' gradient
    (RowInputs.grad_scale), so that the logits' gradient needs no pass of its own
    to apply row_scale. need says which of (hidden, weight, bias)
    gradients to accumulate: hidden and weight in their dtype (module docstring), bias in
    float32 (float64 for float64).
    """
    hidden, weight, bias = student.hidden, student.weight, student.bias
    n = hidden.shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    chosen = resolve_backend(backend, hidden.device, hidden.dtype, weight.shape[0], topk=teacher.topk is not None)
    # Each chunk's logits are scratch: a GPU backend may write d loss / d logits over them.
    options = dataclasses.replace(options, overwrite_student_logits=True)
    columns: Dict[str, List[torch.Tensor]] = {name: [] for name in schema.PER_ROW_OUTPUTS}
    grad_hidden = hidden.new_empty(hidden.shape) if row_scale is not None and need[0] else None
    # The weight gradient (precision: see the module docstring): the first chunk's product is written
    # over the uninitialised buffer, the others are added in place; zeros only when there are no rows.
    grad_weight = None
    if row_scale is not None and need[1]:
        grad_weight = torch.empty_like(weight) if n else torch.zeros_like(weight)
    grad_bias = torch.zeros_like(bias, dtype=acc) if row_scale is not None and need[2] else None
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        h = hidden[start:end]
        with torch.no_grad():
            teacher_logits = teacher.chunk_logits(start, end, hidden.dtype)
            reference_logits = reference.chunk_logits(start, end, hidden.dtype)
            logits = torch.nn.functional.linear(h, weight, bias)
        with torch.enable_grad():
            logits.requires_grad_(row_scale is not None)
            inputs = RowInputs(logits, target[start:end], teacher_logits, reference_logits,
                               teacher_topk=teacher.chunk_topk(start, end), grad_scale=grad_scale)
            rows = chosen.rows(inputs, options)
            if row_scale is not None:
                (grad_logits,) = torch.autograd.grad(rows.loss, logits, grad_outputs=row_scale[start:end])
        for name, column in columns.items():
            column.append(getattr(rows, name).detach())
        if row_scale is None:
            continue
        with torch.no_grad():
            if grad_hidden is not None:
                torch.mm(grad_logits, weight, out=grad_hidden[start:end])
            if grad_weight is not None and start == 0:
                torch.mm(grad_logits.t(), h, out=grad_weight)
            elif grad_weight is not None:
                grad_weight.addmm_(grad_logits.t(), h)
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0, dtype=acc)
        del logits, grad_logits
    per_row = {name: torch.cat(column) if column else hidden.new_zeros((0,), dtype=acc)
               for name, column in columns.items()}
    return per_row, grad_hidden, grad_weight, grad_bias


def _scale_(gradient: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """gradient *= factor (0-d, on the device: no host sync) in place, the product formed in float32
    (float64 for float64) and rounded once: factor in an fp16 gradient's dtype would be rounded first
    (GradScaler's 65536 is inf in fp16, 1/3 is 0.2% high in bf16). On CUDA through ops/scale_rows: a
    factor of exactly 1 (loss.backward() of the loss itself) reads and writes nothing. Elsewhere one
    multiply by the factor as a (1, 1) tensor (a 0-d one ATen would round to the gradient's dtype
    first), without reading it on the host (tests/test_fused_linear_sync.py)."""
    factor = factor.to(torch.float64 if gradient.dtype == torch.float64 else torch.float32)
    rows = gradient.view(-1, gradient.shape[-1])
    if gradient.device.type == "cuda":
        scale_rows_(rows, factor)
    else:
        rows.mul_(factor.reshape(1, 1))
    return gradient


def _refuse_double_backward() -> None:
    """refuse_double_backward's check, with this API's remedy: every backend here computes its
    gradients outside autograd, chunk by chunk, backend='reference' included."""
    try:
        refuse_double_backward()
    except NotImplementedError:
        raise NotImplementedError(
            "fused_linear_smskd_loss computes its gradients outside autograd, chunk by chunk, on every backend "
            "(backend='reference' included), so they cannot be differentiated again: backward with "
            "create_graph=True (double backward: a gradient penalty, MAML, Hessian-vector products) is not "
            "supported; materialise the logits and call smskd_loss(..., backend='reference') instead") from None


class _FusedLinearSMSKD(torch.autograd.Function):
    """Autograd wrapper: gradients are computed in forward for "mean"/"sum", in backward for "none".

    need says which of (hidden, weight, bias) get a gradient: the caller decides, as forward
    runs with grad mode off. The first backward scales the gradients from forward in place and
    hands them over, so autograd takes them as .grad without a copy (a V x H weight gradient is
    the largest buffer of the fused path). A second backward through the same graph
    (retain_graph, gradcheck) finds them gone and recomputes them chunk by chunk, like "none",
    from the saved inputs (autograd refuses them if modified in place since forward).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher, reference, target, options, backend, chunk_size, reduction,
                need):
        target = as_class_indices(target)
        valid = target != options.ignore_index
        student = _Head(hidden, weight, bias)
        grads = any(need) and reduction != "none"
        mean_scale = mean_reduction_scale(valid, hidden) if reduction == "mean" else None
        row_scale = None
        if grads:
            row_scale = valid.to(schema.accumulation_dtype(hidden.dtype))
            if mean_scale is not None:
                row_scale = row_scale * mean_scale
        per_row, grad_hidden, grad_weight, grad_bias = _chunk_pass(
            student, teacher, reference, target, options, backend, chunk_size, row_scale, need, mean_scale)
        ctx.reduction, ctx.need, ctx.row_scale = reduction, need, row_scale
        ctx.save_for_backward(*student.tensors(), *teacher.tensors(), *reference.tensors(), target)
        ctx.replay = (options, backend, chunk_size)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.grads = (grad_hidden, grad_weight, grad_bias) if grads else None
        loss, ce, kd, ref, tcp, w = (per_row[name] for name in ("loss", "ce", "kd", "ref", "tcp", "weight"))
        if reduction == "none":
            reduced = (loss, ce, kd, ref)
        else:
            reduced = tuple(values.sum() if mean_scale is None else values.sum() * mean_scale
                            for values in (loss, ce, kd, ref))
        ctx.mark_non_differentiable(*reduced[1:], tcp, w)
        return (*reduced, tcp, w)

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        _refuse_double_backward()
        if ctx.grads is not None:
            grad_hidden, grad_weight, grad_bias = (None if g is None else _scale_(g, grad_loss) for g in ctx.grads)
            ctx.grads = None
        else:
            saved, width = ctx.saved_tensors, _Head.WIDTH
            student, teacher, reference = (_Head.of(saved[i * width:(i + 1) * width]) for i in range(3))
            target, (options, backend, chunk_size) = saved[-1], ctx.replay
            if ctx.reduction == "none":  # an ignored row's gradient is 0 whatever grad_output holds
                row_scale = row_factor(grad_loss, None, target, options.ignore_index)
            else:
                row_scale = ctx.row_scale * grad_loss.to(ctx.row_scale.dtype)
            _, grad_hidden, grad_weight, grad_bias = _chunk_pass(
                student, teacher, reference, target, options, backend, chunk_size, row_scale, ctx.need)
        grad_bias = None if grad_bias is None else grad_bias.to(ctx.bias_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None, None


def _check_head(prefix: str, hidden, weight, bias, rows_shape, vocabulary: Optional[int],
                device: torch.device) -> None:
    """A head's hidden states, weight and bias: shapes, one dtype (F.linear's), the student's device."""
    if (hidden is None) != (weight is None):
        raise ValueError(f"{prefix}_hidden and {prefix}_head_weight must be given together")
    if hidden is None:
        if bias is not None:
            raise ValueError(f"{prefix}_head_bias needs {prefix}_hidden and {prefix}_head_weight")
        return
    validation.check_logits(f"{prefix}_hidden", hidden)
    validation.check_logits(f"{prefix}_head_weight", weight)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{prefix}_head_weight must have shape (V, {hidden.shape[-1]}) to project "
                         f"{prefix}_hidden, got {tuple(weight.shape)}")
    if tuple(hidden.shape[:-1]) != rows_shape:
        raise ValueError(f"{prefix}_hidden must have the leading shape {rows_shape} of student_hidden, "
                         f"got {tuple(hidden.shape[:-1])}")
    if vocabulary is not None and weight.shape[0] != vocabulary:
        raise ValueError(f"{prefix}_head_weight must have the student's vocabulary size {vocabulary} rows, "
                         f"got {weight.shape[0]}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{prefix}_head_bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    for name, tensor in ((f"{prefix}_head_weight", weight), (f"{prefix}_head_bias", bias)):
        if tensor is not None and tensor.dtype != hidden.dtype:
            raise TypeError(f"{name} must have {prefix}_hidden's dtype {hidden.dtype}, got {tensor.dtype}")
    for name, tensor in ((f"{prefix}_hidden", hidden), (f"{prefix}_head_weight", weight),
                         (f"{prefix}_head_bias", bias)):
        _check_device(name, tensor, device)


def _check_device(name: str, tensor: Optional[torch.Tensor], device: torch.device) -> None:
    """Every input on student_hidden's device: a kernel would read another device's memory as its own."""
    if tensor is not None and tensor.device != device:
        raise ValueError(f"{name} must be on student_hidden's device {device}, got {tensor.device}")


def fused_linear_smskd_loss(
    student_hidden: torch.Tensor,
    student_head_weight: torch.Tensor,
    target: torch.Tensor,
    teacher_hidden: Optional[torch.Tensor] = None,
    teacher_head_weight: Optional[torch.Tensor] = None,
    teacher_logits: Optional[torch.Tensor] = None,
    reference_hidden: Optional[torch.Tensor] = None,
    reference_head_weight: Optional[torch.Tensor] = None,
    *,
    student_head_bias: Optional[torch.Tensor] = None,
    teacher_head_bias: Optional[torch.Tensor] = None,
    reference_head_bias: Optional[torch.Tensor] = None,
    temperature: float = 4.0,
    ce_weight: float = 1.0,
    kd_weight: float = 1.0,
    ref_weight: float = 1.0,
    weighting: str = "inverse_tcp",
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    teacher_topk: Optional[TopKTeacher] = None,
    reference_logits: Optional[torch.Tensor] = None,
) -> SMSKDLossOutput:
    """smskd_loss(student_hidden @ W_s.T + b_s, target, teacher logits, reference logits) without
    materialising the logits: rows are processed chunk_size at a time.

    Hidden states have shape (..., H) (teacher and reference may have their own H),
    head weights (V, H), target the leading shape. The teacher is given either as
    hidden states plus head, as logits (..., V), or in the top-k form of a logit
    cache (teacher_topk, see smskd_fast/backends/topk.py); the reference as hidden states plus
    head or as logits (..., V), e.g. read from a dense logit cache. Logits given
    whole may have any floating dtype: each chunk is converted to student_hidden's
    dtype when it is used (an fp16 cache's rows stay fp16 until then). Gradients
    flow to the student's hidden states, head weight and bias only, computed in forward where grad mode
    is on (not under torch.no_grad or torch.inference_mode); frozen inputs that require grad get a
    warning, as in smskd_loss. Every input must be on student_hidden's device, each head's weight and
    bias in its hidden states' dtype. chunk_size (rows per chunk)
    defaults to chunk_rows: 2^24 / V on the CPU; on a GPU whole 256-row tiles within 1 GiB of chunk
    buffers and a quarter of the unfused path's peak.
    """
    validation.check_logits("student_hidden", student_hidden)
    rows_shape = tuple(student_hidden.shape[:-1])
    device = student_hidden.device
    _check_head("student", student_hidden, student_head_weight, student_head_bias, rows_shape, None, device)
    vocabulary = student_head_weight.shape[0]
    if sum(x is not None for x in (teacher_logits, teacher_hidden, teacher_topk)) > 1:
        raise ValueError("give the teacher either as teacher_hidden with teacher_head_weight, as "
                         "teacher_logits or as teacher_topk, not more than one")
    _check_head("teacher", teacher_hidden, teacher_head_weight, teacher_head_bias, rows_shape, vocabulary, device)
    _check_head("reference", reference_hidden, reference_head_weight, reference_head_bias, rows_shape,
                vocabulary, device)
    if reference_logits is not None and reference_hidden is not None:
        raise ValueError("give the reference either as reference_hidden with reference_head_weight or as "
                         "reference_logits, not both")
    for name, logits in (("teacher_logits", teacher_logits), ("reference_logits", reference_logits)):
        if logits is None:
            continue
        validation.check_logits(name, logits)
        if tuple(logits.shape) != rows_shape + (vocabulary,):
            raise ValueError(f"{name} must have shape {rows_shape + (vocabulary,)}, got {tuple(logits.shape)}")
        _check_device(name, logits, device)
    validation.check_class_indices(target, rows_shape, vocabulary, student_hidden.device, ignore_index,
                                   owner="student_hidden")
    validation.check_options(temperature, reduction, weighting,
                             {"ce_weight": ce_weight, "kd_weight": kd_weight, "ref_weight": ref_weight})
    # A stand-in with the logits' shape and device (one element, broadcast): nothing of that size exists.
    logits_shape = torch.empty((), device=student_hidden.device).expand(rows_shape + (vocabulary,))
    validation.check_teacher_topk(teacher_topk, None, logits_shape, temperature, target, ignore_index)
    has_teacher = teacher_logits is not None or teacher_hidden is not None or teacher_topk is not None
    has_reference = reference_hidden is not None or reference_logits is not None
    validation.check_weighting_has_tcp(weighting, True if has_teacher else None, True if has_reference else None)
    if chunk_size is None:
        dense_heads = 1 + (teacher_logits is not None or teacher_hidden is not None) + has_reference
        chunk_size = chunk_rows(student_hidden.device.type, target.numel(), vocabulary, student_hidden.shape[-1],
                                student_hidden.dtype, heads=dense_heads)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    check_reverse_mode_only("fused_linear_smskd_loss", student_hidden, student_head_weight, student_head_bias)
    for name, tensor in (("teacher_hidden", teacher_hidden), ("teacher_head_weight", teacher_head_weight),
                         ("teacher_head_bias", teacher_head_bias), ("teacher_logits", teacher_logits),
                         ("reference_hidden", reference_hidden), ("reference_head_weight", reference_head_weight),
                         ("reference_head_bias", reference_head_bias), ("reference_logits", reference_logits)):
        validation.warn_if_frozen_requires_grad(name, tensor, "student_hidden, student_head_weight and "
                                                "student_head_bias", stacklevel=2)
    # Gradients only where autograd will ask for them (grad mode on: not under no_grad or inference_mode).
    need = (needs_student_grad(student_hidden), needs_student_grad(student_head_weight),
            student_head_bias is not None and needs_student_grad(student_head_bias))

    def flat(tensor):
        return None if tensor is None else tensor.reshape(-1, tensor.shape[-1])

    options = LossOptions(float(temperature), float(ce_weight), float(kd_weight), float(ref_weight),
                          weighting, int(ignore_index))
    teacher = _Head(flat(teacher_hidden), teacher_head_weight, teacher_head_bias, flat(teacher_logits),
                    None if teacher_topk is None else teacher_topk.rows())
    reference = _Head(flat(reference_hidden), reference_head_weight, reference_head_bias, flat(reference_logits))
    loss, ce, kd, ref, tcp, w = _FusedLinearSMSKD.apply(
        flat(student_hidden), student_head_weight, student_head_bias, teacher, reference, target.reshape(-1),
        options, backend, int(chunk_size), reduction, need)
    if reduction == "none":
        loss, ce, kd, ref = (values.reshape(rows_shape) for values in (loss, ce, kd, ref))
    return SMSKDLossOutput(loss, ce, kd, ref, tcp.reshape(rows_shape), w.reshape(rows_shape))
