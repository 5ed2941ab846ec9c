"""fused_linear_smskd_loss against the unfused composition: logits = hidden @ W.T + b, then smskd_loss."""
from __future__ import annotations

import re
import warnings

import pytest
import torch

import smskd_fast
from smskd_fast.loss.fused_linear import chunk_rows, fused_linear_smskd_loss

from tolerances import chunked_accumulation_excess


def make_problem(rows_shape=(3, 5), hidden=8, vocab=11, teacher_hidden=6, dtype=torch.float64, seed=0,
                 bias=True, ignore_every=4):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    p = dict(
        student_hidden=randn(*rows_shape, hidden).requires_grad_(),
        student_head_weight=randn(vocab, hidden, scale=0.5).requires_grad_(),
        student_head_bias=randn(vocab).requires_grad_() if bias else None,
        teacher_hidden=randn(*rows_shape, teacher_hidden),
        teacher_head_weight=randn(vocab, teacher_hidden, scale=0.5),
        teacher_head_bias=randn(vocab) if bias else None,
        reference_hidden=randn(*rows_shape, hidden),
        reference_head_weight=randn(vocab, hidden, scale=0.5),
        target=torch.randint(0, vocab, rows_shape, generator=g),
    )
    if ignore_every:
        p["target"].view(-1)[::ignore_every] = -100
    return p


def logits_of(hidden, weight, bias):
    return torch.nn.functional.linear(hidden, weight, bias)


def unfused(p, **options):
    """The composition the fused path must equal: materialise all logits, then smskd_loss."""
    student = logits_of(p["student_hidden"], p["student_head_weight"], p["student_head_bias"])
    teacher = logits_of(p["teacher_hidden"], p["teacher_head_weight"], p["teacher_head_bias"])
    reference = logits_of(p["reference_hidden"], p["reference_head_weight"], None)
    return smskd_fast.smskd_loss(student, p["target"], teacher.to(student.dtype), reference.to(student.dtype),
                                 backend="reference", **options)


def fused(p, **options):
    return fused_linear_smskd_loss(
        p["student_hidden"], p["student_head_weight"], p["target"], p["teacher_hidden"],
        p["teacher_head_weight"], None, p["reference_hidden"], p["reference_head_weight"],
        student_head_bias=p["student_head_bias"], teacher_head_bias=p["teacher_head_bias"], **options)


def grads(p, loss):
    params = [p["student_hidden"], p["student_head_weight"]] + ([p["student_head_bias"]]
                                                                 if p["student_head_bias"] is not None else [])
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", [1, 4, 15, 1000])
@pytest.mark.parametrize("weighting", ["inverse_tcp", "constant"])
def test_matches_unfused_composition_in_float64(reduction, chunk_size, weighting):
    p = make_problem()
    options = dict(temperature=2.0, ce_weight=0.5, kd_weight=1.5, ref_weight=0.8, weighting=weighting,
                   reduction=reduction)
    got = fused(p, chunk_size=chunk_size, backend="reference", **options)
    want = unfused(p, **options)
    for key in ("loss", "ce", "kd", "ref", "tcp", "weight"):
        torch.testing.assert_close(getattr(got, key), getattr(want, key).detach(), rtol=1e-12, atol=1e-12)
    upstream = torch.rand_like(want.loss) if reduction == "none" else torch.tensor(0.7, dtype=torch.float64)
    for g_fused, g_unfused in zip(grads(p, (got.loss * upstream).sum()), grads(p, (want.loss * upstream).sum())):
        torch.testing.assert_close(g_fused, g_unfused, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_backward_twice_through_one_graph(reduction):
    """The first backward hands over the gradients from forward (scaled in place); a second one
    (retain_graph) recomputes them, with its own upstream gradient."""
    p = make_problem()
    got, want = fused(p, chunk_size=4, backend="reference", reduction=reduction), unfused(p, reduction=reduction)
    params = [p["student_hidden"], p["student_head_weight"], p["student_head_bias"]]
    first = torch.autograd.grad(got.loss * 0.3, params, retain_graph=True)
    second = torch.autograd.grad(got.loss * 2.0, params)
    expected = grads(p, want.loss)
    for scale, values in ((0.3, first), (2.0, second)):
        for g_fused, g_unfused in zip(values, expected):
            torch.testing.assert_close(g_fused, g_unfused * scale, rtol=1e-11, atol=1e-12)


def test_gradcheck_float64():
    p = make_problem(rows_shape=(5,), hidden=4, vocab=6, teacher_hidden=3)

    def loss(hidden, weight, bias):
        return fused_linear_smskd_loss(hidden, weight, p["target"], p["teacher_hidden"], p["teacher_head_weight"],
                                       None, p["reference_hidden"], p["reference_head_weight"],
                                       student_head_bias=bias, chunk_size=2, backend="reference").loss

    assert torch.autograd.gradcheck(loss, (p["student_hidden"], p["student_head_weight"], p["student_head_bias"]))


def test_teacher_as_logits_equals_teacher_as_hidden():
    p = make_problem()
    teacher_logits = logits_of(p["teacher_hidden"], p["teacher_head_weight"], p["teacher_head_bias"])
    as_logits = fused_linear_smskd_loss(p["student_hidden"], p["student_head_weight"], p["target"],
                                        teacher_logits=teacher_logits, reference_hidden=p["reference_hidden"],
                                        reference_head_weight=p["reference_head_weight"],
                                        student_head_bias=p["student_head_bias"], chunk_size=4,
                                        backend="reference")
    as_hidden = fused(p, chunk_size=7, backend="reference")
    torch.testing.assert_close(as_logits.loss, as_hidden.loss, rtol=1e-12, atol=0)


def test_all_rows_ignored_gives_zero_loss_and_gradient():
    p = make_problem(ignore_every=0)
    p["target"].fill_(-100)
    out = fused(p, chunk_size=4, backend="reference")
    assert out.loss.item() == 0
    assert all(torch.all(g == 0) for g in grads(p, out.loss))


def test_no_grad_computes_the_loss_only():
    p = make_problem()
    with torch.no_grad():
        out = fused(p, chunk_size=4, backend="reference")
    torch.testing.assert_close(out.loss, unfused(p).loss.detach(), rtol=1e-12, atol=0)
    assert not out.loss.requires_grad


# bf16 hidden states and heads: logits are rounded to bf16 in both paths, the loss
# accumulates in fp32, and gradients of hidden/weight are bf16 matmuls of a bf16
# d loss / d logits; the oracle is the float64 unfused composition on the same
# bf16 values, so the error is bf16 rounding of the logits and gradients (~2^-8).
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_bfloat16_against_float64_unfused(backend):
    p = make_problem(rows_shape=(64,), hidden=32, vocab=500, teacher_hidden=48, dtype=torch.bfloat16, seed=1)
    got = fused(p, chunk_size=24, backend=backend)
    got_grads = grads(p, got.loss)
    p64 = {k: (None if v is None else v.detach().double().requires_grad_(v.requires_grad) if v.is_floating_point()
               else v) for k, v in p.items()}
    want = unfused(p64)
    torch.testing.assert_close(got.loss.double(), want.loss.detach(), rtol=2e-2, atol=2e-2)
    for g, w in zip(got_grads, grads(p64, want.loss)):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.double(), w, rtol=5e-2, atol=5e-2 * w.abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_bfloat16_on_cuda_against_float64_unfused(backend):
    """On CUDA the chunk logits take the row gradient in place and the bf16 weight gradient
    accumulates in place through addmm_; the oracle is as in the CPU test above."""
    p = {k: None if v is None else v.detach().cuda().requires_grad_(v.requires_grad)
         for k, v in make_problem(rows_shape=(64,), hidden=32, vocab=500, teacher_hidden=48,
                                  dtype=torch.bfloat16, seed=1).items()}
    got = fused(p, chunk_size=24, backend=backend)
    got_grads = grads(p, got.loss)
    p64 = {k: (None if v is None else v.detach().cpu().double().requires_grad_(v.requires_grad)
               if v.is_floating_point() else v.cpu()) for k, v in p.items()}
    want = unfused(p64)
    torch.testing.assert_close(got.loss.double().cpu(), want.loss.detach(), rtol=2e-2, atol=2e-2)
    for g, w in zip(got_grads, grads(p64, want.loss)):
        assert g.dtype == torch.bfloat16 and g.is_cuda
        torch.testing.assert_close(g.double().cpu(), w, rtol=5e-2, atol=5e-2 * w.abs().max().item())


def test_bad_arguments_name_the_argument():
    p = make_problem()
    with pytest.raises(ValueError, match=r"student_head_weight must have shape \(V, 8\)"):
        fused_linear_smskd_loss(p["student_hidden"], torch.zeros(11, 7, dtype=torch.float64), p["target"])
    with pytest.raises(ValueError, match="teacher_hidden and teacher_head_weight must be given together"):
        fused_linear_smskd_loss(p["student_hidden"], p["student_head_weight"], p["target"], p["teacher_hidden"])
    with pytest.raises(ValueError, match="either as teacher_hidden .* or as teacher_topk, not more than one"):
        fused_linear_smskd_loss(p["student_hidden"], p["student_head_weight"], p["target"], p["teacher_hidden"],
                                p["teacher_head_weight"], torch.zeros(3, 5, 11, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"teacher_head_weight must have the student's vocabulary size 11"):
        fused_linear_smskd_loss(p["student_hidden"], p["student_head_weight"], p["target"], p["teacher_hidden"],
                                torch.zeros(10, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"target values must be in \[0, 11\)"):
        fused_linear_smskd_loss(p["student_hidden"], p["student_head_weight"], torch.full((3, 5), 11))
    with pytest.raises(ValueError, match="chunk_size must be a positive integer, got 0"):
        fused_linear_smskd_loss(p["student_hidden"], p["student_head_weight"], p["target"], chunk_size=0)
    with pytest.raises(ValueError, match="weighting='inverse_tcp' .* needs teacher_logits"):
        fused_linear_smskd_loss(p["student_hidden"], p["student_head_weight"], p["target"],
                                reference_hidden=p["reference_hidden"],
                                reference_head_weight=p["reference_head_weight"])


@pytest.mark.parametrize("rows, vocabulary", [(8192, 128256), (1024, 128256), (2048, 32000), (100, 50), (7, 1 << 30)])
def test_cpu_chunk_rows_keep_the_malloc_tuned_size(rows, vocabulary):
    for dtype in (torch.float32, torch.bfloat16):
        chunk = chunk_rows("cpu", rows, vocabulary, 2048, dtype)
        assert 1 <= chunk <= rows
        assert chunk * vocabulary <= max(1 << 24, vocabulary)  # one chunk's logits: at most ~2^24 values
    assert chunk_rows("cpu", 8192, 128256, 4096, torch.bfloat16) == 130


def model_peaks(rows, vocabulary, hidden, item, heads, chunk):
    """(fused, unfused) peak bytes as chunk_rows models them: (heads + 1) logits-sized buffers per row
    (each head's logits and a gradient), for a chunk or for every row, plus the head's and the hidden
    states' gradients, (V + N) H."""
    gradients = (vocabulary + rows) * hidden * item
    per_row = (heads + 1) * vocabulary * item
    return chunk * per_row + gradients, rows * per_row + gradients


def test_gpu_chunk_rows_by_hand():
    """chunk_rows' formula worked by hand at 8192 tokens: min(2^30 / R, (N R + G) / 4R - G / R), then whole
    256-row tiles, with R = (heads + 1) V b and G = (V + N) H b."""
    cases = {  # (vocabulary, hidden, heads, dtype): (by budget, by share) -> rows
        (128256, 2048, 3, torch.bfloat16): 1024,  # (1046.6, 1639.7)
        (128256, 4096, 3, torch.bfloat16): 1024,  # (1046.6, 1229.3)
        (32000, 2048, 3, torch.bfloat16): 1536,  # (4194.3, 1564.8)
        (32000, 4096, 3, torch.bfloat16): 1024,  # (4194.3, 1085.4)
        (128256, 2048, 2, torch.bfloat16): 1280,  # (1395.5, 1503.3)
        (128256, 4096, 2, torch.bfloat16): 768,  # (1395.5, 958.7)
        (32000, 4096, 2, torch.bfloat16): 512,  # (2796.2, 763.2)
        (128256, 2048, 3, torch.float32): 512,  # (523.3, 1639.7)
    }
    for (vocabulary, hidden, heads, dtype), rows in cases.items():
        assert chunk_rows("cuda", 8192, vocabulary, hidden, dtype, heads=heads) == rows, (vocabulary, hidden, heads)
    assert chunk_rows("cuda", 100, 32000, 2048, torch.bfloat16) == 100  # never more than the rows
    assert chunk_rows("cuda", 1024, 128256, 4096, torch.bfloat16) == 256  # share says < 0: one tile all the same
    assert chunk_rows("cuda", 8192, 128256, 2048, torch.bfloat16, budget_bytes=100 * 4 * 128256 * 2) == 100
    assert chunk_rows("cuda", 8192, 1 << 30, 2048, torch.bfloat16) == 1  # not even a row fits: one row
    assert chunk_rows("xpu", 8192, 32000, 2048, torch.bfloat16) == 1536  # any accelerator is sized like CUDA


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [1, 2, 3])
@pytest.mark.parametrize("budget", [1 << 20, 1 << 27, 1 << 30, 1 << 33])
def test_gpu_chunk_rows_meet_the_budget_and_the_share_in_whole_tiles(dtype, heads, budget):
    item = torch.empty((), dtype=dtype).element_size()
    for vocabulary in (50, 32000, 128256, 256000):
        for hidden in (64, 4096):
            for rows in (1, 300, 8192, 1 << 17):
                chunk = chunk_rows("cuda", rows, vocabulary, hidden, dtype, heads=heads, budget_bytes=budget)
                fused_bytes, unfused_bytes = model_peaks(rows, vocabulary, hidden, item, heads, chunk)
                tile_fits = budget >= 256 * (heads + 1) * vocabulary * item
                assert 1 <= chunk <= rows
                assert chunk * (heads + 1) * vocabulary * item <= budget or chunk == 1
                if tile_fits and chunk < rows:
                    assert chunk % 256 == 0
                    assert chunk == 256 or fused_bytes <= unfused_bytes / 4
                    bigger = model_peaks(rows, vocabulary, hidden, item, heads, chunk + 256)[0]
                    assert (chunk + 256) * (heads + 1) * vocabulary * item > budget or bigger > unfused_bytes / 4


@pytest.mark.parametrize("hidden", [2048, 4096])
@pytest.mark.parametrize("vocabulary", [32000, 128256])
@pytest.mark.parametrize("heads", [2, 3])
def test_gpu_chunks_of_issue_18_shapes_are_fast_and_small(hidden, vocabulary, heads):
    """At 8192 tokens in bf16 (SMSKD: three heads, KD-only: two) the default chunk keeps the modelled
    fused peak under a quarter of the unfused one, with at least 512 rows: >= 256 flops per byte of
    the weight gradient's read and write in its matmul."""
    chunk = chunk_rows("cuda", 8192, vocabulary, hidden, torch.bfloat16, heads=heads)
    fused_bytes, unfused_bytes = model_peaks(8192, vocabulary, hidden, 2, heads, chunk)
    assert fused_bytes <= unfused_bytes / 4
    assert chunk >= 512 and chunk % 256 == 0


def test_bfloat16_weight_gradient_over_many_chunks_stays_within_the_rounding_bound():
    """The weight gradient accumulates in bf16, in place, one rounding per chunk (module docstring):
    against the float64 unchunked gradient, K chunks lose at most (K + 1) roundings more than one
    chunk (tests/tolerances.py, chunked_accumulation_excess)."""
    p = make_problem(rows_shape=(256,), hidden=32, vocab=500, teacher_hidden=48, dtype=torch.bfloat16, seed=1)
    p64 = {k: (None if v is None else v.detach().double().requires_grad_(v.requires_grad) if v.is_floating_point()
               else v) for k, v in p.items()}
    want = unfused(p64)
    want_weight = grads(p64, want.loss)[1]
    logits = logits_of(p64["student_hidden"], p64["student_head_weight"], p64["student_head_bias"])
    teacher = logits_of(p64["teacher_hidden"], p64["teacher_head_weight"], p64["teacher_head_bias"])
    reference = logits_of(p64["reference_hidden"], p64["reference_head_weight"], None)
    logits = logits.detach().requires_grad_()
    (row_grads,) = torch.autograd.grad(smskd_fast.smskd_loss(logits, p64["target"], teacher, reference,
                                                             backend="reference").loss, logits)
    abs_sum = row_grads.abs().t() @ p64["student_hidden"].detach().abs()
    one_chunk = grads(p, fused(p, chunk_size=256).loss)[1]
    assert one_chunk.dtype == torch.bfloat16
    one_chunk_error = (one_chunk.double() - want_weight).abs()
    for chunk in (64, 16, 1):
        got = grads(p, fused(p, chunk_size=chunk).loss)[1]
        excess = (got.double() - want_weight).abs() - one_chunk_error
        bound = chunked_accumulation_excess(256 // chunk, torch.bfloat16, abs_sum)
        assert torch.all(excess <= bound), f"{256 // chunk} chunks: {(excess / bound).max():.2f} of the bound"


@pytest.mark.parametrize("k", [1, 4, 11])
def test_topk_teacher_matches_smskd_loss_on_full_logits(k):
    from smskd_fast.backends.topk import TopKTeacher

    p = make_problem()
    teacher_logits = logits_of(p["teacher_hidden"], p["teacher_head_weight"], p["teacher_head_bias"])
    topk = TopKTeacher.from_logits(teacher_logits, p["target"], k, 2.0)
    got = fused_linear_smskd_loss(p["student_hidden"], p["student_head_weight"], p["target"],
                                  reference_hidden=p["reference_hidden"],
                                  reference_head_weight=p["reference_head_weight"],
                                  student_head_bias=p["student_head_bias"], teacher_topk=topk, temperature=2.0,
                                  chunk_size=4, backend="reference")
    student = logits_of(p["student_hidden"], p["student_head_weight"], p["student_head_bias"])
    reference = logits_of(p["reference_hidden"], p["reference_head_weight"], None)
    want = smskd_fast.smskd_loss(student, p["target"], None, reference, teacher_topk=topk, temperature=2.0,
                                 backend="reference")
    torch.testing.assert_close(got.loss, want.loss.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.tcp, want.tcp, rtol=1e-12, atol=0)
    for g_fused, g_unfused in zip(grads(p, got.loss), grads(p, want.loss)):
        torch.testing.assert_close(g_fused, g_unfused, rtol=1e-11, atol=1e-12)


def test_a_topk_teacher_stored_for_another_temperature_is_refused():
    """smskd_loss's checks hold here too: a teacher built at T = 4 by from_logits (which records it) is
    refused at T = 1, and one of unknown temperature is not a distribution's top k at T = 1 (its kept
    probabilities would sum to more than 1)."""
    from smskd_fast.backends.topk import TopKTeacher

    p = make_problem()
    teacher_logits = logits_of(p["teacher_hidden"], p["teacher_head_weight"], p["teacher_head_bias"])
    topk = TopKTeacher.from_logits(teacher_logits * 3, p["target"], 4, 4.0)
    for teacher, message in ((topk, r"teacher_topk was built for temperature 4\.0 .* the loss's temperature is 1\.0"),
                             (TopKTeacher(*topk.tensors()), r"kept probabilities .* > 1 .* at temperature 1")):
        with pytest.raises(ValueError, match=message):
            fused_linear_smskd_loss(p["student_hidden"], p["student_head_weight"], p["target"],
                                    teacher_topk=teacher, temperature=1.0, backend="reference")


@pytest.mark.parametrize("cached_dtype", [torch.float64, torch.float16])
def test_frozen_models_as_logits_equal_the_unfused_composition(cached_dtype):
    """Teacher and reference given as logits, as read from a dense logit cache, in any floating dtype:
    each chunk is converted to the student's dtype, so the loss is smskd_loss on the converted logits."""
    p = make_problem()
    teacher = logits_of(p["teacher_hidden"], p["teacher_head_weight"], p["teacher_head_bias"]).to(cached_dtype)
    reference = logits_of(p["reference_hidden"], p["reference_head_weight"], None).to(cached_dtype)
    got = fused_linear_smskd_loss(p["student_hidden"], p["student_head_weight"], p["target"], teacher_logits=teacher,
                                  reference_logits=reference, student_head_bias=p["student_head_bias"],
                                  temperature=2.0, chunk_size=4, backend="reference")
    student = logits_of(p["student_hidden"], p["student_head_weight"], p["student_head_bias"])
    want = smskd_fast.smskd_loss(student, p["target"], teacher.double(), reference.double(), temperature=2.0,
                                 backend="reference")
    assert float(want.ref) > 0
    for field in ("loss", "ce", "kd", "ref", "tcp", "weight"):
        torch.testing.assert_close(getattr(got, field), getattr(want, field).detach(), rtol=1e-12, atol=1e-12)
    for g_fused, g_unfused in zip(grads(p, got.loss), grads(p, want.loss)):
        torch.testing.assert_close(g_fused, g_unfused, rtol=1e-11, atol=1e-12)


def test_reference_logits_arguments_are_checked():
    p = make_problem()
    teacher = logits_of(p["teacher_hidden"], p["teacher_head_weight"], p["teacher_head_bias"])
    with pytest.raises(ValueError, match="reference either as reference_hidden .* or as reference_logits, not both"):
        fused_linear_smskd_loss(p["student_hidden"], p["student_head_weight"], p["target"], teacher_logits=teacher,
                                reference_hidden=p["reference_hidden"],
                                reference_head_weight=p["reference_head_weight"], reference_logits=teacher)
    with pytest.raises(ValueError, match=r"reference_logits must have shape \(3, 5, 11\), got \(3, 5, 10\)"):
        fused_linear_smskd_loss(p["student_hidden"], p["student_head_weight"], p["target"], teacher_logits=teacher,
                                reference_logits=teacher[..., :10])
    with pytest.raises(TypeError, match="reference_logits must be a floating tensor"):
        fused_linear_smskd_loss(p["student_hidden"], p["student_head_weight"], p["target"], teacher_logits=teacher,
                                reference_logits=teacher.long())
    with pytest.raises(ValueError, match="weighting='inverse_tcp' .* needs teacher_logits"):
        fused_linear_smskd_loss(p["student_hidden"], p["student_head_weight"], p["target"], reference_logits=teacher)


def test_the_default_chunk_counts_the_dense_heads(monkeypatch):
    """Without chunk_size the loss asks chunk_rows for its device, rows, V, H and dtype, counting as heads
    the student and each frozen model given densely (hidden states or logits; a top-k teacher is not)."""
    import smskd_fast.loss.fused_linear as fused_linear_module
    from smskd_fast.backends.topk import TopKTeacher

    asked = []

    def spy(*args, **kwargs):
        asked.append((args, kwargs))
        return chunk_rows(*args, **kwargs)

    monkeypatch.setattr(fused_linear_module, "chunk_rows", spy)
    p = make_problem()
    fused(p, backend="reference")
    teacher_logits = logits_of(p["teacher_hidden"], p["teacher_head_weight"], p["teacher_head_bias"])
    topk = TopKTeacher.from_logits(teacher_logits, p["target"], 4, 4.0)
    fused_linear_smskd_loss(p["student_hidden"], p["student_head_weight"], p["target"], teacher_topk=topk,
                            backend="reference")
    fused_linear_smskd_loss(p["student_hidden"], p["student_head_weight"], p["target"], teacher_logits=teacher_logits,
                            backend="reference")
    assert asked == [(("cpu", 15, 11, 8, torch.float64), {"heads": heads}) for heads in (3, 1, 2)]


@pytest.mark.parametrize("names", [("teacher_hidden",), ("teacher_head_weight",), ("teacher_head_bias",),
                                   ("teacher_hidden", "teacher_head_weight"), ("reference_hidden",),
                                   ("reference_head_weight",), ("reference_hidden", "reference_head_weight")])
def test_frozen_inputs_on_another_device_are_refused(names):
    """A CPU kernel would read a meta (or another GPU's) tensor's address as its own memory (a teacher's
    hidden states and head on meta, without bias, gave a loss that changed from run to run)."""
    p = make_problem(bias="teacher_head_bias" in names)
    for name in names:
        p[name] = p[name].to("meta")
    with pytest.raises(ValueError, match=f"{names[0]} must be on student_hidden's device cpu, got meta"):
        fused(p)  # "auto": the CPU kernel where it is built


@pytest.mark.parametrize("name, dtype, expected", [
    ("student_head_bias", torch.float32, "student_head_bias must have student_hidden's dtype torch.float64, "
                                         "got torch.float32"),
    ("teacher_hidden", torch.float32, "teacher_head_weight must have teacher_hidden's dtype torch.float32, "
                                      "got torch.float64"),
    ("teacher_head_bias", torch.bfloat16, "teacher_head_bias must have teacher_hidden's dtype torch.float64, "
                                          "got torch.bfloat16"),
    ("reference_head_weight", torch.float32, "reference_head_weight must have reference_hidden's dtype "
                                             "torch.float64, got torch.float32"),
])
def test_head_dtype_mismatches_name_the_argument(name, dtype, expected):
    p = make_problem()
    p[name] = p[name].detach().to(dtype)
    with pytest.raises(TypeError, match=expected):
        fused(p, backend="reference")


def test_chunk_size_takes_any_integer_but_bool():
    np = pytest.importorskip("numpy")
    p = make_problem()
    want = fused(p, chunk_size=4, backend="reference").loss
    torch.testing.assert_close(fused(p, chunk_size=np.int64(4), backend="reference").loss, want, rtol=0, atol=0)
    for bad in (True, 4.0, torch.tensor(4)):
        with pytest.raises(ValueError, match=re.escape(f"chunk_size must be a positive integer, got {bad!r}")):
            fused(p, chunk_size=bad, backend="reference")


@pytest.mark.parametrize("name", ["teacher_hidden", "teacher_head_weight", "teacher_head_bias", "reference_hidden",
                                  "reference_head_weight", "teacher_logits"])
def test_frozen_inputs_that_require_grad_warn_as_smskd_loss_does(name):
    """README: teacher and reference are constants, a warning says so when they require grad; under
    torch.no_grad (no gradient asked for) and for detached inputs nothing is said."""
    p = make_problem()
    if name == "teacher_logits":
        p["teacher_logits"] = logits_of(p.pop("teacher_hidden"), p.pop("teacher_head_weight"),
                                        p.pop("teacher_head_bias"))

    def call():
        return fused_linear_smskd_loss(**p, backend="reference")

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        call()
        p[name] = p[name].detach().requires_grad_()
        with torch.no_grad():
            call()
    with pytest.warns(UserWarning, match=f"{name} requires grad, but the loss is differentiable with respect to "
                                         f"student_hidden, student_head_weight and student_head_bias only"):
        call().loss.backward()
    assert p[name].grad is None
