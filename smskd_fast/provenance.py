"""Where a result came from: the commit of the checkout this package runs from.

Used by every result file (benchmarks, study reports), so it sits below all layers and
imports nothing of the package.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

__all__ = ["git_commit"]


def git_commit() -> str:
    """The commit of the checkout this package runs from, "+dirty" with uncommitted changes:
    every result file records it, whatever the working directory of the run. SMSKD_COMMIT
    names it where the tree is a copy without .git (the GPU machine); "unknown" without git."""
    if os.environ.get("SMSKD_COMMIT"):
        return os.environ["SMSKD_COMMIT"]
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(commit) and bool(git("status", "--porcelain", "--untracked-files=no"))
    except OSError:  # no git on this machine
        return "unknown"
    return (commit or "unknown") + ("+dirty" if dirty else "")
