"""Block-wide synchronization inside the loops of the Triton kernels that walk a row in column blocks, from
sm_90 SASS (no GPU).

For each online configuration (launch.ONLINE_CONFIGS) and the top-k kernel's column-block one, of the
benchmark's variants, bf16 and fp32: per loop
(statistics, gradient) the instructions per iteration and how many of them are barriers (BAR), warp
shuffles (SHFL), shared-memory stores and loads (STS, LDS) and MUFU ops. A statistics loop that reduces the
row maximum over the block every step shows its barriers here; one with a maximum per 16-byte pack (or per
32-column word, top-k) shows none (docs/perf_notes.md, stop 27).

    python benchmarks/triton_loop_sync.py [--out benchmarks/results/NAME.md]
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
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


COLUMN_BLOCK_KERNELS = ("_smskd_rows_online_kernel", "_smskd_topk_rows_kernel")


def walks_column_blocks(job: aot.Job) -> bool:
    return job.kernel in COLUMN_BLOCK_KERNELS and not dict(job.constexprs).get("WHOLE_ROW", False)


def unaligned(job: aot.Job) -> aot.Job:
    """job for rows without 16-byte loads (an odd C: ROW_ALIGN 1; the kernels then keep one maximum per block)."""
    return dataclasses.replace(job, config=job.config + " ROW_ALIGN=1",
                               constexprs=tuple(dict(job.constexprs, ROW_ALIGN=1).items()))


def sass_of(job: aot.Job) -> str:
    fn = getattr(aot.topk_kernels if "topk" in job.kernel else aot.kernels, job.kernel)
    aligned = dict(job.constexprs)["ROW_ALIGN"] == 16
    sig, attrs = aot.signature(fn, aot.DTYPES[job.dtype], True, align_ints=aligned, scalars=job.scalars,
                               has_grad_scale=dict(job.constexprs)["HAS_GRAD_SCALE"])
    compiled = triton.compile(ASTSource(fn, sig, dict(job.constexprs), attrs), target=GPUTarget("cuda", job.arch, 32),
                              options=aot.compile_options(job.num_warps))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        return subprocess.run([aot.cuobjdump(), "-sass", cubin.name], capture_output=True, text=True, check=True).stdout


def rows():
    jobs = [job for job in aot.kernel_jobs(VARIANTS, DTYPES, (90,), "fp32") if walks_column_blocks(job)]
    jobs += [unaligned(job) for job in jobs]
    for job in jobs:
        for instructions in sass_loops.parse_functions(sass_of(job)).values():
            for loop in sass_loops.find_loops(instructions):
                if loop.sweep not in ("statistics", "gradient"):
                    continue
                body = [ins for ins in instructions if loop.start <= ins.address <= loop.end]
                ops = collections.Counter(ins.opcode.split(".")[0] for ins in body)
                yield (job.kernel, job.config, job.num_warps, job.variant, job.dtype, loop.sweep, len(body),
                       *(ops[name] for name in COUNTED))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    lines = ["# Triton column-block kernels: synchronization per loop iteration (sm_90 SASS, no GPU)", "",
             f"date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
             f"commit: {aot.git_commit()}", f"triton: {triton.__version__}",
             "command: python benchmarks/triton_loop_sync.py" + (f" --out {args.out}" if args.out else ""), "",
             "| kernel | config | warps | variant | dtype | loop | instructions/iteration | " + " | ".join(COUNTED) + " |",
             "| --- " * (7 + len(COUNTED)) + "|"]
    lines += ["| " + " | ".join(str(value) for value in row) + " |" for row in rows()]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
