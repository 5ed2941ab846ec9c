"""Thread CPU time (one torch thread) of the forward+backward cases that pass 2's change touches,
for a finer before/after comparison than whole-grid rounds: run it alternately from the two
checkouts; each run prints one JSON line of minima (ms) over the repeats.

    PYTHONPATH=. python benchmarks/results/cpu_c1_exact_zeros_2026-12-05/ab_focus.py LABEL
"""
from __future__ import annotations

import json
import sys
import time

import torch

import smskd_fast
from smskd_fast.backends.topk import TopKTeacher
from smskd_fast.bench import harness

REPEATS = 10


def minimum_ms(step) -> float:
    step()
    seconds = []
    for _ in range(REPEATS):
        start = time.thread_time()
        step()
        seconds.append(time.thread_time() - start)
    return min(seconds) * 1e3


def main(label: str) -> None:
    torch.set_num_threads(1)
    result = {"label": label}
    for dtype in (torch.float32, torch.bfloat16):
        inputs = harness.make_inputs(1024, 32000, dtype)
        name = str(dtype).replace("torch.", "")
        result[f"dense 1024x32000 {name}"] = minimum_ms(harness.make_step("smskd_fast", "forward+backward", inputs,
                                                                          backend="cpu"))
        student, target, teacher, reference = inputs
        topk = TopKTeacher.from_logits(teacher.float(), target, 64, 2.5)
        leaf = student.detach().requires_grad_(True)

        def topk_step() -> None:
            out = smskd_fast.smskd_loss(leaf, target, None, reference, teacher_topk=topk, temperature=2.5,
                                        backend="cpu")
            torch.autograd.grad(out.loss, leaf)
        result[f"topk k=64 1024x32000 {name}"] = minimum_ms(topk_step)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
