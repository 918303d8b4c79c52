#!/usr/bin/env bash
# One prepared GPU check (H200 or any CUDA GPU): the GPU-eligible test suite through the Triton
# backend (the kernels, the functional API, the engine and Hugging Face models under bf16
# autocast, each against float64 oracles and each asserting that kernels were launched), then
# the kernel benchmark. Installs nothing: needs torch (CUDA) and triton already present; the
# package is used from this checkout via PYTHONPATH (or an existing `pip install -e .`).
# Results go to $OUT (default ./gpu_out): pytest log, nvidia-smi, bench_kernels.{md,json},
# bench_split.{md,json} (the split route vs cuBLAS's weight-gradient GEMM).
# Usage: OUT=/some/dir bash benchmarks/gpu_check.sh [--full | --split]
# Default: sized for a 15-minute device session (start-up included): at most ~9.5 minutes of
# commands (tests 210 s, kernel benchmark --quick 120 s, step benchmark M=1 120 s, estimator
# cost 120 s). The split-route kernel's tests run in step 1; its benchmark does not fit here.
# --split: only the split route (issue 12): tests/test_split_triton.py on the GPU (150 s), then
# the split route vs cuBLAS's weight-gradient GEMM, every shape (240 s); at most ~6.5 minutes.
# --full: every shape of the kernel benchmark and M in {1,4} with memory probes, and the split
# benchmark (~25 min).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_INTERPRET=0              # compiled kernels (conftest only sets it when unset)
export TRITON_DEFAULT_FP_FUSION=1
PY="${PYTHON:-$(command -v python3 || command -v python)}"   # the machine's python3 holds torch
MODE="${1:-}"
if [ "$MODE" = "--full" ]; then
  QUICK=""; T_TEST=420; T_BENCH=480; T_STEP=420; T_SPLIT=240
else
  QUICK="--quick"; T_TEST=210; T_BENCH=120; T_STEP=120; T_SPLIT=240
fi

{ nvidia-smi || true; "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"; } \
    > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible')" || exit 1

# The split route (weight gradient + <g_i, V> in one pass, kernels/ghost_split.py) against
# cuBLAS's weight-gradient GEMM alone, torch.mm(B^T, A) in bf16, autotuning on, at N in {8,16},
# T in {128,256,1024}, d=p in {768,1024,2048,4096}; target ratio <= 1.10 (reported in
# bench_split.md, not asserted; a crash fails the check). bench_split.{md,json} are rewritten
# after every shape, so a timeout keeps the shapes done.
split_bench() {
  INRUN_AUTOTUNE=1 timeout $T_SPLIT "$PY" benchmarks/bench_kernels_gpu.py --split --out "$OUT" \
      2>&1 | tee "$OUT/bench_split_log.txt"
  return ${PIPESTATUS[0]}
}
if [ "$MODE" = "--split" ]; then
  INRUN_BACKEND=triton INRUN_AUTOTUNE=0 timeout 150 "$PY" -m pytest tests/test_split_triton.py \
      -m "triton or gpu" -q -rs -p no:cacheprovider --durations=10 2>&1 | tee "$OUT/pytest_split_gpu.txt"
  test_rc=${PIPESTATUS[0]}
  if grep -Eq "[0-9]+ (gpu-only )?skipped" "$OUT/pytest_split_gpu.txt"; then
    echo "gpu_check: tests were skipped on the GPU (see above)"; test_rc=1
  fi
  split_bench
  split_rc=$?
  echo "split: pytest rc=$test_rc bench rc=$split_rc (results in $OUT)"
  exit $(( test_rc != 0 || split_rc != 0 ))
fi

# 1) the GPU-eligible suite on CUDA tensors with the compiled kernels: every test marked `triton`
#    (tests/test_triton_backend_end_to_end.py: functional API, engine, GPT-2 / Llama under bf16
#    autocast against float64 oracles and against the torch backend; tests/test_kernels.py: every
#    kernel against the float64 reference) and the `gpu`-marked ones (bf16 tensor cores, large
#    shapes with autotuning on). INRUN_BACKEND=triton: a primitive that cannot run on the kernels
#    is an error, not a silent fallback; INRUN_AUTOTUNE=0: one config per shape (compile time).
#    The end-to-end tests first, so a timeout cuts kernel tests rather than them. Any skip here
#    means something did not run on the GPU: it fails the check.
INRUN_BACKEND=triton INRUN_AUTOTUNE=0 timeout $T_TEST "$PY" -m pytest \
    tests/test_triton_backend_end_to_end.py tests -m "triton or gpu" -q -rs -p no:cacheprovider \
    --durations=15 2>&1 | tee "$OUT/pytest_gpu.txt"
test_rc=${PIPESTATUS[0]}
if grep -Eq "[0-9]+ (gpu-only )?skipped" "$OUT/pytest_gpu.txt"; then
  echo "gpu_check: tests were skipped on the GPU (see above)"; test_rc=1
fi

# 2) benchmark with autotuning on.
INRUN_AUTOTUNE=1 timeout $T_BENCH "$PY" benchmarks/bench_kernels_gpu.py --out "$OUT" $QUICK \
    2>&1 | tee "$OUT/bench_log.txt"
bench_rc=${PIPESTATUS[0]}

# 2b) --full only: the split route vs the GEMM (split_bench above; alone: --split).
split_rc=0
if [ "$MODE" = "--full" ]; then
  split_bench
  split_rc=$?
fi

# 3) step-level benchmark (benchmarks/run.py): GPT-2 small (124M), T=1024, N=16, M in {1,4},
#    bf16 autocast; plain / plain+val / InRunShapley per eligible backend / authors' engine /
#    vmap / bs-1 loop, interleaved, 5 rounds; peak memory per method from a fresh subprocess
#    (torch.cuda.max_memory_allocated). Default (not --full): M=1 only, no memory probes.
if [ "$QUICK" = "--quick" ]; then
  STEP_ARGS=(--config n_layer=12,d=768,n_head=12,vocab=50257,T=1024,N=16,M=1,autocast=bf16,device=cuda --no-memory)
else
  STEP_ARGS=(--preset gpu)
fi
timeout $T_STEP "$PY" -m benchmarks.run "${STEP_ARGS[@]}" --out "$OUT/step_gpu.json" \
    2>&1 | tee "$OUT/step_log.txt"
step_rc=${PIPESTATUS[0]}
"$PY" -m benchmarks.report --json "$OUT/step_gpu.json" --out "$OUT/RESULTS_gpu.md" \
    2>&1 | tee -a "$OUT/step_log.txt"

# 4) estimator cost (issue 8's GPU target: midpoint >= 70% of plain throughput, i.e. a step
#    ratio <= 1.43): plain / concat / first (sgd, optimizer) / midpoint / second, GPT-2 small,
#    T=1024, N=16, M=1, bf16 autocast, AdamW. Default: 3 rounds, no memory probes.
if [ "$QUICK" = "--quick" ]; then EST_ARGS=(--rounds 3 --no-memory); T_EST=120; else EST_ARGS=(); T_EST=420; fi
timeout $T_EST "$PY" -m benchmarks.run --estimators "${EST_ARGS[@]}" \
    --config n_layer=12,d=768,n_head=12,vocab=50257,T=1024,N=16,M=1,autocast=bf16,device=cuda \
    --out "$OUT/estimators_gpu.json" 2>&1 | tee "$OUT/estimators_log.txt"
est_rc=${PIPESTATUS[0]}

echo "pytest rc=$test_rc bench rc=$bench_rc split rc=$split_rc step rc=$step_rc estimators rc=$est_rc (results in $OUT)"
exit $(( test_rc != 0 || bench_rc != 0 || split_rc != 0 || step_rc != 0 || est_rc != 0 ))
