#!/usr/bin/env bash
# The test suite: unit tests (Triton kernels under TRITON_INTERPRET=1), then the quickest form
# of the benchmark suite so that it cannot rot. Run after scripts/setup.sh. A dependency that
# setup.sh installs and that fails to import stops the run (tests/conftest.py); -rs lists every
# skip with its reason (GPU-only ones are counted apart in the summary line).
set -euo pipefail
cd "$(dirname "$0")/.."
VPY=.venv/bin/python
"$VPY" -m pytest tests -q -rs -p no:cacheprovider "$@"
if [ -d benchmarks ] && ls benchmarks/test_*.py >/dev/null 2>&1; then
  "$VPY" -m pytest benchmarks -q -p no:cacheprovider --quick --benchmark-disable
fi
