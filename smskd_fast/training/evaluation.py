"""Evaluation and the run summary: a model's test loss and accuracy, and the table figures of a run."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Union

import torch
from torch import nn

from smskd_fast.training.data import ImageSet, TokenSet, iterate_batches

__all__ = ["evaluate", "summarize"]


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Union[ImageSet, TokenSet], batch_size: int, device: torch.device) -> Dict[str, float]:
    """Test loss (CE) and top-1 accuracy (%) of `model` on `dataset`, per token for sequence data,
    which also gets perplexity (exp of the mean token CE); restores the model's train/eval mode."""
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for images, labels, _ in iterate_batches(dataset, batch_size, shuffle=False):
        images, labels = dataset.normalize(images).to(device), labels.to(device)
        logits = model(images)
        total_loss += float(nn.functional.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
        count += labels.numel()
    model.train(was_training)
    result = {"loss": total_loss / max(count, 1), "acc": 100.0 * correct / max(count, 1)}
    if dataset.task == "sequence":
        result["perplexity"] = math.exp(result["loss"])
    return result


def summarize(records: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Last-epoch and best-epoch test accuracy overall and per stage (tables show the last epoch)."""
    best = max(records, key=lambda r: r["test_acc"])
    stages = []
    for name in dict.fromkeys(r["stage_name"] for r in records):
        rows = [r for r in records if r["stage_name"] == name]
        stages.append({"name": name, "last_test_acc": rows[-1]["test_acc"],
                       "best_test_acc": max(r["test_acc"] for r in rows),
                       "skipped_steps": sum(r.get("train_skipped_steps", 0) for r in rows)})
    summary = {"last_test_acc": records[-1]["test_acc"], "best_test_acc": best["test_acc"],
               "best_global_epoch": best["global_epoch"], "epochs": len(records), "stages": stages,
               "skipped_steps": sum(stage["skipped_steps"] for stage in stages),
               "table_shows": "last_test_acc"}
    if "val_acc" in records[-1]:  # a validation split was carved from the training data
        summary["last_val_acc"] = records[-1]["val_acc"]
    if "test_perplexity" in records[-1]:  # sequence data
        summary["last_test_perplexity"] = records[-1]["test_perplexity"]
        summary["best_test_perplexity"] = min(r["test_perplexity"] for r in records)
    return summary
