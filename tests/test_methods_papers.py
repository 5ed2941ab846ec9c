"""KD methods against their papers where test_methods.py's float64 cases cannot see a defect:
float32 precision of confident rows, parameter ranges, and CRD's state outside training mode.

Oracles are the papers' formulas written in float64 in the test (DKD, Zhao et al. 2022:
KL of the binary (target, rest) distributions b = (p_t, 1 - p_t) plus KL over the non-target
classes; CRD, Tian et al. 2020: Z = mean score * N, fixed from the first training batch).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from smskd_fast.training.methods import METHODS, MethodInputs, build_method
from smskd_fast.training.methods.relation import CRD
from smskd_fast.training.methods.response import dkd_loss


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----- DKD: TCKD of a confident student in float32 ---------------------------------------------

def _dkd_paper(student, teacher, target, alpha, beta, temperature):
    """T^2 (alpha KL(b_t || b_s) + beta KL(p^_t || p^_s)) averaged over rows, in float64:
    b = (p_target, 1 - p_target), p^ = softmax over the non-target classes."""
    total = torch.zeros((), dtype=torch.float64)
    for i in range(student.shape[0]):
        y = int(target[i])
        p_s = F.softmax(student[i].double() / temperature, 0)
        p_t = F.softmax(teacher[i].double() / temperature, 0)
        b_s, b_t = torch.stack([p_s[y], 1 - p_s[y]]), torch.stack([p_t[y], 1 - p_t[y]])
        keep = [c for c in range(student.shape[1]) if c != y]
        q_s = F.softmax(student[i, keep].double() / temperature, 0)
        q_t = F.softmax(teacher[i, keep].double() / temperature, 0)
        tckd = (b_t * (b_t / b_s).log()).sum()
        nckd = (q_t * (q_t / q_s).log()).sum()
        total = total + temperature ** 2 * (alpha * tckd + beta * nckd)
    return total / student.shape[0]


@pytest.mark.parametrize("temperature, margin", [(1.0, 30.0), (4.0, 100.0), (4.0, 40.0)])  # 40: 1 - p_t ~ 1e-3
def test_dkd_tckd_of_a_confident_student_keeps_float32_precision_and_gradient(temperature, margin):
    """A student surer of the target than float32 can tell from 1 (1 - p_target rounds to 0)
    still gets the TCKD gradient that pulls its target logit back towards the teacher's."""
    g = _gen(21)
    rows, classes = 6, 100
    teacher = torch.randn(rows, classes, generator=g, dtype=torch.float32) * 2
    target = torch.randint(0, classes, (rows,), generator=g)
    student = torch.randn(rows, classes, generator=g, dtype=torch.float32)
    student[torch.arange(rows), target] += margin
    student = student.requires_grad_(True)
    got = dkd_loss(student, teacher, target, 1.0, 8.0, temperature)
    (grad,) = torch.autograd.grad(got, student)

    student64 = student.detach().double().requires_grad_(True)
    expected = _dkd_paper(student64, teacher, target, 1.0, 8.0, temperature)
    (expected_grad,) = torch.autograd.grad(expected, student64)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), expected, rtol=1e-5), (float(got), float(expected))
    assert torch.allclose(grad.double(), expected_grad, rtol=1e-4, atol=1e-6), (
        grad[torch.arange(rows), target], expected_grad[torch.arange(rows), target])


# ----- parameter ranges: refused when the method is built (the config builds it at load time) -----

@pytest.mark.parametrize("name, params, parameter", [
    ("crd", {"feat_dim": 0}, "feat_dim"),
    ("crd", {"nce_k": 0}, "nce_k"),
    ("crd", {"nce_k": -5}, "nce_k"),
    ("crd", {"nce_t": 0.0}, "nce_t"),
    ("crd", {"nce_t": -0.07}, "nce_t"),
    ("crd", {"nce_t": math.nan}, "nce_t"),
    ("crd", {"nce_m": 1.0}, "nce_m"),
    ("crd", {"nce_m": -0.5}, "nce_m"),
    ("dkd", {"temperature": 0.0}, "temperature"),
    ("dkd", {"warmup": -1}, "warmup"),
    ("dkd", {"alpha": -1.0}, "alpha"),
    ("dkd", {"beta": -8.0}, "beta"),
    ("at", {"power": 0.0}, "power"),
    ("at", {"power": -2.0}, "power"),
    ("rkd", {"distance_weight": -25.0}, "distance_weight"),
    ("rkd", {"angle_weight": -50.0}, "angle_weight"),
])
def test_out_of_range_method_parameters_are_refused_naming_the_parameter(name, params, parameter):
    with pytest.raises(ValueError, match=rf"^{name} parameter {parameter} must be "):
        build_method(name, None, None, params=params)


@pytest.mark.parametrize("name, params", [
    ("crd", {"feat_dim": 1, "nce_k": 1, "nce_t": 0.02, "nce_m": 0.0}),
    ("dkd", {"temperature": 0.5, "warmup": 0, "alpha": 0.0, "beta": 0.0}),
    ("at", {"power": 0.5}),
    ("rkd", {"distance_weight": 0.0, "angle_weight": 0.0}),
])
def test_edge_values_inside_the_ranges_are_accepted(name, params):
    method = METHODS[name](**params)
    for key, value in params.items():
        assert getattr(method, key) == value


# ----- CRD: memory banks and Z change in training mode only -----------------------------------------

def _crd(num_samples=10, seed=0):
    g = _gen(seed)
    student, teacher = torch.randn(3, 4, generator=g), torch.randn(3, 6, generator=g)
    method = CRD(0.5, feat_dim=5, nce_k=4, nce_t=0.1, nce_m=0.25)
    method.set_layers(["s"], ["t"])
    torch.manual_seed(seed)
    method.build(_batch(student, teacher, [0, 1, 2]), num_samples)
    method.sample_negatives = lambda batch: torch.tensor([[1, 2, 3, 4], [0, 0, 9, 8], [5, 6, 7, 1]])
    return method


def _batch(student, teacher, indices):
    rows = student.shape[0]
    return MethodInputs(torch.zeros(rows, 3), torch.zeros(rows, 3), torch.zeros(rows, dtype=torch.long),
                        torch.tensor(indices), {"s": student}, {"t": teacher})


def _random_batch(seed, indices):
    g = _gen(seed)
    return _batch(torch.randn(3, 4, generator=g), torch.randn(3, 6, generator=g), indices)


def _first_batch_z(method, inputs):
    """Z per side (student scores on the teacher bank, teacher scores on the student bank) from
    the paper: the mean of exp(v . m / t) over the batch's contrast rows, times the data size."""
    contrast = torch.cat([inputs.indices[:, None], method.sample_negatives(3)], dim=1)
    with torch.no_grad():
        v_s = F.normalize(method.embed_student(inputs.student_features["s"]), dim=1).double()
        v_t = F.normalize(method.embed_teacher(inputs.teacher_features["t"]), dim=1).double()

    def z(query, memory):
        scores = [math.exp(float(memory[int(j)].double() @ query[i]) / 0.1) for i in range(3) for j in contrast[i]]
        return sum(scores) / len(scores) * method.num_samples

    return z(v_s, method.memory_teacher), z(v_t, method.memory_student)


def test_crd_in_eval_mode_leaves_the_banks_and_z_untouched():
    method = _crd()
    memory_student, memory_teacher = method.memory_student.clone(), method.memory_teacher.clone()
    method.eval()
    with torch.no_grad():
        method.loss(_random_batch(1, [7, 2, 5]))  # e.g. a validation batch: its indices name other samples
    assert torch.equal(method.memory_student, memory_student)
    assert torch.equal(method.memory_teacher, memory_teacher)
    assert torch.equal(method.normalizer, torch.full((2,), -1.0)), method.normalizer


def test_crd_z_comes_from_the_first_training_batch_not_from_an_earlier_eval_call():
    method = _crd()
    method.eval()
    method.loss(_random_batch(1, [7, 2, 5]))
    method.train()
    train_batch = _random_batch(2, [3, 8, 0])
    expected = _first_batch_z(method, train_batch)
    method.loss(train_batch)
    assert torch.allclose(method.normalizer.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5)


def test_crd_eval_loss_reads_the_stored_state_as_the_training_loss_does():
    """After training set Z, an eval call scores with that Z and the current banks: the same
    loss a training call on the same batch returns (before its own bank update)."""
    method = _crd()
    method.loss(_random_batch(2, [3, 8, 0]))
    trained = copy.deepcopy(method)
    batch = _random_batch(3, [7, 2, 5])
    method.eval()
    assert torch.equal(method.loss(batch), trained.loss(batch))
