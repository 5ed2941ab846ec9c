"""Loads the compiled operator library smskd_fast._C and remembers why it failed.

Importing _C runs its TORCH_LIBRARY registrations (the smskd_fast:: operators).
A missing or broken build is not fatal: the reference backend still works, and
available_backends() reports the reason. A library compiled against another minor
release of torch than the one running is refused: PyTorch keeps its C++ ABI within
a minor release only, so such a library may load and then crash or compute wrong
values; one compiled against a nightly or a source build of torch is refused under
any other torch. A mismatch happens when pip builds the package in an isolated
environment, which installs the newest torch there, not the one in the user's.
"""
from __future__ import annotations

import importlib
import re
import warnings
from typing import Optional, Tuple

import torch  # loads libtorch and libc10, which _C links against

# --no-binary and --no-cache-dir: neither a published wheel nor one pip cached from an earlier build.
REBUILD = ("rebuild it against the running torch: pip install --no-build-isolation --no-binary smskd-fast "
           "--no-cache-dir --force-reinstall --no-deps smskd-fast (in a checkout: pip install -e . "
           "--no-build-isolation)")


def minor_release(version: str) -> Tuple[int, int]:
    """(major, minor) of a torch version string: "2.14.1+cu130" -> (2, 14)."""
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def is_release(version: str) -> bool:
    """Whether a torch version is a release ("2.14.1", "2.14.1+cu130"), not a nightly ("2.15.0.dev20261201")
    or a source build ("2.15.0a0+git1234567"). (PyTorch's release candidates carry the release's version.)"""
    return re.fullmatch(r"\d+(\.\d+)*", version.split("+")[0]) is not None


def abi_mismatch(built_with: Optional[str], running: str) -> Optional[str]:
    """Why a _C compiled against torch built_with must not run under torch running, or None when both
    are the same minor release, or the very same pre-release: two nightlies or source builds of one
    release may differ in ABI. built_with is None for a library that does not record it (built before
    it did); builds before stop 40, and CMake's, record MAJOR.MINOR.PATCH only (a release)."""
    if built_with is None:
        return f"smskd_fast._C does not record the torch it was compiled against (an old build): {REBUILD}"
    if not (is_release(built_with) and is_release(running)):
        if built_with != running:
            return (f"smskd_fast._C was compiled against torch {built_with} but torch {running} is running "
                    f"(a nightly or source build of torch has a C++ ABI of its own): {REBUILD}")
        return None
    try:
        same = minor_release(built_with) == minor_release(running)
    except ValueError:  # not MAJOR.MINOR...: nothing to vouch for the library
        same = False
    if not same:
        return (f"smskd_fast._C was compiled against torch {built_with} but torch {running} is running "
                f"(PyTorch's C++ ABI changes between minor releases): {REBUILD}")
    return None


def load_error() -> Optional[str]:
    """Imports smskd_fast._C; why it cannot be used, or None when it can."""
    try:
        library = importlib.import_module("smskd_fast._C")
    except ModuleNotFoundError as error:
        return f"smskd_fast._C could not be imported: {error} (the package was installed without its compiled part)"
    except ImportError as error:  # an undefined symbol: most often compiled against another torch
        return f"smskd_fast._C could not be imported: {error}; if it was compiled against another torch, {REBUILD}"
    mismatch = abi_mismatch(getattr(library, "BUILT_WITH_TORCH", None), torch.__version__)
    if mismatch:  # unlike a missing build, a refused one was meant to run: say so once, at import
        warnings.warn(mismatch, RuntimeWarning, stacklevel=2)
    return mismatch


_LOAD_ERROR = load_error()


def extension_loaded() -> bool:
    """True when the compiled operator library is loaded and was compiled against this torch's minor release."""
    return _LOAD_ERROR is None


def extension_error() -> str | None:
    """Why the compiled library is not usable, or None when it is."""
    return _LOAD_ERROR


def require_extension() -> None:
    """Raises RuntimeError(extension_error()) where the compiled library is not usable. For callers of its
    operators outside the backends (benchmarks): a refused library is loaded, and its operators callable."""
    if _LOAD_ERROR is not None:
        raise RuntimeError(_LOAD_ERROR)
