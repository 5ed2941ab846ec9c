"""The Triton ops refuse what the compiled CPU ops refuse, with the same exception type and words, under
their own name (smskd_fast/backends/triton/op_checks.py). Before, a teacher of more rows than the
student or a 0-d target passed unnoticed, and a shorter teacher was read past its end.

Oracle: the compiled CPU op on the same arguments (its messages: csrc/cpu/loss_rows.cpp,
loss_rows_topk.cpp); on a GPU the Triton op gets them on the GPU, the CPU op a copy on the CPU.
"""
from __future__ import annotations

import pytest
import torch

from smskd_fast.ops.extension import extension_loaded
from triton_interpreter import DEVICE, needs_kernels, reruns_under_interpreter, run_under_interpreter

ROWS, CLASSES, K = 4, 9, 3
SCALARS = (2.0, 1.0, 0.5, 0.7, "inverse_tcp", -100, True, None, "none")


def dense_arguments():
    generator = torch.Generator().manual_seed(2)
    student, teacher, reference = (torch.randn(ROWS, CLASSES, generator=generator) for _ in range(3))
    return dict(student=student, target=torch.arange(ROWS), teacher=teacher, reference=reference)


def topk_arguments():
    arguments = dense_arguments()
    teacher = arguments.pop("teacher")
    values, indices = teacher.topk(K, dim=1)
    lse = teacher.logsumexp(dim=1)
    return dict(student=arguments["student"], target=arguments["target"], topk_values=values, topk_indices=indices,
                true_logit=teacher[torch.arange(ROWS), arguments["target"]], log_sum_exp=lse,
                log_sum_exp_at_temperature=(teacher / 2).logsumexp(dim=1), reference=arguments["reference"])


# name -> (form, argument, its bad value from the good arguments, the words of the message after "op: ")
CASES = {
    "student 1-D": ("dense", "student", lambda a: a["student"][0], "student must have shape (N, C) with C >= 1"),
    "student of no columns": ("dense", "student", lambda a: a["student"][:, :0],
                              "student must have shape (N, C) with C >= 1"),
    "teacher of more rows": ("dense", "teacher", lambda a: torch.cat((a["teacher"], a["teacher"][:1])),
                             f"teacher must have the student's shape [{ROWS}, {CLASSES}], got [{ROWS + 1}, {CLASSES}]"),
    "teacher of fewer columns": ("dense", "teacher", lambda a: a["teacher"][:, :-1],
                                 f"teacher must have the student's shape [{ROWS}, {CLASSES}]"),
    "reference of fewer rows": ("dense", "reference", lambda a: a["reference"][:-1],
                                f"reference must have the student's shape [{ROWS}, {CLASSES}]"),
    "teacher of another dtype": ("dense", "teacher", lambda a: a["teacher"].half(),
                                 "teacher must have the student's dtype"),
    "target of floats": ("dense", "target", lambda a: a["target"].float(), "target must hold integer class indices"),
    "target of fewer rows": ("dense", "target", lambda a: a["target"][:-1], f"target must have shape ({ROWS},)"),
    "0-d target": ("dense", "target", lambda a: a["target"][0], f"target must have shape ({ROWS},), got []"),
    "topk_values of k > C": ("topk", "topk_values", lambda a: torch.zeros(ROWS, CLASSES + 1),
                             f"topk_values must have shape ({ROWS}, k) with 1 <= k <= {CLASSES}"),
    "topk_indices of another k": ("topk", "topk_indices", lambda a: a["topk_indices"][:, :-1],
                                  f"topk_indices must have shape [{ROWS}, {K}], got [{ROWS}, {K - 1}]"),
    "true_logit of fewer rows": ("topk", "true_logit", lambda a: a["true_logit"][:-1],
                                 f"true_logit must have shape [{ROWS}], got [{ROWS - 1}]"),
    "log_sum_exp 2-D": ("topk", "log_sum_exp", lambda a: a["log_sum_exp"][:, None],
                        f"log_sum_exp must have shape [{ROWS}], got [{ROWS}, 1]"),
    "topk_indices of floats": ("topk", "topk_indices", lambda a: a["topk_indices"].float(),
                               "topk_indices must hold integer class indices"),
    "true_logit of integers": ("topk", "true_logit", lambda a: a["true_logit"].long(),
                               "true_logit must be a floating tensor"),
    "top-k reference of fewer columns": ("topk", "reference", lambda a: a["reference"][:, :-1],
                                         f"reference must have shape [{ROWS}, {CLASSES}]"),
}
OPS = {"dense": "smskd_loss_rows", "topk": "smskd_loss_rows_topk"}


def call(op_name: str, arguments: dict, temperature: float = 2.0, weighting: str = "inverse_tcp"):
    """The op on the arguments: the Triton op's on DEVICE, the compiled op's on the CPU."""
    op = getattr(torch.ops.smskd_fast, op_name)
    device = DEVICE if op_name.endswith("_triton") else "cpu"
    tensors = [value.to(device) for value in arguments.values()]
    return op(*tensors, temperature, SCALARS[1], SCALARS[2], SCALARS[3], weighting, *SCALARS[5:])


def refusal(op_name: str, arguments: dict, temperature: float = 2.0, weighting: str = "inverse_tcp") -> BaseException:
    with pytest.raises(Exception) as refused:
        call(op_name, arguments, temperature, weighting)
    return refused.value


@needs_kernels
@pytest.mark.skipif(not extension_loaded(), reason="the oracle is the compiled CPU op")
@pytest.mark.parametrize("case", list(CASES))
def test_the_triton_op_refuses_what_the_compiled_op_refuses(case):
    form, name, bad_value, words = CASES[case]
    arguments = dense_arguments() if form == "dense" else topk_arguments()
    call(OPS[form] + "_triton", arguments)  # the good arguments run
    arguments[name] = bad_value(arguments)
    compiled = refusal(OPS[form], arguments)
    triton = refusal(OPS[form] + "_triton", arguments)
    assert type(triton) is type(compiled), (compiled, triton)
    assert f"{OPS[form]}: {words}" in str(compiled), compiled
    assert f"{OPS[form]}_triton: {words}" in str(triton), triton


@needs_kernels
@pytest.mark.skipif(not extension_loaded(), reason="the oracle is the compiled CPU op")
@pytest.mark.parametrize("form", ["dense", "topk"])
@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf"), float("nan")])
def test_a_temperature_that_is_not_finite_and_positive_is_refused(form, temperature):
    arguments = dense_arguments() if form == "dense" else topk_arguments()
    compiled = refusal(OPS[form], arguments, temperature)
    triton = refusal(OPS[form] + "_triton", arguments, temperature)
    assert type(triton) is type(compiled) is ValueError
    assert str(triton).replace("_triton:", ":") == str(compiled)


@needs_kernels
@pytest.mark.skipif(not extension_loaded(), reason="the oracle is the compiled CPU op")
@pytest.mark.parametrize("form", ["dense", "topk"])
def test_an_unknown_weighting_is_refused_with_the_modes(form):
    """(It reached the launcher's table as a bare KeyError.)"""
    arguments = dense_arguments() if form == "dense" else topk_arguments()
    compiled = refusal(OPS[form], arguments, weighting="bogus")
    triton = refusal(OPS[form] + "_triton", arguments, weighting="bogus")
    assert type(triton) is type(compiled) is ValueError
    assert str(triton).replace("_triton:", ":") == str(compiled)


@pytest.mark.skipif(not torch.cuda.is_available() or not extension_loaded(), reason="needs a CUDA device")
@needs_kernels
def test_logits_on_another_device_are_refused_as_the_compiled_op_refuses_them():
    arguments = dense_arguments()
    cuda = {name: value.cuda() for name, value in arguments.items()}
    cuda["teacher"] = arguments["teacher"]  # on the CPU
    with pytest.raises(RuntimeError, match="smskd_loss_rows_triton: teacher must be on the student's device"):
        torch.ops.smskd_fast.smskd_loss_rows_triton(*cuda.values(), *SCALARS)


@reruns_under_interpreter
def test_cases_under_the_interpreter():
    run_under_interpreter(__file__)
