"""The pure-PyTorch reference backend: the executable form of SPEC.md section 2.

Written for clarity, not speed; every other backend is tested against it in
float64. Gradients come from autograd through these torch operations, so they
are independent of the closed-form gradient that the fused kernels write.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from smskd_fast.backends.topk import topk_kl, topk_tcp, with_uniform_rows
from smskd_fast.backends.base import BackendStatus, LossOptions, RowInputs, RowOutputs
from smskd_fast.ops.reduction import as_class_indices


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (for gradcheck); fp32, bf16 and fp16 accumulate in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def softened_kl(source: torch.Tensor, student_log_q: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per row KL(softmax(source/T) || q), given log q; entries with p = 0 add 0."""
    log_p = F.log_softmax(source / temperature, dim=-1).detach()
    p = log_p.exp()
    # p = 0 adds nothing even where log q = -inf; a NaN p (a NaN or +inf teacher
    # logit) must stay NaN, so the test is p == 0, not p > 0.
    terms = torch.where(p == 0, torch.zeros_like(p), p * (log_p - student_log_q))
    return terms.sum(dim=-1)


def per_row_weight(weighting: str, tcp: torch.Tensor, *, has_tcp: bool) -> torch.Tensor:
    """w_i of SPEC.md section 2; zero where it needs TCP and TCP is unknown (no teacher or no target)."""
    if weighting == "constant":
        return torch.ones_like(tcp)
    if not has_tcp:
        return torch.zeros_like(tcp)
    return 1.0 - tcp if weighting == "inverse_tcp" else tcp


class ReferenceBackend:
    """Composition of torch operations; runs on any device and dtype."""

    name = "reference"
    supports_topk = True

    def status(self) -> BackendStatus:
        return BackendStatus(True, "pure PyTorch, always available")

    def supports(self, device: torch.device) -> bool:
        return True

    def rows(self, inputs: RowInputs, options: LossOptions) -> RowOutputs:
        acc = accumulation_dtype(inputs.student.dtype)
        n = inputs.student.shape[0]
        T = options.temperature
        if inputs.target is None:
            valid = torch.ones(n, dtype=torch.bool, device=inputs.student.device)
            target = torch.zeros(n, dtype=torch.long, device=inputs.student.device)
        else:
            valid = as_class_indices(inputs.target) != options.ignore_index
            target = torch.where(valid, inputs.target, torch.zeros_like(inputs.target)).long()
        keep = valid.unsqueeze(-1)

        def masked(logits: torch.Tensor) -> torch.Tensor:
            # Ignored rows are replaced by zeros so that whatever they hold
            # (even NaN) reaches neither the loss nor the gradient.
            return torch.where(keep, logits.to(acc), torch.zeros((), dtype=acc, device=logits.device))

        student = masked(inputs.student)
        zeros = torch.zeros(n, dtype=acc, device=student.device)
        log_q = F.log_softmax(student / T, dim=-1)

        ce = zeros
        if inputs.target is not None:
            # lse(s) - s_y, literally: a +inf logit gives CE = +inf (log_softmax would give NaN).
            ce = torch.logsumexp(student, dim=-1) - student.gather(-1, target.unsqueeze(-1)).squeeze(-1)

        kd = zeros
        tcp = zeros
        if inputs.teacher_topk is not None:
            topk = with_uniform_rows(inputs.teacher_topk, valid, student.shape[-1])
            kd = T * T * topk_kl(topk, log_q, T)
            if inputs.target is not None:
                tcp = topk_tcp(topk).to(acc)
        elif inputs.teacher is not None:
            teacher = masked(inputs.teacher).detach()
            kd = T * T * softened_kl(teacher, log_q, T)
            if inputs.target is not None:
                tcp = F.softmax(teacher, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)

        has_teacher = inputs.teacher is not None or inputs.teacher_topk is not None
        weight = per_row_weight(options.weighting, tcp, has_tcp=has_teacher and inputs.target is not None)
        ref = zeros
        if inputs.reference is not None:
            reference = masked(inputs.reference).detach()
            ref = T * T * weight * softened_kl(reference, log_q, T)

        loss = options.ce_weight * ce + options.kd_weight * kd + options.ref_weight * ref

        def zero_ignored(values: torch.Tensor) -> torch.Tensor:
            return torch.where(valid, values, torch.zeros_like(values))

        return RowOutputs(
            loss=zero_ignored(loss),
            ce=zero_ignored(ce).detach(),
            kd=zero_ignored(kd).detach(),
            ref=zero_ignored(ref).detach(),
            tcp=zero_ignored(tcp).detach(),
            weight=zero_ignored(weight).detach(),
        )
