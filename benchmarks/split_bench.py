"""The split route against the weight-gradient GEMM it extends (issue 12).

    python -m benchmarks.split_bench [--threads 2] [--reps 7] [--big] [--dtype float32]

For each shape, side by side in one process (interleaved round-robin; the best of `reps`, the
least disturbed by other processes on a shared machine; --median for the median):
  gemm        torch.mm(B^T, A) over all tokens: the weight gradient alone
  gemm+dense  today's layer: the mm plus the dense-route product sum_t b_it^T V a_it
  split[torch] the PyTorch reference of the split route (ops/split.py)
  split[cpp]  the C++ kernel (csrc/split.cpp), built on first use
Ratios are to `gemm`; the issue's target is split[cpp] <= 1.25x.
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time

import torch

from inrun_kernels.ops import cpp_backend
from inrun_kernels.ops import reference as ref
from inrun_kernels.ops import split as sp


def cases(big: bool):
    dims = (256, 512, 1024) if big else (256, 512)
    for N, T, d in itertools.product((8, 16), (128, 256), dims):
        yield N, T, d, d


def bench(N, T, d, p, reps, dtype, have_cpp, median=False):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(N, T, d, generator=g).to(dtype)
    B = torch.randn(N, T, p, generator=g).to(dtype)
    V = torch.randn(p, d, generator=g)
    a2, b2 = A.reshape(-1, d), B.reshape(-1, p)
    fns = {
        "gemm": lambda: torch.mm(b2.T, a2),
        "gemm+dense": lambda: (torch.mm(b2.T, a2), ref.dot_dense(A, B, V)),
        "split[torch]": lambda: sp.split_dot(A, B, V),
    }
    if have_cpp:
        fns["split[cpp]"] = lambda: cpp_backend.split_dot(A, B, V)
    for f in fns.values():
        f()
    ts = {k: [] for k in fns}
    names = list(fns)
    for r in range(reps):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            fns[name]()
            ts[name].append(time.perf_counter() - t0)
    pick = statistics.median if median else min
    return {k: pick(v) for k, v in ts.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--median", action="store_true", help="median of the reps instead of the best")
    ap.add_argument("--big", action="store_true", help="also d = p = 1024")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    why = cpp_backend.why_unavailable()
    load_s = time.perf_counter() - t0
    print(f"torch {torch.__version__}, {args.threads} threads, {args.dtype}, "
          f"{'median' if args.median else 'best'} of {args.reps}, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; C++ extension: "
          + (f"unavailable ({why})" if why else
             f"ready in {load_s:.1f} s" + (f" (built now: {cpp_backend.build_seconds:.1f} s)"
                                          if cpp_backend.build_seconds else " (cached)")))
    cols = ["gemm", "gemm+dense", "split[torch]", "split[cpp]"]
    print(f"{'N':>3} {'T':>4} {'d':>5} {'p':>5} | {'gemm ms':>8} | " + " | ".join(f"{c:>12}" for c in cols[1:]))
    for N, T, d, p in cases(args.big):
        t = bench(N, T, d, p, args.reps, dtype, why is None, args.median)
        ratios = [f"{t[c] / t['gemm']:>11.2f}x" if c in t else f"{'-':>12}" for c in cols[1:]]
        print(f"{N:>3} {T:>4} {d:>5} {p:>5} | {t['gemm'] * 1e3:>8.2f} | " + " | ".join(ratios), flush=True)


if __name__ == "__main__":
    main()
