"""Kernel-level cases: each ghost primitive, through the dispatcher per backend, against its
pure-PyTorch reference (inrun_kernels.ops.reference, called directly).

Primitives: ghost_dot (Gram route and dense route), ghost_dot_dense, ghost_gram, ghost_norms_sq.
Implementations: "reference" (the ops.reference function itself, the baseline) and
"<backend>" = ops.<primitive> with INRUN_BACKEND=<backend> (torch = the reference behind the
dispatcher: its time minus the reference's is the dispatch overhead; triton only where
eligible, i.e. on CUDA; cpp if registered). Shapes vary T, d, p and M.
"""
from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .common import quantile, summarize, sync

PRIMITIVES = ("ghost_dot[gram]", "ghost_dot[dense]", "ghost_dot_dense", "ghost_gram", "ghost_norms_sq")


@dataclass(frozen=True)
class KShape:
    N: int
    T: int
    d: int
    p: int
    M: int

    @property
    def name(self) -> str:
        return f"N{self.N}-T{self.T}-d{self.d}-p{self.p}-M{self.M}"


def kernel_shapes(quick: bool = False, device: str = "cpu") -> list[KShape]:
    if quick:
        return [KShape(8, 64, 256, 256, 1)]
    if device.startswith("cuda"):
        Ts, dps, Ms, N = (256, 1024), ((768, 768), (768, 3072)), (1, 4), 16
    else:
        Ts, dps, Ms, N = (64, 256), ((256, 256), (256, 1024)), (1, 4), 8
    return [KShape(N, T, d, p, M) for T, (d, p), M in itertools.product(Ts, dps, Ms)]


def backend_skip(backend: str, device: str, dtype=torch.float32) -> str | None:
    """None when `backend` is a performance path for tensors on `device`, else why not."""
    if backend in ("reference", "torch"):
        return None
    if backend == "triton" and not device.startswith("cuda"):
        return "Triton runs on CPU only in its interpreter (TRITON_INTERPRET=1): not a performance path"
    from inrun_kernels.ops import dispatch
    probe = torch.zeros(1, 1, 1, device=device, dtype=dtype)
    return dispatch._why_not(backend, (probe, probe))


def make_case(prim: str, impl: str, s: KShape, device: str = "cpu",
              dtype=torch.float32) -> Callable[[], torch.Tensor]:
    """A zero-argument callable running `prim` with `impl` on fresh random inputs."""
    from inrun_kernels import ops
    from inrun_kernels.ops import reference as ref
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    A, B = rnd(s.N, s.T, s.d), rnd(s.N, s.T, s.p)
    Av, Bv = rnd(s.M, s.T, s.d), rnd(s.M, s.T, s.p)
    V = rnd(s.p, s.d)
    if impl == "reference":
        fn = {"ghost_dot[gram]": lambda: ref.dot_gram(A, B, Av, Bv, bias=True, per_val=s.M > 1),
              "ghost_dot[dense]": lambda: ref.dot_dense_val(A, B, Av, Bv, bias=True, per_val=s.M > 1),
              "ghost_dot_dense": lambda: ref.dot_dense(A, B, V),
              "ghost_gram": lambda: ref.gram(A, B, bias=True),
              "ghost_norms_sq": lambda: ref.norms_sq(A, B, bias=True)}[prim]
        return fn
    inner = {"ghost_dot[gram]": lambda: ops.ghost_dot(A, B, Av, Bv, bias=True, per_val=s.M > 1, route="gram"),
             "ghost_dot[dense]": lambda: ops.ghost_dot(A, B, Av, Bv, bias=True, per_val=s.M > 1, route="dense"),
             "ghost_dot_dense": lambda: ops.ghost_dot_dense(A, B, V),
             "ghost_gram": lambda: ops.ghost_gram(A, B, bias=True, route="gram"),
             "ghost_norms_sq": lambda: ops.ghost_norms_sq(A, B, bias=True, route="gram")}[prim]

    def fn():
        old = os.environ.get("INRUN_BACKEND")
        os.environ["INRUN_BACKEND"] = impl
        try:
            return inner()
        finally:
            if old is None:
                os.environ.pop("INRUN_BACKEND", None)
            else:
                os.environ["INRUN_BACKEND"] = old
    return fn


def time_fn(fn, device: str, reps: int = 7, warmup: int = 2) -> dict:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t0)
    return summarize(ts)


def run_all(quick: bool = True, device: str = "cpu") -> list[dict]:
    """Time every primitive x implementation x shape; implementations of one primitive and
    shape are interleaved (round-robin) like the step benchmarks."""
    out = []
    impls = ["reference", "torch", "triton", "cpp"]
    for s in kernel_shapes(quick, device):
        for prim in PRIMITIVES:
            fns, rows = {}, {}
            for impl in impls:
                why = backend_skip(impl, device)
                if why:
                    rows[impl] = {"skipped": why}
                else:
                    fns[impl] = make_case(prim, impl, s, device)
                    fns[impl]()   # warm-up
            ts = {k: [] for k in fns}
            for r in range(7):
                order = list(fns)
                k = r % len(order)
                for impl in order[k:] + order[:k]:
                    sync(device)
                    t0 = time.perf_counter()
                    fns[impl]()
                    sync(device)
                    ts[impl].append(time.perf_counter() - t0)
            ref_p50 = quantile(ts["reference"], 0.5)
            for impl in fns:
                res = summarize(ts[impl])
                res["ratio_to_reference"] = res["p50"] / ref_p50
                rows[impl] = res
            out.append({"primitive": prim, "shape": s.__dict__, "shape_name": s.name, "impls": rows})
    return out
