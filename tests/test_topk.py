"""The top-k teacher form: exact TCP, exact when k = C, the coarsened KL otherwise, and its gradient."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import smskd_fast
from closed_form import softmax
from conformance_cases import PADDING_FILLS, padded
from conftest import make_logits
from gpu_child import assert_fails_loudly, run_child
from smskd_fast.backends.topk import TopKTeacher
from smskd_fast.ops.extension import extension_loaded


def topk_closed_form(s, t, y, k, T):
    """Per row T^2 KL(p~||q) and its gradient T (q - p~), written from the definition in float64."""
    losses, grads = [], []
    for si, ti in zip(s, t):
        kept = np.argsort(-ti, kind="stable")[:k]
        rest = np.setdiff1d(np.arange(len(si)), kept)
        p, q = softmax(ti / T), softmax(si / T)
        p_tilde = np.zeros_like(p)
        p_tilde[kept] = p[kept]
        p_rest = 1.0 - p[kept].sum()
        if len(rest):
            p_tilde[rest] = p_rest * q[rest] / q[rest].sum()
        support = p_tilde > 0
        losses.append(T * T * np.sum(p_tilde[support] * np.log(p_tilde[support] / q[support])))
        grads.append(T * (q - p_tilde))
    return np.array(losses), np.array(grads)


@pytest.mark.parametrize("k", [1, 3, 10])
@pytest.mark.parametrize("T", [1.0, 4.0])
def test_loss_and_gradient_match_the_definition(k, T):
    student, target, teacher, _ = make_logits((6, 10), with_reference=False)
    topk = TopKTeacher.from_logits(teacher, target, k, T)
    student.requires_grad_(True)
    out = smskd_fast.smskd_loss(student, target, teacher_topk=topk, temperature=T, ce_weight=0.0,
                                reduction="none", backend="reference")
    out.loss.sum().backward()
    want, want_grad = topk_closed_form(student.detach().numpy(), teacher.numpy(), target, k, T)
    np.testing.assert_allclose(out.kd.numpy(), want, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(student.grad.numpy(), want_grad, rtol=1e-8, atol=1e-12)


def test_k_equal_to_c_is_the_dense_loss_and_tcp_is_always_exact():
    student, target, teacher, reference = make_logits((5, 8), ignore_every=3)
    dense = smskd_fast.smskd_loss(student, target, teacher, reference, reduction="none", backend="reference")
    for k in (8, 2):
        topk = TopKTeacher.from_logits(teacher, target, k, 4.0)
        out = smskd_fast.smskd_loss(student, target, None, reference, teacher_topk=topk, reduction="none",
                                    backend="reference")
        torch.testing.assert_close(out.tcp, dense.tcp, rtol=1e-12, atol=0)
        torch.testing.assert_close(out.weight, dense.weight, rtol=1e-12, atol=0)
        if k == 8:
            torch.testing.assert_close(out.loss, dense.loss, rtol=1e-12, atol=1e-12)
        else:  # coarsening never increases a KL
            assert torch.all(out.kd <= dense.kd + 1e-12)


def test_gradcheck_float64():
    student, target, teacher, _ = make_logits((4, 6), with_reference=False)
    topk = TopKTeacher.from_logits(teacher, target, 2, 2.0)
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda s: smskd_fast.smskd_loss(s, target, teacher_topk=topk, temperature=2.0, backend="reference").loss,
        (student,))


def test_auto_picks_a_backend_that_accepts_topk_and_others_refuse():
    student, target, teacher, _ = make_logits((3, 5), dtype=torch.float32, with_reference=False)
    topk = TopKTeacher.from_logits(teacher, target, 2, 4.0)
    smskd_fast.smskd_loss(student, target, teacher_topk=topk)  # auto
    without = [name for name, status in smskd_fast.available_backends().items()
               if status and name != "reference"
               and not getattr(smskd_fast.backends.registry._BACKENDS[name][1], "supports_topk", False)]
    for name in without:
        if smskd_fast.backends.registry._BACKENDS[name][1].supports(student.device):
            with pytest.raises(ValueError, match=f"backend '{name}' does not accept teacher_topk"):
                smskd_fast.smskd_loss(student, target, teacher_topk=topk, backend=name)


def test_bad_topk_arguments():
    student, target, teacher, _ = make_logits((3, 5), dtype=torch.float32, with_reference=False)
    topk = TopKTeacher.from_logits(teacher, target, 2, 4.0)
    with pytest.raises(ValueError, match="either as teacher_logits or as teacher_topk, not both"):
        smskd_fast.smskd_loss(student, target, teacher, teacher_topk=topk)
    bad = TopKTeacher(topk.values, topk.indices, topk.true_logit[:2], topk.log_sum_exp,
                      topk.log_sum_exp_at_temperature)
    with pytest.raises(ValueError, match=r"teacher_topk.true_logit must have shape \(3,\)"):
        smskd_fast.smskd_loss(student, target, teacher_topk=bad)
    bad = TopKTeacher(topk.values, topk.indices + 5, *topk.tensors()[2:])
    with pytest.raises(ValueError, match=r"teacher_topk.indices must be in \[0, 5\)"):
        smskd_fast.smskd_loss(student, target, teacher_topk=bad)
    with pytest.raises(ValueError, match=r"k must be in \[1, 5\], got 6"):
        TopKTeacher.from_logits(teacher, target, 6, 4.0)


def _with(topk, **fields):
    return dataclasses.replace(topk, **fields)


def test_repeated_or_out_of_range_indices_are_refused_naming_the_first_bad_row():
    student, target, teacher, _ = make_logits((4, 6), dtype=torch.float32, with_reference=False)
    topk = TopKTeacher.from_logits(teacher, target, 3, 4.0)
    repeated = topk.indices.clone()
    repeated[2, 1] = repeated[2, 0]
    repeated[3, 2] = repeated[3, 0]
    with pytest.raises(ValueError, match=r"teacher_topk.indices must be distinct within a row .* row 2 repeats"):
        smskd_fast.smskd_loss(student, target, teacher_topk=_with(topk, indices=repeated))
    negative = topk.indices.clone()
    negative[1, 2] = -1
    with pytest.raises(ValueError, match=r"teacher_topk.indices must be in \[0, 6\), found -1 in row 1"):
        smskd_fast.smskd_loss(student, target, teacher_topk=_with(topk, indices=negative))
    # Leading dimensions (B, L): the row is named by its index in them.
    batched = _with(topk, **{name: getattr(topk, name).reshape(2, 2, *getattr(topk, name).shape[1:])
                                  for name in TopKTeacher.TENSOR_FIELDS})
    batched_repeat = batched.indices.clone()
    batched_repeat[1, 0, 1] = batched_repeat[1, 0, 2]
    with pytest.raises(ValueError, match=r"row \(1, 0\) repeats"):
        smskd_fast.smskd_loss(student.reshape(2, 2, 6), target.reshape(2, 2),
                              teacher_topk=_with(batched, indices=batched_repeat))
    # A single row of shape (C,).
    single = _with(topk, **{name: getattr(topk, name)[0] for name in TopKTeacher.TENSOR_FIELDS})
    with pytest.raises(ValueError, match="in the row"):
        smskd_fast.smskd_loss(student[0], target[0], teacher_topk=_with(single, indices=single.indices - 7))


def test_device_side_index_checks_assert_with_the_same_messages():
    """The non-CPU path (torch._assert_async, no host sync) run on CPU tensors, where it raises at once."""
    from smskd_fast.loss.validation import assert_topk_indices_async
    good = torch.tensor([[0, 4, 2], [1, 3, 0]])
    assert_topk_indices_async(good, 5)
    with pytest.raises(RuntimeError, match=r"teacher_topk.indices must be in \[0, 5\)"):
        assert_topk_indices_async(torch.tensor([[0, 5, 2], [1, 3, 0]]), 5)
    with pytest.raises(RuntimeError, match="teacher_topk.indices must be distinct within a row"):
        assert_topk_indices_async(torch.tensor([[0, 4, 2], [1, 3, 1]]), 5)


def test_teacher_topk_dtypes_are_checked():
    student, target, teacher, _ = make_logits((3, 5), dtype=torch.float32, with_reference=False)
    topk = TopKTeacher.from_logits(teacher, target, 2, 4.0)
    for name in ("values", "true_logit", "log_sum_exp", "log_sum_exp_at_temperature"):
        bad = _with(topk, **{name: getattr(topk, name).long()})
        with pytest.raises(TypeError, match=f"teacher_topk.{name} must be a floating tensor"):
            smskd_fast.smskd_loss(student, target, teacher_topk=bad)
    with pytest.raises(TypeError, match="teacher_topk.indices must be an integer tensor"):
        smskd_fast.smskd_loss(student, target, teacher_topk=_with(topk, indices=topk.indices.bool()))


@pytest.mark.parametrize("built_at, used_at", [(4.0, 1.0), (1.0, 2.0), (0.5, 2.0)])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_a_teacher_built_for_another_temperature_is_refused(backend, built_at, used_at):
    """from_logits records its temperature: any other loss temperature is refused, a lower one too
    (its kept probabilities then sum to less than 1, which the kept-mass check cannot see)."""
    if backend == "cpu" and not extension_loaded():
        pytest.skip("needs the compiled smskd_fast._C")
    student, target, teacher, _ = make_logits((4, 10), dtype=torch.float32, with_reference=False)
    topk = TopKTeacher.from_logits(teacher * 3, target, 3, built_at)
    assert topk.temperature == built_at and topk.rows().temperature == built_at
    smskd_fast.smskd_loss(student, target, teacher_topk=topk, temperature=built_at, backend=backend)
    with pytest.raises(ValueError, match=f"teacher_topk was built for temperature {built_at!r} .* the loss's "
                                         f"temperature is {used_at!r}"):
        smskd_fast.smskd_loss(student, target, teacher_topk=topk, temperature=used_at, backend=backend)


def test_a_temperature_read_back_from_float32_is_the_same_temperature():
    """0.1 stored as float32 (a tensor's .item(), a cache header) and 0.1 given to the loss are one temperature."""
    student, target, teacher, _ = make_logits((4, 10), dtype=torch.float32, with_reference=False)
    topk = TopKTeacher.from_logits(teacher, target, 3, torch.tensor(0.1).item())
    assert topk.temperature != 0.1
    smskd_fast.smskd_loss(student, target, teacher_topk=topk, temperature=0.1, backend="reference")


def test_a_teacher_of_unknown_temperature_is_checked_by_its_kept_mass():
    """A TopKTeacher built by hand (its temperature unknown) with lse(t/4) and the loss at T = 1:
    the kept probabilities would sum to far more than 1."""
    student, target, teacher, _ = make_logits((4, 10), dtype=torch.float32, with_reference=False)
    topk = TopKTeacher(*TopKTeacher.from_logits(teacher * 3, target, 3, 4.0).tensors())
    assert topk.temperature is None
    smskd_fast.smskd_loss(student, target, teacher_topk=topk, temperature=4.0)  # its own temperature
    with pytest.raises(ValueError, match=r"kept probabilities .* sum to [0-9.]+ > 1 in row 0 at temperature 1"):
        smskd_fast.smskd_loss(student, target, teacher_topk=topk, temperature=1.0)


def test_float16_rounding_of_stored_values_passes_the_kept_mass_check():
    """A cache stores values in float16 and lse in float32: a confident teacher with large logits
    may then show a kept mass slightly above 1, which must not be refused."""
    student, target, teacher, _ = make_logits((64, 50), dtype=torch.float32, with_reference=False)
    teacher = teacher * 8 + 60  # logits of magnitude ~ 60-100, one class near certain at T = 1
    topk = TopKTeacher.from_logits(teacher, target, 5, 1.0)
    stored = _with(topk, values=topk.values.half().float())
    kept_mass = torch.exp(stored.values - stored.log_sum_exp_at_temperature[:, None]).sum(-1)
    assert float(kept_mass.max()) > 1  # the case this guards
    smskd_fast.smskd_loss(student, target, teacher_topk=stored, temperature=1.0)


def test_bfloat16_storage_passes_the_kept_mass_check_and_another_temperature_does_not():
    """bfloat16 fields (an epsilon of 2^-7): rounding of a confident teacher's large logits must not be refused
    (it was, with the message about another temperature); a cache built for another temperature still is."""
    student, target, teacher, _ = make_logits((64, 50), dtype=torch.float32, with_reference=False)
    teacher = teacher * 8 + 60
    topk = TopKTeacher.from_logits(teacher, target, 5, 1.0)
    stored = topk.map_tensors(lambda field: field.bfloat16() if field.is_floating_point() else field)
    kept_mass = torch.exp(stored.values.double() - stored.log_sum_exp_at_temperature.double()[:, None]).sum(-1)
    assert float(kept_mass.max()) > 1  # the case this guards
    smskd_fast.smskd_loss(student, target, teacher_topk=stored, temperature=1.0)
    other = TopKTeacher(*(field.bfloat16() if field.is_floating_point() else field  # its temperature unknown
                          for field in TopKTeacher.from_logits(teacher / 20, target, 5, 4.0).tensors()))
    with pytest.raises(ValueError, match=r"kept probabilities .* > 1 .* at temperature 1"):
        smskd_fast.smskd_loss(student, target, teacher_topk=other, temperature=1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bad", ["repeated", "out_of_range"])
def test_bad_indices_on_cuda_fail_the_device_side_assertion(bad):
    """On CUDA the index checks are torch._assert_async (no host sync): the failure surfaces at the
    next synchronisation and poisons the CUDA context, so each case runs in its own process."""
    result = run_child(f"""
import torch, smskd_fast
from smskd_fast.backends.topk import TopKTeacher
g = torch.Generator().manual_seed(0)
student, teacher = torch.randn(4, 6, generator=g).cuda(), torch.randn(4, 6, generator=g).cuda()
target = torch.tensor([0, 1, 2, 3]).cuda()
topk = TopKTeacher.from_logits(teacher, target, 3, 4.0)
indices = topk.indices.clone()
if {bad!r} == "repeated":
    indices[2, 1] = indices[2, 0]
elif {bad!r} == "out_of_range":
    indices[2, 1] = 6
topk = TopKTeacher(topk.values, indices, topk.true_logit, topk.log_sum_exp, topk.log_sum_exp_at_temperature)
smskd_fast.smskd_loss(student, target, teacher_topk=topk, backend="reference")
torch.cuda.synchronize()
""")
    assert_fails_loudly(result, "device-side assert", "teacher_topk.indices")


TOPK_CPU_BACKENDS = [name for name, status in smskd_fast.available_backends().items()
                     if status.available and name in ("reference", "cpu")]


@pytest.mark.parametrize("backend", TOPK_CPU_BACKENDS)
@pytest.mark.parametrize("field", ["values", "log_sum_exp_at_temperature"])
def test_a_nan_in_a_cached_row_gives_a_nan_loss_not_a_dropped_class(backend, field):
    """A NaN teacher value must not vanish from the KD term (p > 0 is False for NaN): the row's
    KD and loss are NaN, as a NaN teacher logit makes them in the dense form; other rows keep
    their values. A -inf value (a class of probability 0) stays a legitimate, finite case."""
    student, target, teacher, _ = make_logits((4, 10), dtype=torch.float32, with_reference=False)
    topk = TopKTeacher.from_logits(teacher, target, 3, 2.0)
    clean = smskd_fast.smskd_loss(student, target, teacher_topk=topk, temperature=2.0, reduction="none",
                                  backend=backend)
    broken = getattr(topk, field).clone()
    if field == "values":
        broken[1, 2] = float("nan")
    else:
        broken[1] = float("nan")
    student = student.clone().requires_grad_(True)
    out = smskd_fast.smskd_loss(student, target, teacher_topk=_with(topk, **{field: broken}), temperature=2.0,
                                reduction="none", backend=backend)
    assert torch.isnan(out.kd[1]) and torch.isnan(out.loss[1])
    keep = torch.tensor([0, 2, 3])
    torch.testing.assert_close(out.loss.detach()[keep], clean.loss[keep], rtol=0, atol=0)
    out.loss.sum().backward()
    assert not torch.isfinite(student.grad[1]).all()
    assert torch.isfinite(student.grad[keep]).all()


@pytest.mark.parametrize("backend", TOPK_CPU_BACKENDS)
def test_a_kept_class_of_probability_zero_adds_nothing(backend):
    """A -inf kept value (a masked class) has p = 0: the loss is finite and equals the float64 closed
    form of the same rows."""
    student, target, teacher, _ = make_logits((4, 10), dtype=torch.float64, with_reference=False)
    teacher[:, 0] = float("-inf")
    topk = TopKTeacher.from_logits(teacher, target.clamp(1), 10, 2.0)  # k = C keeps the -inf class
    out = smskd_fast.smskd_loss(student.float(), target.clamp(1), teacher_topk=_with(
        topk, **{n: getattr(topk, n).float() for n in ("values", "true_logit", "log_sum_exp",
                                                       "log_sum_exp_at_temperature")}),
        temperature=2.0, ce_weight=0.0, reduction="none", backend=backend)
    want, _ = topk_closed_form(student.numpy(), teacher.numpy(), None, 10, 2.0)
    assert torch.isfinite(out.kd).all()
    torch.testing.assert_close(out.kd.double(), torch.from_numpy(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", TOPK_CPU_BACKENDS)
@pytest.mark.parametrize("padding", PADDING_FILLS)
def test_ignored_rows_top_k_fields_are_neither_read_nor_checked(backend, padding):
    """Ignored rows (a batch's padding) count for nothing, so their top-k fields may hold anything, as their dense
    teacher logits may: zero-filled (index 0 repeated, kept mass k), -1 indices, indices past C with NaN values.
    The other rows' results and the gradient are bitwise those with the clean cache; the ignored rows' are 0."""
    student, target, teacher, reference = make_logits((3, 4, 40), dtype=torch.float32, ignore_every=5)
    topk = TopKTeacher.from_logits(teacher, target, 6, 2.0)
    ignored = target == -100
    dirty = padded(topk, ignored, *PADDING_FILLS[padding])

    def run(cache):
        s = student.clone().requires_grad_(True)
        out = smskd_fast.smskd_loss(s, target, None, reference, teacher_topk=cache, temperature=2.0,
                                    reduction="none", backend=backend)
        out.loss.sum().backward()
        return out, s.grad

    (clean_out, clean_grad), (out, grad) = run(topk), run(dirty)
    for name in ("loss", "ce", "kd", "ref", "tcp", "weight"):
        assert torch.equal(getattr(out, name), getattr(clean_out, name)), name
        assert (getattr(out, name)[ignored] == 0).all(), name
    assert torch.equal(grad, clean_grad) and (grad[ignored] == 0).all()


@pytest.mark.parametrize("backend", TOPK_CPU_BACKENDS)
def test_bad_indices_in_a_counted_row_are_still_refused_beside_padding(backend):
    student, target, teacher, _ = make_logits((6, 8), dtype=torch.float32, with_reference=False, ignore_every=3)
    topk = padded(TopKTeacher.from_logits(teacher, target, 3, 2.0), target == -100, 0, 0.0)
    indices = topk.indices.clone()
    indices[4, 2] = indices[4, 0]  # row 4 counts (rows 0 and 3 are ignored)
    with pytest.raises(ValueError, match=r"distinct within a row .* row 4 repeats"):
        smskd_fast.smskd_loss(student, target, teacher_topk=_with(topk, indices=indices), temperature=2.0,
                              backend=backend)
    indices[4, 2] = 8
    with pytest.raises(ValueError, match=r"must be in \[0, 8\), found 8 in row 4"):
        smskd_fast.smskd_loss(student, target, teacher_topk=_with(topk, indices=indices), temperature=2.0,
                              backend=backend)
    with pytest.raises(ValueError, match=r"kept probabilities .* in row 4 at temperature 2"):
        lse = topk.log_sum_exp_at_temperature.clone()
        lse[4] = -5.0
        smskd_fast.smskd_loss(student, target, teacher_topk=_with(topk, log_sum_exp_at_temperature=lse),
                              temperature=2.0, backend=backend)


def test_device_side_index_checks_leave_ignored_rows_alone():
    from smskd_fast.loss.validation import assert_topk_indices_async
    indices = torch.tensor([[0, 0, 0], [1, 3, 0], [-1, -1, -1]])
    counted = torch.tensor([False, True, False])
    assert_topk_indices_async(indices, 5, counted)
    with pytest.raises(RuntimeError, match=r"teacher_topk.indices must be in \[0, 5\)"):
        assert_topk_indices_async(indices, 5, torch.tensor([False, True, True]))
    with pytest.raises(RuntimeError, match="teacher_topk.indices must be distinct within a row"):
        assert_topk_indices_async(indices, 5, torch.tensor([True, True, False]))


@pytest.mark.parametrize("backend", TOPK_CPU_BACKENDS)
def test_fused_linear_takes_a_cache_with_padding_rows(backend):
    """fused_linear_smskd_loss (chunks of rows) with zero-filled padding rows: the clean cache's results."""
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(10, 6, generator=g), torch.randn(30, 6, generator=g)
    target = torch.randint(0, 30, (10,), generator=g)
    target[::4] = -100
    topk = TopKTeacher.from_logits(torch.randn(10, 30, generator=g), target, 4, 2.0)
    results = []
    for cache in (topk, padded(topk, target == -100, 0, 0.0)):
        h = hidden.clone().requires_grad_(True)
        out = smskd_fast.fused_linear_smskd_loss(h, weight, target, teacher_topk=cache, temperature=2.0,
                                                 chunk_size=3, backend=backend)
        out.loss.backward()
        results.append((out.loss.detach(), h.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_a_cache_captured_by_a_torch_func_transform_is_still_checked():
    """Under torch.func.grad / jacrev / vmap the top-k fields a function only captures hold plain values: a
    repeated class is refused as in eager (only batched fields, whose values cannot be read, skip the check)."""
    student, target, teacher, _ = make_logits((3, 7), dtype=torch.float32, with_reference=False)
    topk = TopKTeacher.from_logits(teacher, target, 3, 2.0)
    indices = topk.indices.clone()
    indices[1, 1] = indices[1, 0]
    bad = _with(topk, indices=indices)

    def loss(x):
        return smskd_fast.smskd_loss(x, target, teacher_topk=bad, temperature=2.0).loss

    for transform in (torch.func.grad, torch.func.jacrev, torch.func.vmap):
        with pytest.raises(ValueError, match="row 1 repeats a class"):
            transform(loss)(student.unsqueeze(0).expand(2, 3, 7) if transform is torch.func.vmap else student)
