"""Time the Triton ghost kernels against PyTorch baselines on one CUDA GPU (bf16 inputs).

Baselines, measured in the same process, interleaved per shape:
  gram_ref    reference.dot_gram with a budget large enough for one chunk: materialises the
              (N*T) x (M*S) Grams with torch.matmul (fp32, as the reference computes)
  gram_bf16   the same Grams with bf16 torch.matmul (the authors' engine style), then reduced
  dense_torch reference.dot_dense_val: G_val = Bv^T Av once, then sum_t b_it^T G_val a_it
  func        per-sample gradients with torch.func (vmap(grad)) dotted with the validation gradients
and the Triton kernels: triton_gram (dot_gram), triton_dense (val_grad + dot_dense),
triton_selfgram (gram), triton_norms (norms_sq) against reference.gram / reference.norms_sq.

Reported per row: median ms (p20/p80), achieved TFLOP/s (Gram route counted as
2*N*T*(M*S)*(d+p); dense route 2*N*T*d*p*K + 2*M*S*d*p; self Gram 2*pairs*T^2*(d+p)), peak
memory above the inputs (torch.cuda.max_memory_allocated), and a bf16 torch.matmul TFLOP/s
reference. Writes bench_kernels.md and bench_kernels.json to --out (default $OUT or .).

Usage: python benchmarks/bench_kernels_gpu.py [--out DIR] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback

import torch

if not torch.cuda.is_available():
    sys.exit("bench_kernels_gpu.py needs a CUDA GPU")
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("unset TRITON_INTERPRET (or set it to 0) to benchmark compiled kernels")

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from inrun_kernels.kernels import ghost_dot, ghost_gram  # noqa: E402
from inrun_kernels.ops import reference as ref  # noqa: E402
from inrun_kernels.ops.budget import temp_budget  # noqa: E402

DEV = torch.device("cuda")
DT = torch.bfloat16
QUANT = [0.2, 0.5, 0.8]
BIG_BUDGET_MB = 96 * 1024      # one chunk for every shape here (H200: ~139 GiB)


def bench(fn, warmup=25, rep=100):
    """(p20, p50, p80) ms, peak bytes allocated during one call above what was live before."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    q = do_bench(fn, warmup=warmup, rep=rep, quantiles=QUANT)
    return tuple(float(x) for x in q), int(peak)


def matmul_tflops():
    n = 8192
    a = torch.randn(n, n, device=DEV, dtype=DT)
    b = torch.randn(n, n, device=DEV, dtype=DT)
    ms = do_bench(lambda: a @ b, warmup=25, rep=200)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def gram_bf16(A, B, Av, Bv, bias):
    """Materialised Grams in bf16 (torch.matmul), reduced per (sample, val sample)."""
    N, T, _ = A.shape
    M, S, _ = Av.shape
    ga = (A.reshape(N * T, -1) @ Av.reshape(M * S, -1).T).float()
    if bias:
        ga += 1
    ga *= (B.reshape(N * T, -1) @ Bv.reshape(M * S, -1).T).float()
    return ga.view(N, T, M, S).sum((1, 3))


def func_per_sample(A, B, Av, Bv, bias):
    """Per-sample gradients via torch.func, dotted with per-validation-sample gradients."""
    from torch.func import grad, vmap
    p, d = B.shape[-1], A.shape[-1]
    W = torch.zeros(p, d, device=DEV, dtype=DT)
    b0 = torch.zeros(p, device=DEV, dtype=DT)

    def loss(W, b0, a, g):       # d loss / d y = g, so grad_W = g^T a, grad_b = g^T 1
        return ((a @ W.T + b0) * g).sum()

    gfun = vmap(grad(loss, argnums=(0, 1)), in_dims=(None, None, 0, 0))
    gW, gb = gfun(W, b0, A, B)
    vW, vb = gfun(W, b0, Av, Bv)
    out = gW.flatten(1).float() @ vW.flatten(1).float().T
    if bias:
        out += gb.float() @ vb.float().T
    return out


def row(name, shape, q, peak, flops, note=""):
    ms = q[1]
    return {"kernel": name, **shape, "ms_p20": q[0], "ms_p50": ms, "ms_p80": q[2],
            "tflops": flops / (ms * 1e-3) / 1e12 if flops else None,
            "peak_mb": peak / 2**20, "note": note}


def run_case(results, name, shape, fn, flops, note=""):
    try:
        q, peak = bench(fn)
        results.append(row(name, shape, q, peak, flops, note))
    except torch.cuda.OutOfMemoryError:
        results.append({"kernel": name, **shape, "note": "OOM"})
    except Exception as e:  # report and keep going
        results.append({"kernel": name, **shape, "note": f"error: {type(e).__name__}: {e}"[:300]})
        traceback.print_exc()
    torch.cuda.empty_cache()
    r = results[-1]
    print(f"{name:16s} {shape} {r.get('ms_p50', float('nan')):9.3f} ms  "
          f"{(r.get('tflops') or 0):7.1f} TFLOP/s  {r.get('peak_mb', 0):9.1f} MB  {r.get('note', '')}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(DEV)
    meta = {"gpu": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
            "triton": triton.__version__, "python": platform.python_version(), "dtype": str(DT),
            "autotune": os.environ.get("INRUN_AUTOTUNE", "1"), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    meta["bf16_matmul_tflops"] = matmul_tflops()
    print(meta, flush=True)

    N, d = 16, 768
    shapes = [(1024, p, M) for p in (768, 2304, 3072, 50304) for M in (1, 4)] + [(4096, 768, 1), (4096, 3072, 1)]
    if args.quick:
        shapes = [(1024, 768, 1), (1024, 3072, 4), (1024, 50304, 1), (4096, 768, 1)]
    results = []
    bias = True
    for T, p, M in shapes:
        S = T
        shape = {"N": N, "T": T, "S": S, "M": M, "d": d, "p": p}
        A = torch.randn(N, T, d, device=DEV, dtype=DT)
        B = torch.randn(N, T, p, device=DEV, dtype=DT) * 0.01
        Av = torch.randn(M, S, d, device=DEV, dtype=DT)
        Bv = torch.randn(M, S, p, device=DEV, dtype=DT) * 0.01
        f_gram = 2.0 * N * T * M * S * (d + p)
        f_dense = 2.0 * N * T * d * p * M + 2.0 * M * S * d * p

        run_case(results, "triton_gram", shape,
                 lambda: ghost_dot.dot_gram(A, B, Av, Bv, bias=bias, per_val=True), f_gram)

        def ref_gram():
            with temp_budget(BIG_BUDGET_MB):
                return ref.dot_gram(A, B, Av, Bv, bias=bias, per_val=True)
        if N * T * M * S * 4 * 3 < 60 * 2**30:
            run_case(results, "gram_ref", shape, ref_gram, f_gram, "fp32 torch.matmul Grams")
        run_case(results, "gram_bf16", shape, lambda: gram_bf16(A, B, Av, Bv, bias), f_gram,
                 "bf16 torch.matmul Grams")

        def triton_dense():
            G, gb = ref.val_grad(Av, Bv, bias=bias, per_val=True)
            return ghost_dot.dot_dense(A, B, G, gb)
        run_case(results, "triton_dense", shape, triton_dense, f_dense, "val_grad (torch) + dot_dense")
        run_case(results, "dense_torch", shape,
                 lambda: ref.dot_dense_val(A, B, Av, Bv, bias=bias, per_val=True), f_dense)
        if p * d * (N + M) * 2 * 3 < 60 * 2**30:
            run_case(results, "func", shape, lambda: func_per_sample(A, B, Av, Bv, bias), f_dense,
                     "torch.func per-sample gradients")

        if M == 1:   # train x train products once per (T, p)
            f_self = 2.0 * (N * (N + 1) / 2) * T * T * (d + p)
            f_norm = 2.0 * N * T * T * (d + p)
            run_case(results, "triton_selfgram", shape, lambda: ghost_gram.gram(A, B, bias=bias), f_self)

            def ref_self():
                with temp_budget(BIG_BUDGET_MB):
                    return ref.gram(A, B, bias=bias)
            run_case(results, "selfgram_ref", shape, ref_self, f_self, "fp32 torch.matmul")
            run_case(results, "triton_norms", shape, lambda: ghost_gram.norms_sq(A, B, bias=bias), f_norm)

            def ref_norms():
                with temp_budget(BIG_BUDGET_MB):
                    return ref.norms_sq(A, B, bias=bias)
            run_case(results, "norms_ref", shape, ref_norms, f_norm, "fp32 torch.bmm")
        del A, B, Av, Bv
        torch.cuda.empty_cache()

    with open(os.path.join(args.out, "bench_kernels.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    lines = [f"# inrun_kernels GPU benchmark ({meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}, "
             f"{meta['dtype']}, autotune={meta['autotune']})", "",
             f"bf16 torch.matmul 8192^3: {meta['bf16_matmul_tflops']:.1f} TFLOP/s", "",
             "| kernel | N | T | S | M | d | p | ms p50 (p20-p80) | TFLOP/s | peak MB | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "ms_p50" in r:
            lines.append(f"| {r['kernel']} | {r['N']} | {r['T']} | {r['S']} | {r['M']} | {r['d']} | {r['p']} | "
                         f"{r['ms_p50']:.3f} ({r['ms_p20']:.3f}-{r['ms_p80']:.3f}) | "
                         f"{(r['tflops'] or 0):.1f} | {r['peak_mb']:.1f} | {r['note']} |")
        else:
            lines.append(f"| {r['kernel']} | {r['N']} | {r['T']} | {r['S']} | {r['M']} | {r['d']} | {r['p']} | "
                         f"- | - | - | {r['note']} |")
    with open(os.path.join(args.out, "bench_kernels.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
