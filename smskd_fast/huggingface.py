"""One call that makes a Hugging Face causal LM's training loss the fused SMSKD loss.

    from smskd_fast.huggingface import apply_smskd_loss
    apply_smskd_loss(student, teacher=teacher, reference=None, temperature=2.0)
    loss = student(input_ids=..., attention_mask=..., labels=...).loss   # SMSKD, logits never built

Like Liger's apply_liger_kernel_to_*(model=...), it patches one model instance:
its forward, when given labels, runs the base model to the last hidden state,
the frozen teacher (and reference) likewise without gradients, and returns
fused_linear_smskd_loss on the LM heads' weights with labels shifted by one
token, as the model's own loss does (padding -100 is ignored). The output's
logits are None: no (batch, length, vocabulary) tensor exists, one chunk of
tokens' logits at a time. Without labels (generation, evaluation of logits)
the original forward runs unchanged. transformers.Trainer needs no subclass:
it reads `outputs.loss`, and its num_items_in_batch (gradient accumulation)
is honoured like the model's own loss does (sum over tokens / num_items).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import types
from typing import Any, Optional, Tuple

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from smskd_fast.loss.fused_linear import fused_linear_smskd_loss

__all__ = ["apply_smskd_loss", "revert_smskd_loss"]

LOSS_OPTIONS = ("temperature", "ce_weight", "kd_weight", "ref_weight", "weighting", "ignore_index", "backend",
                "chunk_size")
# Keyword arguments of a causal LM's forward that concern the loss or the cache, not the base model.
_NOT_FOR_THE_BASE_MODEL = ("labels", "num_items_in_batch", "shift_labels", "logits_to_keep", "use_cache", "cache",
                           "past_key_values", "return_dict")
# Config fields of models whose logits are not a plain linear head (Gemma's soft-capping, Cohere's and Granite's scale).
_HEAD_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def _linear_head(model: nn.Module, role: str) -> nn.Linear:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        raise TypeError(f"{role}: apply_smskd_loss needs a causal LM whose get_output_embeddings() is an nn.Linear, "
                        f"got {type(head).__name__}")
    config = getattr(model, "config", None)
    for field in _HEAD_TRANSFORMS:
        value = getattr(config, field, None)
        if value not in (None, 1, 1.0):
            raise ValueError(f"{role}: its config sets {field}={value!r}, so its logits are not hidden @ lm_head.T "
                             "and the fused loss would differ from the model's own; use smskd_fast.smskd_loss on "
                             "its logits instead")
    return head


def _last_hidden(model: nn.Module, arguments: dict) -> Tuple[Any, torch.Tensor]:
    """The base model's outputs (without a cache) and its last hidden state (after the final norm)."""
    outputs = model.base_model(**arguments, use_cache=False)
    return outputs, outputs.last_hidden_state


def _shifted_labels(labels: Optional[torch.Tensor], shift_labels: Optional[torch.Tensor],
                    ignore_index: int) -> torch.Tensor:
    """The label of each position's next token (what the model's own causal-LM loss compares with)."""
    if shift_labels is not None:
        return shift_labels
    return nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype in force on device, or None."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def apply_smskd_loss(model: nn.Module, teacher: nn.Module, reference: Optional[nn.Module] = None,
                     **loss_options: Any) -> nn.Module:
    """Makes model(..., labels=y).loss the fused SMSKD loss against the frozen teacher (and reference).

    teacher and reference are put in eval mode and frozen (requires_grad False); they are
    held by the patched forward, not registered as submodules, so the model's parameters,
    state_dict and optimizer are unchanged, and a copy.deepcopy of the model (e.g. the next
    stage's reference) shares them instead of copying them. They must share the student's
    vocabulary (their hidden sizes may differ) and be on its device. loss_options go to
    fused_linear_smskd_loss: temperature (default 2.0), ce_weight, kd_weight, ref_weight,
    weighting, ignore_index (the labels' padding, -100), backend, chunk_size. Calling it
    again replaces the teacher and reference (e.g. for SMSKD's next stage). Under autocast
    the heads run in the autocast dtype (hidden states and head weights cast to it, as
    autocast does to an nn.Linear). Returns the model.
    """
    unknown = sorted(set(loss_options) - set(LOSS_OPTIONS))
    if unknown:
        raise TypeError(f"apply_smskd_loss: unknown loss option(s) {unknown}; expected some of {list(LOSS_OPTIONS)}")
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be a causal LM (nn.Module), got {type(teacher).__name__}")
    revert_smskd_loss(model)
    original = model.forward
    if getattr(original, "__self__", None) is not model:
        raise TypeError("apply_smskd_loss: the model's forward is already replaced by something else "
                        f"({original!r}); apply it to a model whose forward is its class's method")
    student_head = _linear_head(model, "model")
    frozen = [(module, _linear_head(module, role)) for role, module in (("teacher", teacher), ("reference", reference))
              if module is not None]
    for (module, head), role in zip(frozen, ("teacher", "reference")):
        if head.out_features != student_head.out_features:
            raise ValueError(f"{role} has a vocabulary of {head.out_features}, the model "
                             f"{student_head.out_features}: the KD terms need the same classes")
        module.eval().requires_grad_(False)
    options = {"temperature": 2.0, **loss_options}
    ignore_index = options.get("ignore_index", -100)
    signature = inspect.signature(original)
    original_function = original.__func__

    @functools.wraps(original_function)  # inspect.signature(model.forward) stays the original's
    def forward(self: nn.Module, *args: Any, **kwargs: Any):
        arguments = dict(signature.bind(*args, **kwargs).arguments)
        arguments.update(arguments.pop(_var_keyword(signature), None) or {})
        if arguments.get("labels") is None and arguments.get("shift_labels") is None:
            return original_function(self, *args, **kwargs)
        labels = _shifted_labels(arguments.get("labels"), arguments.get("shift_labels"), ignore_index)
        num_items = arguments.get("num_items_in_batch")
        for name in _NOT_FOR_THE_BASE_MODEL:
            arguments.pop(name, None)
        if arguments.get("input_ids") is None:
            raise ValueError("apply_smskd_loss: give input_ids (the teacher cannot read the student's inputs_embeds)")
        outputs, hidden = _last_hidden(self, arguments)
        with torch.no_grad():
            frozen_hidden = [(_last_hidden(module, arguments)[1], head) for module, head in frozen]
        loss = _loss((hidden, self.get_output_embeddings()), frozen_hidden, labels, num_items, options)
        return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=outputs.hidden_states,
                                      attentions=outputs.attentions)

    forward.smskd_original_forward = original_function
    model.forward = types.MethodType(forward, model)  # a deepcopy rebinds it to the copy
    return model


def _var_keyword(signature: inspect.Signature) -> Optional[str]:
    return next((p.name for p in signature.parameters.values() if p.kind == inspect.Parameter.VAR_KEYWORD), None)


def _loss(student: Tuple[torch.Tensor, nn.Linear], frozen: list, labels: torch.Tensor, num_items,
          options: dict) -> torch.Tensor:
    """fused_linear_smskd_loss on (hidden states, head) of the student and of the frozen models: the mean
    over real tokens, or their sum divided by num_items, as the model's own loss."""
    hidden = student[0]
    cast = _autocast_dtype(hidden.device)

    def head_of(pair) -> Tuple[Optional[torch.Tensor], ...]:
        if pair is None:
            return None, None, None
        values, head = pair
        dtype = cast or head.weight.dtype
        return values.to(dtype), head.weight.to(dtype), None if head.bias is None else head.bias.to(dtype)

    student_hidden, student_weight, student_bias = head_of(student)
    teacher_hidden, teacher_weight, teacher_bias = head_of(frozen[0])
    reference_hidden, reference_weight, reference_bias = head_of(frozen[1] if len(frozen) > 1 else None)
    autocast_off = torch.autocast(hidden.device.type, enabled=False) if cast else contextlib.nullcontext()
    with autocast_off:
        out = fused_linear_smskd_loss(
            student_hidden, student_weight, labels.to(hidden.device), teacher_hidden, teacher_weight, None,
            reference_hidden, reference_weight, student_head_bias=student_bias, teacher_head_bias=teacher_bias,
            reference_head_bias=reference_bias, reduction="mean" if num_items is None else "sum", **options)
    if num_items is None:
        return out.loss
    return out.loss / (num_items.to(out.loss.device) if torch.is_tensor(num_items) else num_items)


def revert_smskd_loss(model: nn.Module) -> nn.Module:
    """Undoes apply_smskd_loss on `model` (nothing happens if it was not applied)."""
    patched = model.__dict__.get("forward")
    if patched is not None and hasattr(patched, "smskd_original_forward"):
        model.forward = types.MethodType(patched.smskd_original_forward, model)
        if model.forward.__func__ is getattr(type(model), "forward", None):
            del model.forward
    return model
