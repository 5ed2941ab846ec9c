"""Packages that some training features need but smskd-fast does not depend on (matplotlib for plots,
torchvision for ImageFolder data and torchvision models): imported where used, or refused up front with the
feature that needs them and how to install them, instead of an ImportError at the end of a run."""
from __future__ import annotations

import importlib
from types import ModuleType

import torch

__all__ = ["MissingPackageError", "require", "require_matplotlib", "require_torchvision"]


class MissingPackageError(ImportError):
    """A feature the run asks for needs a package that is not installed; the message names both and the way out."""


def require(package: str, feature: str, way_out: str) -> ModuleType:
    """The imported package, or MissingPackageError naming the feature that needs it and way_out."""
    try:
        return importlib.import_module(package)
    except ImportError as error:
        raise MissingPackageError(f"{feature} needs {package}, which cannot be imported here ({error}); "
                                  f"{way_out}") from None


def require_matplotlib(feature: str) -> ModuleType:
    """matplotlib, for the PNG plots of a run or a study."""
    return require("matplotlib", feature, "pip install matplotlib (or smskd-fast[plots])")


def require_torchvision(feature: str) -> ModuleType:
    """torchvision, which is not a dependency: the wrong release would make pip replace the installed torch."""
    return require("torchvision", feature, f"install the torchvision release built for torch {torch.__version__} "
                                           "(pip install torchvision==<that release>)")
