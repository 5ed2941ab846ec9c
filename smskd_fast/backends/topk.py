"""The top-k form of a teacher's logits, as a logit cache stores it, and its KD term.

Keeping only the k largest teacher logits per row (plus the true-class logit and
the full row's log-sum-exp at temperature 1 and at the loss temperature) keeps
TCP and the kept classes' probabilities p_c = exp(t_c/T - lse(t/T)) exact, and
the mass of the rest, p_rest = 1 - sum_kept p_c, known. How the rest is spread
over its classes is not known; we spread it like the student does:

    p~_c = p_c (kept),   p~_j = p_rest * q_j / q_rest (rest),   q = softmax(s/T)

so KD_topk = T^2 KL(p~ || q) = T^2 [sum_kept p_c log(p_c/q_c) + p_rest log(p_rest/q_rest)],
the KL between the two distributions coarsened to {kept classes, the rest}. It is
never larger than the dense KD (coarsening cannot increase a KL) and equals it
when k = C; its gradient keeps the dense form T (q - p~). benchmarks/topk_error.py
measures the gap.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Optional, Tuple

import torch

__all__ = ["TopKTeacher"]


@dataclass(frozen=True)
class TopKTeacher:
    """A teacher given by its top-k logits. Shapes: values and indices (..., k); the rest (...).

    temperature, when known (from_logits and the trainer's caches record it), is the one
    log_sum_exp_at_temperature was taken at: the loss refuses the teacher at any other."""

    values: torch.Tensor
    indices: torch.Tensor
    true_logit: torch.Tensor
    log_sum_exp: torch.Tensor
    log_sum_exp_at_temperature: torch.Tensor
    temperature: Optional[float] = None
    TENSOR_FIELDS: ClassVar[Tuple[str, ...]] = ("values", "indices", "true_logit", "log_sum_exp",
                                                "log_sum_exp_at_temperature")

    @classmethod
    def from_logits(cls, logits: torch.Tensor, target: torch.Tensor, k: int, temperature: float) -> "TopKTeacher":
        """The top-k form of dense teacher logits (..., C) for the given target and temperature."""
        if not 1 <= k <= logits.shape[-1]:
            raise ValueError(f"k must be in [1, {logits.shape[-1]}], got {k}")
        logits = logits.detach().to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
        values, indices = logits.topk(k, dim=-1)
        safe_target = target.clamp(0, logits.shape[-1] - 1).long().unsqueeze(-1)
        return cls(values, indices, logits.gather(-1, safe_target).squeeze(-1), torch.logsumexp(logits, -1),
                   torch.logsumexp(logits / temperature, -1), float(temperature))

    def tensors(self) -> Tuple[torch.Tensor, ...]:
        """The tensor fields, in TENSOR_FIELDS order."""
        return tuple(getattr(self, name) for name in self.TENSOR_FIELDS)

    def map_tensors(self, function: Callable[[torch.Tensor], torch.Tensor]) -> "TopKTeacher":
        """The same teacher with `function` applied to each tensor field (to move, slice or cast them),
        its temperature kept."""
        return TopKTeacher(*(function(tensor) for tensor in self.tensors()), self.temperature)

    @property
    def k(self) -> int:
        return self.values.shape[-1]

    def rows(self) -> "TopKTeacher":
        """The same teacher flattened to rows: (N, k) and (N,)."""
        k = self.k
        return TopKTeacher(self.values.reshape(-1, k), self.indices.reshape(-1, k), self.true_logit.reshape(-1),
                           self.log_sum_exp.reshape(-1), self.log_sum_exp_at_temperature.reshape(-1), self.temperature)


def with_uniform_rows(teacher: TopKTeacher, keep: torch.Tensor, num_classes: int) -> TopKTeacher:
    """The rows teacher (N, k) with those where keep (N,) is False replaced by the top k of a uniform
    teacher over num_classes classes (values 0, classes 0..k-1): what an ignored row holds (a cache's
    zero-filled padding, even indices outside [0, C)) then reaches no gather and no loss term."""
    row_keep = keep.unsqueeze(-1)
    first_classes = torch.arange(teacher.k, device=keep.device).expand_as(teacher.indices)
    log_classes = math.log(num_classes)  # the log-sum-exp of C zeros, at any temperature
    return TopKTeacher(torch.where(row_keep, teacher.values, 0.0),
                       torch.where(row_keep, teacher.indices.long(), first_classes),
                       torch.where(keep, teacher.true_logit, 0.0),
                       torch.where(keep, teacher.log_sum_exp, log_classes),
                       torch.where(keep, teacher.log_sum_exp_at_temperature, log_classes), teacher.temperature)


def topk_tcp(teacher: TopKTeacher) -> torch.Tensor:
    """TCP_i = exp(t_y - lse(t)), exact from the stored true-class logit and log-sum-exp."""
    return torch.exp(teacher.true_logit - teacher.log_sum_exp)


def topk_kl(teacher: TopKTeacher, student_log_q: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per row KL(p~ || q) of the module docstring, given log q = log_softmax(s/T) (N, C)."""
    log_p_kept = teacher.values.to(student_log_q.dtype) / temperature \
        - teacher.log_sum_exp_at_temperature.to(student_log_q.dtype).unsqueeze(-1)
    p_kept = log_p_kept.exp()
    log_q_kept = student_log_q.gather(-1, teacher.indices.long())
    # A kept class of probability 0 (a -inf logit) adds nothing; a NaN value or log-sum-exp
    # propagates (p != 0 holds for NaN) so that a broken cache row gives a NaN loss, as a
    # NaN teacher logit does in the dense form, instead of silently losing that class.
    kept = torch.where(p_kept != 0, p_kept * (log_p_kept - log_q_kept), torch.zeros_like(p_kept)).sum(-1)
    if teacher.k == student_log_q.shape[-1]:
        return kept  # nothing left out: the dense KL
    p_rest = (-torch.expm1(torch.logsumexp(log_p_kept, dim=-1))).clamp(min=0.0)
    has_rest = p_rest > 0
    in_kept = torch.zeros_like(student_log_q, dtype=torch.bool).scatter(-1, teacher.indices.long(), True)
    rest_log_q = student_log_q.masked_fill(in_kept, float("-inf"))
    # Rows without teacher mass outside the kept classes get a harmless stand-in, so
    # that logsumexp never sees an all -inf row (its gradient would be NaN).
    rest_log_q = torch.where(has_rest.unsqueeze(-1), rest_log_q, torch.zeros_like(rest_log_q))
    log_q_rest = torch.logsumexp(rest_log_q, dim=-1)
    safe_p_rest = torch.where(has_rest, p_rest, torch.ones_like(p_rest))
    rest = torch.where(has_rest, p_rest * (safe_p_rest.log() - log_q_rest), torch.zeros_like(p_rest))
    return kept + rest
