"""Compiles every Triton kernel of the triton backend ahead of time, without a GPU, and reports resources.

For each kernel, launch configuration (smskd_fast/backends/triton/launch.py),
variant (which inputs and whether the gradient is written), input dtype and
target (sm_80, sm_90), triton.compile with a GPUTarget builds the cubin; the
cuobjdump shipped inside triton's package reads its registers, shared memory,
stack and local bytes, and triton's ptxas -v its spill stores and loads. Writes a Markdown table and the raw JSON to
benchmarks/results/ and exits with status 1 on any spill (spill stores, loads
or local bytes > 0), a failed compile, fp64 arithmetic in the PTX, or when the target check kernel lost its
device-side assert (debug build) or its trap (both builds).

Scalar types: Triton's own launcher passes a Python float as fp32, torch.compile's
Inductor as fp64 (torch/_inductor/codegen/triton_utils.py, signature_of), so every
kernel configuration is also compiled with fp64 float arguments (scalars "fp64",
fp32 logits): it must compile and keep its arithmetic in fp32 (fp64 ops = 0).

    python benchmarks/triton_aot_report.py                 # everything
    python benchmarks/triton_aot_report.py --ci --jobs 2   # what CI runs: gradient variants, fp32 + bf16,
                                                           # fp64 scalars on sm_90
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from smskd_fast.provenance import git_commit  # noqa: E402
from smskd_fast.backends.triton import kernels  # noqa: E402
from smskd_fast.backends.triton import launch  # noqa: E402
from smskd_fast.backends.triton import topk_kernels  # noqa: E402
from smskd_fast.ops.launch_device import TRITON_COMPILE_OPTIONS  # noqa: E402
from smskd_fast.backends.triton import topk_launch  # noqa: E402
from smskd_fast.ops.schema import PER_ROW_OUTPUTS, WEIGHTING_CODES  # noqa: E402

ARCHS = (80, 90)
DTYPES = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}
# name: (HAS_TARGET, HAS_TEACHER, HAS_REFERENCE, WEIGHTING, COMPUTE_GRAD, T_POWER). The gradient variants
# are compiled with HAS_GRAD_SCALE (a grad_scale tensor, as reduction="mean" passes it): the superset of
# the code without one (one fp32 load and three multiplies per program more). T_POWER: 2 is the launch at
# T = 2 with a target and a teacher or reference (kernels.temperature_power).
VARIANTS = {
    "smskd+grad": (True, True, True, WEIGHTING_CODES["inverse_tcp"], True, 0),
    "smskd+grad T=2": (True, True, True, WEIGHTING_CODES["inverse_tcp"], True, 2),
    "smskd": (True, True, True, WEIGHTING_CODES["inverse_tcp"], False, 0),
    "kd+grad": (False, True, False, WEIGHTING_CODES["constant"], True, 0),
    "ce+grad": (True, False, False, WEIGHTING_CODES["constant"], True, 0),
}
# The top-k kernel has no HAS_TEACHER (its teacher is the top-k form) and no "ce" variant.
TOPK_VARIANTS = ("smskd+grad", "smskd+grad T=2", "smskd", "kd+grad")
CI_VARIANTS = ("smskd+grad", "smskd+grad T=2", "kd+grad")
CI_DTYPES = ("fp32", "bf16")
OUTPUT_POINTERS = tuple(f"{name}_ptr" for name in PER_ROW_OUTPUTS)
# The top-k form's own tensors, as the launcher passes them (topk_launch.launch_topk_rows).
TOPK_POINTERS = {"values_ptr": "*fp32", "true_logit_ptr": "*fp32", "lse_ptr": "*fp32", "lse_T_ptr": "*fp32",
                 "indices_ptr": "*i64", "bits_ptr": "*i32", "kept_logits_ptr": "*fp32", "exact_rest_ptr": "*i8"}
ALIGNED_INTS = ("num_classes", "num_kept", "student_stride", "teacher_stride", "reference_stride", "grad_stride")
FLOAT_ARGS = ("temperature", "ce_weight", "kd_weight", "ref_weight")
# The float arguments' types: as Triton's launcher passes them, and as Inductor does.
SCALAR_TYPES = ("fp32", "fp64")
# fp64 scalars are compiled for fp32 logits (the logits' dtype does not meet the scalars); CI on sm_90 only.
INDUCTOR_DTYPE = "fp32"
CI_INDUCTOR_ARCHS = (90,)


@dataclass(frozen=True)
class Job:
    kernel: str
    config: str
    variant: str
    dtype: str
    arch: int
    num_warps: int
    constexprs: tuple
    scalars: str = "fp32"


@dataclass
class Row:
    kernel: str
    config: str
    variant: str
    dtype: str
    arch: str
    num_warps: int
    registers: int
    shared_bytes: int
    stack_bytes: int
    local_bytes: int
    spill_stores: int
    spill_loads: int
    ldg128: int
    ldg_narrow: int
    ex2: int
    check_live: Optional[bool]
    scalars: str = "fp32"
    fp64_ops: int = -1
    error: str = ""

    @property
    def spills(self) -> bool:
        return self.local_bytes > 0 or self.spill_stores > 0 or self.spill_loads > 0


def cuobjdump() -> str:
    """The cuobjdump inside triton's package (triton 3.x ships it with ptxas)."""
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.exists():
        raise FileNotFoundError(f"cuobjdump not found at {path}")
    return str(path)


def compile_options(num_warps: int) -> Dict[str, object]:
    """triton.compile's options for a kernel launched with num_warps: the launchers' own
    (TRITON_COMPILE_OPTIONS), so what is counted here is what runs."""
    return {"num_warps": num_warps, **TRITON_COMPILE_OPTIONS}


def signature(fn, dtype: str, has_target: bool, align_ints: bool, scalars: str = "fp32", has_grad_scale: bool = False):
    """Argument types (the float scalars typed scalars) and the divisibility the JIT would specialize for aligned tensors.

    grad_scale_ptr is the fp32 scale with has_grad_scale, else the launcher's stand-in (the student logits).

    Online kernels (and top-k column blocks) are compiled as for C = 32000 or 128256
    and k = 64 (C, k and strides divisible by 16, ROW_ALIGN = 16), tile kernels
    (and whole top-k rows) as for C = 1000 (no integer specialization, ROW_ALIGN = 8).
    """
    sig, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in OUTPUT_POINTERS:
            sig[name] = "*fp32"
        elif name in TOPK_POINTERS:
            sig[name] = TOPK_POINTERS[name]
        elif name == "target_ptr":
            sig[name] = "*i64" if has_target else dtype
        elif name == "grad_scale_ptr":
            sig[name] = "*fp32" if has_grad_scale else dtype
        elif name.endswith("_ptr"):
            sig[name] = dtype
        elif name in FLOAT_ARGS:
            sig[name] = scalars
        elif name.isupper():
            sig[name] = "constexpr"
        else:
            sig[name] = "i32"
        if name.endswith("_ptr") or (align_ints and name in ALIGNED_INTS):
            attrs[(index,)] = [["tt.divisibility", 16]]
    return sig, attrs


def triton_ptxas(arch: int) -> str:
    """The ptxas triton itself assembles for sm_<arch> with (its knobs, TRITON_PTXAS_PATH included). Not always
    bin/ptxas: triton 3.9 writes PTX 9.4 and takes its CUDA 13 ptxas-blackwell from sm_90 up; its bin/ptxas
    (CUDA 12.9) refuses that PTX."""
    from triton.backends.nvidia.compiler import get_ptxas  # noqa: PLC0415

    return get_ptxas(arch).path


def ptxas_spills(ptx: str) -> Dict[str, int]:
    """Spill stores and loads as ptxas -v reports them for the kernel's PTX (its own .target, e.g. sm_90a)."""
    arch = re.search(r"^\.target\s+(sm_\w+)", ptx, flags=re.MULTILINE).group(1)
    ptxas = triton_ptxas(int(re.match(r"sm_(\d+)", arch).group(1)))
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx)
        log = subprocess.run([str(ptxas), "-v", f"--gpu-name={arch}", str(source), "-o", str(Path(folder) / "k.o")],
                             capture_output=True, text=True, check=True).stderr
    stores = re.search(r"(\d+) bytes spill stores", log)
    loads = re.search(r"(\d+) bytes spill loads", log)
    return {"spill_stores": int(stores.group(1)), "spill_loads": int(loads.group(1))}


def fp64_ops(ptx: str) -> int:
    """PTX instructions with an f64 operand type, other than a scalar argument's load and its conversion to fp32."""
    count = 0
    for line in ptx.splitlines():
        match = re.match(r"\s*(?:@!?%\w+\s+)?([a-z][\w.]*)\s", line)
        if match and ".f64" in match.group(1) and not match.group(1).startswith(("ld.param", "cvt.rn.f32.f64")):
            count += 1
    return count


def resource_usage(cubin: bytes) -> Dict[str, int]:
    """Registers, stack, shared and local bytes; and from the SASS, the 16-byte global loads,
    the narrower ones, and the MUFU.EX2 (exponential) instructions."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as handle:
        handle.write(cubin)
    try:
        text = subprocess.run([cuobjdump(), "--dump-resource-usage", handle.name],
                              capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([cuobjdump(), "-sass", handle.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(handle.name)
    line = next(line for line in text.splitlines() if "REG:" in line)
    fields = dict(item.split(":", 1) for item in line.split())
    usage = {key: int(fields[key]) for key in ("REG", "STACK", "SHARED", "LOCAL")}
    loads = re.findall(r"\bLDG\.E[.\w]*", sass)
    usage["ldg128"] = sum(1 for load in loads if load.endswith("128"))
    usage["ldg_narrow"] = len(loads) - usage["ldg128"]
    usage["ex2"] = len(re.findall(r"\bMUFU\.EX2\b", sass))
    return usage


def compile_job(job: Job) -> Row:
    fn = getattr(topk_kernels if "topk" in job.kernel else kernels, job.kernel)
    constexprs = dict(job.constexprs)
    has_target = constexprs.get("HAS_TARGET", True)
    if job.kernel == "_check_targets_kernel":
        sig = {"target_ptr": "*i64", "num_rows": "i32", "num_classes": "i32", "ignore_index": "i32", "BLOCK": "constexpr"}
        attrs = {(0,): [["tt.divisibility", 16]]}
    else:
        column_blocks = job.kernel.endswith("online_kernel") or not constexprs.get("WHOLE_ROW", True)
        sig, attrs = signature(fn, DTYPES[job.dtype], has_target, align_ints=column_blocks, scalars=job.scalars,
                               has_grad_scale=constexprs.get("HAS_GRAD_SCALE", False))
    options = compile_options(job.num_warps)
    if job.kernel == "_check_targets_kernel":
        options["debug"] = job.variant == "debug"  # what @triton.jit(debug=True) gives eagerly
    try:
        compiled = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", job.arch, 32),
                                  options=options)
        usage = resource_usage(compiled.asm["cubin"])
        usage.update(ptxas_spills(compiled.asm["ptx"]))
    except Exception as error:  # reported as a failed row, and the script fails
        return Row(job.kernel, job.config, job.variant, job.dtype, f"sm_{job.arch}", job.num_warps,
                   -1, -1, -1, -1, -1, -1, -1, -1, -1, None, job.scalars,
                   error=f"{type(error).__name__}: {compile_error_line(error)}")
    check_live = None
    if job.kernel == "_check_targets_kernel":
        ptx = compiled.asm["ptx"]
        check_live = "trap" in ptx and (job.variant != "debug" or "__assertfail" in ptx)
    return Row(job.kernel, job.config, job.variant, job.dtype, f"sm_{job.arch}", job.num_warps,
               usage["REG"], usage["SHARED"], usage["STACK"], usage["LOCAL"], usage["spill_stores"],
               usage["spill_loads"], usage["ldg128"], usage["ldg_narrow"], usage["ex2"], check_live,
               job.scalars, fp64_ops(compiled.asm["ptx"]))


def compile_error_line(error: Exception) -> str:
    """The line that says what failed: a CompilationError's last line (its first is the source excerpt)."""
    lines = [line for line in str(error).splitlines() if line.strip()] or [""]
    return (lines[-1] if type(error).__name__ == "CompilationError" else lines[0])[:200]


def jobs(variants, dtypes, inductor_archs=ARCHS) -> List[Job]:
    """The kernels' jobs with fp32 scalars for every dtype, then with fp64 scalars (Inductor's) on inductor_archs."""
    return kernel_jobs(variants, dtypes, ARCHS, "fp32") + kernel_jobs(variants, (INDUCTOR_DTYPE,), inductor_archs, "fp64")


def kernel_jobs(variants, dtypes, archs, scalars: str) -> List[Job]:
    result = []
    for arch in archs:
        for build in ("debug", "no-debug") if scalars == "fp32" else ():  # as launched eagerly; as Inductor re-jits it
            result.append(Job("_check_targets_kernel", f"BLOCK={launch.CHECK_BLOCK}", build, "i64", arch, 4,
                              (("BLOCK", launch.CHECK_BLOCK),)))
        for variant in variants:
            has_target, has_teacher, has_reference, weighting, grad, power = VARIANTS[variant]
            flags = (("HAS_TARGET", has_target), ("HAS_TEACHER", has_teacher), ("HAS_REFERENCE", has_reference),
                     ("WEIGHTING", weighting), ("COMPUTE_GRAD", grad), ("HAS_GRAD_SCALE", grad), ("T_POWER", power))
            for dtype in dtypes:
                for tile in launch.all_tile_configs():
                    result.append(Job("_smskd_rows_tile_kernel", f"ROWS={tile.rows} BLOCK_C={tile.block_c}",
                                      variant, dtype, arch, tile.num_warps,
                                      flags + (("ROWS", tile.rows), ("BLOCK_C", tile.block_c), ("ROW_ALIGN", 8)),
                                      scalars))
                for online in launch.ONLINE_CONFIGS:
                    maxima = f" maxima per {online.maxima_columns}" if online.maxima_columns else ""
                    result.append(Job("_smskd_rows_online_kernel", f"BLOCK_C={online.block_c}{maxima}",
                                      variant, dtype, arch, online.num_warps,
                                      flags + (("BLOCK_C", online.block_c),
                                               ("MAXIMA_COLUMNS", online.maxima_columns), ("ROW_ALIGN", 16)),
                                      scalars))
                if variant in TOPK_VARIANTS:
                    result.extend(topk_jobs(variant, dtype, arch, scalars))
    return result


def topk_jobs(variant: str, dtype: str, arch: int, scalars: str = "fp32") -> List[Job]:
    """Every configuration of the top-k kernel (topk_launch.all_topk_configs) for one variant, and its
    exact-rest pass (topk_launch.EXACT_REST_CONFIG, T_POWER 0, as the launcher runs it) once per variant
    without a temperature power."""
    has_target, _, has_reference, weighting, grad, power = VARIANTS[variant]
    flags = (("HAS_TARGET", has_target), ("HAS_REFERENCE", has_reference), ("WEIGHTING", weighting),
             ("COMPUTE_GRAD", grad), ("HAS_GRAD_SCALE", grad), ("BLOCK_K", topk_launch.BLOCK_K))
    passes = [(config, False, power) for config in topk_launch.all_topk_configs()]
    if power == 0:
        passes.append((topk_launch.EXACT_REST_CONFIG, True, 0))
    result = []
    for config, exact_rest, t_power in passes:
        shape = "whole row" if config.whole_row else "column blocks"
        name = f"BLOCK_C={config.block_c} {shape}" + (" exact rest" if exact_rest else "")
        result.append(Job("_smskd_topk_rows_kernel", name, variant, dtype, arch, config.num_warps,
                          flags + (("T_POWER", t_power), ("EXACT_REST", exact_rest), ("WHOLE_ROW", config.whole_row),
                                   ("BLOCK_C", config.block_c), ("ROW_ALIGN", 8 if config.whole_row else 16)),
                          scalars))
    return result


def markdown(rows: List[Row], header: str) -> str:
    lines = [header, "",
             "| kernel | config | variant | dtype | scalars | arch | warps | regs | shared B | stack B | local B | spill st/ld B | LDG 16B/narrow | EX2 | fp64 ops | target check | error |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        assert_text = "" if row.check_live is None else ("live" if row.check_live else "MISSING")
        lines.append(f"| {row.kernel} | {row.config} | {row.variant} | {row.dtype} | {row.scalars} | {row.arch} | "
                     f"{row.num_warps} | {row.registers} | {row.shared_bytes} | {row.stack_bytes} | {row.local_bytes} | "
                     f"{row.spill_stores}/{row.spill_loads} | {row.ldg128}/{row.ldg_narrow} | {row.ex2} | "
                     f"{row.fp64_ops} | {assert_text} | {row.error} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ci", action="store_true",
                        help="gradient variants in fp32 and bf16 only, fp64 scalars on sm_90 only")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                        help="folder for triton_aot_report[_ci].{md,json}")
    args = parser.parse_args(argv)

    variants = CI_VARIANTS if args.ci else tuple(VARIANTS)
    dtypes = CI_DTYPES if args.ci else tuple(DTYPES)
    work = jobs(variants, dtypes, CI_INDUCTOR_ARCHS if args.ci else ARCHS)
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        rows = list(pool.map(compile_job, work))

    failures = [row for row in rows if row.error or row.spills or row.fp64_ops != 0 or row.check_live is False]
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "python benchmarks/triton_aot_report.py" + (" --ci" if args.ci else "")
    header = (f"# Triton kernels compiled ahead of time (no GPU)\n\n"
              f"Command: `{command}`; {stamp}; commit {git_commit()}; triton {triton.__version__}; "
              f"{len(rows)} compiles, {len(failures)} with a spill, an error, fp64 arithmetic or a missing target check.\n"
              f"scalars: the float arguments' type, fp32 as Triton's launcher passes them, fp64 as Inductor does.\n"
              f"regs: registers per thread; spills: ptxas -v spill stores/loads, local: cuobjdump local bytes; any > 0 fails.\n"
              f"fp64 ops: PTX instructions on f64 besides a scalar's load and conversion to fp32; any > 0 fails.\n"
              f"A stack frame without spills (e.g. the assert call of the check kernel) is reported, not failed.\n"
              f"LDG 16B/narrow: global loads in the SASS, 16-byte vectors / narrower (scalar loads of the\n"
              f"target and of s_y, t_y are narrow by nature); EX2: MUFU.EX2 instructions (static count).")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "triton_aot_report_ci" if args.ci else "triton_aot_report"
    (args.out / f"{stem}.md").write_text(markdown(rows, header))
    (args.out / f"{stem}.json").write_text(json.dumps(
        {"command": command, "date": stamp, "commit": git_commit(), "triton": triton.__version__,
         "rows": [asdict(row) for row in rows]}, indent=1))
    print(markdown(failures or rows[:0], header))
    print(f"wrote {args.out / (stem + '.md')}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
