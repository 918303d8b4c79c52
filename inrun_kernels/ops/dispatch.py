"""One entry point per ghost primitive: picks the backend (triton | cpp | torch) and the route
(Gram vs dense / materialised) by counted flops and bytes, then calls the implementation.

INRUN_BACKEND = auto (default) | torch | triton | cpp. `auto` takes the fastest backend that is
eligible for the tensors at hand and falls back to the exact PyTorch reference; naming a
backend that cannot run here is an error that says why.
INRUN_ROUTE = auto (default) | gram | dense | split forces the route (tests use it; `split`
applies where a layer's backward can take it, see prefer_split, and is `auto` elsewhere).
"""
from __future__ import annotations

import logging
import os
import warnings
from typing import Callable

import torch
from torch import Tensor

from . import reference as ref
from . import split as split_ref
from .budget import temp_budget_elems

log = logging.getLogger("inrun_kernels.dispatch")

BACKENDS = ("auto", "torch", "triton", "cpp")
ROUTES = ("auto", "gram", "dense", "split")
PRIMITIVES = ("dot_gram", "dot_dense", "gram", "norms_sq", "gram_materialised", "norms_sq_materialised",
              "split_dot", "split_norms")

# backend name -> (availability check returning a reason string or None, {primitive: fn})
_BACKEND_TABLE: dict[str, tuple[Callable[[tuple[Tensor, ...]], str | None], dict[str, Callable]]] = {
    "torch": (lambda tensors: None, {
        "dot_gram": ref.dot_gram, "dot_dense": ref.dot_dense, "gram": ref.gram,
        "norms_sq": ref.norms_sq, "gram_materialised": ref.gram_materialised,
        "norms_sq_materialised": ref.norms_sq_materialised,
        "split_dot": split_ref.split_dot, "split_norms": split_ref.split_norms,
    }),
}


def register_backend(name: str, eligible: Callable[[tuple[Tensor, ...]], str | None],
                     impls: dict[str, Callable]) -> None:
    """Make a backend available. `eligible(tensors)` returns None when it can run on them,
    else the reason it cannot; primitives it lacks fall back to the reference."""
    if name not in BACKENDS or name == "auto":
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS[1:]}")
    unknown = set(impls) - set(PRIMITIVES)
    if unknown:
        raise ValueError(f"backend {name!r} registers unknown primitives {sorted(unknown)}")
    _BACKEND_TABLE[name] = (eligible, dict(impls))


def requested_backend() -> str:
    name = os.environ.get("INRUN_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"INRUN_BACKEND={name!r} is not a backend; expected one of {BACKENDS}")
    return name


def requested_route() -> str:
    name = os.environ.get("INRUN_ROUTE", "auto").strip().lower() or "auto"
    if name not in ROUTES:
        raise ValueError(f"INRUN_ROUTE={name!r} is not a route; expected one of {ROUTES}")
    return name


SPLIT_PRIMITIVES = ("split_dot", "split_norms")


def _why_not(name: str, tensors: tuple[Tensor, ...], primitive: str | None = None) -> str | None:
    if name not in _BACKEND_TABLE:
        hint = {"triton": "the Triton kernels are not available (triton missing, or not built for this platform)",
                "cpp": "the C++ CPU extension is not built or failed to load"}.get(name, "it is not registered")
        return hint
    return _BACKEND_TABLE[name][0](tensors)


_warned: set[str] = set()


def resolve_backend(*tensors: Tensor, primitive: str | None = None) -> str:
    """The backend that will run a primitive on these tensors. `auto` only considers backends
    that implement it (no primitive named: the ghost products in general), so no C++ build is
    triggered for a primitive the C++ extension does not have; a backend that fails for its own reason (a failed C++ build) is
    skipped with ONE warning saying why."""
    req = requested_backend()
    if req == "cpp" and primitive is not None and primitive not in _BACKEND_TABLE.get("cpp", (None, {}))[1]:
        # the extension has the split route only; the other primitives run the reference (checked
        # before building anything)
        return "torch"
    if req != "auto":
        why = _why_not(req, tensors, primitive)
        if why is not None:
            raise RuntimeError(f"INRUN_BACKEND={req} was requested but cannot run here: {why}")
        return req
    for name in ("triton", "cpp"):
        # only backends that implement the primitive (none given: the ghost products in general)
        if name not in _BACKEND_TABLE or (primitive or "dot_gram") not in _BACKEND_TABLE[name][1]:
            continue
        why = _why_not(name, tensors, primitive)
        if why is None:
            return name
        if name == "cpp" and name in _BACKEND_TABLE and _cpp_broken(why) and name not in _warned:
            _warned.add(name)
            warnings.warn(f"INRUN_BACKEND=auto: using the PyTorch reference on CPU because {why}",
                          RuntimeWarning, stacklevel=3)
    return "torch"


def _cpp_broken(why: str) -> bool:
    """Whether the C++ backend is out for good (build/load failure), not for these tensors."""
    return "could not be built or loaded" in why


def _fused(*tensors: Tensor) -> bool:
    """Whether the backend that will run keeps its temporaries in registers (Triton)."""
    return resolve_backend(*tensors, primitive="dot_gram") == "triton"


def _impl(primitive: str, tensors: tuple[Tensor, ...]) -> Callable:
    backend = resolve_backend(*tensors, primitive=primitive)
    return _BACKEND_TABLE[backend][1].get(primitive) or _BACKEND_TABLE["torch"][1][primitive]


# ---- cost model ---------------------------------------------------------------------------
# Time estimate = flops / F + bytes / BW. Only the ratio F / BW (the machine balance, flops per
# byte) matters for choosing a route: ~10 on CPUs, ~100 on data-centre GPUs.
def _balance(t: Tensor) -> float:
    return 100.0 if t.is_cuda else 10.0


def dot_route_costs(N: int, T: int, M: int, S: int, d: int, p: int, per_val: bool,
                    elem_bytes: int = 4, fused: bool = False) -> dict[str, tuple[float, float]]:
    """(flops, bytes) of the train x val dot for each route. Unfused (reference) routes also
    write and re-read their temporaries: the Grams [N*T, M*S], the dense route's [N*T, min(p, d)]
    projection; a fused kernel keeps them in registers."""
    io = (N * T + M * S) * (d + p) * elem_bytes
    K = M if per_val else 1
    gram_flops = 2.0 * N * T * M * S * (d + p) + 2.0 * N * T * M * S
    gram_bytes = io + (0 if fused else 3 * N * T * M * S * elem_bytes)
    dense_flops = 2.0 * M * S * p * d + 2.0 * N * T * p * d * K + 2.0 * N * T * min(p, d) * K
    dense_bytes = io + K * p * d * elem_bytes + (0 if fused else 2 * K * N * T * min(p, d) * elem_bytes)
    return {"gram": (gram_flops, float(gram_bytes)), "dense": (dense_flops, float(dense_bytes))}


def self_route_costs(N: int, T: int, d: int, p: int, pairs: float,
                     elem_bytes: int = 4, fused: bool = False) -> dict[str, tuple[float, float]]:
    """(flops, bytes) of Gram/norm products over `pairs` sample pairs for each route."""
    io = N * T * (d + p) * elem_bytes
    gram_flops = 2.0 * pairs * T * T * (d + p)
    gram_bytes = io + (0 if fused else 3 * pairs * T * T * elem_bytes)
    mat_flops = 2.0 * N * T * p * d + 2.0 * pairs * p * d
    return {"gram": (gram_flops, float(gram_bytes)),
            "dense": (mat_flops, float(io + N * p * d * elem_bytes))}


def _pick(costs: dict[str, tuple[float, float]], balance: float, what: str, route: str | None) -> str:
    route = route or requested_route()
    if route == "split":   # the split route is decided in the layer's backward (prefer_split)
        route = "auto"
    if route == "auto":
        route = min(costs, key=lambda r: costs[r][0] + balance * costs[r][1])
        log.debug("%s: route %s (costs %s)", what, route, costs)
    elif route not in costs:
        raise ValueError(f"route {route!r} is not one of {sorted(costs)}")
    return route


def _check3(name: str, *ts: Tensor) -> None:
    for t in ts:
        if t.dim() != 3:
            raise ValueError(f"{name}: expected 3-D [samples, tokens, features] tensors, got shape {tuple(t.shape)}")


# ---- primitives ---------------------------------------------------------------------------
def ghost_dot(A: Tensor, B: Tensor, Av: Tensor, Bv: Tensor, *, bias: bool, per_val: bool = False,
              route: str | None = None, lengths: Tensor | None = None,
              val_lengths: Tensor | None = None) -> Tensor:
    """s_i = <g_i, sum_v g_v> ([N]) or per validation sample ([N, M])."""
    _check3("ghost_dot", A, B, Av, Bv)
    N, T, d = A.shape
    M, S, _ = Av.shape
    p = B.shape[-1]
    if B.shape[:2] != (N, T) or Av.shape[-1] != d or Bv.shape != (M, S, p):
        raise ValueError(f"ghost_dot: inconsistent shapes A{tuple(A.shape)} B{tuple(B.shape)} "
                         f"Av{tuple(Av.shape)} Bv{tuple(Bv.shape)}")
    fused = _fused(A, B, Av, Bv)
    costs = dot_route_costs(N, T, M, S, d, p, per_val, A.element_size(), fused)
    chosen = _pick(costs, _balance(A), f"ghost_dot N={N} T={T} M={M} S={S} d={d} p={p}", route)
    if chosen == "gram":
        return _impl("dot_gram", (A, B, Av, Bv))(A, B, Av, Bv, bias=bias, per_val=per_val,
                                                   lengths=lengths, val_lengths=val_lengths)
    G, gb = ref.val_grad(Av, ref._mask_lengths(Bv, val_lengths), bias=bias, per_val=per_val)
    return ghost_dot_dense(A, B, G, gb, lengths=lengths)


def ghost_dot_dense(A: Tensor, B: Tensor, V: Tensor, v_bias: Tensor | None = None,
                    lengths: Tensor | None = None) -> Tensor:
    """s_i = sum_t b_it^T V a_it (+ b_it . v_bias); V [p, d] -> [N], V [K, p, d] -> [N, K]."""
    _check3("ghost_dot_dense", A, B)
    if V.shape[-2:] != (B.shape[-1], A.shape[-1]):
        raise ValueError(f"ghost_dot_dense: V{tuple(V.shape)} does not match p={B.shape[-1]}, d={A.shape[-1]}")
    return _impl("dot_dense", (A, B, V))(A, B, V, v_bias, lengths=lengths)


def ghost_gram(A: Tensor, B: Tensor, *, bias: bool, route: str | None = None,
               lengths: Tensor | None = None) -> Tensor:
    """Train x train Gram of per-sample gradients [N, N]."""
    _check3("ghost_gram", A, B)
    N, T, d = A.shape
    costs = self_route_costs(N, T, d, B.shape[-1], N * (N + 1) / 2, A.element_size(), _fused(A, B))
    chosen = _pick(costs, _balance(A), f"ghost_gram N={N} T={T}", route)
    prim = "gram" if chosen == "gram" else "gram_materialised"
    return _impl(prim, (A, B))(A, B, bias=bias, lengths=lengths)


def ghost_norms_sq(A: Tensor, B: Tensor, *, bias: bool, route: str | None = None,
                   lengths: Tensor | None = None) -> Tensor:
    """Squared L2 norms of the per-sample gradients [N]."""
    _check3("ghost_norms_sq", A, B)
    N, T, d = A.shape
    costs = self_route_costs(N, T, d, B.shape[-1], N, A.element_size(), _fused(A, B))
    chosen = _pick(costs, _balance(A), f"ghost_norms N={N} T={T}", route)
    prim = "norms_sq" if chosen == "gram" else "norms_sq_materialised"
    return _impl(prim, (A, B))(A, B, bias=bias, lengths=lengths)


# ---- the split route ----------------------------------------------------------------------
def split_cost(N: int, T: int, d: int, p: int, elem_bytes: int = 4, K: int = 1) -> tuple[float, float]:
    """(flops, bytes) of the split route: the weight-gradient GEMM plus K d*p dots (or one
    square) per sample; its I/O is the GEMM's plus reading the K vectors. Compare with the GEMM
    alone plus a dense_route product (dot_route_costs' "dense" with M*S = 0, i.e. G_val given)."""
    return (2.0 * N * T * p * d + 2.0 * K * N * p * d,
            float((N * T * (d + p) + (1 + K) * p * d) * elem_bytes))


def prefer_split(A: Tensor, B: Tensor, M: int, S: int, *, v_given: bool, per_val: bool = False,
                 norms: bool = False, weight_grad: bool = True) -> bool:
    """Whether a linear-type layer's backward should take the split route for its training rows
    A [N, T, d], B [N, T, p]: weight gradient and <g_i, V> in one pass, instead of the weight-
    gradient GEMM plus the cheaper of the Gram and dense products. V is either given (a dense
    vector known before the backward: v_given) or the summed gradient of M validation rows of
    S tokens (computed first: 2 M S p d flops, which the dense route pays too); per_val: one V
    per validation row (M dots per sample; not when the M [p, d] vectors exceed INRUN_TEMP_MB);
    norms: squared norms instead of dots (against the Gram / materialised norm routes).
    weight_grad=False: the layer owes no weight gradient (functional API), so the other routes
    do not pay the GEMM while the split route still does. The torch reference writes and
    re-reads each chunk's per-sample tiles; cpp/Triton keep them in registers."""
    forced = requested_route()
    if forced != "auto":
        return forced == "split"
    # one decision per layer shape and setting: this runs in every linear backward of every step
    key = (tuple(A.shape), B.shape[-1], M, S, v_given, per_val, norms, weight_grad, A.dtype,
           A.device.type, requested_backend(), temp_budget_elems())
    hit = _split_choices.get(key)
    if hit is None:
        if len(_split_choices) > 4096:
            _split_choices.clear()
        hit = _split_choices[key] = _split_pays(A, B, M, S, v_given, per_val, norms, weight_grad)
    return hit


_split_choices: dict[tuple, bool] = {}


# What one launched op costs beyond its arithmetic, in flops: on CPU the references' Python and
# dispatch overhead, ~20 us per op at ~40 GFLOP/s (measured here on 2-D layers of small models,
# where it decides); not measured on a GPU (0: arithmetic and bytes only).
_OP_FLOPS = {"cpu": 8e5}
# ops per call, torch reference: the GEMM (mm, scale); the Gram route; the dense route (given V /
# with its validation gradient); the split route (reference chunk / C++ call) and its V
_OPS = {"gemm": 2, "gram": 8, "dense": 6, "dense_val": 9, "split_torch": 7, "split_cpp": 2, "val": 3}
# The C++ split kernel against the library GEMM it replaces (measured here, 1-2 threads, AMD EPYC,
# benchmarks.split_bench and the T sweep in issue 12's note): its register-tiled GEMM runs at
# ~1/1.5 of MKL's speed (1.4-1.9x at T >= 64), and its per-sample epilogue (read-add-write of the
# weight-gradient tile, read of V's tile, one FMA) costs ~0.75 ns per weight entry and sample,
# ~30 flops at this cost model's rate: at T = 1 (2-D inputs) the kernel is 6-13x the GEMM.
_CPP_GEMM_FACTOR = 1.5
_CPP_EPILOGUE_FLOPS = 30.0


def _split_pays(A: Tensor, B: Tensor, M: int, S: int, v_given: bool, per_val: bool, norms: bool,
                weight_grad: bool) -> bool:
    N, T, d = A.shape
    p = B.shape[-1]
    e = A.element_size()
    K = M if per_val else 1
    if per_val and K * p * d > temp_budget_elems():   # the M per-validation-row gradients
        return False
    bal, op = _balance(A), _OP_FLOPS.get(A.device.type, 0.0)
    gemm = (2.0 * N * T * p * d + bal * N * T * (d + p) * e + _OPS["gemm"] * op) if weight_grad else 0.0
    routes = dot_route_costs(N, T, 0 if v_given else M, 0 if v_given else S, d, p, per_val, e, _fused(A, B))
    if norms:     # the GEMM plus the cheaper norm route (one op each beyond the GEMM's)
        costs = self_route_costs(N, T, d, p, N, e, _fused(A, B))
        other = min(c[0] + bal * c[1] for c in costs.values()) + _OPS["gram"] * op
        val = 0.0
    elif v_given:   # the GEMM plus the dense product with the given V
        other = routes["dense"][0] + bal * routes["dense"][1] + _OPS["dense"] * op
        val = 0.0
    else:
        other = min(routes["gram"][0] + bal * routes["gram"][1] + _OPS["gram"] * op,
                    routes["dense"][0] + bal * routes["dense"][1] + _OPS["dense_val"] * op)
        val = 2.0 * M * S * p * d + bal * M * S * (d + p) * e + _OPS["val"] * op
    flops, byts = split_cost(N, T, d, p, e, K)
    backend = resolve_backend(A, B, primitive="split_dot")
    if backend == "torch":
        byts += (2.0 + K) * N * p * d * e   # the reference's [chunk, p, d] tiles: written, read 1 + K times
    elif backend == "cpp":
        flops += (_CPP_GEMM_FACTOR - 1.0) * 2.0 * N * T * p * d + _CPP_EPILOGUE_FLOPS * K * N * p * d
    split = flops + bal * byts + val + _OPS["split_cpp" if backend == "cpp" else "split_torch"] * op
    return split < gemm + other


def ghost_split_dot(A: Tensor, B: Tensor, V: Tensor, v_bias: Tensor | None = None,
                    lengths: Tensor | None = None, scale: float = 1.0, *, bias: bool | None = None):
    """(scale * sum_i g_i [p, d], scale * bias gradient [p] or None, <g_i, V> (+ <B_i^T 1, v_bias>) [N])
    in one pass over the weight-gradient GEMM (ops/split.py). A/B: [N, T, d]/[N, T, p] or [N, d]/[N, p].
    K vectors at once: V [K, p, d] (v_bias [K, p]) -> dots [N, K]."""
    return _impl("split_dot", (A, B, V))(A, B, V, v_bias, lengths, scale, bias=bias)


def ghost_split_norms(A: Tensor, B: Tensor, lengths: Tensor | None = None, scale: float = 1.0, *,
                      bias: bool = False):
    """(scale * sum_i g_i [p, d], bias gradient or None, ||g_i||^2 [N]) in one pass."""
    return _impl("split_norms", (A, B))(A, B, lengths, scale, bias=bias)
