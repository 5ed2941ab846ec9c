"""smskd_fast.huggingface.apply_smskd_loss on a tiny random Llama (transformers, no download)."""
from __future__ import annotations

import copy
import inspect
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

import smskd_fast  # noqa: E402
from smskd_fast.huggingface import apply_smskd_loss, revert_smskd_loss  # noqa: E402
from test_huggingface_recipe import VOCAB, batch, expected_loss, tiny_llama  # noqa: E402


def models(dtype=torch.float64):
    student, teacher, reference = tiny_llama(16, 0), tiny_llama(24, 1), tiny_llama(16, 2)
    return tuple(model.to(dtype) for model in (student, teacher, reference))


class LargestVocabularyTensor(TorchDispatchMode):
    """Records the largest storage (in elements) of any tensor an op produces whose last dimension is
    the vocabulary (logits, their gradient, softmax temporaries), leaving out views of the models'
    parameters (lm_head.weight.t() is (H, V))."""

    def __init__(self, *models):
        super().__init__()
        self.largest = 0
        self.parameters = {p.untyped_storage().data_ptr() for m in models for p in m.parameters()}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if (isinstance(tensor, torch.Tensor) and tensor.dim() >= 1 and tensor.shape[-1] == VOCAB
                    and tensor.untyped_storage().data_ptr() not in self.parameters):
                self.largest = max(self.largest, tensor.untyped_storage().nbytes() // tensor.element_size())
        return out


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_loss_and_gradients_equal_the_unfused_composition_without_building_logits(backend):
    """float64: the patched model's loss is CE + T^2 KL(teacher) + T^2 (1 - TCP) KL(reference) on the
    shifted labels (the recipe test's independent composition), its gradients with respect to every
    student parameter agree, and no tensor holding more than one chunk of tokens' logits exists:
    the LM heads' modules never run and the output has no logits."""
    student, teacher, reference = models()
    apply_smskd_loss(student, teacher=teacher, reference=reference, temperature=2.0, backend=backend, chunk_size=5)
    head_calls = []
    for model in (student, teacher, reference):
        model.lm_head.register_forward_hook(lambda *args: head_calls.append(args))
    inputs = batch()
    params = list(student.parameters())
    with LargestVocabularyTensor(student, teacher, reference) as largest:
        out = student(**inputs)
        got_grads = torch.autograd.grad(out.loss, params)
    assert out.logits is None and head_calls == []
    assert 0 < largest.largest <= 5 * VOCAB  # one chunk of 5 tokens (of 3 x 12)
    want = expected_loss(student, teacher, reference, inputs, 2.0)
    torch.testing.assert_close(out.loss, want, rtol=1e-10, atol=1e-12)
    for got, expected, (name, _) in zip(got_grads, torch.autograd.grad(want, params), student.named_parameters()):
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10, msg=lambda m: f"{name}: {m}")


def test_teacher_only_and_num_items_in_batch_follow_the_models_own_loss_convention():
    """Without a reference the loss is CE + T^2 KL(teacher); with num_items_in_batch (what Trainer
    passes for gradient accumulation) it is the sum over real tokens divided by it."""
    student, teacher, _ = models()
    apply_smskd_loss(student, teacher=teacher, temperature=3.0, kd_weight=0.5)
    inputs = batch(seed=4)
    mean = student(**inputs).loss
    labels = inputs["labels"][:, 1:]
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    with torch.no_grad():
        s = torch.nn.functional.linear(student.model(**model_inputs).last_hidden_state, student.lm_head.weight)
        t = teacher(**model_inputs).logits
    want = smskd_fast.smskd_loss(s[:, :-1], labels, t[:, :-1], temperature=3.0, kd_weight=0.5, backend="reference")
    torch.testing.assert_close(mean.detach(), want.loss, rtol=1e-10, atol=1e-12)
    real = int((labels != -100).sum())
    summed = student(**inputs, num_items_in_batch=torch.tensor(7)).loss
    torch.testing.assert_close(summed.detach(), want.loss * real / 7, rtol=1e-10, atol=1e-12)


def test_without_labels_the_original_forward_runs_and_revert_restores_the_model():
    student, teacher, _ = models()
    inputs = batch()
    plain = {k: v for k, v in inputs.items() if k != "labels"}
    before = student(**plain).logits
    hf_loss = student(**inputs).loss
    signature = inspect.signature(student.forward)
    apply_smskd_loss(student, teacher=teacher)
    assert inspect.signature(student.forward) == signature  # Trainer reads forward's parameters
    assert torch.equal(student(**plain).logits, before)
    assert student(input_ids=inputs["input_ids"]).logits.shape == (3, 12, VOCAB)
    revert_smskd_loss(student)
    assert "forward" not in student.__dict__
    out = student(**inputs)
    assert out.logits is not None and torch.equal(out.loss, hf_loss)


def test_a_copy_of_the_patched_model_computes_with_its_own_weights():
    """copy.deepcopy (e.g. the next stage's reference) rebinds the patched forward to the copy and shares
    the teacher; changing the original afterwards does not change the copy's loss."""
    student, teacher, _ = models()
    apply_smskd_loss(student, teacher=teacher)
    inputs = batch()
    copied = copy.deepcopy(student)
    loss = copied(**inputs).loss.detach()
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(0.1)
    assert torch.equal(copied(**inputs).loss.detach(), loss)
    assert not torch.equal(student(**inputs).loss.detach(), loss)
    assert sum(p.numel() for p in copied.parameters()) == sum(p.numel() for p in student.parameters())


def test_under_bfloat16_autocast_the_heads_run_in_bfloat16():
    """Under torch.autocast(cpu, bf16) the fused loss projects bf16 hidden states with bf16 heads, as
    autocast runs an nn.Linear. Oracle: the models' own bf16 logits under the same autocast, then the
    loss in float64. Both sides round the same bf16 products' float32 sums to bf16 (summed in another
    order per chunk), so the logits differ by at most an ulp of bf16 (2^-8 |s|max), and the loss,
    whose terms move by at most 2 (CE) and 2T (each KL, times its weight <= 1) per unit of max
    |logit change|, by at most (2 + 4T) 2^-8 |s|max; the fused loss's float32 arithmetic adds ~1e-6."""
    student, teacher, reference = models(torch.float32)
    apply_smskd_loss(student, teacher=teacher, reference=reference, temperature=2.0)
    inputs = batch()
    plain = {k: v for k, v in inputs.items() if k != "labels"}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = student(**inputs)
        with torch.no_grad():
            logits = [model(**plain).logits for model in (student, teacher, reference)]
    assert all(values.dtype == torch.bfloat16 for values in logits)
    s, t, r = (values[:, :-1].double() for values in logits)
    want = smskd_fast.smskd_loss(s, inputs["labels"][:, 1:], t, r, temperature=2.0, backend="reference").loss
    bound = (2 + 4 * 2.0) * 2.0 ** -8 * max(values.abs().max().item() for values in (s, t, r))
    torch.testing.assert_close(out.loss.double(), want, rtol=0, atol=bound)
    out.loss.backward()
    assert student.lm_head.weight.grad.dtype == torch.float32 and torch.isfinite(student.lm_head.weight.grad).all()


def test_a_few_steps_of_training_lower_the_loss_and_leave_the_teacher_alone(tmp_path):
    """A plain optimiser loop on one batch lowers the loss; transformers.Trainer, without a subclass,
    trains the patched model (it reads outputs.loss) and updates only the student."""
    student, teacher, reference = models(torch.float32)
    teacher_before = copy.deepcopy(teacher.state_dict())
    apply_smskd_loss(student, teacher=teacher, reference=reference, temperature=2.0)
    inputs = batch(seed=1)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = student(**inputs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.9, losses
    data = [{k: v[0] for k, v in batch(seed).items()} for seed in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no",
                             per_device_train_batch_size=4, num_train_epochs=1, learning_rate=1e-2,
                             logging_steps=1, disable_tqdm=True, gradient_accumulation_steps=2)
    before = copy.deepcopy(student.state_dict())
    trainer = Trainer(model=student, args=args, train_dataset=data)
    trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all(torch.isfinite(torch.tensor(logged)))
    assert any(not torch.equal(before[name], value) for name, value in student.state_dict().items())
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[name]), name


def test_bad_arguments_name_the_problem():
    student, teacher, _ = models()
    with pytest.raises(TypeError, match=r"unknown loss option\(s\) \['reduction'\]"):
        apply_smskd_loss(student, teacher=teacher, reduction="sum")
    other = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB + 1, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(ValueError, match=f"teacher has a vocabulary of {VOCAB + 1}, the model {VOCAB}"):
        apply_smskd_loss(student, teacher=other)
    capped = tiny_llama(16, 3)
    capped.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="teacher: its config sets final_logit_softcapping=30.0"):
        apply_smskd_loss(student, teacher=capped)
    apply_smskd_loss(student, teacher=teacher)
    inputs = batch()
    embeds = student.model.embed_tokens(inputs["input_ids"])
    with pytest.raises(ValueError, match="give input_ids"):
        student(inputs_embeds=embeds, labels=inputs["labels"])


def test_under_ddp_two_ranks_give_the_gradient_of_the_whole_batch(tmp_path):
    """2 gloo ranks (tests/distributed_huggingface_worker.py), the patched student in DDP, the loss of
    each half batch over the global number of real tokens (Trainer's convention): both ranks end with
    the float64 gradient of the whole batch's loss in one process."""
    from distributed_huggingface_worker import BATCH
    from test_distributed import torchrun

    torchrun(2, str(Path(__file__).resolve().parent / "distributed_huggingface_worker.py"), str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    student, teacher, reference = models()
    inputs = batch(size=BATCH)
    want = expected_loss(student, teacher, reference, inputs, 2.0)
    want.backward()
    for name, parameter in student.named_parameters():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        torch.testing.assert_close(ranks[0][name], parameter.grad, rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")
