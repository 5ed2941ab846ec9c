"""The Hugging Face Trainer recipe of docs/examples/hf_trainer.py on a tiny random Llama."""
from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments  # noqa: E402

RECIPE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "hf_trainer.py"
VOCAB = 97


def load_recipe():
    spec = importlib.util.spec_from_file_location("hf_trainer_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_llama(hidden: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(config).double()


def batch(seed: int = 0, size: int = 3, length: int = 12):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (size, length), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -4:] = 0  # right padding
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def expected_loss(student, teacher, reference, inputs, T):
    """CE + T^2 KL(teacher||student) + T^2 (1-TCP) KL(reference||student), over real next tokens."""
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    s = student(**model_inputs).logits[:, :-1].reshape(-1, VOCAB)
    t = teacher(**model_inputs).logits[:, :-1].reshape(-1, VOCAB)
    r = reference(**model_inputs).logits[:, :-1].reshape(-1, VOCAB)
    y = inputs["labels"][:, 1:].reshape(-1)
    keep = y != -100
    s, t, r, y = s[keep], t[keep], r[keep], y[keep]
    log_q = F.log_softmax(s / T, -1)
    kl_t = F.kl_div(log_q, F.log_softmax(t / T, -1), log_target=True, reduction="none").sum(-1)
    kl_r = F.kl_div(log_q, F.log_softmax(r / T, -1), log_target=True, reduction="none").sum(-1)
    tcp = F.softmax(t, -1).gather(1, y[:, None]).squeeze(1)
    return F.cross_entropy(s, y) + T * T * kl_t.mean() + T * T * ((1 - tcp) * kl_r).mean()


@pytest.mark.parametrize("fused_linear", [True, False])
def test_compute_loss_matches_the_composition(fused_linear, tmp_path):
    recipe = load_recipe()
    student, teacher, reference = tiny_llama(16, 0), tiny_llama(24, 1), tiny_llama(16, 2)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no")
    trainer = recipe.SMSKDTrainer(model=student, teacher=teacher, reference=reference, args=args,
                                  fused_linear=fused_linear, loss_options={"temperature": 2.0, "backend": "reference"})
    inputs = batch()
    got = trainer.compute_loss(student, inputs)
    want = expected_loss(student, teacher, reference, inputs, 2.0)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    params = [p for p in student.parameters()]
    for g_got, g_want in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params)):
        torch.testing.assert_close(g_got, g_want, rtol=1e-8, atol=1e-10)


def test_two_stage_training_updates_only_the_student(tmp_path):
    recipe = load_recipe()
    student, teacher = tiny_llama(16, 0).float(), tiny_llama(24, 1).float()
    data = [{k: v[0] for k, v in batch(seed).items()} for seed in range(8)]
    teacher_before = copy.deepcopy(teacher.state_dict())
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no",
                             per_device_train_batch_size=4, num_train_epochs=2, learning_rate=1e-2,
                             logging_steps=1, disable_tqdm=True)
    recipe.SMSKDTrainer(model=student, teacher=teacher, args=args, train_dataset=data).train()
    stage1 = copy.deepcopy(student)
    reference = copy.deepcopy(student)
    trainer = recipe.SMSKDTrainer(model=student, teacher=teacher, reference=reference, args=args, train_dataset=data)
    trainer.train()
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[name]), name
    for (name, before), after in zip(stage1.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(before, after), f"reference changed: {name}"
    moved = [name for (name, a), b in zip(stage1.state_dict().items(), student.state_dict().values())
             if not torch.equal(a, b)]
    assert moved, "stage 2 did not update the student"
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("fused_linear", [True, False])
def test_num_items_in_batch_divides_the_sum(fused_linear, tmp_path):
    """As the model's own loss: with Trainer's num_items_in_batch, the sum over real tokens divided by it."""
    recipe = load_recipe()
    student, teacher = tiny_llama(16, 0), tiny_llama(24, 1)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no")
    trainer = recipe.SMSKDTrainer(model=student, teacher=teacher, args=args, fused_linear=fused_linear,
                                  loss_options={"temperature": 2.0, "backend": "reference"})
    inputs = batch()
    real_tokens = int((inputs["labels"][:, 1:] != -100).sum())
    got = trainer.compute_loss(student, inputs, num_items_in_batch=torch.tensor(3 * real_tokens))
    want = trainer.compute_loss(student, inputs) * real_tokens / (3 * real_tokens)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_gradient_accumulation_takes_the_same_step(tmp_path):
    """One optimizer step over 8 sequences: one batch of 8, or 2 accumulated batches of 4 whose real tokens
    differ, moves the student by the same update (Trainer divides by nothing when num_items_in_batch is given)."""
    recipe = load_recipe()
    teacher = tiny_llama(24, 1)
    data = [{k: v[i] for k, v in batch(seed, size=2).items()} for seed in range(4) for i in range(2)]
    data[5]["labels"][3:] = -100  # the second micro-batch holds fewer real tokens than the first

    def one_step(batch_size: int, accumulation: int) -> dict:
        student = tiny_llama(16, 0)
        before = copy.deepcopy(student.state_dict())
        args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no",
                                 max_steps=1, per_device_train_batch_size=batch_size,
                                 gradient_accumulation_steps=accumulation, learning_rate=1.0, optim="sgd",
                                 weight_decay=0.0, lr_scheduler_type="constant", max_grad_norm=0.0,
                                 disable_tqdm=True, seed=0)
        trainer = recipe.SMSKDTrainer(model=student, teacher=teacher, args=args, train_dataset=data,
                                      loss_options={"temperature": 2.0, "backend": "reference"})
        trainer.train()
        return {name: value - before[name] for name, value in student.state_dict().items()}

    whole, accumulated = one_step(8, 1), one_step(4, 2)
    assert any(update.abs().max() > 0 for update in whole.values())
    for name, update in whole.items():
        torch.testing.assert_close(accumulated[name], update, rtol=1e-9, atol=1e-12, msg=name)


def test_across_ranks_the_loss_is_multiplied_back_as_trainer_does(tmp_path, monkeypatch):
    """num_items_in_batch counts every rank's tokens (average_tokens_across_devices) and DDP averages the
    ranks' gradients: like transformers' own compute_loss, the loss is multiplied by the number of ranks."""
    recipe = load_recipe()
    student, teacher = tiny_llama(16, 0), tiny_llama(24, 1)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no",
                             average_tokens_across_devices=True)
    trainer = recipe.SMSKDTrainer(model=student, teacher=teacher, args=args, fused_linear=False,
                                  loss_options={"temperature": 2.0, "backend": "reference"})
    inputs, items = batch(), torch.tensor(50)
    one_rank = trainer.compute_loss(student, inputs, num_items_in_batch=items)
    monkeypatch.setattr(type(trainer.accelerator), "num_processes", property(lambda self: 2))
    torch.testing.assert_close(trainer.compute_loss(student, inputs, num_items_in_batch=items), 2 * one_rank,
                               rtol=1e-15, atol=0)


def test_the_fused_loss_refuses_a_wrapped_model(tmp_path):
    """Past a DDP wrapper, model.model would run without its gradient synchronisation."""
    recipe = load_recipe()
    student, teacher = tiny_llama(16, 0), tiny_llama(24, 1)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no")
    trainer = recipe.SMSKDTrainer(model=student, teacher=teacher, args=args)
    wrapped = torch.nn.parallel.DistributedDataParallel.__new__(torch.nn.parallel.DistributedDataParallel)
    torch.nn.Module.__init__(wrapped)
    wrapped.module = student
    with pytest.raises(ValueError, match="fused_linear=True calls model.model and model.lm_head, which a DDP"):
        trainer.compute_loss(wrapped, batch())
