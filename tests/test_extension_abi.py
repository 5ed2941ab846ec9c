"""smskd_fast._C records the torch it was compiled against, and the package refuses it under another minor
release (smskd_fast/ops/extension.py): PyTorch's C++ ABI changes between minor releases, and pip's isolated
build installs the newest torch in its build environment, not the user's. Found by hand (results README of
torch212_213_215_2026-12-07): a 2.14 build loads under torch 2.15 without an error and ran; under 2.11 it fails with
an undefined symbol. Here the running release is faked instead."""
import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch

from smskd_fast.ops import extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Not "extension_loaded()": a stale or refused build must fail here, not skip.
built_here = pytest.mark.skipif(importlib.util.find_spec("smskd_fast._C") is None,
                                reason="smskd_fast._C is not built here")


@pytest.mark.parametrize("version, release", [("2.14.1", (2, 14)), ("2.15.0+cu132", (2, 15)),
                                              ("2.11.0a0+git1234", (2, 11)), ("3.0.0", (3, 0))])
def test_minor_release(version, release):
    assert extension.minor_release(version) == release


@pytest.mark.parametrize("built, running", [("2.14.1", "2.14.1+cu130"), ("2.14.0", "2.14.1+cpu"),
                                            ("2.11.0", "2.11.0")])
def test_the_same_minor_release_is_accepted(built, running):
    assert extension.abi_mismatch(built, running) is None


@pytest.mark.parametrize("built, running", [("2.15.0", "2.14.1+cu130"), ("2.14.1", "2.15.0+cu132"),
                                            ("2.11.0", "3.11.0")])
def test_another_minor_release_is_refused_naming_both_and_the_rebuild(built, running):
    message = extension.abi_mismatch(built, running)
    assert f"compiled against torch {built} but torch {running} is running" in message
    assert "pip install --no-build-isolation" in message


@pytest.mark.parametrize("built, running", [("2.15.0.dev20261201+cu130", "2.15.0.dev20261201+cu130"),
                                            ("2.15.0a0+git1234567", "2.15.0a0+git1234567")])
def test_the_very_same_pre_release_is_accepted(built, running):
    assert extension.abi_mismatch(built, running) is None


@pytest.mark.parametrize("built, running", [("2.15.0.dev20261201+cu130", "2.15.0.dev20261202+cu130"),
                                            ("2.15.0a0+git1234567", "2.15.0a0+git89abcde"),
                                            ("2.15.0", "2.15.0.dev20261202+cu130")])  # torch's header: 2.15.0 only
def test_another_build_of_a_pre_release_is_refused(built, running):
    """Two nightlies (or source builds) of one release may differ in ABI, and a library that records only
    MAJOR.MINOR.PATCH (built before the whole version was recorded, or by CMake) cannot say which it was."""
    message = extension.abi_mismatch(built, running)
    assert f"compiled against torch {built} but torch {running} is running" in message
    assert "has a C++ ABI of its own" in message and "pip install --no-build-isolation" in message


def test_a_library_that_does_not_record_its_torch_is_refused():
    assert "does not record the torch" in extension.abi_mismatch(None, "2.14.1")


def test_an_unreadable_version_is_refused_not_raised():
    assert "compiled against torch 2 but torch 2.14.1 is running" in extension.abi_mismatch("2", "2.14.1")


@built_here
def test_the_build_records_the_torch_it_was_compiled_against():
    """This checkout's build is accepted, and what it records is the running torch's whole version (setup.py
    writes torch.__version__ into build/generated/smskd_fast_built_with_torch.h; torch's own header gives
    MAJOR.MINOR.PATCH only)."""
    assert extension.extension_error() is None
    extension.require_extension()
    assert importlib.import_module("smskd_fast._C").BUILT_WITH_TORCH == torch.__version__


def test_setup_writes_the_whole_torch_version_and_leaves_an_unchanged_header_alone(tmp_path):
    """The header _C's BUILT_WITH_TORCH is read from: rewritten only when the version changes, so that an
    incremental build does not recompile ops.cpp."""
    spec = importlib.util.spec_from_file_location("smskd_setup", os.path.join(ROOT, "setup.py"))
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)  # setup() runs under __main__ only
    header = tmp_path / "generated" / "smskd_fast_built_with_torch.h"  # the folder made too
    setup.record_torch_version(str(header))
    assert f'#define SMSKD_FAST_BUILT_WITH_TORCH "{torch.__version__}"' in header.read_text()
    os.utime(header, (1, 1))
    setup.record_torch_version(str(header))
    assert header.stat().st_mtime == 1
    header.write_text('#define SMSKD_FAST_BUILT_WITH_TORCH "2.0.0"\n')
    setup.record_torch_version(str(header))
    assert torch.__version__ in header.read_text()


@built_here
def test_under_another_torch_the_compiled_backends_are_refused_and_the_reference_remains():
    """torch.__version__ faked to another minor release before the package is imported: a RuntimeWarning at
    import; the cpu backend is not available, with the reason and the rebuild command; require_extension (the
    benchmarks' guard) raises; a loss on the default backend still runs (the reference, on the CPU)."""
    program = (
        "import torch\n"
        "torch.__version__ = '2.99.0'\n"
        "import smskd_fast\n"
        "from smskd_fast.ops.extension import require_extension\n"
        "status = smskd_fast.available_backends()['cpu']\n"
        "try:\n"
        "    require_extension()\n"
        "except RuntimeError as error:\n"
        "    print('refused:', str(error) == status.reason)\n"
        "print(status.available)\n"
        "print(status.reason)\n"
        "s, t = torch.randn(3, 5), torch.randn(3, 5)\n"
        "print(float(smskd_fast.smskd_loss(s, torch.tensor([0, 1, 2]), t).loss) > 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    refused, available, reason, reference_runs = result.stdout.strip().splitlines()[-4:]
    assert refused == "refused: True" and available == "False" and reference_runs == "True"
    assert "RuntimeWarning: smskd_fast._C was compiled against torch" in result.stderr
    built_with = importlib.import_module("smskd_fast._C").BUILT_WITH_TORCH
    assert f"compiled against torch {built_with} but torch 2.99.0 is running" in reason
    assert "pip install --no-build-isolation" in reason


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler to preprocess csrc/ops.cpp with")
@pytest.mark.parametrize("with_generated_header", [True, False], ids=["setup.py", "cmake"])
def test_only_setup_py_builds_read_the_generated_header(tmp_path, with_generated_header):
    """ops.cpp includes the header with <>: a compile without its folder on the include path (CMake's) records
    torch's TORCH_VERSION, even where setup.py has written the header for another torch (a "" include would
    find one beside ops.cpp first)."""
    from torch.utils import cpp_extension

    folder, source = tmp_path / "generated", tmp_path / "csrc"
    folder.mkdir()
    source.mkdir()
    (folder / "smskd_fast_built_with_torch.h").write_text('#define SMSKD_FAST_BUILT_WITH_TORCH "9.9.9.dev0+x"\n')
    # a stale copy beside ops.cpp, where a "" include would look first: never read
    shutil.copy(os.path.join(ROOT, "csrc", "ops.cpp"), source / "ops.cpp")
    (source / "smskd_fast_built_with_torch.h").write_text('#define SMSKD_FAST_BUILT_WITH_TORCH "8.8.8.dev0+y"\n')
    include = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"], os.path.join(ROOT, "csrc"),
               os.path.join(ROOT, "kernels"), *([str(folder)] if with_generated_header else [])]
    result = subprocess.run(["c++", "-std=c++20", "-E", "-P", str(source / "ops.cpp"),
                             *(f"-I{path}" for path in include)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    recorded = re.search(r'"BUILT_WITH_TORCH",\s*"([^"]*)"', result.stdout).group(1)
    torch_header_version = re.match(r"\d+\.\d+\.\d+", torch.__version__).group(0)  # TORCH_VERSION
    assert recorded == ("9.9.9.dev0+x" if with_generated_header else torch_header_version)
