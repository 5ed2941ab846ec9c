"""Every KD method's loss and gradient on small known inputs, against independent formulas.

The expected values are written with explicit loops or other algebra than the
implementation (e.g. NCKD by deleting the target column instead of masking it), in
float64; gradients are checked with torch.autograd.gradcheck.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from smskd_fast.training.config import MethodConfig, StageConfig
from smskd_fast.training.methods import METHODS, FeatureTaps, MethodInputs, build_method
from smskd_fast.training.methods.feature import AttentionTransfer, FitNet
from smskd_fast.training.methods.relation import CRD, PKT, RKD, SimilarityPreserving
from smskd_fast.training.methods.response import dkd_loss
from smskd_fast.training.models import build_model
from smskd_fast.training.steps import stage_loss

@pytest.fixture(autouse=True, scope="module")
def _float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _logits(rows=5, classes=7, seed=0):
    g = _gen(seed)
    return (torch.randn(rows, classes, generator=g, dtype=torch.float64) * 2,
            torch.randn(rows, classes, generator=g, dtype=torch.float64) * 2,
            torch.randint(0, classes, (rows,), generator=g))


def _inputs(student_features, teacher_features, rows):
    zeros = torch.zeros(rows, 3, dtype=torch.float64)
    return MethodInputs(zeros, zeros, torch.zeros(rows, dtype=torch.long), torch.arange(rows),
                        {"s": student_features}, {"t": teacher_features})


def _method(cls, **params):
    method = cls(**params)
    method.set_layers(["s"], ["t"])
    return method


def _stage(**changes):
    stage = StageConfig(methods=[MethodConfig(name="kd")], epochs=1)
    for key, value in changes.items():
        setattr(stage, key, value)
    return stage


# ----- fused terms: CE, KD and the TCP-weighted reference term ----------------------------------

def test_kd_stage_loss_matches_ce_plus_hinton_kl():
    student, teacher, target = _logits()
    student.requires_grad_(True)
    temperature = 3.0
    out = stage_loss(student, target, teacher, None, _stage(ce_weight=0.3, temperature=temperature),
                     fused_kd_weight=0.7, backend="reference")
    kl = F.kl_div(F.log_softmax(student / temperature, -1), F.softmax(teacher / temperature, -1),
                  reduction="batchmean")
    expected = 0.3 * F.cross_entropy(student, target) + 0.7 * temperature ** 2 * kl
    assert torch.allclose(out.loss, expected, rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(out.loss, student)
    (expected_grad,) = torch.autograd.grad(expected, student)
    assert torch.allclose(grad, expected_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("weighting", ["inverse_tcp", "tcp", "constant"])
def test_reference_term_is_weighted_per_sample_by_teacher_tcp(weighting):
    student, teacher, target = _logits(rows=6, seed=1)
    reference = torch.randn(6, 7, generator=_gen(2), dtype=torch.float64)
    student.requires_grad_(True)
    temperature = 2.0
    out = stage_loss(student, target, teacher, reference,
                     _stage(ce_weight=0.0, ref_weight=0.5, temperature=temperature, weighting=weighting),
                     fused_kd_weight=0.0, backend="reference")
    tcp = torch.tensor([math.exp(teacher[i, target[i]]) / teacher[i].exp().sum() for i in range(6)])
    weights = {"inverse_tcp": 1 - tcp, "tcp": tcp, "constant": torch.ones(6)}[weighting]
    per_row_kl = torch.stack([
        (F.softmax(reference[i] / temperature, 0)
         * (F.log_softmax(reference[i] / temperature, 0) - F.log_softmax(student[i] / temperature, 0))).sum()
        for i in range(6)])
    expected = 0.5 * (weights * temperature ** 2 * per_row_kl).mean()
    assert torch.allclose(out.weight, weights, atol=1e-12)
    assert torch.allclose(out.loss, expected, rtol=1e-10)
    (grad,) = torch.autograd.grad(out.loss, student)
    (expected_grad,) = torch.autograd.grad(expected, student)
    assert torch.allclose(grad, expected_grad, rtol=1e-9, atol=1e-12)


def test_reference_weight_follows_the_teacher():
    """A teacher that is surer of the truth gives the reference term less weight (inverse_tcp)."""
    student, teacher, target = _logits(rows=4, seed=3)
    reference = torch.randn(4, 7, generator=_gen(4), dtype=torch.float64)
    sure_teacher = teacher.clone()
    sure_teacher[torch.arange(4), target] += 10.0
    stage = _stage(ce_weight=0.0, ref_weight=1.0)
    unsure = stage_loss(student, target, teacher, reference, stage, 0.0, backend="reference")
    sure = stage_loss(student, target, sure_teacher, reference, stage, 0.0, backend="reference")
    assert torch.all(sure.weight < unsure.weight)
    assert sure.loss < unsure.loss


# ----- DKD -------------------------------------------------------------------------------------

def _dkd_by_deleting_the_target(student, teacher, target, alpha, beta, temperature):
    total = 0.0
    for i in range(student.shape[0]):
        p_s, p_t = F.softmax(student[i] / temperature, 0), F.softmax(teacher[i] / temperature, 0)
        y = int(target[i])
        b_s, b_t = p_s[y], p_t[y]
        tckd = b_t * torch.log(b_t / b_s) + (1 - b_t) * torch.log((1 - b_t) / (1 - b_s))
        keep = [c for c in range(student.shape[1]) if c != y]
        q_s, q_t = F.softmax(student[i, keep] / temperature, 0), F.softmax(teacher[i, keep] / temperature, 0)
        nckd = (q_t * torch.log(q_t / q_s)).sum()
        total = total + temperature ** 2 * (alpha * tckd + beta * nckd)
    return total / student.shape[0]


def test_dkd_matches_binary_and_non_target_kl():
    student, teacher, target = _logits(seed=5)
    got = dkd_loss(student, teacher, target, 1.0, 8.0, 4.0)
    expected = _dkd_by_deleting_the_target(student, teacher, target, 1.0, 8.0, 4.0)
    assert torch.allclose(got, expected, rtol=1e-9)
    student.requires_grad_(True)
    (grad,) = torch.autograd.grad(dkd_loss(student, teacher, target, 1.0, 8.0, 4.0), student)
    (expected_grad,) = torch.autograd.grad(_dkd_by_deleting_the_target(student, teacher, target, 1.0, 8.0, 4.0), student)
    assert torch.allclose(grad, expected_grad, rtol=1e-7, atol=1e-10)


def test_dkd_warmup_ramps_linearly():
    student, teacher, target = _logits(seed=6)
    method = build_method("dkd", None, None, weight=2.0, params={"warmup": 4})
    inputs = MethodInputs(student, teacher, target, torch.arange(5))
    full = 2.0 * dkd_loss(student, teacher, target, 1.0, 8.0, 4.0)
    method.set_epoch(0)
    assert torch.allclose(method.loss(inputs), full / 4)
    method.set_epoch(7)
    assert torch.allclose(method.loss(inputs), full)


# ----- feature methods --------------------------------------------------------------------------

def test_fitnet_is_mse_of_1x1_conv_and_batchnorm():
    g = _gen(7)
    student = torch.randn(4, 3, 5, 5, generator=g)
    teacher = torch.randn(4, 6, 5, 5, generator=g)
    method = _method(FitNet, weight=2.0)
    method.build(_inputs(student, teacher, 4), 10)
    conv = method.connectors[0][0].weight[:, :, 0, 0]  # (6, 3)
    projected = torch.einsum("oc,nchw->nohw", conv, student)
    mean = projected.mean(dim=(0, 2, 3), keepdim=True)
    variance = projected.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    normalized = (projected - mean) / torch.sqrt(variance + 1e-5)
    expected = 2.0 * ((normalized - teacher) ** 2).mean()
    assert torch.allclose(method.loss(_inputs(student, teacher, 4)), expected, rtol=1e-9)


def test_fitnet_relu_connector_clamps_the_projection_as_the_reference_regressor():
    g = _gen(9)
    student = torch.randn(4, 3, 5, 5, generator=g)
    teacher = torch.randn(4, 6, 5, 5, generator=g).relu()
    plain, clamped = _method(FitNet, weight=2.0), _method(FitNet, weight=2.0, relu=True)
    for method in (plain, clamped):
        torch.manual_seed(0)
        method.build(_inputs(student, teacher, 4), 10)
    projected = plain.connectors[0](student)
    expected = 2.0 * ((projected.relu() - teacher) ** 2).mean()
    assert torch.allclose(clamped.loss(_inputs(student, teacher, 4)), expected, rtol=1e-9)


def test_fitnet_pools_the_larger_map_and_has_gradients():
    g = _gen(8)
    student = torch.randn(3, 2, 4, 4, generator=g, requires_grad=True)
    teacher = torch.randn(3, 3, 2, 2, generator=g)
    method = _method(FitNet)
    method.build(_inputs(student, teacher, 3), 10)
    assert torch.autograd.gradcheck(lambda s: method.loss(_inputs(s, teacher, 3)), (student,))


def _attention_by_loops(features, power):
    rows = []
    for sample in features:
        amap = sum(sample[c].abs() ** power for c in range(sample.shape[0])) / sample.shape[0]
        flat = amap.reshape(-1)
        rows.append(flat / flat.norm())
    return torch.stack(rows)


def test_attention_transfer_matches_loops_and_gradcheck():
    g = _gen(9)
    student = torch.randn(3, 2, 4, 4, generator=g, requires_grad=True)
    teacher = torch.randn(3, 5, 4, 4, generator=g)
    method = _method(AttentionTransfer, weight=10.0)
    expected = 10.0 * ((_attention_by_loops(student, 2) - _attention_by_loops(teacher, 2)) ** 2).mean()
    assert torch.allclose(method.loss(_inputs(student, teacher, 3)), expected, rtol=1e-10)
    assert torch.autograd.gradcheck(lambda s: method.loss(_inputs(s, teacher, 3)), (student,))


# ----- relation methods ---------------------------------------------------------------------------

def _huber(x):
    return torch.where(x.abs() < 1, 0.5 * x ** 2, x.abs() - 0.5)


def _rkd_by_loops(student, teacher, distance_weight, angle_weight):
    n = student.shape[0]

    def distances(x):
        d = torch.stack([torch.stack([(x[i] - x[j]).norm() if i != j else torch.zeros(()) for j in range(n)])
                         for i in range(n)])
        return d / (d.sum() / (n * (n - 1)))

    def angles(x):
        values = []
        for j in range(n):
            for i in range(n):
                for k in range(n):
                    a, b = x[i] - x[j], x[k] - x[j]
                    na, nb = a.norm(), b.norm()
                    a = a / na if na > 0 else a
                    b = b / nb if nb > 0 else b
                    values.append((a * b).sum())
        return torch.stack(values)

    return (distance_weight * _huber(distances(student) - distances(teacher)).mean()
            + angle_weight * _huber(angles(student) - angles(teacher)).mean())


def test_rkd_matches_loops_and_gradcheck():
    g = _gen(10)
    student = torch.randn(4, 3, generator=g, requires_grad=True)
    teacher = torch.randn(4, 5, generator=g)
    method = _method(RKD, weight=1.5)
    expected = 1.5 * _rkd_by_loops(student, teacher, 25.0, 50.0)
    assert torch.allclose(method.loss(_inputs(student, teacher, 4)), expected, rtol=1e-9)
    assert torch.autograd.gradcheck(lambda s: method.loss(_inputs(s, teacher, 4)), (student,))


def test_similarity_preserving_matches_loops_and_gradcheck():
    g = _gen(11)
    student = torch.randn(4, 2, 3, 3, generator=g, requires_grad=True)
    teacher = torch.randn(4, 6, 2, 2, generator=g)

    def gram(x):
        flat = x.reshape(4, -1)
        rows = [torch.stack([(flat[i] * flat[j]).sum() for j in range(4)]) for i in range(4)]
        return torch.stack([row / row.norm() for row in rows])

    method = _method(SimilarityPreserving, weight=3.0)
    expected = 3.0 * ((gram(student) - gram(teacher)) ** 2).sum() / 16
    assert torch.allclose(method.loss(_inputs(student, teacher, 4)), expected, rtol=1e-10)
    assert torch.autograd.gradcheck(lambda s: method.loss(_inputs(s, teacher, 4)), (student,))


def test_pkt_matches_loops_and_gradcheck():
    g = _gen(12)
    student = torch.randn(5, 3, generator=g, requires_grad=True)
    teacher = torch.randn(5, 4, generator=g)

    def conditional(x):
        rows = []
        for i in range(5):
            cos = torch.stack([(x[i] @ x[j]) / (x[i].norm() * x[j].norm()) for j in range(5)])
            affinity = (cos + 1) / 2
            rows.append(affinity / affinity.sum())
        return torch.stack(rows)

    p_s, p_t = conditional(student), conditional(teacher)
    expected = 7.0 * (p_t * torch.log((p_t + 1e-7) / (p_s + 1e-7))).mean()
    method = _method(PKT, weight=7.0)
    assert torch.allclose(method.loss(_inputs(student, teacher, 5)), expected, rtol=1e-10)
    assert torch.autograd.gradcheck(lambda s: method.loss(_inputs(s, teacher, 5)), (student,))


def test_crd_nce_loss_and_memory_update_match_the_formulas():
    g = _gen(13)
    student = torch.randn(3, 4, generator=g)
    teacher = torch.randn(3, 6, generator=g)
    method = _method(CRD, weight=0.5, feat_dim=5, nce_k=4, nce_t=0.1, nce_m=0.25)
    torch.manual_seed(0)
    method.build(_inputs(student, teacher, 3), num_samples=10)
    negatives = torch.tensor([[1, 2, 3, 4], [0, 0, 9, 8], [5, 6, 7, 1]])
    method.sample_negatives = lambda batch: negatives
    indices = torch.tensor([7, 2, 5])
    inputs = _inputs(student, teacher, 3)
    inputs.indices = indices
    memory_student, memory_teacher = method.memory_student.clone(), method.memory_teacher.clone()

    v_s = F.normalize(student @ method.embed_student.weight.t() + method.embed_student.bias, dim=1)
    v_t = F.normalize(teacher @ method.embed_teacher.weight.t() + method.embed_teacher.bias, dim=1)
    contrast = torch.cat([indices[:, None], negatives], dim=1)

    def nce(query, memory):
        scores = torch.stack([torch.stack([torch.exp((memory[int(j)] * query[i]).sum() / 0.1) for j in contrast[i]])
                              for i in range(3)])
        scores = scores / (scores.mean() * 10)  # Z from this first batch
        noise = 4 / 10
        total = 0.0
        for i in range(3):
            total = total + torch.log(scores[i, 0] / (scores[i, 0] + noise + 1e-7))
            total = total + sum(torch.log(noise / (scores[i, k] + noise + 1e-7)) for k in range(1, 5))
        return -total / 3

    expected = 0.5 * (nce(v_s, memory_teacher) + nce(v_t, memory_student))
    assert torch.allclose(method.loss(inputs), expected, rtol=1e-9)
    for memory, before, value in ((method.memory_student, memory_student, v_s),
                                  (method.memory_teacher, memory_teacher, v_t)):
        for row, index in enumerate(indices.tolist()):
            mixed = 0.25 * before[index] + 0.75 * value[row]
            assert torch.allclose(memory[index], mixed / mixed.norm(), rtol=1e-10)
        untouched = [i for i in range(10) if i not in indices.tolist()]
        assert torch.equal(memory[untouched], before[untouched])


# ----- small batches: one sample (a last batch, a rank's shard), two, or coinciding samples -------

FEATURE_SHAPES = {"fitnet": ((2, 3, 3), (4, 3, 3)), "at": ((2, 3, 3), (4, 3, 3)), "sp": ((2, 3, 3), (4, 3, 3)),
                  "rkd": ((5,), (6,)), "pkt": ((5,), (6,)), "crd": ((5,), (6,)), "dkd": ((5,), (6,))}


@pytest.mark.parametrize("batch", ["one", "two", "three equal"])
@pytest.mark.parametrize("name", sorted(FEATURE_SHAPES))
def test_every_method_is_finite_with_finite_gradients_on_tiny_batches(name, batch):
    rows = {"one": 1, "two": 2, "three equal": 3}[batch]
    g = _gen(14)
    student_shape, teacher_shape = FEATURE_SHAPES[name]
    repeat = (lambda x: x[:1].expand_as(x).clone()) if batch == "three equal" else (lambda x: x)
    student = repeat(torch.randn(rows, *student_shape, generator=g)).requires_grad_(True)
    teacher = repeat(torch.randn(rows, *teacher_shape, generator=g))
    inputs = _inputs(student, teacher, rows)
    inputs.student_logits = torch.randn(rows, 3, generator=g).requires_grad_(True)  # what DKD reads
    inputs.teacher_logits = torch.randn(rows, 3, generator=g)
    method = _method(METHODS[name], **({"nce_k": 4} if name == "crd" else {}))
    method.build(inputs, num_samples=10)
    loss = method.loss(inputs)
    grads = torch.autograd.grad(loss, [student, inputs.student_logits], allow_unused=True)
    assert torch.isfinite(loss), loss
    assert any(grad is not None for grad in grads)
    assert all(torch.isfinite(grad).all() for grad in grads if grad is not None), grads


@pytest.mark.parametrize("rows", [1, 2])
def test_rkd_of_fewer_than_three_samples_is_zero_with_zero_gradient(rows):
    """One sample has no distance (exactly 0); two have one, which normalises to 1 up to rounding;
    angles need three samples."""
    g = _gen(15)
    student = torch.randn(rows, 3, generator=g, requires_grad=True)
    teacher = torch.randn(rows, 5, generator=g)
    loss = _method(RKD).loss(_inputs(student, teacher, rows))
    (grad,) = torch.autograd.grad(loss, student)
    atol = 0.0 if rows == 1 else 1e-12  # float64 rounding of d_01 and d_10 (summed in different orders)
    assert torch.allclose(loss, torch.zeros(()), rtol=0, atol=atol), loss
    assert torch.allclose(grad, torch.zeros_like(grad), rtol=0, atol=atol), grad


# ----- layer lookup -----------------------------------------------------------------------------

def test_unknown_layer_name_lists_the_available_ones():
    model = build_model("digits_cnn_small", 10, 1)
    with pytest.raises(KeyError, match=r"no layer named 'stage9'.*available layer names: stage1, stage1\.0"):
        FeatureTaps(model, ["stage9"], "student")


def test_taps_record_outputs_and_inputs_by_name():
    model = build_model("digits_cnn_small", 10, 1).double()
    taps = FeatureTaps(model, ["stage2", "head.fc:input"], "student")
    images = torch.randn(2, 1, 8, 8)
    logits = model(images)
    features = taps.take()
    assert features["stage2"].shape == (2, 8, 4, 4)
    assert torch.allclose(model.head.fc(features["head.fc:input"]), logits)
    taps.take()
    taps.remove()
    model(images)
    assert taps.take() == {}


def test_build_method_resolves_default_layers_of_zoo_models():
    student, teacher = build_model("resnet8x4", 100), build_model("resnet32x4", 100)
    assert build_method("fitnet", student, teacher).student_layers == ["layer2"]
    assert build_method("at", student, teacher).teacher_layers == ["layer1", "layer2", "layer3"]
    assert build_method("crd", student, teacher).student_layers == ["head.flatten"]
    with pytest.raises(ValueError, match="unknown method 'fitnett'"):
        build_method("fitnett", student, teacher)
    with pytest.raises(ValueError, match="bad parameters"):
        build_method("rkd", student, teacher, params={"distance": 1.0})
