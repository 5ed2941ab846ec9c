"""A pytest plugin for time-boxed runs (benchmarks/gpu/run_all.sh): per-test timeout and a progress file.

Both are off unless their environment variable is set (xdist workers inherit it):

SMSKD_TEST_TIMEOUT=N     a test (setup, call and teardown) running past N seconds fails:
                         SIGALRM raises in the test's thread ("soft"); if the test is stuck in C
                         code that never returns to Python, a watchdog thread (at N + G/2) or,
                         if even it cannot run, faulthandler (at N + G; G = SMSKD_TEST_HARD_GRACE,
                         default 30) dumps every thread's stack to stderr and exits the process;
                         under xdist the controller then reports the test as crashed and starts
                         a new worker. (pytest-timeout does the same, but the GPU machine may not
                         have it and cannot download it.) Marker no_timeout exempts a test.
SMSKD_TEST_PROGRESS=PATH one line per test outcome, appended to PATH as it happens, so a run cut
                         short still says what passed, what failed and why:
                             FAILED  call    3.21s tests/x.py::test_y[a] | AssertionError: ... | ...
                         Each line is one os.write on an O_APPEND descriptor (atomic between
                         processes on a local file system), so xdist workers share the file.
                         Under xdist, workers write their own tests' lines and the controller
                         writes only the lines workers cannot (a crashed worker's test) and
                         the final summary.
SMSKD_TEST_FIRST="a.py b.py" runs the tests of those files (path prefixes, as given) first, in that order,
the rest after them (pytest orders a file given beside its directory by the directory's walk).
With SMSKD_TEST_PROGRESS set, an xdist worker whose test failed with a sticky CUDA error (a device-side
assertion, an illegal address: the process's CUDA context is unusable from then on) exits after
that test, so that xdist starts a fresh worker instead of failing every later test of this one.
"""
from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
import time

import pytest

TIMEOUT_ENV = "SMSKD_TEST_TIMEOUT"
HARD_GRACE_ENV = "SMSKD_TEST_HARD_GRACE"
PROGRESS_ENV = "SMSKD_TEST_PROGRESS"
MAX_LINE = 1500  # characters of one progress line; the failure's first lines, joined
# Errors after which a process's CUDA context stays unusable.
STICKY_CUDA_ERRORS = ("device-side assert triggered", "illegal memory access", "unspecified launch failure",
                      "misaligned address", "illegal instruction", "CUDA error: an illegal")


def _timeout_seconds() -> float:
    value = os.environ.get(TIMEOUT_ENV, "")
    return float(value) if value else 0.0


class TestTimeout(Exception):
    """Raised in a test that ran past SMSKD_TEST_TIMEOUT seconds."""


def _is_xdist_controller(config) -> bool:
    return not hasattr(config, "workerinput") and getattr(config.option, "numprocesses", None) not in (None, 0)


def _append_line(text: str) -> None:
    path = os.environ.get(PROGRESS_ENV)
    if not path:
        return
    line = " ".join(text.split("\n"))[:MAX_LINE] + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode("utf-8", "replace"))  # one write per line: no interleaving
    finally:
        os.close(fd)


def _failure_text(report) -> str:
    """The exception's message (its first lines) and where it was raised, on one line."""
    longrepr = report.longrepr
    crash = getattr(longrepr, "reprcrash", None)
    if crash is not None:
        message, where = crash.message, f"{os.path.basename(str(crash.path))}:{crash.lineno}"
    elif isinstance(longrepr, tuple) and len(longrepr) == 3:  # a skip: (path, line, reason)
        message, where = str(longrepr[2]), f"{os.path.basename(str(longrepr[0]))}:{longrepr[1]}"
    else:
        message, where = str(longrepr), ""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return " | ".join(lines[:12]) + (f" @ {where}" if where else "")


def _progress_line(report) -> str:
    outcome = report.outcome.upper()
    if hasattr(report, "wasxfail"):
        outcome = "XFAIL" if report.skipped else "XPASS"
    text = f"{outcome:7s} {report.when:8s} {report.duration:7.2f}s {report.nodeid}"
    if report.failed or report.skipped:
        text += " | " + _failure_text(report)
    return text


_STATE: dict = {"config": None, "collect_errors": set()}


def pytest_configure(config):
    _STATE["config"] = config
    config.addinivalue_line("markers", "no_timeout: exempt from SMSKD_TEST_TIMEOUT")
    if os.environ.get(PROGRESS_ENV) and not hasattr(config, "workerinput"):
        _append_line(f"# session start {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} pid {os.getpid()} "
                     f"args {' '.join(config.invocation_params.args)} per-test timeout {_timeout_seconds() or 'none'} s")


FIRST_ENV = "SMSKD_TEST_FIRST"


def pytest_collection_modifyitems(session, config, items):
    """Moves the items of SMSKD_TEST_FIRST's files to the front (stable: every xdist worker agrees)."""
    prefixes = os.environ.get(FIRST_ENV, "").split()
    if not prefixes:
        return

    def rank(item):
        return next((i for i, prefix in enumerate(prefixes) if item.nodeid.startswith(prefix)), len(prefixes))

    items[:] = sorted(items, key=rank)


def pytest_collectreport(report):
    """A module that fails to import or collect: one line, from the controller (workers would repeat it)."""
    config = _STATE["config"]
    if not os.environ.get(PROGRESS_ENV) or not report.failed or config is None or hasattr(config, "workerinput"):
        return
    if report.nodeid not in _STATE["collect_errors"]:
        _STATE["collect_errors"].add(report.nodeid)
        _append_line(f"ERROR   collect  {report.nodeid} | {_failure_text(report)}")


def pytest_runtest_logreport(report):
    config = _STATE["config"]
    if not os.environ.get(PROGRESS_ENV) or config is None:
        return
    if _is_xdist_controller(config):
        # The worker wrote its own line, except when it crashed (hard timeout, segfault).
        if not (report.failed and "crashed" in str(report.longrepr)):
            return
    if report.when == "call" or (report.when == "setup" and not report.passed) or (
            report.when == "teardown" and report.failed) or report.when not in ("setup", "call", "teardown"):
        _append_line(_progress_line(report))
    if hasattr(config, "workerinput") and report.failed and any(e in str(report.longrepr) for e in STICKY_CUDA_ERRORS):
        _STATE["sticky_cuda_error"] = report.nodeid


def pytest_runtest_logfinish(nodeid, location):
    if _STATE.get("sticky_cuda_error") and os.environ.get(PROGRESS_ENV):
        worker = _STATE["config"].workerinput.get("workerid", "?")
        _append_line(f"# worker {worker} exits after a sticky CUDA error in {nodeid}: its CUDA context is unusable; "
                     "xdist starts a new worker")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(4)


def pytest_sessionfinish(session, exitstatus):
    if not os.environ.get(PROGRESS_ENV) or hasattr(session.config, "workerinput"):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    counts = {}
    if reporter is not None:
        for key in ("passed", "failed", "error", "skipped", "xfailed", "xpassed"):
            counts[key] = len(reporter.stats.get(key, []))
    _append_line(f"# session end, exit status {int(exitstatus)}: " + " ".join(f"{k}={v}" for k, v in counts.items()))


def _on_alarm(signum, frame):
    where = f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno} in {frame.f_code.co_name}" if frame else "?"
    raise TestTimeout(f"test ran past {TIMEOUT_ENV}={os.environ.get(TIMEOUT_ENV)} seconds (soft timeout, SIGALRM); "
                      f"it was at {where}")


def _hard_stop(nodeid: str, seconds: float) -> None:
    """The test ignored SIGALRM (stuck in C code) but another thread can still run: say so, dump, exit."""
    _append_line(f"FAILED  hard     {seconds:7.2f}s {nodeid} | hard timeout: no return to Python within "
                 f"{seconds:.0f} s; stacks on stderr; process exits")
    faulthandler.dump_traceback(file=sys.__stderr__, all_threads=True)
    os._exit(3)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    seconds = _timeout_seconds()
    usable = (seconds > 0 and item.get_closest_marker("no_timeout") is None and hasattr(signal, "SIGALRM")
              and threading.current_thread() is threading.main_thread())
    if not usable:
        yield
        return
    grace = float(os.environ.get(HARD_GRACE_ENV, "30"))
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    # Hard stops for a test stuck where SIGALRM's Python handler cannot run: a Python thread (needs
    # the GIL) and, as the last resort, faulthandler's C thread (exits without a progress line).
    watchdog = threading.Timer(seconds + grace / 2, _hard_stop, (item.nodeid, seconds + grace / 2))
    watchdog.daemon = True
    watchdog.start()
    faulthandler.dump_traceback_later(seconds + grace, exit=True, file=sys.__stderr__)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        watchdog.cancel()
        faulthandler.cancel_dump_traceback_later()
