"""Registers, shared memory and spills of every CUDA row-kernel instantiation, without a GPU.

The kernels are the dense form (smskd_rows_kernel, kernels/smskd_kernels.cu) and the
top-k teacher form (smskd_topk_rows_kernel, kernels/smskd_topk_kernels.cu).
Two sources, one report:
  --source (default)  compiles both .cu files to a cubin per architecture
                      with `ptxas -v` and reads its exact spill counts;
  --binary PATH       reads a built object or shared library (e.g. smskd_fast/_C.abi3.so)
                      with `cuobjdump --dump-resource-usage`, where a spill shows as
                      local memory (LOCAL or STACK > 0).
Both disassemble the sm_90 code (`cuobjdump -sass`) and require that every bf16
row kernel issues 128-bit global loads (LDG.E.128).

Writes <out-dir>/cuda_resource_usage_<source|binary>.{txt,json} (date, commit,
tool versions, command, raw tool output) and exits 1 on any spill or a bf16
kernel without LDG.E.128, 2 when the CUDA tools are missing.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_SOURCES = [os.path.join(ROOT, "kernels", name) for name in ("smskd_kernels.cu", "smskd_topk_kernels.cu")]
NVCC_FLAGS = ["-std=c++17", "-O3", "--use_fast_math", "-lineinfo"]  # as setup.py and kernels/CMakeLists.txt
KERNEL_NAME = re.compile(
    r"smskd_(?:(?P<topk>topk_)?rows|(?P<exact>topk_exact_rest))_kernelI(?P<dtype>6__half|13__nv_bfloat16|f)"
    r"(?:Li(?P<threads>\d+)ELi(?P<rows>\d+)E)?"  # absent: the top-k exact-rest kernel's fixed layout
    r"(?:Lb(?P<teacher>[01])E)?Lb(?P<reference>[01])E"  # the top-k form has no teacher flag
    r"(?:Li(?P<power>\d)E)?"  # the dense form's temperature power (kPower: 0 any T, else T = kPower)
)
EXACT_REST_THREADS = "256"  # kernels/smskd_topk_row_kernel.cuh, kExactRestThreads: a block per row
DTYPES = {"6__half": "float16", "13__nv_bfloat16": "bfloat16", "f": "float32"}


@dataclasses.dataclass
class KernelUsage:
    """Resources of one kernel instantiation on one architecture."""

    arch: str
    mangled: str
    registers: int = 0
    shared_bytes: int = 0
    stack_bytes: int = 0
    local_bytes: int = 0
    spill_store_bytes: int = 0
    spill_load_bytes: int = 0
    sass_128bit_loads: Optional[int] = None  # LDG.E.128 count, sm_90 only

    @property
    def label(self) -> str:
        match = KERNEL_NAME.search(self.mangled)
        if not match:
            return self.mangled
        teacher = "top-k" if match["topk"] or match["exact"] else "teacher" if match["teacher"] == "1" else None
        inputs = "+".join(name for name in (teacher, "reference" if match["reference"] == "1" else None)
                          if name) or "student only"
        at = f" at T={match['power']}" if match["power"] not in (None, "0") else ""
        exact = " exact rest" if match["exact"] else ""
        threads, rows = match["threads"] or EXACT_REST_THREADS, match["rows"] or "1"
        return f"{DTYPES[match['dtype']]:8s} {threads:>3s} thr/row x {rows} rows, {inputs}{at}{exact}"

    @property
    def dtype(self) -> Optional[str]:
        match = KERNEL_NAME.search(self.mangled)
        return DTYPES[match["dtype"]] if match else None

    @property
    def topk(self) -> bool:
        match = KERNEL_NAME.search(self.mangled)
        return bool(match and (match["topk"] or match["exact"]))

    @property
    def spills(self) -> bool:
        return self.spill_store_bytes > 0 or self.spill_load_bytes > 0 or self.local_bytes > 0


def find_tool(name: str) -> Optional[str]:
    """A CUDA tool from CUDA_HOME, the PATH, /usr/local/cuda*, or the copy that Triton bundles."""
    candidates = []
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home:
            candidates.append(os.path.join(home, "bin", name))
    which = shutil.which(name)
    if which:
        candidates.append(which)
    candidates += sorted(glob.glob(f"/usr/local/cuda*/bin/{name}"), reverse=True)
    try:
        import triton  # noqa: PLC0415  (optional: only for its bundled CUDA tools)

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name))
    except ImportError:
        pass
    return next((path for path in candidates if os.path.isfile(path) and os.access(path, os.X_OK)), None)


def run(command: List[str]) -> str:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return result.stdout + result.stderr


def ptxas_usage(nvcc: str, arch: str, source: str, cubin: str) -> tuple[List[KernelUsage], str]:
    """Compiles one kernels/ source for one architecture and parses `ptxas -v`."""
    output = run([nvcc, *NVCC_FLAGS, f"-arch=sm_{arch}", "-cubin", "-Xptxas=-v",
                  "-I", os.path.dirname(source), source, "-o", cubin])
    return parse_ptxas(output), output


def parse_ptxas(output: str) -> List[KernelUsage]:
    """Kernel resources from `ptxas -v` output."""
    kernels: List[KernelUsage] = []
    current: Optional[KernelUsage] = None
    for line in output.splitlines():
        if m := re.search(r"Compiling entry function '(\S+)' for 'sm_(\d+)'", line):
            current = KernelUsage(arch=f"sm_{m[2]}", mangled=m[1])
            kernels.append(current)
        elif current is None:
            continue
        elif m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line):
            current.stack_bytes, current.spill_store_bytes, current.spill_load_bytes = map(int, m.groups())
        elif m := re.search(r"Used (\d+) registers", line):
            current.registers = int(m[1])
            smem = re.search(r"(\d+) bytes smem", line)
            current.shared_bytes = int(smem[1]) if smem else 0
    return kernels


def cuobjdump_usage(cuobjdump: str, binary: str) -> tuple[List[KernelUsage], str]:
    """Reads `cuobjdump --dump-resource-usage` of a built object or library."""
    output = run([cuobjdump, "--dump-resource-usage", binary])
    return parse_resource_usage(output), output


def parse_resource_usage(output: str) -> List[KernelUsage]:
    """Row-kernel resources from `cuobjdump --dump-resource-usage` output."""
    kernels: List[KernelUsage] = []
    arch = "?"
    current: Optional[KernelUsage] = None
    for line in output.splitlines():
        if m := re.match(r"\s*arch = (sm_\d+)", line):
            arch = m[1]
        elif m := re.match(r"\s*Function (\S+):", line):
            current = KernelUsage(arch=arch, mangled=m[1]) if KERNEL_NAME.search(m[1]) else None
            if current:
                kernels.append(current)
        elif current and (m := re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)):
            current.registers, current.stack_bytes, current.shared_bytes, current.local_bytes = map(int, m.groups())
            current.local_bytes += current.stack_bytes  # a stack frame here is spill space
    return kernels


def count_wide_loads(cuobjdump: str, binary: str, kernels: List[KernelUsage]) -> str:
    """Counts LDG.E.128 in the sm_90 SASS of each kernel; returns the raw disassembly."""
    sass = run([cuobjdump, "-sass", "-arch", "sm_90", binary])
    per_function = count_wide_loads_in_sass(sass)
    for kernel in kernels:
        if kernel.arch == "sm_90":
            kernel.sass_128bit_loads = per_function.get(kernel.mangled, 0)
    return sass


def count_wide_loads_in_sass(sass: str) -> Dict[str, int]:
    """LDG.E.128 instructions per function of a `cuobjdump -sass` listing."""
    per_function: Dict[str, int] = {}
    name = None
    for line in sass.splitlines():
        if m := re.search(r"Function : (\S+)", line):
            name = m[1]
            per_function[name] = 0
        elif name and re.search(r"\bLDG\.E\.128\b", line):
            per_function[name] += 1
    return per_function


def git_commit() -> str:
    try:
        return run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"]).strip()
    except (RuntimeError, OSError):
        return "unknown"


def report(kernels: List[KernelUsage], header: List[str]) -> tuple[str, List[str]]:
    """The text table and the list of problems (spills, bf16 kernels without LDG.E.128)."""
    lines = header + ["", f"{'arch':6s} {'kernel':50s} {'regs':>4s} {'smem':>6s} {'stack':>5s} {'spill st/ld':>11s} "
                          f"{'LDG.E.128':>9s}"]
    problems: List[str] = []
    for k in sorted(kernels, key=lambda k: (k.arch, k.label)):
        wide = "-" if k.sass_128bit_loads is None else str(k.sass_128bit_loads)
        lines.append(f"{k.arch:6s} {k.label:50s} {k.registers:4d} {k.shared_bytes:6d} {k.stack_bytes:5d} "
                     f"{k.spill_store_bytes:>5d}/{k.spill_load_bytes:<5d} {wide:>9s}")
        if k.spills:
            problems.append(f"{k.arch} {k.label}: spills (stores {k.spill_store_bytes} B, loads "
                            f"{k.spill_load_bytes} B, local {k.local_bytes} B)")
        if k.arch == "sm_90" and k.dtype == "bfloat16" and not k.sass_128bit_loads:
            problems.append(f"{k.arch} {k.label}: no 128-bit global load (LDG.E.128) in its SASS")
    if not any(not k.topk for k in kernels):
        problems.append("no smskd_rows_kernel instantiation found")
    if not any(k.topk for k in kernels):
        problems.append("no smskd_topk_rows_kernel instantiation found")
    if not any(k.arch == "sm_90" for k in kernels):
        problems.append("no sm_90 code found, so LDG.E.128 could not be checked")
    lines += ["", f"{len(kernels)} kernel instantiations; " + ("problems:" if problems else "no spills; every bf16 "
              "sm_90 kernel issues LDG.E.128")] + [f"  {p}" for p in problems]
    return "\n".join(lines) + "\n", problems


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binary", help="read this built object/library instead of compiling the source")
    parser.add_argument("--archs", default="80,90", help="architectures to compile for in source mode (need 90)")
    parser.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args(argv)

    cuobjdump = find_tool("cuobjdump")
    nvcc = find_tool("nvcc") if not args.binary else None
    if cuobjdump is None or (not args.binary and nvcc is None):
        print("cuda_resource_report: nvcc and cuobjdump are needed (set CUDA_HOME)", file=sys.stderr)
        return 2
    mode = "binary" if args.binary else "source"
    header = [
        f"# CUDA row-kernel resource usage ({mode} mode)",
        f"date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"commit: {git_commit()}",
        f"command: {' '.join([os.path.relpath(sys.argv[0], ROOT)] + (argv if argv is not None else sys.argv[1:]))}",
        f"cuobjdump: {cuobjdump}",
    ]
    raw: List[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.binary:
            kernels, text = cuobjdump_usage(cuobjdump, args.binary)
            raw.append(text)
            sass = count_wide_loads(cuobjdump, args.binary, kernels)
        else:
            header.append(f"nvcc: {nvcc} ({run([nvcc, '--version']).strip().splitlines()[-1]})")
            header.append(f"nvcc flags: {' '.join(NVCC_FLAGS)} -cubin -Xptxas=-v")
            kernels = []
            sass = ""
            for arch in args.archs.split(","):
                for source in KERNEL_SOURCES:
                    name = os.path.splitext(os.path.basename(source))[0]
                    cubin = os.path.join(tmp, f"{name}.sm_{arch.strip()}.cubin")
                    found, text = ptxas_usage(nvcc, arch.strip(), source, cubin)
                    kernels += found
                    raw.append(text)
                    if arch.strip() == "90":
                        sass += count_wide_loads(cuobjdump, cubin, found)
    table, problems = report(kernels, header)
    os.makedirs(args.out_dir, exist_ok=True)
    base = os.path.join(args.out_dir, f"cuda_resource_usage_{mode}")
    with open(base + ".txt", "w") as f:
        f.write(table + "\n# raw tool output\n" + "\n".join(raw))
    with open(base + ".json", "w") as f:
        json.dump({"header": header, "problems": problems,
                   "kernels": [dict(dataclasses.asdict(k), label=k.label) for k in kernels]}, f, indent=1)
    wide = sorted(set(re.findall(r"LDG\.E\.128[.A-Z0-9]*", sass)))
    print(table + f"128-bit load opcodes seen: {', '.join(wide) or 'none'}\nwritten: {base}.txt, {base}.json")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
