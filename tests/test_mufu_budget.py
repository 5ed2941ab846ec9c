"""CI's special-function proxy (issue 17): MUFU instructions per element and sweep stay within
benchmarks/mufu_budget.json for every CUDA and Triton kernel instantiation, without a GPU.

The counter (benchmarks/mufu_report.py, benchmarks/sass_loops.py) is first calibrated on small
kernels compiled here whose exponentials per element are known (1 and 2), and its negative
control plants one extra MUFU.EX2 in the statistics loop of a real kernel's SASS, which must
raise that sweep's figure by one per loop iteration and fail the budget.
CUDA: the sm_90 SASS of the built smskd_fast._C when it has CUDA code (seconds, as CI builds
it), else kernels/*.cu compiled with nvcc for sm_90 (about 3 minutes on 2 cores); skipped
without cuobjdump/nvcc. Triton: the AOT report's CI set (88 compiles for sm_90, 2-4 minutes).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import cuda_resource_report as cuda_report  # noqa: E402
import mufu_report  # noqa: E402
import sass_loops  # noqa: E402

# A loop (0x0100..0x0180) loading two 16-byte packs and issuing 3 EX2 + 1 RCP, a forward-skipped EX2
# inside it, and one LG2 after it.
SASS = """
        Function : _Z4demoPKfPf
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0100*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0110*/                   LDG.E.128 R8, desc[UR4][R2.64+0x10] ;
        /*0120*/                   MUFU.EX2 R4, R4 ;
        /*0130*/               @P1 BRA 0x150 ;
        /*0140*/                   MUFU.EX2 R5, R5 ;
        /*0150*/                   MUFU.EX2 R6, R6 ;
        /*0160*/                   MUFU.RCP R7, R7 ;
        /*0180*/              @!P0 BRA 0x100 ;
        /*0190*/                   MUFU.LG2 R0, R0 ;
        /*01a0*/                   EXIT ;
        /*01b0*/                   BRA 0x1b0;
"""


def test_loops_and_their_mufu_are_found():
    (instructions,) = sass_loops.parse_functions(SASS).values()
    (loop,) = sass_loops.find_loops(instructions)
    assert (loop.start, loop.end, loop.sweep) == (0x100, 0x180, "statistics")
    assert loop.mufu == {"EX2": 3, "RCP": 1} and loop.conditional_mufu == 1
    assert loop.loads == [16, 16] and loop.widest_bytes() == 32
    assert sass_loops.mufu_outside_loops(instructions, [loop]) == {"LG2": 1}
    assert sass_loops.access_bytes("LDG.E.EL.128", "LDG") == 16 and sass_loops.access_bytes("LDG.E", "LDG") == 4
    assert sass_loops.access_bytes("LDG.E.U16", "LDG") == 2 and sass_loops.access_bytes("STG.E.64", "LDG") == 0


# A gradient loop over packs a row cache kept in shared memory (two 16-byte LDS per stream read, one STG
# written, 4 EX2), then a cross-warp merge loop that reads shared memory and stores nothing globally.
SASS_ROW_CACHE = """
        Function : _Z4demoPKfPf
        /*0100*/                   LDS.128 R4, [R2] ;
        /*0110*/                   LDS.128 R8, [R2+0x2000] ;
        /*0120*/                   MUFU.EX2 R4, R4 ;
        /*0130*/                   MUFU.EX2 R5, R5 ;
        /*0140*/                   MUFU.EX2 R6, R6 ;
        /*0150*/                   MUFU.EX2 R7, R7 ;
        /*0160*/                   STG.E.128 desc[UR4][R12.64], R4 ;
        /*0170*/              @!P0 BRA 0x100 ;
        /*0180*/                   LDS.128 R4, [R3] ;
        /*0190*/                   FADD R0, R0, R4 ;
        /*01a0*/              @!P1 BRA 0x180 ;
        /*01b0*/                   EXIT ;
"""


def test_a_gradient_loop_over_shared_memory_is_counted_by_its_shared_loads():
    (instructions,) = sass_loops.parse_functions(SASS_ROW_CACHE).values()
    gradient, merge = sass_loops.find_loops(instructions)
    assert (gradient.sweep, gradient.shared_loads, gradient.widest_bytes()) == ("gradient", [16, 16], 32)
    assert (merge.sweep, merge.widest_bytes()) == ("merge", 0)
    assert sass_loops.access_bytes("LDS.U.128", "LDS") == 16 and sass_loops.access_bytes("LDS.128", "LDG") == 0


def test_sweep_rows_take_the_worst_packed_loop():
    (instructions,) = sass_loops.parse_functions(SASS).values()
    loops = sass_loops.find_loops(instructions)
    rows = mufu_report.sweep_rows(loops, lambda loop: loop.widest_bytes() / 4, dict(
        backend="cuda", kernel="k", config="c", variant="v", dtype="float32", arch="sm_90"),
        packed=mufu_report.is_packed)
    assert [(r.sweep, r.elements, r.per_element) for r in rows] == [("statistics", 8, 0.5)]
    assert mufu_report.check_budget(rows, {rows[0].key: 0.5}) == []
    assert "> budget 0.250" in mufu_report.check_budget(rows, {rows[0].key: 0.25})[0]
    assert "no budget stated" in mufu_report.check_budget(rows, {})[0]


@pytest.mark.parametrize("version, expected", [("3.6.0", "mufu_budget_triton3.6.json"), ("3.6.1+git", "mufu_budget_triton3.6.json"),
                                               ("3.7.1", "mufu_budget_triton3.7.json"), ("3.8.0", None),
                                               ("3.9.0", "mufu_budget_triton3.9.json"), ("3.10.0", None)])
def test_each_triton_version_has_its_budget_file(version, expected):
    found = mufu_report.triton_budget_file(version)
    assert (found and found.name) == expected


@pytest.mark.parametrize("version, budgeted", [("3.6.0", True), ("3.7.1", True), ("3.8.0", True), ("3.8.1+git", True),
                                               ("3.9.0", True), ("3.5.0", False), ("3.10.0", False)])
def test_which_triton_versions_are_budgeted(version, budgeted):
    assert mufu_report.triton_is_budgeted(version) == budgeted


def makefile_torch_pin() -> str:
    """The torch release `make` (and so CI) installs."""
    with open(os.path.join(ROOT, "Makefile")) as makefile:
        return re.search(r"^TORCH_PINS := torch==(\S+)", makefile.read(), re.MULTILINE).group(1)


def test_the_makefile_pin_is_read():
    """test_triton_kernels_within_budget compares the running torch with it (read only under other tritons)."""
    assert re.fullmatch(r"\d+\.\d+\.\d+", makefile_torch_pin())


def test_write_budget_is_refused_under_a_triton_without_budgets(monkeypatch, capsys):
    """Writing would put that version's Triton rows over CI's (3.8's) in mufu_budget.json."""
    triton = pytest.importorskip("triton")
    monkeypatch.setattr(triton, "__version__", "3.10.0")
    with pytest.raises(SystemExit) as stopped:
        mufu_report.main(["--triton", "--ci", "--write-budget"])
    assert stopped.value.code == 2 and "triton 3.10.0 has no budget file" in capsys.readouterr().err


@pytest.mark.parametrize("version", sorted(mufu_report.TRITON_BUDGET_FILES))
def test_a_triton_versions_budget_covers_every_triton_row_of_the_main_file(version):
    """Every Triton sweep budgeted for CI's triton has a budget for each other version too (written under that
    version with --write-budget), so that a run there reports figures, not missing budgets."""
    main = {key for key in mufu_report.load_budget() if key.startswith("triton |")}
    other = mufu_report.load_budget(mufu_report.TRITON_BUDGET_FILES[version])
    assert set(other) == main


def test_write_budget_merges_into_the_file(tmp_path):
    (instructions,) = sass_loops.parse_functions(SASS).values()
    rows = mufu_report.sweep_rows(sass_loops.find_loops(instructions), lambda loop: loop.widest_bytes() / 4, dict(
        backend="triton", kernel="k", config="c", variant="v", dtype="float32", arch="sm_90"),
        packed=mufu_report.is_packed)
    path = tmp_path / "budget.json"
    path.write_text(json.dumps({"kept": 1.0, rows[0].key: 9.0}))
    mufu_report.write_budget(path, rows)
    assert mufu_report.load_budget(path) == {"kept": 1.0, rows[0].key: 0.5}


def plant_ex2(sass: str, function: str, address: int) -> str:
    """sass with one more MUFU.EX2 at address (inside function's listing)."""
    lines = sass.splitlines()
    start = next(i for i, line in enumerate(lines) if f"Function : {function}" in line)
    at = next(i for i in range(start, len(lines)) if f"/*{address:04x}*/" in lines[i])
    lines.insert(at + 1, f"        /*{address:04x}*/                   MUFU.EX2 R250, R250 ;")
    return "\n".join(lines)


CUDA_CALIBRATION = r"""
__global__ void calib(const float4* __restrict__ x, float* out, int n) {
  float acc = 0.0f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float4 v = x[i];
    acc += exp2f(v.x) + exp2f(v.y) + exp2f(v.z) + exp2f(v.w);
#if EXTRA
    acc += exp2f(v.x * 1.5f) + exp2f(v.y * 1.5f) + exp2f(v.z * 1.5f) + exp2f(v.w * 1.5f);
#endif
  }
  out[threadIdx.x] = acc;
}
"""


@pytest.mark.skipif(cuda_report.find_tool("nvcc") is None or cuda_report.find_tool("cuobjdump") is None,
                    reason="nvcc/cuobjdump not found (no CUDA toolkit)")
@pytest.mark.parametrize("extra, expected", [(0, 1.0), (1, 2.0)])
def test_cuda_counter_is_calibrated(tmp_path, extra, expected):
    source = tmp_path / "calib.cu"
    source.write_text(CUDA_CALIBRATION)
    cubin = tmp_path / "calib.cubin"
    cuda_report.run([cuda_report.find_tool("nvcc"), *cuda_report.NVCC_FLAGS, "-arch=sm_90", "-cubin",
                     f"-DEXTRA={extra}", str(source), "-o", str(cubin)])
    sass = cuda_report.run([cuda_report.find_tool("cuobjdump"), "-sass", str(cubin)])
    (instructions,) = sass_loops.parse_functions(sass).values()
    loops = [loop for loop in sass_loops.find_loops(instructions) if loop.sweep == "statistics"]
    assert loops, sass
    assert {loop.mufu.get("EX2", 0) / (loop.widest_bytes() / 4) for loop in loops} == {expected}


@pytest.mark.skipif(cuda_report.find_tool("cuobjdump") is None, reason="cuobjdump not found (no CUDA toolkit)")
def test_cuda_kernels_within_budget_and_a_planted_exp2_is_caught(tmp_path, cuda_extension_binary):
    binary = cuda_extension_binary
    if binary is None and cuda_report.find_tool("nvcc") is None:
        pytest.skip("no CUDA build of smskd_fast._C and no nvcc to compile kernels/")
    sass = mufu_report.cuda_sass(binary, str(tmp_path))
    rows = mufu_report.cuda_rows(sass)
    budget = mufu_report.load_budget()
    assert {r.kernel for r in rows} == {"smskd_rows_kernel", "smskd_topk_rows_kernel"}
    # 5 layouts x 3 dtypes x (4 dense input sets, 3 of them also at T = 1 and T = 2, + 2 top-k ones, also at
    # T = 1 and T = 2) instantiations, and the top-k exact-rest kernel's 3 dtypes x (with and without a reference),
    # each with a budgeted sweep
    assert len({(r.kernel, r.config, r.variant, r.dtype) for r in rows if r.sweep in mufu_report.BUDGETED}) == 246
    assert mufu_report.check_budget(rows, budget) == []

    # Negative control: one more EX2 in the bf16 512-thread teacher+reference kernel's statistics loop.
    name = next(n for n in sass_loops.parse_functions(sass)
                if re.search(r"smskd_rows_kernelI13__nv_bfloat16Li512ELi1ELb1ELb1ELi0E", n))
    loop = next(lp for lp in sass_loops.find_loops(sass_loops.parse_functions(sass)[name]) if lp.sweep == "statistics"
                and lp.widest_bytes() == 3 * 2 * 16)  # the unrolled loop: 2 packs x 3 streams
    planted = mufu_report.cuda_rows(plant_ex2(sass, name, loop.start))
    problems = mufu_report.check_budget(planted, budget)
    assert len(problems) == 1 and "teacher+reference | bfloat16 | sm_90 | statistics | 16/iter" in problems[0]
    assert "5.375 MUFU/element > budget 5.312" in problems[0]  # (85 + 1) / 16 against 85 / 16


TRITON_CALIBRATION = SimpleNamespace(kernel="calib", config="calib", variant="calib", dtype="fp32", arch=90,
                                     num_warps=4, constexprs=(("BLOCK_C", 1024),))


def triton_calibration_kernel(extra: bool):
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def calib(x_ptr, out_ptr, n, EXTRA: tl.constexpr, BLOCK_C: tl.constexpr):
        acc = tl.zeros([BLOCK_C], tl.float32)
        for start in range(0, n, BLOCK_C):
            cols = start + tl.arange(0, BLOCK_C)
            x = tl.load(x_ptr + cols, mask=cols < n, other=0.0)
            acc += tl.exp2(x)
            if EXTRA:
                acc += tl.exp2(x * 1.5)
        tl.store(out_ptr + tl.arange(0, BLOCK_C), acc)

    return calib


@pytest.mark.parametrize("extra, expected", [(False, 1.0), (True, 2.0)])
def test_triton_counter_is_calibrated(extra, expected):
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import triton_aot_report  # the launchers' compile options (benchmarks/)

    fn = triton_calibration_kernel(extra)
    if not isinstance(fn, triton.JITFunction):
        pytest.skip("triton was imported with TRITON_INTERPRET=1: its kernels are interpreted, not compiled")
    compiled = triton.compile(
        ASTSource(fn, {"x_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32", "EXTRA": "constexpr", "BLOCK_C": "constexpr"},
                  {"EXTRA": extra, "BLOCK_C": 1024}, {(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]]}),
        target=GPUTarget("cuda", 90, 32), options=triton_aot_report.compile_options(4))
    rows = mufu_report.triton_rows_from_cubin(compiled.asm["cubin"], TRITON_CALIBRATION)
    (stats,) = [r for r in rows if r.sweep == "statistics"]
    assert (stats.elements, stats.per_element, stats.mufu) == (8, expected, {"EX2": int(8 * expected)})


def test_triton_kernels_within_budget(tmp_path):
    triton = pytest.importorskip("triton")
    import torch

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this triton has no cuobjdump")
    if not mufu_report.triton_is_budgeted(triton.__version__):
        # Never for CI's triton: moving the Makefile's torch pin to a triton without budgets fails here.
        assert torch.__version__.split("+")[0] != makefile_torch_pin(), (
            f"the Makefile's torch brings triton {triton.__version__}, which has no MUFU budgets: set "
            f"mufu_report.BUDGET_FILE_TRITON to it, then mufu_report.py --triton --ci --write-budget")
        pytest.skip(f"no MUFU budgets were written under triton {triton.__version__} (written: "
                    f"{', '.join(sorted([*mufu_report.TRITON_BUDGET_FILES, mufu_report.BUDGET_FILE_TRITON]))}, "
                    f"{mufu_report.BUDGET_FILE_TRITON} CI's); another compiler schedules the exponentials "
                    f"differently (benchmarks/mufu_report.py)")
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "mufu_report.py"), "--triton", "--ci", "--jobs", "2",
         "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=1200,
        env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})  # compiled, not interpreted
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    rows = json.loads((tmp_path / "mufu_report.json").read_text())["rows"]
    budgeted = {(r["kernel"], r["config"], r["variant"], r["dtype"]) for r in rows if r["sweep"] in mufu_report.BUDGETED}
    assert len(budgeted) == len(mufu_report.triton_jobs(ci=True))  # every compiled configuration has a budgeted sweep
