"""Forward+backward of the fused loss eagerly and under torch.compile, on the CPU, side by side.

Eagerly, backward leaves the kernel's gradient rows untouched when grad_output / grad_scale is 1
(ops/scale_rows.py); a traced backward cannot know that and multiplies the whole N x C gradient
out of place (ops/registration.py), one more read and write of it. This measures what that pass
costs a user who compiles the loss: compiled / eager time per shape (alternating, fastest of
--repeats), one thread.

  python benchmarks/compiled_backward_cpu.py --out benchmarks/results/compiled_backward_cpu
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import smskd_fast  # noqa: E402
from smskd_fast.bench import harness as benchmarking  # noqa: E402
from smskd_fast.provenance import git_commit  # noqa: E402
from host_overhead import write_outputs  # noqa: E402

SHAPES = ((2048, 4000), (512, 32000))


def loss(student, target, teacher, reference):
    return smskd_fast.smskd_loss(student, target, teacher, reference, temperature=2.0, backend="cpu").loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=benchmarking.positive_int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    benchmarking.refuse_existing_outputs(parser, args.out)
    torch.set_num_threads(1)
    compiled = torch.compile(loss, fullgraph=True)
    rows = []
    for n, c in SHAPES:
        generator = torch.Generator().manual_seed(n + c)
        student, teacher, reference = (torch.randn(n, c, generator=generator) * 2 for _ in range(3))
        target = torch.randint(0, c, (n,), generator=generator)
        student.requires_grad_()
        times = {"eager": [], "compiled": []}
        for fn in (loss, compiled):  # warm-up (and compilation)
            for _ in range(2):
                student.grad = None
                fn(student, target, teacher, reference).backward()
        for _ in range(args.repeats):
            for name, fn in (("eager", loss), ("compiled", compiled)):
                student.grad = None
                start = time.perf_counter()
                fn(student, target, teacher, reference).backward()
                times[name].append((time.perf_counter() - start) * 1e3)
        eager_ms, compiled_ms = min(times["eager"]), min(times["compiled"])
        rows.append({"N": n, "C": c, "eager_ms": eager_ms, "compiled_ms": compiled_ms,
                     "compiled_over_eager": compiled_ms / eager_ms,
                     "gradient_pass_GB": 2 * n * c * 4 / 1e9})
    header = (f"fused CPU loss fwd+bwd, eager vs torch.compile(fullgraph=True), fp32, T = 2, 1 thread, fastest of "
              f"{args.repeats} alternating; {platform.processor() or platform.machine()}, torch {torch.__version__}, "
              f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {git_commit()}\n"
              f"command: python {' '.join(sys.argv)}")
    lines = [header, "", "| N x C | eager ms | compiled ms | compiled / eager | gradient pass GB (read + write) |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['N']} x {r['C']} | {r['eager_ms']:.2f} | {r['compiled_ms']:.2f} | {r['compiled_over_eager']:.2f} "
              f"| {r['gradient_pass_GB']:.3f} |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        write_outputs(args.out, text, {"header": header, "rows": rows})


if __name__ == "__main__":
    main()
