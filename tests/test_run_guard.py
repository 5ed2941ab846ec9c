"""tests/run_guard.py (per-test timeout, progress file) on a small pytest run in a child process."""
import os
import subprocess
import sys
import textwrap

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))

CASES = textwrap.dedent("""
    import signal, time

    def test_passes():
        pass

    def test_fails():
        assert 1 == 2, "first line of the failure\\nsecond line"

    def test_sleeps_past_the_timeout():
        time.sleep(60)

    def test_ignores_sigalrm():
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])
        time.sleep(60)
""")


def run_cases(tmp_path, **env):
    (tmp_path / "test_cases.py").write_text(CASES)
    progress = tmp_path / "progress.txt"
    environment = dict(os.environ, PYTHONPATH=TESTS, SMSKD_TEST_PROGRESS=str(progress), **env)
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "run_guard", "-p", "no:cacheprovider", "-q",
                           "test_cases.py"], cwd=tmp_path, env=environment, capture_output=True, text=True,
                          timeout=120)
    return done, progress.read_text().splitlines()


def test_timeouts_fail_the_test_and_every_outcome_is_a_line(tmp_path):
    done, lines = run_cases(tmp_path, SMSKD_TEST_TIMEOUT="1", SMSKD_TEST_HARD_GRACE="2")
    assert done.returncode != 0
    by_test = {line.split()[3].split("::")[-1]: line for line in lines if not line.startswith("#")}
    assert by_test["test_passes"].startswith("PASSED  call")
    assert by_test["test_fails"].startswith("FAILED  call")
    assert "first line of the failure | second line" in by_test["test_fails"]
    assert "soft timeout" in by_test["test_sleeps_past_the_timeout"]
    assert "test_cases.py:11 in test_sleeps_past_the_timeout" in by_test["test_sleeps_past_the_timeout"]
    # SIGALRM blocked: the watchdog thread writes the line and ends the process (no session end line).
    assert by_test["test_ignores_sigalrm"].startswith("FAILED  hard")
    assert lines[0].startswith("# session start") and not lines[-1].startswith("# session end")


def test_off_without_the_variables(tmp_path):
    (tmp_path / "test_cases.py").write_text("def test_passes():\n    pass\n")
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SMSKD_TEST_")}
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "run_guard", "-p", "no:cacheprovider", "-q",
                           "test_cases.py"], cwd=tmp_path, env=dict(environment, PYTHONPATH=TESTS),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".py", ".txt")) == ["test_cases.py"]


def test_a_worker_with_a_sticky_cuda_error_is_replaced(tmp_path):
    """Under xdist, the worker exits after the test (its CUDA context would fail every later test)."""
    pytest.importorskip("xdist")
    (tmp_path / "test_cases.py").write_text(textwrap.dedent("""
        def test_poisons():
            raise RuntimeError("CUDA error: device-side assert triggered")

        def test_later_1():
            pass

        def test_later_2():
            pass
    """))
    progress = tmp_path / "progress.txt"
    environment = dict(os.environ, PYTHONPATH=TESTS, SMSKD_TEST_PROGRESS=str(progress))
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "run_guard", "-p", "no:cacheprovider", "-q", "-n", "1",
                           "test_cases.py"], cwd=tmp_path, env=environment, capture_output=True, text=True,
                          timeout=120)
    text = progress.read_text()
    assert done.returncode == 1 and "exits after a sticky CUDA error in test_cases.py::test_poisons" in text
    assert "PASSED  call" in text.split("test_later_1")[0].splitlines()[-1] and "test_later_2" in text
