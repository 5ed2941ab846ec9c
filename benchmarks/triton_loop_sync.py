"""Block-wide synchronization inside the Triton online kernel's loops, from sm_90 SASS (no GPU).

For each online configuration (launch.ONLINE_CONFIGS) of the benchmark's variants, bf16 and fp32: per loop
(statistics, gradient) the instructions per iteration and how many of them are barriers (BAR), warp
shuffles (SHFL), shared-memory stores and loads (STS, LDS) and MUFU ops. A statistics loop that reduces the
row maximum over the block every step shows its barriers here; one with a maximum per 16-byte pack shows
none (docs/perf_notes.md, stop 27).

    python benchmarks/triton_loop_sync.py [--out benchmarks/results/NAME.md]
"""
from __future__ import annotations

import argparse
import collections
import datetime
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sass_loops  # noqa: E402
import triton  # noqa: E402
import triton_aot_report as aot  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

VARIANTS = ("smskd+grad", "smskd+grad T=2")
DTYPES = ("bf16", "fp32")
COUNTED = ("BAR", "SHFL", "STS", "LDS", "MUFU")


def sass_of(job: aot.Job) -> str:
    fn = aot.kernels._smskd_rows_online_kernel
    sig, attrs = aot.signature(fn, aot.DTYPES[job.dtype], True, align_ints=True, scalars=job.scalars,
                               has_grad_scale=dict(job.constexprs)["HAS_GRAD_SCALE"])
    compiled = triton.compile(ASTSource(fn, sig, dict(job.constexprs), attrs), target=GPUTarget("cuda", job.arch, 32),
                              options={"num_warps": job.num_warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        return subprocess.run([aot.cuobjdump(), "-sass", cubin.name], capture_output=True, text=True, check=True).stdout


def rows():
    jobs = [job for job in aot.kernel_jobs(VARIANTS, DTYPES, (90,), "fp32") if job.kernel == "_smskd_rows_online_kernel"]
    for job in jobs:
        for instructions in sass_loops.parse_functions(sass_of(job)).values():
            for loop in sass_loops.find_loops(instructions):
                if loop.sweep not in ("statistics", "gradient"):
                    continue
                body = [ins for ins in instructions if loop.start <= ins.address <= loop.end]
                ops = collections.Counter(ins.opcode.split(".")[0] for ins in body)
                yield (job.config, job.num_warps, job.variant, job.dtype, loop.sweep, len(body),
                       *(ops[name] for name in COUNTED))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    lines = ["# Triton online kernel: synchronization per loop iteration (sm_90 SASS, no GPU)", "",
             f"date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
             f"commit: {aot.git_commit()}", f"triton: {triton.__version__}",
             "command: python benchmarks/triton_loop_sync.py" + (f" --out {args.out}" if args.out else ""), "",
             "| config | warps | variant | dtype | loop | instructions/iteration | " + " | ".join(COUNTED) + " |",
             "| --- " * (6 + len(COUNTED)) + "|"]
    lines += ["| " + " | ".join(str(value) for value in row) + " |" for row in rows()]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
