"""CI's spill check: every Triton kernel configuration compiles for sm_80 and sm_90 without spills,
and also with the argument types torch.compile's Inductor passes (fp64 float scalars).

Runs benchmarks/triton_aot_report.py --ci (the gradient variants, fp32 and bf16,
every launch configuration of the dense and the top-k kernels, and each again with
fp64 scalars on sm_90; 359 compiles, 2-6 minutes on 2 cores shared with other work)
in a subprocess: triton.compile with a GPUTarget needs no GPU, and cuobjdump and
ptxas ship inside triton's package. The fp64 compiles catch what a GPU run of
torch.compile(fullgraph=True) found on an H200 (issue 15): a kernel that fails to
compile ("loop-carried variable ... fp64") or silently computes in fp64.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
triton = pytest.importorskip("triton", reason="the triton backend is optional; without triton nothing to compile")
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
sys.path.insert(0, str(ROOT / "benchmarks"))
from triton_aot_report import compile_options, ptxas_spills, triton_ptxas  # noqa: E402


def has_ptxas(arch: int) -> bool:
    """Whether triton finds the ptxas it assembles sm_<arch> with (the one the reports run)."""
    try:
        return Path(triton_ptxas(arch)).exists()
    except RuntimeError:  # triton's "Cannot find ptxas..."
        return False


@pytest.mark.skipif(not (BIN / "cuobjdump").exists() or not (has_ptxas(80) and has_ptxas(90)),
                    reason=f"this triton has no cuobjdump under {BIN} or no ptxas for sm_80/sm_90")
def test_every_kernel_configuration_compiles_without_spills(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "triton_aot_report.py"), "--ci", "--jobs", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    rows = json.loads((tmp_path / "triton_aot_report_ci.json").read_text())["rows"]
    from smskd_fast.backends.triton import launch as triton_launch
    from smskd_fast.backends.triton import topk_launch as triton_topk_launch

    dense = len(triton_launch.all_tile_configs()) + len(triton_launch.ONLINE_CONFIGS)
    topk = len(triton_topk_launch.all_topk_configs())
    # 3 variants (smskd+grad, the same at T = 2, kd+grad) of the dense and the top-k kernels, every configuration,
    # and the top-k kernel's exact-rest pass (one configuration, T_POWER 0: the two variants at any T)
    configs = 3 * (dense + topk) + 2
    per_arch = 2 + 2 * configs  # the check kernel twice; 2 dtypes
    assert len(rows) == 2 * per_arch + configs  # and the same with fp64 scalars on sm_90 (fp32 logits)
    inductor = [row for row in rows if row["scalars"] == "fp64"]
    assert {(row["kernel"], row["config"], row["variant"]) for row in inductor} == {
        (row["kernel"], row["config"], row["variant"]) for row in rows
        if row["scalars"] == "fp32" and row["arch"] == "sm_90" and row["dtype"] == "fp32"
        and row["kernel"] != "_check_targets_kernel"}
    assert {row["arch"] for row in inductor} == {"sm_90"}
    exact_rest = triton_topk_launch.EXACT_REST_CONFIG
    assert {row["config"] for row in rows if row["kernel"] == "_smskd_topk_rows_kernel"} == {
        f"BLOCK_C={c.block_c} {'whole row' if c.whole_row else 'column blocks'}"
        for c in triton_topk_launch.all_topk_configs()} | {f"BLOCK_C={exact_rest.block_c} column blocks exact rest"}
    assert {row["arch"] for row in rows} == {"sm_80", "sm_90"}
    assert all(row["registers"] > 0 and row["spill_stores"] == 0 and not row["error"] for row in rows)
    assert all(row["fp64_ops"] == 0 for row in rows)  # the scalars are cast to fp32 once, whatever their type
    # The target check: assert + trap in the debug build, the trap alone in Inductor's re-jit.
    assert [row["check_live"] for row in rows if row["kernel"] == "_check_targets_kernel"] == [True] * 4


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("kernel", ["_scale_rows_kernel", "_scale_all_rows_kernel"])
def test_backward_scale_kernels_compile_without_spills(kernel, dtype, arch):
    """ops/scale_rows.py's kernels (backward's only N x C step) compile for the GPU targets without spills."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from smskd_fast.ops import scale_rows

    if not has_ptxas(arch):
        pytest.skip(f"triton finds no ptxas for sm_{arch}")
    signature = {"grad_ptr": f"*{dtype}", "factor_ptr": "*fp32", "row_stride": "i32"}
    if kernel == "_scale_all_rows_kernel":
        signature["rows"] = "i32"
    signature.update(cols="i32", BLOCK="constexpr")
    source = ASTSource(getattr(scale_rows, kernel), signature, {"BLOCK": scale_rows._BLOCK_COLUMNS},
                       {(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]]})
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=compile_options(4))
    assert ptxas_spills(compiled.asm["ptx"]) == {"spill_stores": 0, "spill_loads": 0}
