"""Distilling a Hugging Face causal LM with smskd-fast inside transformers.Trainer.

Subclass Trainer and override compute_loss: run the frozen teacher (and, from
the second SMSKD stage on, the frozen reference) without gradients, then call
either smskd_fast.smskd_loss on the shifted logits, or
smskd_fast.fused_linear_smskd_loss on the last hidden states and the LM heads so
that the vocabulary-sized logits are never materialised all at once.

When Trainer passes num_items_in_batch (the real tokens of all the micro-batches
of one optimizer step, and of all ranks), the loss is the sum over this
micro-batch's tokens divided by it (times the ranks, whose gradients DDP
averages), as the model's own loss is: Trainer then does not divide by the
gradient accumulation steps, and a step's gradient is the mean over its tokens
whatever the accumulation and the ranks. Under DDP use fused_linear=False, or
apply_smskd_loss (smskd_fast.huggingface) for the fused loss.
"""
from __future__ import annotations

from typing import Optional

import torch
from transformers import Trainer

import smskd_fast


class SMSKDTrainer(Trainer):
    """A Trainer whose loss is SMSKD's CE + KD to the teacher + TCP-weighted KL to a reference."""

    def __init__(self, *args, teacher: torch.nn.Module, reference: Optional[torch.nn.Module] = None,
                 fused_linear: bool = True, loss_options: Optional[dict] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False)
        self.reference = None if reference is None else reference.eval().requires_grad_(False)
        self.fused_linear = fused_linear
        self.loss_options = {"temperature": 2.0, **(loss_options or {})}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"][:, 1:]  # token t predicts token t+1; padding is -100 = ignore_index
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        reduction = "mean" if num_items_in_batch is None else "sum"
        if self.fused_linear:
            out = self._fused_linear_loss(model, model_inputs, labels, reduction)
        else:
            out = self._logits_loss(model, model_inputs, labels, reduction)
        loss = out.loss if num_items_in_batch is None else out.loss / num_items_in_batch
        if num_items_in_batch is not None and getattr(self.args, "average_tokens_across_devices", False):
            loss = loss * self.accelerator.num_processes  # DDP averages the ranks' gradients, as Trainer's own loss
        return (loss, out) if return_outputs else loss

    def _logits_loss(self, model, model_inputs, labels, reduction):
        student = model(**model_inputs).logits[:, :-1]
        with torch.no_grad():
            teacher = self.teacher(**model_inputs).logits[:, :-1].to(student.dtype)
            reference = None
            if self.reference is not None:
                reference = self.reference(**model_inputs).logits[:, :-1].to(student.dtype)
        return smskd_fast.smskd_loss(student, labels, teacher, reference, reduction=reduction, **self.loss_options)

    def _fused_linear_loss(self, model, model_inputs, labels, reduction):
        if model is not self.accelerator.unwrap_model(model):
            raise ValueError("fused_linear=True calls model.model and model.lm_head, which a DDP or FSDP wrapper "
                             "hides (calling them past it would skip its gradient synchronisation): use "
                             "smskd_fast.huggingface.apply_smskd_loss, whose loss runs inside the model's "
                             "forward, or fused_linear=False")
        hidden = model.model(**model_inputs).last_hidden_state[:, :-1]
        with torch.no_grad():
            teacher_hidden = self.teacher.model(**model_inputs).last_hidden_state[:, :-1]
            reference_hidden = reference_weight = None
            if self.reference is not None:
                reference_hidden = self.reference.model(**model_inputs).last_hidden_state[:, :-1]
                reference_weight = self.reference.lm_head.weight
        return smskd_fast.fused_linear_smskd_loss(
            hidden, model.lm_head.weight, labels,
            teacher_hidden=teacher_hidden, teacher_head_weight=self.teacher.lm_head.weight,
            reference_hidden=reference_hidden, reference_head_weight=reference_weight,
            student_head_bias=model.lm_head.bias, teacher_head_bias=self.teacher.lm_head.bias,
            reference_head_bias=None if self.reference is None else self.reference.lm_head.bias,
            reduction=reduction, **self.loss_options)
