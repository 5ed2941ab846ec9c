"""Special-function (MUFU: ex2, lg2, rcp, ...) instructions per element and sweep of every GPU kernel, without a GPU.

Issue 17's proxy for the exponential throughput limit on Hopper: H200 issues about
16 MUFU ops/clk/SM x 132 SMs x 1.98 GHz = 4.2e12/s, so at the bf16 copy rate (4250 GB/s
over 8 bytes of floor traffic per element: s, t, r read, grad written) there is room for
about 8 MUFU per element in both sweeps together; more makes the kernel MUFU-bound.

Sources of SASS:
  CUDA    kernels/smskd_kernels.cu and smskd_topk_kernels.cu compiled with nvcc to an sm_90
          cubin (--cuda-source, about 2-3 minutes of one core), or a built smskd_fast._C
          (--cuda-binary PATH, seconds); every smskd_rows_kernel / smskd_topk_rows_kernel
          instantiation (dtype x threads per row x inputs x the temperature power: T = 1, T = 2, any).
  Triton  every kernel/configuration/variant/dtype that benchmarks/triton_aot_report.py compiles,
          by triton.compile with GPUTarget("cuda", 90, 32); cuobjdump from triton's package.
benchmarks/sass_loops.py finds the loops (backward branches) and counts per loop body.

Elements per loop iteration and thread:
  CUDA    from the loads: bytes of the widest global loads in the body / (element size x
          dense row streams: student, teacher, reference as present). Exact for the packed
          loops (16-byte packs, 2 per stream and iteration); the scalar head/tail loops of fp32
          top-k kernels also count the kept-mask word loads (not budgeted: they see < 8 columns).
  Triton  from the launch configuration: BLOCK_C / (32 x num_warps) for a loop over column
          blocks; a kernel without one (the tile kernel, the whole-row top-k kernel) is one
          "tile" of ROWS x BLOCK_C / (32 x num_warps) elements per thread, all its MUFU outside
          loops divided by that (per-row logs and reciprocals included, amortized over the tile).
Per sweep (statistics, gradient, tile) and loop width (elements per iteration), the figure is the
largest MUFU per element of its packed loops (CUDA: loops over 16-byte packs, LDG.E.128, so the
scalar head/tail loops of a row, which see fewer than 16 bytes of columns, are left out; Triton:
every column loop): one CUDA kernel holds the unrolled 2-pack and the 1-pack loop of each sweep,
each with and without a target, and each width has its own budget, so that one more exponential in
either loop fails it. Loops over kept top-k slots, merges and
zero-fills are listed, not budgeted. Static counts: a rarely taken branch (CUDA's rescale
when the maximum grows) counts as taken; see sass_loops.py for the limits.

Budget: benchmarks/mufu_budget.json, one number per kernel, configuration, variant, dtype,
arch and sweep, set at the value measured when it was written (--write-budget): a regression
guard. The Triton rows there are triton 3.8's (CI's: BUDGET_FILE_TRITON); a triton whose compiler
places the exponentials differently has its own file for its Triton rows (TRITON_BUDGET_FILES: 3.6,
torch 2.11's and the GPU machine's). Other versions (3.7, torch 2.12's; 3.9, torch 2.15's) have no
budgets of their own: their rows are compared with 3.8's, which the report's header says, and
tests/test_mufu_budget.py skips there. docs/perf_notes.md states the target. Exit status 1 when a
figure exceeds its budget or has none, 2 when the tools are missing.

    python benchmarks/mufu_report.py --cuda-source --triton            # everything, writes benchmarks/results/
    python benchmarks/mufu_report.py --cuda-binary smskd_fast/_C.abi3.so --triton --ci
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import cuda_resource_report as cuda_report  # noqa: E402
import sass_loops  # noqa: E402

BUDGET_FILE = ROOT / "benchmarks" / "mufu_budget.json"
# Triton rows compiled by these triton versions (major.minor) are held to their own file (the rest to BUDGET_FILE):
# triton 3.6's and 3.7's ptxas re-materialise a few whole-row top-k tiles' exponentials (+0.125 to +0.25 per
# element); 3.9 schedules some below 3.8. 3.6: torch 2.11's (the GPU machine's), 3.7: 2.12's, 3.9: 2.15's.
TRITON_BUDGET_FILES = {version: ROOT / "benchmarks" / f"mufu_budget_triton{version}.json"
                       for version in ("3.6", "3.7", "3.9")}
BUDGET_FILE_TRITON = "3.8"  # the triton (CI's) whose rows BUDGET_FILE holds
ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
BUDGETED = ("statistics", "gradient", "tile")
TOLERANCE = 1e-6


@dataclass
class SweepRow:
    """MUFU of one sweep of one kernel instantiation, per element and per iteration of its bulk loop."""

    backend: str
    kernel: str
    config: str
    variant: str
    dtype: str
    arch: str
    sweep: str
    elements: float  # per thread and iteration (per tile for "tile")
    mufu: Dict[str, int] = field(default_factory=dict)  # per iteration, by kind
    per_element: float = 0.0
    conditional_per_element: float = 0.0
    instructions_per_element: float = 0.0  # issue slots of the same loop body
    unskipped_instructions_per_element: float = 0.0  # those not behind a forward branch (the steady path)
    loops: int = 0  # loops of this sweep in the kernel (all widths)

    @property
    def key(self) -> str:
        return " | ".join((self.backend, self.kernel, self.config, self.variant, self.dtype, self.arch, self.sweep,
                           f"{self.elements:g}/iter"))


def sweep_rows(loops: List[sass_loops.Loop], elements_of, base: dict, packed=lambda loop: True) -> List[SweepRow]:
    """Rows of a kernel's loops: for each sweep and width (elements per iteration) of its packed loops
    (packed(loop) true; all its loops when none is), the loop with the most MUFU per element."""
    rows = []
    for sweep in ("statistics", "gradient", "zero-fill", "kept", "merge"):
        found = [(loop, elements_of(loop)) for loop in loops if loop.sweep == sweep]
        bulk = [(loop, n) for loop, n in found if packed(loop)] or found
        for width in sorted({n for _, n in bulk}, reverse=True):
            loop, n = max(((lp, m) for lp, m in bulk if m == width),
                          key=lambda item: item[0].mufu_total / item[1] if item[1] else item[0].mufu_total)
            rows.append(SweepRow(
                **base, sweep=sweep, elements=n, mufu=dict(sorted(loop.mufu.items())),
                per_element=loop.mufu_total / n if n else float(loop.mufu_total),
                conditional_per_element=loop.conditional_mufu / n if n else 0.0,
                instructions_per_element=loop.instructions / n if n else float(loop.instructions),
                unskipped_instructions_per_element=(loop.instructions - loop.skippable_instructions) / n if n else 0.0,
                loops=len(found)))
    return rows


# CUDA -------------------------------------------------------------------------------------------

def is_packed(loop: sass_loops.Loop) -> bool:
    """A loop over 16-byte packs (LDG.E.128 / STG.E.128), not a scalar head or tail loop of a row."""
    return max(loop.loads or loop.stores or [0]) == 16


def cuda_sass(binary: Optional[str], tmp: str) -> str:
    """sm_90 SASS of the built library, or of kernels/*.cu compiled here to cubins."""
    cuobjdump = cuda_report.find_tool("cuobjdump")
    if binary:
        return cuda_report.run([cuobjdump, "-sass", "-arch", "sm_90", binary])
    nvcc = cuda_report.find_tool("nvcc")
    sass = ""
    for source in cuda_report.KERNEL_SOURCES:
        cubin = os.path.join(tmp, Path(source).stem + ".sm_90.cubin")
        cuda_report.run([nvcc, *cuda_report.NVCC_FLAGS, "-arch=sm_90", "-cubin", "-I", os.path.dirname(source),
                         source, "-o", cubin])
        sass += cuda_report.run([cuobjdump, "-sass", cubin])
    return sass


def cuda_rows(sass: str) -> List[SweepRow]:
    rows = []
    for name, instructions in sass_loops.parse_functions(sass).items():
        match = cuda_report.KERNEL_NAME.search(name)
        if not match:
            continue
        usage = cuda_report.KernelUsage(arch="sm_90", mangled=name)
        dtype = usage.dtype
        streams = 1 + (match["teacher"] == "1") + (match["reference"] == "1")
        size = ELEMENT_BYTES[dtype]

        def elements(loop: sass_loops.Loop) -> float:
            if loop.sweep in ("statistics", "gradient"):
                return loop.widest_bytes() / size / streams
            if loop.sweep == "zero-fill":
                return loop.widest_bytes(stores=True) / size
            return 1.0  # kept slots and merges: per iteration

        label = usage.label.split(",")
        base = dict(backend="cuda", kernel="smskd_topk_rows_kernel" if usage.topk else "smskd_rows_kernel",
                    config=label[0].split(None, 1)[1].strip(), variant=label[1].strip(), dtype=dtype, arch="sm_90")
        rows += sweep_rows(sass_loops.find_loops(instructions), elements, base, packed=is_packed)
    return rows


# Triton -----------------------------------------------------------------------------------------

def triton_jobs(ci: bool) -> list:
    import triton_aot_report as aot  # noqa: PLC0415  (imports triton)

    variants = aot.CI_VARIANTS if ci else tuple(aot.VARIANTS)
    dtypes = aot.CI_DTYPES if ci else tuple(aot.DTYPES)
    return [job for job in aot.kernel_jobs(variants, dtypes, (90,), "fp32") if job.kernel != "_check_targets_kernel"]


def triton_job_rows(job) -> List[SweepRow]:
    """Compiles one Triton job for sm_90 and counts its MUFU per sweep."""
    import triton  # noqa: PLC0415
    import triton_aot_report as aot  # noqa: PLC0415
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    from triton.compiler import ASTSource  # noqa: PLC0415

    fn = getattr(aot.topk_kernels if "topk" in job.kernel else aot.kernels, job.kernel)
    constexprs = dict(job.constexprs)
    column_blocks = job.kernel.endswith("online_kernel") or not constexprs.get("WHOLE_ROW", True)
    sig, attrs = aot.signature(fn, aot.DTYPES[job.dtype], constexprs.get("HAS_TARGET", True), align_ints=column_blocks,
                               has_grad_scale=constexprs.get("HAS_GRAD_SCALE", False))
    compiled = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", job.arch, 32),
                              options=aot.compile_options(job.num_warps))
    return triton_rows_from_cubin(compiled.asm["cubin"], job)


def triton_rows_from_cubin(cubin: bytes, job) -> List[SweepRow]:
    import triton_aot_report as aot  # noqa: PLC0415

    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as handle:
        handle.write(cubin)
    try:
        sass = subprocess.run([aot.cuobjdump(), "-sass", handle.name], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(handle.name)
    return triton_rows(sass, job)


def triton_rows(sass: str, job) -> List[SweepRow]:
    """Rows of one compiled Triton job from its SASS; elements per iteration from its launch configuration."""
    constexprs = dict(job.constexprs)
    threads = 32 * job.num_warps
    block_c = constexprs["BLOCK_C"]
    (instructions,) = sass_loops.parse_functions(sass).values()
    loops = sass_loops.find_loops(instructions)
    base = dict(backend="triton", kernel=job.kernel, config=f"{job.config} warps={job.num_warps}",
                variant=job.variant, dtype=job.dtype, arch=f"sm_{job.arch}")

    def elements(loop: sass_loops.Loop) -> float:
        if loop.sweep == "kept":
            return constexprs.get("BLOCK_K", 1) / threads
        return block_c / threads if loop.sweep != "merge" else 1.0

    rows = sweep_rows(loops, elements, base)
    if not any(row.sweep in ("statistics", "gradient") for row in rows):  # one tile, no column loop
        tile = constexprs.get("ROWS", 1) * block_c / threads
        outside = sass_loops.mufu_outside_loops(instructions, loops)
        issued = sass_loops.instructions_outside_loops(instructions, loops) / tile
        rows.append(SweepRow(**base, sweep="tile", elements=tile, mufu=dict(sorted(outside.items())),
                             per_element=sum(outside.values()) / tile, instructions_per_element=issued,
                             unskipped_instructions_per_element=issued))
    return rows


# Budget and report ------------------------------------------------------------------------------

def load_budget(path: Path = BUDGET_FILE) -> Dict[str, float]:
    """The stated budgets, MUFU per element by SweepRow.key ({} when the file is missing)."""
    return json.loads(path.read_text()) if path.exists() else {}


def triton_minor(version: str) -> str:
    """"3.6.1+git" -> "3.6"."""
    return ".".join(version.split(".")[:2])


def triton_budget_file(version: str) -> Optional[Path]:
    """The file that holds the Triton rows' budgets for this triton version, when not BUDGET_FILE."""
    return TRITON_BUDGET_FILES.get(triton_minor(version))


def triton_is_budgeted(version: str) -> bool:
    """Whether budgets were written under this triton version (in BUDGET_FILE or its own file)."""
    return triton_minor(version) == BUDGET_FILE_TRITON or triton_budget_file(version) is not None


def write_budget(path: Path, rows: List[SweepRow]) -> None:
    """Sets the budget of every budgeted sweep of rows to its figure today, merged into path."""
    budget = load_budget(path)
    budget.update({row.key: round(row.per_element, 4) for row in rows if row.sweep in BUDGETED})
    path.write_text(json.dumps(dict(sorted(budget.items())), indent=1) + "\n")


def check_budget(rows: List[SweepRow], budget: Dict[str, float], source: str = BUDGET_FILE.name) -> List[str]:
    """A line per budgeted sweep above its budget or without one in source (the budget's file or files)."""
    problems = []
    for row in rows:
        if row.sweep not in BUDGETED:
            continue
        limit = budget.get(row.key)
        if limit is None:
            problems.append(f"{row.key}: {row.per_element:.3f} MUFU/element, no budget stated in {source}")
        elif row.per_element > limit + TOLERANCE:
            problems.append(f"{row.key}: {row.per_element:.3f} MUFU/element > budget {limit:.3f}")
    return problems


def markdown(rows: List[SweepRow], header: List[str]) -> str:
    lines = header + ["", "| backend | kernel | config | variant | dtype | arch | sweep | elements/iter/thread | "
                          "MUFU/iter by kind | MUFU/element | of which conditional | instructions/element (not skippable) | loops |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        kinds = " ".join(f"{k}:{v}" for k, v in r.mufu.items()) or "-"
        lines.append(f"| {r.backend} | {r.kernel} | {r.config} | {r.variant} | {r.dtype} | {r.arch} | {r.sweep} | "
                     f"{r.elements:g} | {kinds} | {r.per_element:.3f} | {r.conditional_per_element:.3f} | "
                     f"{r.instructions_per_element:.2f} ({r.unskipped_instructions_per_element:.2f}) | {r.loops} |")
    return "\n".join(lines) + "\n"


def git_commit() -> str:
    return cuda_report.git_commit()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuda-source", action="store_true", help="compile kernels/*.cu for sm_90 with nvcc")
    parser.add_argument("--cuda-binary", help="read the sm_90 SASS of this built library instead")
    parser.add_argument("--triton", action="store_true", help="compile the Triton kernels for sm_90")
    parser.add_argument("--ci", action="store_true", help="Triton: the AOT report's CI variants and dtypes only")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--stem", default="mufu_report")
    parser.add_argument("--budget", type=Path, default=BUDGET_FILE,
                        help="budget file (default: mufu_budget.json, the Triton rows from TRITON_BUDGET_FILES "
                             "where the installed triton has one)")
    parser.add_argument("--write-budget", action="store_true",
                        help="set the budget of every measured sweep to today's value (merged into the file)")
    args = parser.parse_args(argv)
    if not (args.cuda_source or args.cuda_binary or args.triton):
        parser.error("choose --cuda-source, --cuda-binary and/or --triton")
    default_budget = args.budget.resolve() == BUDGET_FILE.resolve()
    if args.triton and default_budget and args.write_budget:
        import triton  # noqa: PLC0415

        if not triton_is_budgeted(triton.__version__):  # BUDGET_FILE's Triton rows are triton 3.8's
            parser.error(f"triton {triton.__version__} has no budget file: add mufu_budget_triton"
                         f"{triton_minor(triton.__version__)}.json to TRITON_BUDGET_FILES first, or pass --budget")

    rows: List[SweepRow] = []
    header = ["# MUFU (special-function) instructions per element and sweep, from SASS (no GPU)", "",
              f"date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
              f"commit: {git_commit()}",
              f"command: python benchmarks/mufu_report.py {' '.join(argv if argv is not None else sys.argv[1:])}",
              "method: benchmarks/sass_loops.py (loops = backward branches; static count per loop body / elements "
              "per thread and iteration); budgets: benchmarks/mufu_budget.json; target: docs/perf_notes.md"]
    if args.cuda_source or args.cuda_binary:
        if cuda_report.find_tool("cuobjdump") is None or (args.cuda_source and cuda_report.find_tool("nvcc") is None):
            print("mufu_report: nvcc and cuobjdump are needed for the CUDA kernels", file=sys.stderr)
            return 2
        with tempfile.TemporaryDirectory() as tmp:
            rows += cuda_rows(cuda_sass(args.cuda_binary, tmp))
        header.append(f"cuda: {'binary ' + args.cuda_binary if args.cuda_binary else 'nvcc -cubin sm_90'} "
                      f"({' '.join(cuda_report.NVCC_FLAGS)})")
    if args.triton:
        import triton  # noqa: PLC0415

        with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for found in pool.map(triton_job_rows, triton_jobs(args.ci)):
                rows += found
        header.append(f"triton: {triton.__version__}, {'CI' if args.ci else 'all'} variants and dtypes, sm_90")

    triton_file = triton_budget_file(triton.__version__) if args.triton and default_budget else None
    if args.write_budget:
        write_budget(args.budget, [r for r in rows if triton_file is None or r.backend != "triton"])
        if triton_file is not None:
            write_budget(triton_file, [r for r in rows if r.backend == "triton"])
    budget, source = load_budget(args.budget), args.budget.name
    if triton_file is not None:
        budget.update(load_budget(triton_file))
        source += f" or, for triton {triton.__version__}'s rows, {triton_file.name}"
        header.append(f"triton {triton.__version__}'s rows against {triton_file.relative_to(ROOT)}")
    elif args.triton and default_budget and not triton_is_budgeted(triton.__version__):
        header.append(f"triton {triton.__version__} has no budgets of its own: its rows are compared with triton "
                      f"{BUDGET_FILE_TRITON}'s")
    problems = check_budget(rows, budget, source)
    header += ["", f"{len(rows)} rows; " + (f"{len(problems)} over budget or without one:" if problems else
                                           "every budgeted sweep within its budget")] + [f"- {p}" for p in problems]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.stem}.md").write_text(markdown(rows, header))
    (args.out / f"{args.stem}.json").write_text(json.dumps(
        {"header": header, "problems": problems, "rows": [dict(asdict(r), key=r.key) for r in rows]}, indent=1))
    print("\n".join(header))
    print(f"wrote {args.out / (args.stem + '.md')}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
