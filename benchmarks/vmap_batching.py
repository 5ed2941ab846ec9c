"""torch.func.vmap of the fused loss: one op call on the batch's rows (ops/vmap_rules.py) against B calls.

Forward + backward of the sum of B per-sample losses (reduction "mean", target, teacher and reference),
side by side in one run, as ratios to "sample by sample": the same B calls written out (the loss of
each unbound sample, stacked), as a user would without vmap. "vmap" is the rule as shipped; "always one
call" and "always per sample" force its two paths (vmap_rules.SHARED_BYTES_PER_SAMPLE set to infinity
or -1 during the call), which is how that limit was chosen. "flat rows" is one call on all B*N rows
(reduction "sum": the kernel work without per-sample reductions). The teacher and reference are shared
by the samples ("shared": an ensemble of students learning from one teacher; the rule copies them to
every sample's rows when they are small, else calls the op per sample) or given per sample.
vmap before the rule (its per-sample fallback) is not in this tree: run this script at the commit
before ops/vmap_rules.py with the needs_student_grad fix applied (benchmarks/results/vmap_batching_*).

  python benchmarks/vmap_batching.py --out benchmarks/results/vmap_batching_cpu
  python benchmarks/vmap_batching.py --device cuda --out $OUT/vmap_batching
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Dict, List, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))

import torch  # noqa: E402

import smskd_fast  # noqa: E402
from smskd_fast.bench import harness as benchmarking  # noqa: E402
from smskd_fast.ops import vmap_rules  # noqa: E402
from bench_grid import with_attribute_during_each_call  # noqa: E402
from host_overhead import interleaved_per_call_us, write_outputs  # noqa: E402

TEMPERATURE = 2.0
# (samples B, rows N, classes C, teacher and reference shared by the samples)
CASES: Tuple[Tuple[int, int, int, bool], ...] = (
    (64, 8, 100, True), (16, 16, 400, True), (16, 16, 1600, True), (16, 64, 1000, True), (16, 64, 1000, False),
    (8, 64, 2000, True), (8, 64, 4000, True), (4, 64, 32000, True), (4, 64, 32000, False))


def implementations(backend: str) -> Dict[str, Callable]:
    """name -> step(students (B, N, C), targets (B, N), teachers, references) -> loss to backward; teachers
    and references (N, C) when shared, (B, N, C) when per sample."""
    def loss(student, target, teacher, reference, reduction="mean"):
        return smskd_fast.smskd_loss(student, target, teacher, reference, temperature=TEMPERATURE,
                                     reduction=reduction, backend=backend).loss

    def vmapped(students, targets, teachers, references):
        per_sample = 0 if teachers.dim() == 3 else None
        return torch.func.vmap(loss, in_dims=(0, 0, per_sample, per_sample))(
            students, targets, teachers, references).sum()

    def sample_by_sample(students, targets, teachers, references):
        if teachers.dim() == 2:
            return torch.stack([loss(s, y, teachers, references) for s, y in zip(students, targets)]).sum()
        return torch.stack([loss(*sample) for sample in zip(students, targets, teachers, references)]).sum()

    def flat_rows(students, targets, teachers, references):
        samples = students.shape[0]
        if teachers.dim() == 2:
            teachers, references = teachers.expand(samples, -1, -1), references.expand(samples, -1, -1)
        return loss(students.flatten(0, 1), targets.flatten(), teachers.reshape(-1, teachers.shape[-1]),
                    references.reshape(-1, references.shape[-1]), reduction="sum")

    def vmapped_with_limit(limit: float) -> Callable:
        return with_attribute_during_each_call(vmapped, vmap_rules, "SHARED_BYTES_PER_SAMPLE", limit)

    return {"sample by sample": sample_by_sample, "vmap": vmapped,
            "vmap, always one call": vmapped_with_limit(float("inf")),
            "vmap, always per sample": vmapped_with_limit(-1), "flat rows": flat_rows}


def case_step(step_loss: Callable, case: Tuple[int, int, int, bool], dtype: torch.dtype,
              device: str) -> Callable[[], None]:
    """One forward + backward of step_loss on the case's inputs (its own, seed 0), the gradient reset before it."""
    samples, rows, classes, shared = case
    generator = torch.Generator().manual_seed(0)
    students = torch.randn(samples, rows, classes, generator=generator).to(device, dtype).requires_grad_()
    frozen_shape = (rows, classes) if shared else (samples, rows, classes)
    teachers, references = (torch.randn(frozen_shape, generator=generator).to(device, dtype) for _ in range(2))
    targets = torch.randint(0, classes, (samples, rows), generator=generator).to(device)

    def step():
        students.grad = None
        step_loss(students, targets, teachers, references).backward()
    return step


def measure(implementations_of_case: Dict[str, Callable], case: Tuple[int, int, int, bool], dtype: torch.dtype,
            device: str, calls: int, batches: int) -> List[Dict]:
    """One row per implementation on one case, their timed batches interleaved."""
    samples, rows, classes, shared = case
    steps = {name: case_step(step_loss, case, dtype, device) for name, step_loss in implementations_of_case.items()}
    label = f"{samples} x {rows} x {classes} {'shared' if shared else 'per sample'}"
    return [{"impl": name, "case": label, **timing}
            for name, timing in interleaved_per_call_us(steps, device, calls, batches).items()]


def table(rows: List[Dict], baseline: str) -> str:
    lines = ["| B x N x C, teacher | implementation | us/call (median) | min-max | vs " + baseline + " |",
             "| --- | --- | --- | --- | --- |"]
    for row in rows:
        base = next(other["us_per_call"] for other in rows if other["impl"] == baseline and other["case"] == row["case"])
        lines.append(f"| {row['case']} | {row['impl']} | "
                     f"{row['us_per_call']:.1f} | {row['us_min']:.1f}-{row['us_max']:.1f} | "
                     f"{row['us_per_call'] / base:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--backend", choices=tuple(smskd_fast.available_backends()),
                        help="default: cpu on the CPU, cuda on CUDA")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--calls", type=benchmarking.positive_int, default=20, help="calls per timed batch")
    parser.add_argument("--batches", type=benchmarking.positive_int, default=9)
    parser.add_argument("--threads", type=benchmarking.positive_int, default=1, help="torch.set_num_threads (CPU)")
    parser.add_argument("--out", type=Path, help="writes OUT.json and OUT.md")
    args = parser.parse_args()
    benchmarking.refuse_existing_outputs(parser, args.out)
    torch.set_num_threads(args.threads)
    backend = args.backend or args.device
    dtype = getattr(torch, args.dtype)
    rows = []
    for case in CASES:
        case_rows = measure(implementations(backend), case, dtype, args.device, args.calls, args.batches)
        for row in case_rows:
            print(json.dumps(row), flush=True)
        rows += case_rows
    where = benchmarking.environment(args.device)
    header = (f"vmap of the loss, forward + backward of the B per-sample means, {args.dtype}, T = {TEMPERATURE}, "
              f"backend {backend}, device {args.device} ({where['device_name']}), torch {where['torch']}, "
              f"triton {where['triton']}, threads {args.threads}, {where['date']}, "
              f"commit {where['commit']}\ncommand: python {' '.join(sys.argv)}")
    text = header + "\n\n" + table(rows, "sample by sample") + "\n"
    print(text)
    if args.out:
        write_outputs(args.out, text, {"header": header, "environment": where, "rows": rows})


if __name__ == "__main__":
    main()
