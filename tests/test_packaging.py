"""Building from source: setup.py stops early, naming what to install, where the environment's setuptools
cannot read pyproject.toml (a build with --no-build-isolation uses that setuptools; Python 3.11's venvs bring
65.5, which rejects the SPDX license string with a schema error about `project.license`)."""
import os
import runpy
import subprocess
import sys

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUP_PY = os.path.join(ROOT, "setup.py")


@pytest.fixture(scope="module")
def setup_module_namespace() -> dict:
    """setup.py's functions and constants, without running setup() (it runs only as __main__)."""
    return runpy.run_path(SETUP_PY, run_name="smskd_setup_under_test")


@pytest.mark.parametrize("version", ["65.5.0", "76.1.0", "77.0.2"])
def test_older_setuptools_stops_the_build_naming_what_to_install(setup_module_namespace, version):
    with pytest.raises(SystemExit) as stopped:
        setup_module_namespace["require_setuptools"](version)
    message = str(stopped.value)
    assert f"setuptools {version}" in message and "pip install 'setuptools>=77.0.3'" in message


@pytest.mark.parametrize("version", ["77.0.3", "80.9.0", "81.0.0.post1", "84.2.1"])
def test_setuptools_from_77_0_3_builds(setup_module_namespace, version):
    setup_module_namespace["require_setuptools"](version)


def test_build_system_asks_for_the_version_setup_py_checks(setup_module_namespace):
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        requires = tomllib.load(f)["build-system"]["requires"]
    wanted = ".".join(map(str, setup_module_namespace["SETUPTOOLS_MIN"]))
    assert f"setuptools>={wanted}" in requires


def run_setup_py_version(setuptools_version: str | None) -> subprocess.CompletedProcess:
    """`python setup.py --version` as setuptools runs it (as __main__), with setuptools reporting
    setuptools_version when given; the extension is not built."""
    fake = "" if setuptools_version is None else f"setuptools.__version__ = {setuptools_version!r}; "
    code = (f"import runpy, sys, setuptools; {fake}sys.argv = ['setup.py', '--version']; "
            f"runpy.run_path({SETUP_PY!r}, run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env=dict(os.environ, SMSKD_FAST_SKIP_EXTENSION="1"))


def test_setup_py_checks_setuptools_before_reading_pyproject():
    old = run_setup_py_version("65.5.0")
    assert old.returncode != 0
    assert "smskd-fast needs setuptools >= 77.0.3" in old.stderr
    assert "project.license" not in old.stderr  # stopped before setuptools read the configuration
    current = run_setup_py_version(None)
    assert current.returncode == 0, current.stderr[-2000:]
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        assert current.stdout.split()[-1] == tomllib.load(f)["project"]["version"]


@pytest.mark.parametrize("arch_list, flags", [
    (None, ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]),
    ("", ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]),
    ("9.0", ["-gencode=arch=compute_90,code=sm_90"]),
    ("8.0 9.0a", ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a"]),
    ("8.6;10.0+PTX", ["-gencode=arch=compute_86,code=sm_86", "-gencode=arch=compute_100,code=sm_100",
                      "-gencode=arch=compute_100,code=compute_100"]),
])
def test_the_cuda_build_compiles_the_architectures_torch_cuda_arch_list_names(setup_module_namespace, arch_list, flags):
    """run_all.sh builds for the GPU it runs on (TORCH_CUDA_ARCH_LIST=9.0); torch's cpp_extension adds no arch
    flags when any nvcc flag names one, so setup.py's own must follow the list (it always gave 8.0 and 9.0)."""
    assert setup_module_namespace["cuda_gencode_flags"](arch_list) == flags


def test_a_malformed_cuda_arch_list_names_the_variable(setup_module_namespace):
    with pytest.raises(SystemExit, match=r"TORCH_CUDA_ARCH_LIST: expected compute capabilities .* got 'sm_90'"):
        setup_module_namespace["cuda_gencode_flags"]("sm_90")
