"""The sample inputs that every backend runs in tests/test_backend_conformance.py.

A Case names its shape, dtype, inputs present, options, teacher form (dense, or top-k
with k kept classes), memory layout and an input edit (masked classes, a NaN, ...).
build() draws the tensors on the CPU from the case's seed, so that every backend and the
float64 reference see the same values. The groups below are the union of the case tables
that test_cpu_*, test_triton_* and test_cuda_* kept before (one table per backend).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from smskd_fast.backends.base import LossOptions
from smskd_fast.backends.topk import TopKTeacher

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
FIELDS = ("loss", "ce", "kd", "ref", "tcp", "weight")

# (target, teacher, reference, weighting): every combination of inputs a backend is given.
INPUTS = {
    "smskd": (True, True, True, "inverse_tcp"),
    "smskd_tcp": (True, True, True, "tcp"),
    "smskd_constant": (True, True, True, "constant"),
    "ce_kd": (True, True, False, "inverse_tcp"),
    "ce_kd_constant": (True, True, False, "constant"),
    "ce_ref": (True, False, True, "constant"),
    "ce_only": (True, False, False, "constant"),
    "kd_only": (False, True, False, "constant"),  # kd_loss
    "ref_only": (False, False, True, "constant"),  # no target: only through a backend's rows()
}
# Top-k teacher: (target, reference, weighting); the teacher is always there.
TOPK_INPUTS = {
    "smskd": (True, True, "inverse_tcp"),  # the default: as "target+reference"
    "target+reference": (True, True, "inverse_tcp"),
    "target+reference_tcp": (True, True, "tcp"),
    "target+reference_constant": (True, True, "constant"),
    "target": (True, False, "tcp"),
    "target_inverse_tcp": (True, False, "inverse_tcp"),
    "reference": (False, True, "constant"),
    "neither": (False, False, "constant"),
}


@dataclass(frozen=True)
class Case:
    """One sample input; k None is the dense teacher, else the top-k form with k kept classes."""

    name: str
    n: int
    c: int
    dtype: torch.dtype
    inputs: str = "smskd"
    temperature: float = 4.0
    weights: tuple = (0.7, 1.3, 0.9)  # ce, kd, ref
    k: Optional[int] = None
    layout: str = "contiguous"
    edit: str = ""
    row_weights: bool = False  # check d(sum_i v_i L_i)/ds for v_i in [0.5, 1.5], not d(sum_i L_i)/ds
    ignore_index: int = -100
    seed: int = 0
    scale: float = 3.0
    target_dtype: torch.dtype = torch.int64
    leading: tuple = field(default=())  # non-empty: the inputs get this leading shape (product n)

    @property
    def topk(self) -> bool:
        return self.k is not None

    @property
    def present(self) -> tuple:
        """(target, teacher, reference, weighting)."""
        if self.topk:
            with_target, with_reference, weighting = TOPK_INPUTS[self.inputs]
            return with_target, True, with_reference, weighting
        return INPUTS[self.inputs]

    def options(self) -> LossOptions:
        ce, kd, ref = self.weights
        if self.inputs == "kd_only":
            ce, kd, ref = 0.0, 1.0, 0.0  # what kd_loss runs
        return LossOptions(temperature=self.temperature, ce_weight=ce, kd_weight=kd, ref_weight=ref,
                           weighting=self.present[3], ignore_index=self.ignore_index)

    @property
    def id(self) -> str:
        dtype = str(self.dtype).replace("torch.", "")
        parts = [self.name, f"{self.n}x{self.c}", dtype, self.inputs, f"T{self.temperature:g}",
                 "w" + "/".join(f"{w:g}" for w in self.weights)]
        if self.topk:
            parts.insert(1, f"k{self.k}")
        parts += [p for p in (self.layout if self.layout != "contiguous" else "", self.edit,
                              "v" if self.row_weights else "") if p]
        return "-".join(parts)


@dataclass
class Inputs:
    """A case's tensors in its dtype (build: contiguous on the CPU; on_device: laid out); absent inputs None."""

    student: torch.Tensor
    target: Optional[torch.Tensor]
    teacher: Optional[torch.Tensor]
    reference: Optional[torch.Tensor]
    topk: Optional[TopKTeacher]


def build(case: Case) -> Inputs:
    """The case's contiguous CPU tensors: logits scale * randn drawn in float64, edited, then rounded to the
    dtype; every fifth row from the second ignored; the top-k teacher is that of a dense teacher drawn the
    same way (or one of TOPK_TEACHERS)."""
    with_target, with_teacher, with_reference, _ = case.present
    g = torch.Generator().manual_seed(case.seed)
    student, teacher, reference = ((torch.randn(case.n, case.c, generator=g, dtype=F64) * case.scale)
                                   for _ in range(3))
    target = torch.randint(0, case.c, (case.n,), generator=g)
    if case.n > 1:
        target[1::5] = case.ignore_index
    student, target, teacher, reference = EDITS.get(case.edit, _no_edit)(student, target, teacher, reference, case)
    topk = None
    if case.topk:
        cache = F64 if case.dtype == F64 else F32
        topk = TOPK_TEACHERS.get(case.edit, _topk_from_logits)(student, teacher.to(cache), target, case)
        teacher = None
    return Inputs(student.to(case.dtype), target.to(case.target_dtype) if with_target else None,
                  teacher.to(case.dtype) if with_teacher and teacher is not None else None,
                  reference.to(case.dtype) if with_reference else None, topk)


def _topk_from_logits(student, teacher, target, case):
    return TopKTeacher.from_logits(teacher, target, case.k, case.temperature)


def _with_leading_shape(inputs: Inputs, leading: tuple) -> Inputs:
    def shaped(x, trailing):
        return None if x is None else x.reshape(*leading, *trailing)

    topk = inputs.topk
    if topk is not None:
        k = topk.k
        topk = TopKTeacher(shaped(topk.values, (k,)), shaped(topk.indices, (k,)), shaped(topk.true_logit, ()),
                           shaped(topk.log_sum_exp, ()), shaped(topk.log_sum_exp_at_temperature, ()))
    c = inputs.student.shape[-1]
    return Inputs(shaped(inputs.student, (c,)), shaped(inputs.target, ()), shaped(inputs.teacher, (c,)),
                  shaped(inputs.reference, (c,)), topk)


# ---- input edits: (student, target, teacher, reference, case) -> the same, float64 ----

def _no_edit(s, y, t, r, case):
    return s, y, t, r


def _masked_blocks(s, y, t, r, case):
    """-inf in all three at columns in the first block of 1024, later and in the tail; the teacher alone
    masks one entry (KL stays finite), the reference alone ten; targets moved off the masked columns."""
    masked = torch.zeros(case.c, dtype=torch.bool)
    masked[torch.tensor([0, 3, 500, 1024, 1029]) % case.c] = True
    y = torch.where((y >= 0) & masked[y.clamp(min=0)], torch.full_like(y, 7), y)
    for x in (s, t, r):
        x[:, masked] = float("-inf")
    t[1, 200] = float("-inf")
    r[2, 10:20] = float("-inf")
    return s, y, t, r


def _masked_every_third(s, y, t, r, case):
    """-inf in all three at columns 1, 4, 7, ...; and in the teacher alone at column 0."""
    masked = torch.zeros(case.c, dtype=torch.bool)
    masked[1::3] = True
    for _ in range(2):
        y = torch.where((y >= 0) & masked[y.clamp(min=0)], (y + 1) % case.c, y)
    for x in (s, t, r):
        x[:, masked] = float("-inf")
    t[:, 0] = float("-inf")
    return s, y, t, r


def _masked_teacher_and_reference(s, y, t, r, case):
    """The teacher masks every 7th class, the reference every 11th from 1: only the student sees them."""
    t[:, ::7] = float("-inf")
    r[:, 1::11] = float("-inf")
    return s, y, t, r


def _nan_teacher(s, y, t, r, case):
    """A NaN teacher logit in row 2 (a valid row): that row's values and gradient are NaN, the rest not."""
    t[2, 7 % case.c] = float("nan")
    return s, y, t, r


def _nan_in_ignored_row(s, y, t, r, case):
    """Row 1 (ignored) is all NaN in the student: an ignored row's values are never read."""
    s[1] = float("nan")
    return s, y, t, r


def _all_equal(s, y, t, r, case):
    """Every student logit 5, every teacher logit -2: CE = log C, KD = 0."""
    return torch.full_like(s, 5.0), y, torch.full_like(t, -2.0), r


def _late_maximum(s, y, t, r, case):
    """Maxima in the last sixth of the row: an online softmax rescales its running sums late."""
    s[:, 5 * case.c // 6:] += 8.0
    return s, y, t, r


def _rising(s, y, t, r, case):
    """Logits rising by 200 across the row: the running maximum grows block after block."""
    return s + torch.linspace(0, 200, case.c, dtype=F64), y, t, r


def _far_shifted(s, y, t, r, case):
    """The reference's rows 5e5 below the student's and a dense teacher's 1e6 above (softmax ignores a shift:
    the loss is that of the rows unshifted). A kernel that sums p (t - s), or forms CE or TCP from lse, rounds
    them to the spacing of the shift (0.03-0.06); a top-k teacher keeps its logits (its cache stores absolute
    values: README)."""
    return s, y, t if case.topk else t + 1e6, r - 5e5


def _masked_with_lowest(s, y, t, r, case):
    """Classes masked with float32's lowest finite value (-3.4e38, what masked_fill(mask, torch.finfo(dtype).min)
    writes): the teacher's and reference's past the first 2%, the student's last fifth. Such a shift must not meet
    a sum before it is scaled: Triton's column-block kernel summed 8 of them into -inf and scaled that by 0 into a
    NaN KD until stop 33. Targets stay off the student's masked classes (CE there would be 3.4e38 and the weighted
    loss overflow float32)."""
    lowest = torch.finfo(torch.float32).min
    kept = case.c - case.c // 5
    s[:, kept:] = lowest
    t[:, case.c // 50 + 1:] = lowest
    r[:, case.c // 50 + 1:] = lowest
    return s, torch.where((y >= kept) & (y != case.ignore_index), y % kept, y), t, r


def _student_masked_where_frozen_lowest(s, y, t, r, case):
    """The student masked with -inf (masked_fill(mask, -inf)) at the row's first 2% (at least 16 classes) and at
    a stretch in its middle, where the teacher and reference hold their dtype's lowest finite value
    (finfo(dtype).min: -3.4e38 in fp32 and bf16, -65504 in fp16) and -1e4 respectively: those classes have
    probability 0 in float64, so KD and the reference term are finite. Triton's column-block kernel gave NaN
    (a lane's +inf cross sum times a rescale of 0) until stop 36. Targets stay off the masked classes (C >= 64
    leaves some unmasked)."""
    first = max(16, case.c // 50)
    middle = torch.arange(case.c // 2, min(case.c, case.c // 2 + first))
    masked = torch.zeros(case.c, dtype=torch.bool)
    masked[:first] = True
    masked[middle] = True
    s[:, masked] = float("-inf")
    for x in (t, r):
        x[:, :first] = torch.finfo(case.dtype).min
        x[:, middle] = -1e4
    kept = torch.nonzero(~masked).flatten()
    on_masked = (y >= 0) & (y != case.ignore_index) & masked[y.clamp(min=0)]
    return s, torch.where(on_masked, kept[y.clamp(min=0) % kept.numel()], y), t, r


def _all_ignored(s, y, t, r, case):
    return s, torch.full_like(y, case.ignore_index), t, r


EDITS = {"": _no_edit, "masked_blocks": _masked_blocks, "masked_every_third": _masked_every_third,
         "masked_teacher_reference": _masked_teacher_and_reference, "nan_teacher": _nan_teacher,
         "nan_ignored_row": _nan_in_ignored_row, "all_equal": _all_equal, "late_maximum": _late_maximum,
         "rising": _rising, "all_ignored": _all_ignored, "far_shifted": _far_shifted,
         "masked_with_lowest": _masked_with_lowest,
         "student_masked_where_frozen_lowest": _student_masked_where_frozen_lowest}


# ---- top-k teachers other than the top-k of random logits: (student, teacher, target, case) -> TopKTeacher ----

def _sure_teacher(student, teacher, target, case):
    """Kept mass 1 in float64 (p_rest = 0): teacher logits -1e4 outside the first k classes."""
    sure = torch.full_like(teacher, -1e4)
    sure[:, : case.k] = torch.linspace(3.0, 1.0, case.k, dtype=teacher.dtype)
    return TopKTeacher.from_logits(sure, target, case.k, case.temperature)


def _nan_kept_value(student, teacher, target, case):
    """A NaN kept value in row 2: that row's KD, loss and gradient are NaN, as the reference's (p != 0)."""
    topk = TopKTeacher.from_logits(teacher, target, case.k, case.temperature)
    values = topk.values.clone()
    values[2, 1] = float("nan")
    return replace(topk, values=values)


def _half_cache(student, teacher, target, case):
    """An fp16 cache (values, true logit, log-sum-exps) with int32 indices."""
    topk = TopKTeacher.from_logits(teacher, target, case.k, case.temperature)
    return TopKTeacher(topk.values.half(), topk.indices.int(), topk.true_logit.half(), topk.log_sum_exp.half(),
                       topk.log_sum_exp_at_temperature.half())


def _no_rest(student, teacher, target, case):
    """p_rest = 0 (kept mass 1 + e^-30: p_rest = -expm1(log of it) < 0, clamped to 0 in fp32 and fp64 alike),
    targets on the two kept classes; from row 2 on the student's rest is -inf too (R = 0): a finite 0 term."""
    valid = target != case.ignore_index
    target[valid] = target[valid].clamp(0, 1)
    student[2:, 2:] = float("-inf")
    values = torch.tensor([[0.0, -30.0]], dtype=teacher.dtype).expand(case.n, 2)
    zeros = torch.zeros(case.n, dtype=teacher.dtype)
    true_logit = values.gather(1, target.clamp(0, 1)[:, None])[:, 0]
    return TopKTeacher(values, torch.tensor([[0, 1]]).expand(case.n, 2), true_logit, zeros, zeros)


def _student_rest_masked(student, teacher, target, case):
    """p_rest > 0 but the student's non-kept logits are -inf (R = 0): KD = +inf, as in the reference;
    targets moved onto a kept class."""
    topk = TopKTeacher.from_logits(teacher, target, case.k, case.temperature)
    rest = torch.ones_like(student, dtype=torch.bool).scatter(1, topk.indices, False)
    student[rest] = float("-inf")
    valid = target != case.ignore_index
    target[valid] = topk.indices[valid, 0]
    return TopKTeacher.from_logits(teacher, target, case.k, case.temperature)


# The rest's distance below the kept classes, in units of T, by row (row 1 is ignored): past fp32's underflow of
# the rest's sum at the row maximum (about 87 T); where that sum is about e^-70, below the kernels' switch to the
# rest's own maximum (2^-64, about e^-44) but still a normal float; past float64's underflow (about 708 T); and
# above the switch (e^-30: the sum at the row maximum is kept).
FAR_REST_GAPS = (120.0, 0.0, 70.0, 1000.0, 30.0)


def _student_rest_far_below(student, teacher, target, case):
    """p_rest > 0 and the student's largest logit not kept lies FAR_REST_GAPS[i] T below its largest kept one
    (a confident student at a low temperature): the exact KD is finite, and so is its gradient, where the rest's
    sum taken at the row maximum underflows. Targets alternate between a kept class and the rest."""
    topk = TopKTeacher.from_logits(teacher, target, case.k, case.temperature)
    rest = torch.ones_like(student, dtype=torch.bool).scatter(1, topk.indices, False)
    kept_max = student.masked_fill(rest, float("-inf")).amax(1, keepdim=True)
    rest_max = student.masked_fill(~rest, float("-inf")).amax(1, keepdim=True)
    gaps = torch.tensor(FAR_REST_GAPS, dtype=student.dtype).repeat(case.n // len(FAR_REST_GAPS) + 1)[: case.n]
    student[:] = torch.where(rest, student - rest_max + kept_max - gaps[:, None] * case.temperature, student)
    on_kept = (target != case.ignore_index) & (torch.arange(case.n) % 2 == 0)
    target[on_kept] = topk.indices[on_kept, 0]
    return TopKTeacher.from_logits(teacher, target, case.k, case.temperature)


# What a cache's padding rows (target ignore_index) may hold: (every index, every float field) of such a row.
PADDING_FILLS = {"zeros": (0, 0.0), "minus_one": (-1, float("-inf")), "past_c": (10**6, float("nan"))}


def padded(topk: TopKTeacher, rows, index: int, value: float) -> TopKTeacher:
    """topk with the given rows filled as a cache's padding might be: every index `index`, every float `value`."""
    fields = {name: getattr(topk, name).clone() for name in TopKTeacher.TENSOR_FIELDS}
    for name, values in fields.items():
        values[rows] = index if name == "indices" else value
    return TopKTeacher(**fields, temperature=topk.temperature)


def _padding_rows(student, teacher, target, case):
    """The ignored rows' top-k fields hold PADDING_FILLS in turn (zeros: index 0 repeated, kept mass k; -1 with
    -inf; past C with NaN): no backend reads them, validation leaves them be."""
    topk = TopKTeacher.from_logits(teacher, target, case.k, case.temperature)
    fills = list(PADDING_FILLS.values())
    for j, row in enumerate(torch.nonzero(target == case.ignore_index).flatten().tolist()):
        topk = padded(topk, row, *fills[j % len(fills)])
    return topk


# edit -> (student, teacher, target, case) -> TopKTeacher; may edit student and target in place.
TOPK_TEACHERS = {"no_rest": _no_rest, "student_rest_masked": _student_rest_masked,
                 "student_rest_far_below": _student_rest_far_below,
                 "sure_teacher": _sure_teacher, "nan_kept_value": _nan_kept_value, "half_cache": _half_cache,
                 "padding_rows": _padding_rows}


# ---- layouts: views into larger tensors, as models hand them over (made on the tensors' device) ----

def _view(x, rows, cols, offset):
    """x as the [:, offset:offset + C] slice of a (rows * N, C + cols) tensor's every rows-th row."""
    if x is None:
        return None
    n, c = x.shape
    wide = torch.zeros(rows * n, c + cols, dtype=x.dtype, device=x.device)
    wide[::rows, offset:offset + c] = x
    return wide[::rows, offset:offset + c]


def _transposed(x):
    return None if x is None else x.t().contiguous().t()


def _column_strided(x):
    if x is None:
        return None
    wide = torch.zeros(x.shape[0], 2 * x.shape[1], dtype=x.dtype, device=x.device)
    wide[:, ::2] = x
    return wide[:, ::2]


def _strided_topk(topk):
    return None if topk is None else topk.map_tensors(lambda t: torch.stack([t, t], dim=-1)[..., 1])


def _same(x):
    return x


# (student, teacher, reference, target, top-k teacher)
LAYOUTS = {
    "contiguous": (_same, _same, _same, _same, _same),
    # row stride C + 3, from the row's first element (row-padded) or from its second (misaligned)
    "padded": (*(lambda x: _view(x, 1, 3, 0),) * 3, _same, _same),
    "misaligned": (*(lambda x: _view(x, 1, 3, 1),) * 3, _same, _same),
    "column_strided": (_column_strided, _same, _transposed, _same, _same),
    "transposed": (_transposed, _transposed, _transposed, _same, _same),
    # transposed student, column stride 2 teacher, row stride 2C reference, strided target and top-k tensors
    "mixed": (_transposed, _column_strided, lambda x: _view(x, 2, 0, 0),
              lambda y: torch.stack([y, y], 1)[:, 0], _strided_topk),
    # row stride C + 8 from an unaligned start (student), C + 8 (reference), transposed teacher
    "offset_rows": (lambda x: _view(x, 1, 8, 3), _transposed, lambda x: _view(x, 1, 8, 0), _same, _same),
}


def on_device(inputs: Inputs, case: Case, device) -> Inputs:
    """The case's inputs moved to device, then laid out (views made there) and given the leading shape."""
    def move(x):
        return None if x is None else x.to(device)

    topk = None if inputs.topk is None else inputs.topk.map_tensors(move)
    student, teacher, reference, target, topk_layout = LAYOUTS[case.layout]
    laid = Inputs(student(move(inputs.student)), None if inputs.target is None else target(move(inputs.target)),
                  teacher(move(inputs.teacher)), reference(move(inputs.reference)),
                  None if topk is None else topk_layout(topk))
    return _with_leading_shape(laid, case.leading) if case.leading else laid


# ---- the cases ----

def row_count(c: int) -> int:
    """Rows for the vocabulary ladder: about 2^19 logits per case, 3 to 64 rows."""
    return max(3, min(64, 2**19 // c))


def dense_cases() -> list:
    cases = []
    # Narrow rows: C = 1 and 2, 17 (no multiple of a vector width), 1000, 2051 (two blocks of 1024 and a
    # tail); every input combination and dtype.
    for dtype in (F64, F32, BF16, F16):
        for c in (1, 2, 17, 1000, 2051):
            for inputs in INPUTS:
                cases.append(Case("rows", 5, c, dtype, inputs))
    cases += [Case("rows", 1, 262144, F32), Case("rows", 2, 262144, BF16, seed=1), Case("rows", 257, 64, F32)]
    # The vocabulary ladder: C around the CUDA kernels' row layouts (8 lanes <= 128 < 16 lanes <= 512 < warp
    # <= 2048 < 256-thread block <= 16384 < 512-thread block), odd sizes, LLM vocabularies; per-row weights
    # v_i, as a training loop's mean or mask gives the backward.
    for dtype in (F32, BF16, F16):
        for c in (1, 7, 100, 129, 130, 513, 1000, 2048, 2049, 4097, 4100, 5003, 16384, 16385, 32000, 50257, 128256,
                  131072, 262144):
            for inputs in ("smskd", "smskd_tcp", "ce_kd", "ce_ref", "ce_only", "kd_only"):
                cases.append(Case("ladder", row_count(c), c, dtype, inputs, temperature=2.5, row_weights=True))
    # T = 1 and T = 2 over the same row layouts: the CUDA kernel's instantiations for them take softmax(s) and
    # the teacher's T = 1 sums from the exponentials at T (kernels/smskd_row_kernel.cuh, temperature_power).
    for dtype in (F32, BF16, F16):
        for c in (100, 513, 2049, 16385, 50257):
            for inputs in ("smskd", "smskd_tcp", "ce_kd", "ce_ref"):
                for temperature in (1.0, 2.0):
                    cases.append(Case("temperature_ladder", row_count(c), c, dtype, inputs, temperature=temperature,
                                      row_weights=True, seed=c + int(temperature)))
    # Temperatures: 1 and 4 take the CPU's integer-power path, the others exp.
    for temperature in (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 8.0, 9.0):
        for dtype in (F64, F32, BF16):
            cases.append(Case("temperature", 4, 300, dtype, temperature=temperature))
        if temperature in (0.5, 1.0, 8.0):
            cases.append(Case("temperature", 33, 4096, BF16, temperature=temperature, row_weights=True))
        if temperature in (1.0, 2.0):  # Triton's column-block kernel (C > 4096), small enough for its interpreter
            cases.append(Case("temperature", 3, 4100, F32, temperature=temperature, row_weights=True))
    # Triton's shapes: every weighting, subsets of the inputs with unit weights, half precision.
    shapes = ((3, 1), (4, 7), (5, 130), (2, 4100), (64, 1000), (33, 4097), (16, 32000), (8, 128256), (4, 262144))
    for n, c in shapes:
        for inputs in ("smskd", "smskd_tcp", "smskd_constant"):
            cases.append(Case("shapes", n, c, F32, inputs, temperature=2.5, seed=n * 1000 + c))
        for inputs in ("kd_only", "ce_only", "ce_kd_constant", "ce_ref"):
            cases.append(Case("subsets", n, c, F32, inputs, weights=(1.0, 1.0, 1.0), seed=c))
        for dtype in (BF16, F16):
            if c > 1:
                cases.append(Case("half", n, c, dtype, temperature=2.0, weights=(1.0, 1.0, 1.0), seed=7))
    for weights in ((0.0, 1.0, 1.0), (1.0, 0.0, 1.0), (1.0, 1.0, 0.0)):
        cases.append(Case("loss_weights", 4, 100, F32, weights=weights))
    for dtype in (F32, BF16, F16):
        for layout in ("padded", "misaligned"):
            for c in (100, 2049, 32000):
                cases.append(Case("layout", 17, c, dtype, layout=layout, temperature=2.5, row_weights=True))
        for c in (24, 1100, 4104):
            cases.append(Case("layout", 6, c, dtype, layout="mixed"))
            cases.append(Case("layout", 6, c, dtype, layout="offset_rows", temperature=1.5, seed=13))
    cases += [Case("leading", 24, 500, F32, "smskd_tcp", leading=(4, 6), row_weights=True),
              Case("leading", 6, 33, F32, temperature=2.0, leading=(2, 3)),
              Case("int32_target", 10, 64, F32, target_dtype=torch.int32, row_weights=True),
              Case("ignore_index", 6, 90, F32, ignore_index=-1, edit="nan_ignored_row"),
              Case("all_equal", 3, 37, F32, edit="all_equal"),
              Case("late_maximum", 4, 300, F32, temperature=3.0, seed=3, edit="late_maximum"),
              # T = 1 and 2 with C > 4096: Triton's column-block kernel rescaling its squared (T = 2) sums
              Case("late_maximum", 3, 4100, F32, temperature=2.0, seed=3, edit="late_maximum"),
              Case("late_maximum", 3, 4100, F32, temperature=1.0, seed=4, edit="late_maximum"),
              Case("nan", 3, 4100, F32, temperature=2.0, edit="nan_teacher"),
              Case("nan", 3, 40, F32, edit="nan_teacher"),
              Case("nan", 4, 4100, F32, edit="nan_teacher"),
              Case("masked", 9, 3000, F32, edit="masked_teacher_reference", row_weights=True)]
    for dtype in (F64, F32, BF16):
        cases.append(Case("masked", 4, 1030, dtype, edit="masked_blocks"))
    for c in (7, 4100):
        cases.append(Case("masked", 3, c, F32, temperature=2.0, seed=11, edit="masked_every_third"))
    # Far-shifted teacher and reference rows: whole rows (Triton's tile kernel) and column blocks, T = 2's power path.
    for dtype in (F64, F32):
        for c, temperature in ((300, 4.0), (5000, 2.0)):
            cases.append(Case("far_shifted", 4, c, dtype, temperature=temperature, seed=c, edit="far_shifted"))
    # Float32's lowest as the mask value (float32 only: bfloat16 and float16 round it to -inf).
    for c in (300, 5000):
        cases.append(Case("lowest", 5, c, F32, temperature=2.0, seed=c, edit="masked_with_lowest"))
    # The student's -inf where the teacher and reference hold their dtype's lowest (or -1e4): a whole row,
    # column blocks (Triton) and the CPU's row split; T = 1 and 2 (power paths) and 4.
    for dtype in (F32, BF16, F16):
        for n, c, temperature in ((5, 300, 4.0), (5, 5000, 2.0), (5, 5000, 1.0), (1, 5000, 4.0)):
            cases.append(Case("student_masked", n, c, dtype, temperature=temperature, seed=c + int(temperature),
                              row_weights=True, edit="student_masked_where_frozen_lowest"))
    return cases


def topk_cases() -> list:
    cases = []
    opts = dict(temperature=4.0, weights=(0.3, 0.9, 0.7))
    for dtype in (F64, F32, BF16, F16):
        for k in (1, 3, 17):
            for inputs in ("target+reference", "target+reference_tcp", "target+reference_constant"):
                cases.append(Case("topk_rows", 9, 17, dtype, inputs, k=k, seed=k, **opts))
    for dtype in (F64, F32):
        for inputs in ("target_inverse_tcp", "reference", "neither"):
            cases.append(Case("topk_inputs", 6, 11, dtype, inputs, k=4, temperature=2.0, weights=(1.0, 1.0, 0.5)))
    # The ladder of the CUDA kernel's row layouts; k = 1, k below and above the threads of a row, k = C.
    for dtype in (F32, BF16, F16):
        for c in (1, 7, 100, 129, 513, 2049, 5003, 16385, 32000, 50257, 131072):
            n = max(3, min(48, 2**18 // c))
            for inputs in ("target+reference", "target", "reference", "neither"):
                for k in sorted({1, min(8, c), min(300, c), c if c <= 513 else 1}):
                    cases.append(Case("topk_ladder", n, c, dtype, inputs, k=k, seed=k,
                                      temperature=4.0 if c % 2 else 1.0, weights=(0.3, 0.9, 0.7)))
    for dtype in (F64, F32, BF16):
        for c, k in ((1023, 10), (1024, 64), (1025, 1), (5000, 37)):
            cases.append(Case("topk_blocks", 5, c, dtype, k=k, seed=c, temperature=2.5, weights=(0.4, 0.9, 0.6)))
        for c, k in ((40, 39), (40, 40), (1100, 1099), (1100, 1100)):
            cases.append(Case("topk_k_near_c", 4, c, dtype, k=k, seed=k, temperature=3.0, weights=(0.3, 1.0, 0.7)))
        cases.append(Case("topk_layout", 6, 1500, dtype, k=12, seed=3, temperature=2.0, weights=(0.5, 1.0, 0.5),
                          layout="mixed"))
    for dtype in (F64, F32):
        cases.append(Case("topk_wide", 3, 32000, dtype, "target+reference_tcp", k=64, seed=7, temperature=1.0,
                          weights=(1.0, 1.0, 0.5)))
    cases.append(Case("topk_rising", 7, 4100, F64, k=50, seed=11, scale=30.0, temperature=1.5,
                      weights=(0.5, 1.0, 0.5), edit="rising"))
    for dtype in (F32, BF16, F16):
        for layout in ("padded", "misaligned", "transposed", "column_strided"):
            for c in (100, 2049, 32000):
                cases.append(Case("topk_layout", 17, c, dtype, k=20, seed=3, temperature=2.0,
                                  weights=(0.5, 1.0, 0.5), layout=layout))
        for n, c in ((5, 17), (4, 5000), (64, 1000), (16, 32000), (4, 128256)):
            cases.append(Case("topk_half", n, c, dtype, k=5, seed=9, temperature=2.0, weights=(0.6, 1.0, 0.7)))
        for n, c, k in ((4, 5000, 7), (64, 1000, 7), (64, 1000, 1000), (16, 32000, 7), (16, 32000, 32000),
                        (4, 128256, 7), (4, 128256, 128256)):
            cases.append(Case("topk_wide", n, c, dtype, k=k, seed=c, temperature=2.0, weights=(0.5, 1.0, 0.8)))
    cases += [
        Case("topk_late_maximum", 3, 300, F32, k=5, seed=5, temperature=3.0, weights=(0.4, 1.0, 0.6),
             edit="late_maximum"),
        Case("topk_late_maximum", 3, 300, F32, k=300, seed=300, temperature=3.0, weights=(0.4, 1.0, 0.6),
             edit="late_maximum"),
        Case("topk_one_class", 3, 1, F32, k=1, temperature=2.0, weights=(0.5, 1.0, 0.7)),
        Case("topk_layout", 5, 40, F32, k=6, seed=3, temperature=2.0, weights=(0.5, 1.0, 0.7), layout="offset_rows"),
        Case("topk_no_rest", 4, 6, F64, "target+reference_constant", k=2, temperature=1.0, weights=(0.0, 1.0, 0.0),
             edit="sure_teacher"),
        Case("topk_no_rest", 4, 6, F32, "target", k=2, temperature=1.0, weights=(0.5, 1.0, 0.0), edit="no_rest"),
        Case("topk_student_rest_masked", 3, 8, F32, "target", k=3, seed=4, temperature=2.0, weights=(1.0, 1.0, 0.0),
             edit="student_rest_masked"),
        Case("topk_student_rest_masked", 6, 300, F32, "target", k=10, seed=9, temperature=2.0,
             weights=(0.5, 1.0, 0.0), edit="student_rest_masked"),
        Case("topk_no_rest", 4, 3000, F32, k=2, seed=7, temperature=1.0, weights=(0.5, 1.0, 0.3),
             inputs="target+reference_constant", edit="sure_teacher"),
        Case("topk_no_rest", 5, 3000, BF16, k=3000, seed=8, weights=(1.0, 1.0, 1.0)),
        Case("topk_half_cache", 12, 1000, BF16, k=16, seed=5, weights=(0.3, 0.9, 0.7), target_dtype=torch.int32,
             edit="half_cache"),
        Case("topk_leading", 6, 12, F32, k=4, seed=5, temperature=3.0, weights=(1.0, 1.0, 1.0), leading=(2, 3)),
    ]
    # The rest far below the kept classes (FAR_REST_GAPS): T = 1 and 2 (the CUDA kernel's power paths) and 2.5,
    # a whole row and column blocks (Triton), the CPU's row split among threads (one row of C >= 4096).
    for dtype in (F64, F32, BF16, F16):
        for temperature in (1.0, 2.0, 2.5):
            for inputs in ("target+reference", "target", "neither"):
                cases.append(Case("topk_far_rest", 5, 300, dtype, inputs, k=5, seed=21, temperature=temperature,
                                  weights=(0.5, 1.0, 0.7), edit="student_rest_far_below"))
    for n, c, k in ((5, 5000, 37), (1, 5000, 3), (3, 2049, 300)):
        for temperature in (1.0, 2.5):
            cases.append(Case("topk_far_rest", n, c, F32, k=k, seed=c, temperature=temperature,
                              weights=(0.5, 1.0, 0.7), edit="student_rest_far_below"))
    # Padding rows (every fifth from the second, ignored) holding PADDING_FILLS; a whole row and column blocks.
    for dtype in (F64, F32, BF16):
        for n, c, k in ((12, 300, 5), (12, 2049, 37)):
            cases.append(Case("topk_padding", n, c, dtype, k=k, seed=c + n, temperature=2.0, weights=(0.5, 1.0, 0.7),
                              edit="padding_rows"))
    for c in (9, 300):
        cases.append(Case("topk_nan", 4, c, F32, "target", k=3, seed=6, temperature=2.0, weights=(0.5, 1.0, 0.0),
                          edit="nan_kept_value"))
    for dtype in (F64, F32):
        for c, temperature in ((300, 4.0), (5000, 2.0)):
            cases.append(Case("topk_far_shifted", 4, c, dtype, k=10, seed=c, temperature=temperature,
                              weights=(0.5, 1.0, 0.7), edit="far_shifted"))
    # The student's -inf where the dense reference holds its dtype's lowest (the top-k kernel's reference stream).
    for dtype in (F32, BF16, F16):
        for c, k, temperature in ((300, 5, 4.0), (5000, 37, 2.0)):
            cases.append(Case("topk_student_masked", 5, c, dtype, k=k, seed=c, temperature=temperature,
                              weights=(0.5, 1.0, 0.7), edit="student_masked_where_frozen_lowest"))
    return cases
