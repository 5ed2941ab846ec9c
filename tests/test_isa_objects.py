"""Link safety of the instruction-set copies of the CPU kernels (csrc/cpu/isa_units.json).

Each such unit is compiled with -mavx2 (or -mavx512f ...) as a whole, so any inline
function or template from a header that it emits (std::, c10, ATen) may hold AVX2 code.
Such a function is a weak (COMDAT) symbol; if a baseline object of the library also
emits it, the linker keeps one copy for both, and baseline code could run AVX2
instructions on a CPU without them. These tests read the objects that setup.py built
(build/temp.*; SMSKD_FAST_BUILD_TEMP names another build directory: the clang build
of the Makefile, CMake's object directory under ctest) with readelf and objdump, and
fail when a function of an instruction-set object is also defined by another object
with different instructions, or when a function named outside the unit's namespaces
(smskd::cpu::AVX2, at::vec::AVX2, ...) uses instructions beyond the x86-64 baseline.
Compiler helpers with baseline code (clang's __clang_call_terminate) and data
symbols (the personality pointer, a static local's guard) are harmless and pass.
"""
from __future__ import annotations

import glob
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def isa_units() -> list[str]:
    """Repository-relative paths of the instruction-set units on this machine's architecture."""
    with open(os.path.join(ROOT, "csrc", "cpu", "isa_units.json")) as f:
        units = json.load(f)["units"]
    machine = platform.machine().lower()
    return sorted(units.get("x86_64" if machine == "amd64" else machine, {}))


def build_temp() -> str:
    """setup.py's build directory of the objects (the one for this interpreter by default)."""
    default = os.path.join(ROOT, "build", f"temp.{sysconfig.get_platform()}-{sys.implementation.cache_tag}")
    return os.environ.get("SMSKD_FAST_BUILD_TEMP", default)


def objects() -> tuple[dict[str, str], list[str]]:
    """(unit -> its object, the other objects of the library), skipping when there is no build to read."""
    if not isa_units():
        pytest.skip(f"no instruction-set units on {platform.machine()}")
    if shutil.which("readelf") is None:
        pytest.skip("readelf (binutils) is not installed")
    temp = build_temp()
    everything = sorted(glob.glob(os.path.join(temp, "**", "*.o"), recursive=True))
    units = {}
    for unit in isa_units():
        stem = os.path.splitext(os.path.basename(unit))[0]
        names = (stem + ".o", stem + ".cpp.o")  # setup.py's, CMake's
        found = [path for path in everything if os.path.basename(path) in names]
        if len(found) != 1:
            pytest.skip(f"no single object of {unit} under {temp} (build with setup.py first): {found}")
        units[unit] = found[0]
    return units, [path for path in everything if path not in units.values()]


def defined_functions(obj: str) -> set[str]:
    """Mangled names of the functions that obj defines with global, weak or unique binding."""
    table = subprocess.run(["readelf", "-sW", obj], check=True, capture_output=True, text=True).stdout
    names = set()
    for line in table.splitlines():
        fields = line.split()  # Num: Value Size Type Bind Vis Ndx Name
        defined = len(fields) >= 8 and fields[3] == "FUNC" and fields[6] != "UND"
        if defined and fields[4] in ("GLOBAL", "WEAK", "UNIQUE"):
            names.add(fields[7])
    return names


def instructions(obj: str, name: str) -> list[str]:
    """The instructions of function name in obj, without addresses and symbolic annotations."""
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", f"--disassemble={name}", obj], check=True,
                          capture_output=True, text=True).stdout
    found = (re.match(r"^\s*[0-9a-f]+:\s+(.*)$", line) for line in text.splitlines())
    return [" ".join(re.sub(r"<[^>]*>", "", m.group(1)).split()) for m in found if m]


# Instructions that the baseline x86-64 target does not have: VEX/EVEX-encoded ones (v...),
# AVX-512 mask registers, and the BMI, BMI2, LZCNT and POPCNT ones of the units' flags.
_ISA_ONLY = re.compile(r"^(?:v\S+|andn|bextr|blsi|blsmsk|blsr|bzhi|pdep|pext|rorx|sarx|shlx|shrx|mulx|lzcnt|"
                       r"tzcnt|popcnt)\b|%[yz]mm|%k[0-7]")


def uses_isa_instructions(code: list[str]) -> bool:
    return any(_ISA_ONLY.search(line) for line in code)


def demangle(name: str) -> str:
    if shutil.which("c++filt") is None:
        return name
    return subprocess.run(["c++filt", name], check=True, capture_output=True, text=True).stdout.strip()


def shared_isa_code(units: dict[str, str], others: list[str]) -> dict[str, list[str]]:
    """Per unit, the functions of its object that another object of the library defines with other
    instructions: the linker keeps one copy of each, so either side may run the other's code."""
    found = {}
    for unit, obj in units.items():
        own = defined_functions(obj)
        found[unit] = []
        for other in others + [u for u in units.values() if u != obj]:
            for name in sorted(own & defined_functions(other)):
                if instructions(obj, name) != instructions(other, name):
                    found[unit].append(f"{demangle(name)} (also in {os.path.basename(other)})")
    return found


def foreign_isa_code(units: dict[str, str]) -> dict[str, list[str]]:
    """Per unit, the functions of its object that are named outside its namespaces (AVX2 for
    *_avx2.cpp: smskd::cpu::AVX2, at::vec::AVX2, or a type of theirs in the name) and use
    instructions beyond the baseline: each would become shared ISA code as soon as a
    baseline object emitted the same inline function."""
    found = {}
    for unit, obj in units.items():
        capability = os.path.splitext(unit)[0].rsplit("_", 1)[-1].upper()  # loss_rows_simd_avx2 -> AVX2
        own = re.compile(rf"(?<![0-9]){len(capability)}{capability}[0-9]")  # the mangled component "4AVX2"
        functions = defined_functions(obj)
        assert any(own.search(name) and "loss_rows_kernel" in name for name in functions), \
            f"{unit}: no smskd::cpu::{capability}::loss_rows_kernel in {obj}"
        found[unit] = [demangle(name) for name in sorted(functions) if not own.search(name)
                       and uses_isa_instructions(instructions(obj, name))]
    return found


def test_no_isa_code_is_shared_with_another_object():
    units, others = objects()
    assert shared_isa_code(units, others) == {unit: [] for unit in units}


def test_no_function_outside_the_isa_namespaces_has_isa_code():
    units, _ = objects()
    assert foreign_isa_code(units) == {unit: [] for unit in units}


def test_the_checks_find_an_inline_function_emitted_in_both(tmp_path):
    """The hazard itself, in two small objects: both checks must name the vectorised inline function."""
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None or shutil.which("objdump") is None or platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("needs an x86-64 C++ compiler and binutils")
    header = "__attribute__((noinline)) inline void twice(float* x, int n) { for (int i = 0; i < n; ++i) x[i] *= 2; }"
    (tmp_path / "base.cpp").write_text(header + "\nvoid base(float* x, int n) { twice(x, n); }\n")
    (tmp_path / "simd_avx2.cpp").write_text(
        header + "\nnamespace smskd::cpu::AVX2 { void loss_rows_kernel(float* x, int n) { twice(x, n); } }\n")
    for name, flags in (("base", []), ("simd_avx2", ["-mavx2"])):
        subprocess.run([compiler, "-O3", "-std=c++17", *flags, "-c", str(tmp_path / f"{name}.cpp"), "-o",
                        str(tmp_path / f"{name}.o")], check=True)
    units = {"simd_avx2.cpp": str(tmp_path / "simd_avx2.o")}
    shared = shared_isa_code(units, [str(tmp_path / "base.o")])
    assert shared == {"simd_avx2.cpp": ["twice(float*, int) (also in base.o)"]}
    assert foreign_isa_code(units) == {"simd_avx2.cpp": ["twice(float*, int)"]}


def test_no_source_sets_its_instruction_set_itself():
    """Instruction sets come from isa_units.json's flags only: a target pragma (or hand-defined
    __AVX2__-style macros) fails with GCC >= 13, whose libstdc++ has always_inline allocator members."""
    pattern = re.compile(r"#\s*pragma\s+(GCC\s+target|clang\s+attribute)|#\s*define\s+__(AVX|FMA|F16C)\w*__")
    sources = [path for folder in ("csrc", "kernels") for path in glob.glob(os.path.join(ROOT, folder, "**", "*"),
                                                                             recursive=True) if os.path.isfile(path)]
    offending = [os.path.relpath(path, ROOT) for path in sources if pattern.search(open(path, errors="replace").read())]
    assert sources and offending == []
