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

--split: instead, the split route (kernels/ghost_split.py: weight gradient + <g_i, V> in one
pass, fp32 V) against cuBLAS's weight-gradient GEMM alone, torch.mm(B.reshape(-1, p).T,
A.reshape(-1, d)) in bf16, at N in {8, 16} (--quick: 16), T in {128, 256, 1024}, d = p in
{768, 1024, 2048, 4096}, bf16 inputs. Interleaved rounds per shape; reported: the ratio of
median times split / GEMM (target <= 1.10), both TFLOP/s (2 N T p d), peak memory, the chosen
config, and the split's error against an fp32 GEMM and reference.dot_dense. Written after every
shape to bench_split.md and bench_split.json (a timeout keeps the shapes done).

Usage: python benchmarks/bench_kernels_gpu.py [--out DIR] [--quick] [--split]
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
from inrun_kernels.kernels import ghost_dot, ghost_gram, ghost_split  # noqa: E402
from inrun_kernels.ops import reference as ref  # noqa: E402
from inrun_kernels.ops.budget import temp_budget  # noqa: E402

DEV = torch.device("cuda")
DT = torch.bfloat16
QUANT = [0.2, 0.5, 0.8]
BIG_BUDGET_MB = 96 * 1024      # one chunk for every shape here (H200: ~139 GiB)


def peak_bytes(fn) -> int:
    """Peak bytes allocated during one call of fn above what was live before (after a warm call)."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base)


def bench(fn, warmup=25, rep=100):
    """(p20, p50, p80) ms, peak bytes allocated during one call above what was live before."""
    peak = peak_bytes(fn)
    q = do_bench(fn, warmup=warmup, rep=rep, quantiles=QUANT)
    return tuple(float(x) for x in q), peak


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


# ---- the split route vs cuBLAS's weight-gradient GEMM (--split) -------------------------------
SPLIT_TARGET = 1.10
SPLIT_ROUNDS = 3


def _split_config(T, d, p) -> str:
    """The config the last split launch used: the autotuner's pick, or the only candidate."""
    cfgs = ghost_split.configs(T, d, p)
    cfg = cfgs[0] if len(cfgs) == 1 else getattr(ghost_split._autotuned, "best_config", None)
    if cfg is None:
        return "?"
    return f"{cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}" + (" (only config)" if len(cfgs) == 1 else "")


def _rel(x, y) -> float:
    return ((x.double() - y.double()).norm() / y.double().norm().clamp_min(1e-30)).item()


def split_case(N, T, dp, K=1):
    """One shape: interleaved rounds of the GEMM alone and the split route; ratio of medians.
    K > 1: K vectors at once (V [K, p, d], per-validation dots: ik.grad_dot(per_val=True))."""
    d = p = dp
    A = torch.randn(N, T, d, device=DEV, dtype=DT)
    B = torch.randn(N, T, p, device=DEV, dtype=DT) * 0.01
    V = torch.randn(*((K,) if K > 1 else ()), p, d, device=DEV, dtype=torch.float32)
    a2, b2 = A.reshape(-1, d), B.reshape(-1, p)

    def gemm():
        return torch.mm(b2.T, a2)

    def split():
        return ghost_split.split_dot(A, B, V)

    W, _, dots = split()                      # autotunes on the first call (excluded from timing)
    torch.cuda.synchronize()
    err_w = _rel(W, torch.mm(b2.T.float(), a2.float()))
    err_dots = _rel(dots, ref.dot_dense(A, B, V))
    del W, dots
    config = _split_config(T, d, p)
    res = {}
    for name, fn in (("gemm", gemm), ("split", split)):
        res[name] = {"peak_mb": peak_bytes(fn) / 2**20, "p50": []}
    for _ in range(SPLIT_ROUNDS):             # interleaved: GEMM, split, GEMM, split, ...
        for name, fn in (("gemm", gemm), ("split", split)):
            q = do_bench(fn, warmup=10, rep=40, quantiles=QUANT)
            res[name]["p50"].append(float(q[1]))
    flops = 2.0 * N * T * p * d
    out = {"N": N, "T": T, "d": d, "p": p, "K": K, "config": config, "err_W": err_w, "err_dots": err_dots}
    for name in ("gemm", "split"):
        ms = sorted(res[name]["p50"])[len(res[name]["p50"]) // 2]
        out[f"{name}_ms"] = ms
        out[f"{name}_rounds_p50"] = res[name]["p50"]
        out[f"{name}_tflops"] = flops / (ms * 1e-3) / 1e12
        out[f"{name}_peak_mb"] = res[name]["peak_mb"]
    out["ratio"] = out["split_ms"] / out["gemm_ms"]
    del A, B, V, a2, b2
    torch.cuda.empty_cache()
    return out


def _write_split(outdir, meta, results):
    with open(os.path.join(outdir, "bench_split.json"), "w") as f:
        json.dump({"meta": meta, "target_ratio": SPLIT_TARGET, "results": results}, f, indent=1)
    done = [r for r in results if "ratio" in r]
    ok = sum(r["ratio"] <= SPLIT_TARGET for r in done)
    lines = [f"# Split route vs cuBLAS weight-gradient GEMM ({meta['gpu']}, torch {meta['torch']}, "
             f"triton {meta['triton']}, bf16 A/B, fp32 V, autotune={meta['autotune']})", "",
             "split = ghost_split.split_dot(A, B, V): weight gradient (fp32) + <g_i, V> for every sample; "
             "gemm = torch.mm(B.reshape(-1, p).T, A.reshape(-1, d)) (bf16 out). "
             f"Ratio of median times over {SPLIT_ROUNDS} interleaved rounds; target <= {SPLIT_TARGET:.2f}x. "
             f"{ok}/{len(done)} shapes meet it.", "",
             "| N | T | d=p | K | gemm ms | split ms | ratio | gemm TFLOP/s | split TFLOP/s | split peak MB | "
             "err W | err dots | config |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "ratio" in r:
            lines.append(f"| {r['N']} | {r['T']} | {r['d']} | {r.get('K', 1)} | {r['gemm_ms']:.4f} | {r['split_ms']:.4f} | "
                         f"**{r['ratio']:.3f}** | {r['gemm_tflops']:.1f} | {r['split_tflops']:.1f} | "
                         f"{r['split_peak_mb']:.1f} | {r['err_W']:.1e} | {r['err_dots']:.1e} | {r['config']} |")
        else:
            lines.append(f"| {r['N']} | {r['T']} | {r['d']} | {r.get('K', 1)} | - | - | - | - | - | - | - | - | {r['note']} |")
    with open(os.path.join(outdir, "bench_split.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return lines


def run_split(args, meta):
    Ns = (16,) if args.quick else (8, 16)
    cases = [(N, T, dp, 1) for N in Ns for T in (128, 256, 1024) for dp in (768, 1024, 2048, 4096)]
    cases += [(16, 1024, dp, 4) for dp in (768, 2048)]   # per-validation dots, M = 4 vectors
    results = []
    for N, T, dp, K in cases:
        try:
            r = split_case(N, T, dp, K)
            print(f"split N={N:2d} T={T:4d} d=p={dp:4d} K={K}  gemm {r['gemm_ms']:.4f} ms  split "
                  f"{r['split_ms']:.4f} ms  ratio {r['ratio']:.3f}  err W {r['err_W']:.1e} "
                  f"dots {r['err_dots']:.1e}  {r['config']}", flush=True)
        except Exception as e:  # report and keep going
            traceback.print_exc()
            r = {"N": N, "T": T, "d": dp, "p": dp, "K": K, "note": f"error: {type(e).__name__}: {e}"[:300]}
            torch.cuda.empty_cache()
        results.append(r)
        _write_split(args.out, meta, results)
    print("\n".join(_write_split(args.out, meta, results)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--split", action="store_true",
                    help="only the split route vs the cuBLAS weight-gradient GEMM (bench_split.md/json)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(DEV)
    meta = {"gpu": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
            "triton": triton.__version__, "python": platform.python_version(), "dtype": str(DT),
            "autotune": os.environ.get("INRUN_AUTOTUNE", "1"), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if args.split:
        print(meta, flush=True)
        run_split(args, meta)
        return
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
