"""Builds smskd_fast._C: the CPU operators always, the CUDA ones when possible.

CUDA sources (csrc/cuda/*.cu, kernels/*.cu) are compiled for sm_80 and sm_90
whenever the installed torch is a CUDA build and nvcc is found, so that a
machine without a GPU still compiles (and so checks) every kernel.
Set SMSKD_FAST_NO_CUDA=1 to build the CPU part only, and SMSKD_FAST_SKIP_EXTENSION=1
to install the Python package without building (the Makefile builds the extension
in place first, incrementally, then installs the package editable this way).
The instruction-set copies of the CPU kernels compile with per-file flags from
csrc/cpu/isa_units.json, the list that CMakeLists.txt reads too.
"""
from __future__ import annotations

import glob
import json
import os
import platform
import re
import shutil
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional

import setuptools
import torch
from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
CUDA_ARCHS = ("80", "90")
ISA_UNITS = "csrc/cpu/isa_units.json"
# pyproject.toml's license is an SPDX string (PEP 639), which setuptools reads from 77.0.3 on; older ones
# stop with a schema error about `project.license`. [build-system] asks for the same version.
SETUPTOOLS_MIN = (77, 0, 3)


def require_setuptools(version: str) -> None:
    """Stops the build with what to install when setuptools `version` is older than SETUPTOOLS_MIN
    (a build without isolation, --no-build-isolation, uses the environment's own setuptools)."""
    if tuple(int(part) for part in re.findall(r"\d+", version)[:3]) < SETUPTOOLS_MIN:
        wanted = ".".join(map(str, SETUPTOOLS_MIN))
        raise SystemExit(f"smskd-fast needs setuptools >= {wanted} to build (pyproject.toml's SPDX license string); "
                         f"this environment has setuptools {version}: pip install 'setuptools>={wanted}'")


def sources(*patterns: str) -> list[str]:
    """Repository-relative paths matching the patterns, sorted for stable builds."""
    found: list[str] = []
    for pattern in patterns:
        found += sorted(glob.glob(pattern, root_dir=ROOT, recursive=True))
    return found


def cuda_build_reason() -> str | None:
    """None when the CUDA part should be built, else why not."""
    if os.environ.get("SMSKD_FAST_NO_CUDA", "0") not in ("", "0"):
        return "SMSKD_FAST_NO_CUDA is set"
    if torch.version.cuda is None:
        return "the installed torch is not a CUDA build"
    if cpp_extension.CUDA_HOME is None:
        return "no CUDA toolkit found (set CUDA_HOME)"
    nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    if not os.path.exists(nvcc) and shutil.which("nvcc") is None:
        return f"nvcc not found under CUDA_HOME={cpp_extension.CUDA_HOME}"
    return None


def pip_cuda_include_dirs() -> list[str]:
    """Headers of the pip-installed CUDA runtime that CUDA builds of torch depend on."""
    site = sysconfig.get_paths()["purelib"]
    return [path for path in glob.glob(os.path.join(site, "nvidia", "cu*", "include")) if os.path.isdir(path)]


def isa_unit_flags() -> dict[str, list[str]]:
    """Absolute source path -> its extra instruction-set flags, for this machine's architecture."""
    with open(os.path.join(ROOT, ISA_UNITS)) as f:
        units = json.load(f)["units"]
    machine = platform.machine().lower()
    arch = "x86_64" if machine == "amd64" else machine
    return {os.path.join(ROOT, path): flags for path, flags in units.get(arch, {}).items()}


def with_cxx_flags(extra_postargs: dict | list | None, flags: list[str]) -> dict | list:
    """extra_postargs (torch's {"cxx": ..., "nvcc": ...} or a list) with flags added for the C++ compiler."""
    if isinstance(extra_postargs, dict):
        return {**extra_postargs, "cxx": [*extra_postargs.get("cxx", []), *flags]}
    return [*(extra_postargs or []), *flags]


class BuildExtension(cpp_extension.BuildExtension):
    """torch's ninja build, plus per-file flags for the instruction-set units.

    torch writes one ninja file with the same flags for every source, so each unit
    of isa_unit_flags() is compiled by its own call (own build directory, so
    incremental too) with its flags appended, beside the main call where MAX_JOBS
    allows. Its object is linked after all the others, so that where a header's
    inline function is emitted in both a baseline and an instruction-set object the
    linker keeps the baseline copy (tests/test_isa_objects.py checks that no such
    shared copy exists at all).
    """

    def build_extension(self, ext) -> None:
        compile_sources = self.compiler.compile
        units = isa_unit_flags()

        def compile_with_unit_flags(sources, output_dir=None, extra_postargs=None, **kwargs):
            plain = [s for s in sources if os.path.join(ROOT, s) not in units]
            isa = [s for s in sources if os.path.join(ROOT, s) in units]

            def compile_unit(source: str) -> list[str]:
                unit_dir = os.path.join(output_dir, "isa", os.path.splitext(os.path.basename(source))[0])
                flags = units[os.path.join(ROOT, source)]
                return compile_sources([source], output_dir=unit_dir,
                                       extra_postargs=with_cxx_flags(extra_postargs, flags), **kwargs)

            # The units compile beside the main ninja run where MAX_JOBS leaves cores for them
            # (a GPU machine), else one after another after it (MAX_JOBS=1 or 2 here).
            beside = int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1) > len(isa)
            with ThreadPoolExecutor(max_workers=max(1, len(isa))) as pool:
                early = [pool.submit(compile_unit, source) for source in isa] if beside else []
                objects = compile_sources(plain, output_dir=output_dir, extra_postargs=extra_postargs,
                                          **kwargs) if plain else []
                for job in early:
                    objects += job.result()
                for source in [] if beside else isa:
                    objects += compile_unit(source)
            return objects

        self.compiler.compile = compile_with_unit_flags
        try:
            super().build_extension(ext)
        finally:
            self.compiler.compile = compile_sources


# Written at build time under build/ (not in git or the sdist: it names the builder's torch), on the include
# path of this build's C++ compiles only: csrc/ops.cpp includes it with <>, so that a CMake build, which does
# not look there, records torch's MAJOR.MINOR.PATCH instead of what another build last wrote.
GENERATED_INCLUDE_DIR = os.path.join(ROOT, "build", "generated")
TORCH_VERSION_HEADER = os.path.join(GENERATED_INCLUDE_DIR, "smskd_fast_built_with_torch.h")


def record_torch_version(path: str = TORCH_VERSION_HEADER) -> None:
    """Writes torch.__version__ where _C's BUILT_WITH_TORCH reads it: the whole version, so that a nightly
    or a source build of torch is told from another build of the same release (torch's own header gives
    MAJOR.MINOR.PATCH only). Rewritten only when it changes, so that an incremental build stays one."""
    text = ("// Generated by setup.py: the torch this build compiled against (smskd_fast/ops/extension.py).\n"
            f"#define SMSKD_FAST_BUILT_WITH_TORCH {json.dumps(torch.__version__)}\n")
    if not os.path.exists(path) or open(path).read() != text:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as header:
            header.write(text)


def cuda_gencode_flags(arch_list: Optional[str]) -> List[str]:
    """nvcc's -gencode flags for TORCH_CUDA_ARCH_LIST (e.g. "9.0", "8.0;9.0+PTX", "9.0a"), CUDA_ARCHS when
    unset. Ours are explicit, and torch's cpp_extension then adds none of its own (it leaves the list to
    any nvcc flag naming an arch), so the list is read here: without it a build for one GPU compiled
    every default architecture (twice the device compile time of run_all.sh's build)."""
    entries = (arch_list or "").replace(";", " ").split() or [f"{a[0]}.{a[1]}" for a in CUDA_ARCHS]
    flags = []
    for entry in entries:
        match = re.fullmatch(r"(\d+)\.(\d)([af]?)(\+PTX)?", entry)
        if match is None:
            raise SystemExit(f"TORCH_CUDA_ARCH_LIST: expected compute capabilities such as '9.0' or '8.0+PTX' "
                             f"separated by ';' or spaces, got {entry!r} in {arch_list!r}")
        arch = match.group(1) + match.group(2) + match.group(3)
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
        if match.group(4):
            flags.append(f"-gencode=arch=compute_{arch},code=compute_{arch}")
    return flags


def extension() -> cpp_extension.CppExtension:
    record_torch_version()
    # py_limited_api=True defines Py_LIMITED_API; the generated header's folder for the C++ compiles only
    cxx_flags = ["-O3", "-fopenmp", f"-I{GENERATED_INCLUDE_DIR}"]
    include_dirs = [os.path.join(ROOT, "kernels"), os.path.join(ROOT, "csrc")]
    cpu_sources = sources("csrc/*.cpp", "csrc/cpu/*.cpp")
    reason = cuda_build_reason()
    if reason is not None:
        print(f"smskd_fast: building the CPU operators only ({reason})")
        return cpp_extension.CppExtension(
            "smskd_fast._C", cpu_sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"], py_limited_api=True,
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", ";".join(f"{a[0]}.{a[1]}" for a in CUDA_ARCHS))
    gencode = cuda_gencode_flags(os.environ["TORCH_CUDA_ARCH_LIST"])
    nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo", "-Xptxas=-warn-spills", *gencode]
    cuda_sources = sources("csrc/cuda/*.cpp", "csrc/cuda/*.cu", "kernels/*.cu")
    print(f"smskd_fast: building CPU and CUDA operators for {', '.join(flag.split('code=')[1] for flag in gencode)}")
    return cpp_extension.CUDAExtension(
        "smskd_fast._C", cpu_sources + cuda_sources,
        include_dirs=include_dirs + pip_cuda_include_dirs(),
        extra_compile_args={"cxx": cxx_flags + ["-DSMSKD_FAST_WITH_CUDA"], "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"], py_limited_api=True,
    )


if __name__ == "__main__":  # setuptools runs this file as __main__ (python setup.py, pip's PEP 517 builds)
    require_setuptools(setuptools.__version__)
    setup(
        ext_modules=[] if os.environ.get("SMSKD_FAST_SKIP_EXTENSION", "0") not in ("", "0") else [extension()],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        options={"bdist_wheel": {"py_limited_api": "cp310"}},
    )
