#!/usr/bin/env bash
# The reliability campaign behind docs/reliability.md: the fault-injection tests with many random
# kills (SMSKD_FAULT_KILLS), the bad-input and non-finite tests, printed with their tallies.
# Usage: benchmarks/fault_injection.sh [KILLS]   (from the repository root, extension built in place)
set -euo pipefail
kills="${1:-40}"
echo "date: $(date -u +%Y-%m-%dT%H:%MZ)  commit: $(git rev-parse --short HEAD)  host: $(nproc) cores, $(uname -sr)"
echo "python: $(python -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)')"
echo "command: SMSKD_FAULT_KILLS=$kills python -m pytest tests/test_fault_injection.py tests/test_cli_errors.py tests/test_trainer_nonfinite.py -q -s"
SMSKD_FAULT_KILLS="$kills" PYTHONPATH="$PWD" python -m pytest tests/test_fault_injection.py tests/test_cli_errors.py \
    tests/test_trainer_nonfinite.py -q -s -p no:cacheprovider --durations=5 2>&1 | grep -v "^\s*$"
