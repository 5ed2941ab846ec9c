"""Link safety of the instruction-set copies of the CPU kernels (csrc/cpu/isa_units.json).

Each such unit is compiled with -mavx2 (or -mavx512f ...) as a whole, so any inline
function or template from a header that it emits (std::, c10, ATen) holds AVX2 code.
Such a function is a weak (COMDAT) symbol; if a baseline object of the library also
emits it, the linker keeps one copy for both, and baseline code could run AVX2
instructions on a CPU without them. These tests read the objects that setup.py built
(build/temp.*; SMSKD_FAST_BUILD_TEMP names another build directory: the clang build
of the Makefile, CMake's object directory under ctest) with readelf and check that no function symbol of an
instruction-set object is defined by any other object of the library, and that every
such function is named in the unit's own namespace (smskd::cpu::AVX2,
at::vec::AVX2, ...), so that no baseline object can ever emit the same name. Data
symbols (the personality pointer, a static local's guard) hold no code and may be shared.
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


def demangled(names) -> list[str]:
    names = sorted(names)
    if shutil.which("c++filt") is None:
        return names
    return subprocess.run(["c++filt"], input="\n".join(names), check=True, capture_output=True,
                          text=True).stdout.splitlines()


def shared_functions(units: dict[str, str], others: list[str]) -> dict[str, list[str]]:
    """Per unit, the functions of its object that another object of the library defines too."""
    found = {}
    for unit, obj in units.items():
        elsewhere = set().union(*(defined_functions(o) for o in others + [u for u in units.values() if u != obj]))
        found[unit] = demangled(defined_functions(obj) & elsewhere)
    return found


def foreign_functions(units: dict[str, str]) -> dict[str, list[str]]:
    """Per unit, the functions of its object named outside its namespaces (AVX2 for *_avx2.cpp):
    none of them may carry the unit's kernels, smskd::cpu::<ISA>::loss_rows_kernel, to count."""
    found = {}
    for unit, obj in units.items():
        capability = os.path.splitext(unit)[0].rsplit("_", 1)[-1].upper()  # loss_rows_simd_avx2 -> AVX2
        own = re.compile(rf"(?<![0-9]){len(capability)}{capability}[0-9]")  # the mangled component "4AVX2"
        functions = defined_functions(obj)
        assert any(own.search(name) and "loss_rows_kernel" in name for name in functions), \
            f"{unit}: no smskd::cpu::{capability}::loss_rows_kernel in {obj}"
        found[unit] = demangled(name for name in functions if not own.search(name))
    return found


def test_no_function_of_an_isa_object_is_defined_elsewhere():
    units, others = objects()
    assert shared_functions(units, others) == {unit: [] for unit in units}


def test_every_function_of_an_isa_object_is_named_in_its_namespace():
    units, _ = objects()
    assert foreign_functions(units) == {unit: [] for unit in units}


def test_the_checks_find_an_inline_function_emitted_in_both(tmp_path):
    """The hazard itself, in two small objects: both checks must name the shared inline function."""
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None or shutil.which("readelf") is None or platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("needs an x86-64 C++ compiler and readelf")
    header = "__attribute__((noinline)) inline int twice(int x) { return 2 * x; }\n"
    (tmp_path / "base.cpp").write_text(header + "int base(int x) { return twice(x); }\n")
    (tmp_path / "simd_avx2.cpp").write_text(
        header + "namespace smskd::cpu::AVX2 { int loss_rows_kernel(int x) { return twice(x); } }\n")
    for name, flags in (("base", []), ("simd_avx2", ["-mavx2"])):
        subprocess.run([compiler, "-O2", "-std=c++17", *flags, "-c", str(tmp_path / f"{name}.cpp"), "-o",
                        str(tmp_path / f"{name}.o")], check=True)
    units = {"simd_avx2.cpp": str(tmp_path / "simd_avx2.o")}
    assert shared_functions(units, [str(tmp_path / "base.o")]) == {"simd_avx2.cpp": ["twice(int)"]}
    assert foreign_functions(units) == {"simd_avx2.cpp": ["twice(int)"]}
