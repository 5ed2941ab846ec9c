"""smskd_fast._C records the torch it was compiled against, and the package refuses it under another minor
release (smskd_fast/ops/extension.py): PyTorch's C++ ABI changes between minor releases, and pip's isolated
build installs the newest torch in its build environment, not the user's. Found by hand (results README of
torch212_213_215_2026-12-07): a 2.14 build loads under torch 2.15 without an error and ran; under 2.11 it fails with
an undefined symbol. Here the running release is faked instead."""
import importlib
import importlib.util
import os
import subprocess
import sys

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


def test_a_library_that_does_not_record_its_torch_is_refused():
    assert "does not record the torch" in extension.abi_mismatch(None, "2.14.1")


def test_an_unreadable_version_is_refused_not_raised():
    assert "compiled against torch 2 but torch 2.14.1 is running" in extension.abi_mismatch("2", "2.14.1")


@built_here
def test_the_build_records_the_torch_it_was_compiled_against():
    """This checkout's build is accepted, and what it records is the running torch's release (its header gives
    MAJOR.MINOR.PATCH only; a source build of torch runs as e.g. 2.11.0a0+git...)."""
    assert extension.extension_error() is None
    extension.require_extension()
    built_with = importlib.import_module("smskd_fast._C").BUILT_WITH_TORCH
    assert extension.minor_release(built_with) == extension.minor_release(torch.__version__)
    assert torch.__version__.startswith(built_with)


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
