# One-command set-up, demo and tests on a fresh machine (see README.md).
#   make demo   creates .venv, builds the package with its compiled extension, runs the main job
#   make test   the same set-up, then the whole test suite, the CMake/ctest build and the
#               clang build of the CPU part with its tests
PYTHON ?= python3
VENV := .venv
PY := $(abspath $(VENV))/bin/python
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
CMAKE_BUILD := build/cmake
# A second compiler on every run (Debian packages: clang, libomp-dev for its -fopenmp).
CLANG_BUILD := build/clang
CLANG_TESTS := tests/test_cpu_backend.py tests/test_cpu_topk.py tests/test_isa_objects.py
# ... and the conformance suite's cpu cases (the triton interpreter runs do not depend on the compiler).
CLANG_CONFORMANCE := tests/test_backend_conformance.py -k "cpu and not interpreter"
# The CMake build compiles the CUDA library and its standalone tests wherever nvcc is.
CMAKE_ARGS ?= $(if $(wildcard $(CUDA_HOME)/bin/nvcc),-DSMSKD_FAST_CUDA=ON,)

# CUDA sources compile (for sm_80 and sm_90) wherever nvcc is, GPU or not.
export CUDA_HOME ?= $(firstword $(wildcard /usr/local/cuda-13.0 /usr/local/cuda))
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
export MAX_JOBS ?= 2

.PHONY: all venv build demo test test-python test-cmake test-clang clang-toolchain bench clean

all: test

$(VENV)/.deps: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

venv: $(VENV)/.deps

# The extension is built in place (build/, incremental through ninja: only changed sources
# recompile), and the package is installed editable once, without building it again.
build: venv
	$(PY) setup.py -q build_ext --inplace
	test -f $(VENV)/.editable || { SMSKD_FAST_SKIP_EXTENSION=1 $(PY) -m pip install -q --no-build-isolation \
	  --no-deps -e . && touch $(VENV)/.editable; }
	$(PY) -c "import smskd_fast; print(smskd_fast.available_backends())"

demo: build
	$(PY) -m smskd_fast demo

test: test-python test-cmake test-clang

test-python: build
	$(PY) -m pytest tests -q

test-cmake: venv
	cmake -S . -B $(CMAKE_BUILD) -G Ninja -DPython_EXECUTABLE=$(PY) \
	  -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV))/bin/ninja $(CMAKE_ARGS)
	cmake --build $(CMAKE_BUILD)
	ctest --test-dir $(CMAKE_BUILD) --output-on-failure

# clang++ with OpenMP: Debian's clang and libomp-dev, installed when missing where we are root.
clang-toolchain:
	@echo 'int main() {}' | clang++ -fopenmp -x c++ - -o /dev/null 2>/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && \
	    apt-get install -y -qq clang libomp-dev; } || \
	  { echo "make test-clang needs clang++ with -fopenmp: apt-get install clang libomp-dev"; exit 1; }

# The CPU part built by clang into $(CLANG_BUILD) (package and extension, incremental), then
# the CPU test files run against that copy: PYTHONPATH puts it before the editable install.
test-clang: venv clang-toolchain
	CC=clang CXX=clang++ SMSKD_FAST_NO_CUDA=1 $(PY) setup.py -q build --build-base $(CLANG_BUILD) \
	  --build-lib $(CLANG_BUILD)/lib --build-temp $(CLANG_BUILD)/temp
	cd $(CLANG_BUILD)/lib && PYTHONPATH=$(abspath $(CLANG_BUILD)/lib) $(PY) -c \
	  "import smskd_fast._C as c, os; assert os.getcwd() in c.__file__, c.__file__; print(c.__file__)"
	cd $(CLANG_BUILD)/lib && PYTHONPATH=$(abspath $(CLANG_BUILD)/lib) SMSKD_FAST_BUILD_TEMP=$(abspath $(CLANG_BUILD)/temp) \
	  $(PY) -m pytest $(addprefix $(CURDIR)/,$(CLANG_TESTS)) -q -x -p no:cacheprovider
	cd $(CLANG_BUILD)/lib && PYTHONPATH=$(abspath $(CLANG_BUILD)/lib) \
	  $(PY) -m pytest $(CURDIR)/$(CLANG_CONFORMANCE) -q -x -p no:cacheprovider

bench: build
	$(PY) -m smskd_fast bench

clean:
	rm -rf build $(VENV) smskd_fast/_C*.so *.egg-info .pytest_cache
