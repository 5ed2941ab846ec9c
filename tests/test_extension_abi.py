"""smskd_fast._C records the torch it was compiled against, and the package refuses it under another minor
release (smskd_fast/ops/extension.py): PyTorch's C++ ABI changes between minor releases, and pip's isolated
build installs the newest torch in its build environment, not the user's. Checked here: a 2.14 build loads
under torch 2.15 without an error (it would have been used), and fails with an undefined symbol under 2.11."""
import importlib
import os
import subprocess
import sys

import pytest
import torch

from smskd_fast.ops import extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


@pytest.mark.skipif(not extension.extension_loaded(), reason="smskd_fast._C is not built here")
def test_the_build_records_the_torch_it_was_compiled_against():
    library = importlib.import_module("smskd_fast._C")
    assert library.BUILT_WITH_TORCH == torch.__version__.split("+")[0]


@pytest.mark.skipif(not extension.extension_loaded(), reason="smskd_fast._C is not built here")
def test_under_another_torch_the_compiled_backends_are_refused_and_the_reference_remains():
    """torch.__version__ faked to another minor release before the package is imported: the cpu backend is not
    available, with the reason and the rebuild command, and a loss on the reference backend still runs."""
    program = (
        "import torch\n"
        "torch.__version__ = '2.99.0'\n"
        "import smskd_fast\n"
        "status = smskd_fast.available_backends()['cpu']\n"
        "print(status.available)\n"
        "print(status.reason)\n"
        "s, t = torch.randn(3, 5), torch.randn(3, 5)\n"
        "print(float(smskd_fast.smskd_loss(s, torch.tensor([0, 1, 2]), t, backend='reference').loss) > 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    available, reason, reference_runs = result.stdout.strip().splitlines()[-3:]
    assert available == "False" and reference_runs == "True"
    assert f"compiled against torch {torch.__version__.split('+')[0]} but torch 2.99.0 is running" in reason
    assert "pip install --no-build-isolation" in reason
