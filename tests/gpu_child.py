"""Child processes for the GPU tests that trip a device-side assertion.

A device-side assertion (or a trap) leaves the CUDA context unusable for the rest of the
process, so such a case runs in a child: this repository's smskd_fast (cwd and PYTHONPATH at
the repository root, whatever the parent's working directory), a timeout well inside a test's
time box, and the failure checked on stdout and stderr together (the device prints the
assertion's text on stdout; the host error names "device-side assert" on stderr).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_child(code: str, timeout: float = 90) -> subprocess.CompletedProcess:
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=ROOT,
                          env=environment, timeout=timeout)


def assert_fails_loudly(result: subprocess.CompletedProcess, *messages: str) -> None:
    """The child failed, and its output names one of messages."""
    output = result.stdout + result.stderr
    assert result.returncode != 0, f"the child did not fail; its output:\n{output[-2000:]}"
    assert any(message in output for message in messages), output[-2000:]
