"""The package's layers import only downwards: cli -> training -> loss (the API) -> backends -> ops.

Every module under smskd_fast/ is parsed (ast, nothing imported) and each import of a
smskd_fast module, absolute or relative, at any depth (inside functions too), is checked
against RULES: a module in a layer must not import the layers listed for it.
huggingface.py may import the loss layer only; bench/ the loss and backends layers; provenance.py,
which every layer may use, imports nothing of the package.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "smskd_fast"
LAYERS = ("ops", "backends", "loss", "training", "bench", "cli", "huggingface", "provenance")
# layer -> the layers it must not import
RULES = {
    "ops": {"backends", "loss", "training", "bench", "cli", "huggingface"},
    "backends": {"loss", "training", "bench", "cli", "huggingface"},
    "loss": {"training", "bench", "cli", "huggingface"},
    "training": {"bench", "cli", "huggingface"},
    "bench": {"training", "cli", "huggingface"},
    "huggingface": {"backends", "ops", "training", "bench", "cli"},
    "provenance": {"ops", "backends", "loss", "training", "bench", "cli", "huggingface"},
}


def layer_of(module: str) -> str | None:
    """The layer of a dotted smskd_fast module name (None: the package root or outside the package)."""
    parts = module.split(".")
    if parts[0] != "smskd_fast" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in LAYERS else None


def imported_modules(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, dotted name) of every smskd_fast module that source (the module `module`) imports."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the importing module's package
                package = module.split(".")
                package = package if is_package else package[:-1]
                base = ".".join(package[: len(package) - node.level + 1])
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            # `from smskd_fast import loss` imports smskd_fast.loss
            found += [(node.lineno, f"{name}.{alias.name}" if layer_of(name) is None else name)
                      for alias in node.names]
    return [(line, name) for line, name in found if name.split(".")[0] == "smskd_fast"]


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """The imports of source that break RULES, as 'module:line imports name (layer -> layer)'."""
    own = layer_of(module)
    forbidden = RULES.get(own, set())
    return [f"{module}:{line} imports {name} ({own} -> {layer_of(name)})"
            for line, name in imported_modules(source, module, is_package) if layer_of(name) in forbidden]


def package_modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(relative.parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        yield ".".join(parts), path, is_package


def test_every_module_imports_only_lower_layers():
    found = []
    checked = 0
    for module, path, is_package in package_modules():
        checked += 1
        found += violations(path.read_text(), module, is_package)
    assert checked > 30, f"only {checked} modules found under {PACKAGE}"
    assert not found, "\n".join(found)


def test_every_layer_has_modules():
    layers = {layer_of(module) for module, _, _ in package_modules()}
    assert set(LAYERS) <= layers, set(LAYERS) - layers


@pytest.mark.parametrize("module, source, expected", [
    ("smskd_fast.backends.planted", "from smskd_fast.loss.validation import check_options", "backends -> loss"),
    ("smskd_fast.backends.planted", "def f():\n    import smskd_fast.training.trainer", "backends -> training"),
    ("smskd_fast.ops.planted", "from smskd_fast.backends import registry", "ops -> backends"),
    ("smskd_fast.ops.planted", "from ..loss import functional", "ops -> loss"),
    ("smskd_fast.loss.planted", "from smskd_fast import cli", "loss -> cli"),
    ("smskd_fast.loss.planted", "from smskd_fast.bench.harness import git_commit", "loss -> bench"),
    ("smskd_fast.huggingface", "from smskd_fast.backends import resolve_backend", "huggingface -> backends"),
    ("smskd_fast.bench.planted", "from smskd_fast.training import trainer", "bench -> training"),
    ("smskd_fast.training.planted", "from smskd_fast.bench.harness import eager_smskd_loss", "training -> bench"),
    ("smskd_fast.provenance", "from smskd_fast.ops import schema", "provenance -> ops"),
])
def test_the_checker_flags_a_planted_bad_import(module, source, expected):
    """Negative control: a module string with one upward import is flagged, naming the two layers."""
    found = violations(source, module)
    assert len(found) == 1 and expected in found[0], found


@pytest.mark.parametrize("module, source", [
    ("smskd_fast.loss.planted", "from smskd_fast.backends.base import LossOptions"),
    ("smskd_fast.backends.planted", "from . import topk\nfrom smskd_fast.ops import registration"),
    ("smskd_fast.bench.planted", "from smskd_fast.loss.functional import smskd_loss\nimport smskd_fast.backends"),
    ("smskd_fast.huggingface", "from smskd_fast.loss.fused_linear import fused_linear_smskd_loss"),
    ("smskd_fast.training.planted", "import torch\nfrom smskd_fast.loss import functional"),
    ("smskd_fast.training.planted", "from smskd_fast.provenance import git_commit"),
])
def test_the_checker_passes_downward_imports(module, source):
    assert violations(source, module) == []
