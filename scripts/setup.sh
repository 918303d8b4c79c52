#!/usr/bin/env bash
# Creates .venv with everything the demo, the tests and the benchmarks need, from scratch.
# torch is pinned to the CPU build that lies on this kind of machine (a plain `pip install
# torch` may pull a multi-GB CUDA build) and is installed BEFORE the package, which is then
# installed without build isolation so that pip never fetches a second torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip setuptools wheel
"$VPY" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
"$VPY" -m pip install -q "triton>=3.0" "transformers>=4.40" accelerate scikit-learn pytest pytest-benchmark matplotlib numpy ninja
"$VPY" -m pip install -q --no-build-isolation --no-deps -e .
"$VPY" -c "import torch, inrun_kernels; print('torch', torch.__version__, '| inrun_kernels', inrun_kernels.__version__)"
