"""The split route (ops/split.py, csrc/split.cpp): weight gradient + per-sample dots / norms in
one pass, against a float64 oracle of explicit per-sample gradients; the C++ kernel against the
reference, bitwise across thread counts; dispatch, failure fallback and the custom ops.

The C++ extension is built on first use (~45 s on 2 busy cores, then cached under
~/.cache/inrun_kernels or INRUN_EXT_DIR); where it cannot be built the C++ tests fail with
the compiler's message unless INRUN_SKIP_CPP=1."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

from inrun_kernels import ops
from inrun_kernels.ops import cpp_backend, dispatch
from inrun_kernels.ops import split as sp
from inrun_kernels.ops.budget import temp_budget

SHAPES = [  # (N, T or None for 2-D, d, p)
    (5, None, 7, 3), (1, 1, 1, 1), (4, 7, 13, 11), (3, 9, 37, 29), (6, 5, 100, 70),
]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def make(N, T, d, p, dtype=torch.float64, seed=0, lengths=False):
    g = torch.Generator().manual_seed(seed)
    shp = (N, d) if T is None else (N, T, d)
    A = torch.randn(*shp, generator=g, dtype=torch.float64).to(dtype)
    B = torch.randn(*shp[:-1], p, generator=g, dtype=torch.float64).to(dtype)
    V = torch.randn(p, d, generator=g, dtype=torch.float64)
    vb = torch.randn(p, generator=g, dtype=torch.float64)
    L = None
    if lengths and T is not None:
        L = torch.randint(0, T + 1, (N,), generator=g)
        L[0] = T
    return A, B, V, vb, L


def oracle(A, B, V=None, vb=None, L=None, scale=1.0, bias=False):
    """Explicit float64 per-sample gradients g_i = B_i^T A_i: (W, bias grad or None, dots or
    norms). Padded tokens are dropped with where (NaN-poisoned padding stays out)."""
    A, B = A.double(), B.double()
    if A.dim() == 2:
        A, B = A[:, None], B[:, None]
    if L is not None:
        keep = (torch.arange(A.shape[1], device=A.device)[None, :] < L[:, None])[..., None]
        A, B = torch.where(keep, A, 0.0), torch.where(keep, B, 0.0)
    g = torch.einsum("ntp,ntd->npd", B, A)            # every g_i, explicitly
    bs = B.sum(1)
    W = g.sum(0) * scale
    gb = bs.sum(0) * scale if bias else None
    if V is None:
        out = g.square().sum((1, 2)) + (bs.square().sum(1) if bias else 0)
    elif V.dim() == 3:   # K vectors: [N, K]
        out = torch.einsum("npd,kpd->nk", g, V.double()) + (bs @ vb.double().T if (bias and vb is not None) else 0)
    else:
        out = (g * V.double()).sum((1, 2)) + (bs @ vb.double() if (bias and vb is not None) else 0)
    return W, gb, out


def check(got, want, tol):
    assert len(got) == 3
    for x, y in zip(got, want):
        if y is None:
            assert x is None
        else:
            assert x.shape == y.shape
            assert rel(x, y) <= tol, (rel(x, y), tol)


# ---- the PyTorch reference ----------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("with_len", [False, True])
def test_reference_matches_oracle(shape, with_bias, with_len):
    A, B, V, vb, L = make(*shape, lengths=with_len)
    vb = vb if with_bias else None
    got = sp.split_dot(A, B, V, vb, L, scale=0.25)
    check(got, oracle(A, B, V, vb, L, 0.25, bias=with_bias), 1e-10)
    got = sp.split_norms(A, B, L, scale=3.0, bias=with_bias)
    check(got, oracle(A, B, None, None, L, 3.0, bias=with_bias), 1e-10)
    with temp_budget(1e-4):   # ~26 elements: one sample and a few rows at a time
        check(sp.split_dot(A, B, V, vb, L, scale=0.25), oracle(A, B, V, vb, L, 0.25, bias=with_bias), 1e-10)
        check(sp.split_norms(A, B, L, bias=with_bias), oracle(A, B, None, None, L, bias=with_bias), 1e-10)


def make_k(shape, K, dtype=torch.float64, lengths=False, seed=0):
    """make() with K vectors: V [K, p, d], v_bias [K, p]."""
    A, B, _, _, L = make(*shape, dtype=dtype, lengths=lengths, seed=seed)
    g = torch.Generator().manual_seed(seed + 7)
    V = torch.randn(K, shape[3], shape[2], generator=g, dtype=torch.float64)
    vb = torch.randn(K, shape[3], generator=g, dtype=torch.float64)
    return A, B, V, vb, L


@pytest.mark.parametrize("shape", SHAPES[::2] + [SHAPES[3]])
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("with_bias", [False, True])
def test_reference_k_vectors_match_oracle(shape, K, with_bias):
    """V [K, p, d] (per-validation-sample dots): [N, K], column k = the dot with V[k] alone."""
    A, B, V, vb, L = make_k(shape, K, lengths=True)
    vb = vb if with_bias else None
    got = sp.split_dot(A, B, V, vb, L, scale=0.5)
    assert got[2].shape == (A.shape[0], K)
    check(got, oracle(A, B, V, vb, L, 0.5, bias=with_bias), 1e-10)
    with temp_budget(1e-4):
        check(sp.split_dot(A, B, V, vb, L, scale=0.5), oracle(A, B, V, vb, L, 0.5, bias=with_bias), 1e-10)
    one = sp.split_dot(A, B, V[K - 1], None if vb is None else vb[K - 1], L)[2]
    assert rel(got[2][:, K - 1], one) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_low_precision_accumulates_in_fp32(dtype):
    A, B, V, vb, L = make(4, 7, 13, 11, dtype=dtype, lengths=True)
    W, gb, out = sp.split_dot(A, B, V.float(), vb.float(), L)
    assert W.dtype == gb.dtype == out.dtype == torch.float32
    check((W, gb, out), oracle(A, B, V.float(), vb.float(), L, bias=True), 1e-5)
    W, gb, out = sp.split_norms(A, B, L)
    assert W.dtype == out.dtype == torch.float32 and gb is None


def test_bias_flag_and_shape_errors():
    A, B, V, vb, _ = make(3, 4, 5, 6)
    assert sp.split_dot(A, B, V)[1] is None
    W, gb, out = sp.split_dot(A, B, V, bias=True)          # bias gradient, no bias product
    check((W, gb, out), oracle(A, B, V, None, bias=True), 1e-10)
    with pytest.raises(ValueError, match="V"):
        sp.split_dot(A, B, V.T)
    with pytest.raises(ValueError, match="v_bias"):
        sp.split_dot(A, B, V, vb[:2])
    with pytest.raises(ValueError, match="lengths"):
        sp.split_dot(A, B, V, lengths=torch.tensor([1]))
    with pytest.raises(ValueError, match="same rank"):
        sp.split_dot(A[:, 0], B, V)
    V3 = torch.stack([V, V])
    with pytest.raises(ValueError, match="v_bias"):    # [p] with V [K, p, d]
        sp.split_dot(A, B, V3, vb)
    with pytest.raises(ValueError, match="v_bias"):    # [K, p] with V [p, d]
        sp.split_dot(A, B, V, torch.stack([vb, vb]))
    with pytest.raises(ValueError, match="K = 0"):
        sp.split_dot(A, B, V3[:0])
    with pytest.raises(ValueError, match="V"):
        sp.split_dot(A, B, V3[None])


# ---- the C++ kernel -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def ext():
    if os.environ.get("INRUN_SKIP_CPP") == "1":
        pytest.skip("INRUN_SKIP_CPP=1")
    return cpp_backend.load()    # builds on first use; raises with the compiler's message


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("with_len", [False, True])
def test_cpp_matches_oracle_fp64(ext, shape, with_bias, with_len):
    A, B, V, vb, L = make(*shape, lengths=with_len)
    vb = vb if with_bias else None
    check(cpp_backend.split_dot(A, B, V, vb, L, scale=0.25), oracle(A, B, V, vb, L, 0.25, bias=with_bias), 1e-10)
    check(cpp_backend.split_norms(A, B, L, scale=3.0, bias=with_bias),
          oracle(A, B, None, None, L, 3.0, bias=with_bias), 1e-10)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("K", [1, 2, 5])
def test_cpp_k_vectors_match_oracle(ext, shape, K):
    A, B, V, vb, L = make_k(shape, K, lengths=True)
    check(cpp_backend.split_dot(A, B, V, vb, L, scale=0.25), oracle(A, B, V, vb, L, 0.25, bias=True), 1e-10)
    check(cpp_backend.split_dot(A, B, V, None, None), oracle(A, B, V), 1e-10)
    A32, B32 = A.float(), B.to(torch.bfloat16)      # mixed inputs: fp32 accumulation
    got, want = cpp_backend.split_dot(A32, B32, V.float(), vb.float(), L), sp.split_dot(A32, B32, V.float(), vb.float(), L)
    assert got[2].dtype == torch.float32 and got[2].shape == (A.shape[0], K)
    check(got, want, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpp_matches_reference_low_precision(ext, dtype):
    A, B, V, vb, L = make(5, 9, 61, 35, dtype=dtype, lengths=True)
    V, vb = V.float(), vb.float()
    got, want = cpp_backend.split_dot(A, B, V, vb, L, 0.5), sp.split_dot(A, B, V, vb, L, 0.5)
    for x, y in zip(got, want):
        assert x.dtype == y.dtype == torch.float32
    check(got, want, 1e-5)
    check(cpp_backend.split_norms(A, B, L, bias=True), sp.split_norms(A, B, L, bias=True), 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_bitwise_across_thread_counts(ext, dtype):
    A, B, V, vb, L = make(6, 17, 300, 200, dtype=dtype, lengths=True)   # 4 x 5 macro tiles
    V, vb = V.to(dtype), vb.to(dtype)
    before = torch.get_num_threads()
    try:
        res = {}
        for n in (1, 2):
            torch.set_num_threads(n)
            res[n] = (cpp_backend.split_dot(A, B, V, vb, L) + cpp_backend.split_norms(A, B, L, bias=True)
                      + cpp_backend.split_dot(A, B, torch.stack([V, -V, 2 * V]), torch.stack([vb, vb, vb]), L))
    finally:
        torch.set_num_threads(before)
    for x, y in zip(res[1], res[2]):
        assert torch.equal(x, y)


def test_cpp_edge_cases(ext):
    A, B, V, _, _ = make(3, 4, 5, 6)
    L = torch.zeros(3, dtype=torch.long)            # no valid token: zero everything
    W, gb, out = cpp_backend.split_dot(A, B, V, None, L, bias=True)
    assert not W.any() and not gb.any() and not out.any()
    W, _, out = cpp_backend.split_dot(A[:0], B[:0], V)   # no samples
    assert W.shape == (6, 5) and not W.any() and out.shape == (0,)
    A2, B2 = A.transpose(1, 2).contiguous().transpose(1, 2), B[..., ::1]   # non-contiguous input
    check(cpp_backend.split_dot(A2, B2, V), oracle(A, B, V), 1e-12)


# ---- dispatch, fallback, custom ops --------------------------------------------------------
def test_dispatch_picks_cpp_on_cpu(ext, monkeypatch):
    calls = []
    real = cpp_backend.load

    def counting():
        calls.append(1)
        return real()
    monkeypatch.setattr(cpp_backend, "load", counting)
    A, B, V, vb, L = make(4, 7, 13, 11, lengths=True)
    for backend in ("auto", "cpp"):
        monkeypatch.setenv("INRUN_BACKEND", backend)
        calls.clear()
        check(ops.ghost_split_dot(A, B, V, vb, L), oracle(A, B, V, vb, L, bias=True), 1e-10)
        check(ops.ghost_split_norms(A, B, L), oracle(A, B, None, None, L), 1e-10)
        assert calls
    monkeypatch.setenv("INRUN_BACKEND", "torch")
    calls.clear()
    check(ops.ghost_split_dot(A, B, V, vb, L), oracle(A, B, V, vb, L, bias=True), 1e-10)
    assert not calls
    monkeypatch.setenv("INRUN_BACKEND", "cpp")     # the other primitives: the reference, no build
    calls.clear()
    assert dispatch.resolve_backend(A, B, primitive="dot_gram") == "torch"
    ops.ghost_dot(A, B, A[:2], B[:2], bias=False)
    assert not calls


def test_failed_build_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(cpp_backend, "_state", {"error": "RuntimeError: Error building extension: g++: not found"})
    monkeypatch.setattr(dispatch, "_warned", set())
    A, B, V, vb, L = make(4, 7, 13, 11, lengths=True)
    monkeypatch.setenv("INRUN_BACKEND", "auto")
    with pytest.warns(RuntimeWarning, match="PyTorch reference .* g\\+\\+: not found"):
        check(ops.ghost_split_dot(A, B, V, vb, L), oracle(A, B, V, vb, L, bias=True), 1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                # only once
        ops.ghost_split_norms(A, B, L)
    monkeypatch.setenv("INRUN_BACKEND", "cpp")
    with pytest.raises(RuntimeError, match="INRUN_BACKEND=cpp was requested .* g\\+\\+: not found"):
        ops.ghost_split_dot(A, B, V)


def test_auto_never_builds_for_other_primitives(monkeypatch):
    def boom():
        raise AssertionError("the C++ extension was loaded for a primitive it does not have")
    monkeypatch.setattr(cpp_backend, "load", boom)
    monkeypatch.setenv("INRUN_BACKEND", "auto")
    A, B, V, _, _ = make(3, 4, 5, 6)
    ops.ghost_dot(A, B, A[:2], B[:2], bias=True)
    ops.ghost_norms_sq(A, B, bias=False)
    ops.ghost_dot_dense(A, B, V)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_custom_ops_opcheck(backend, monkeypatch):
    if backend == "auto" and os.environ.get("INRUN_SKIP_CPP") == "1":
        pytest.skip("INRUN_SKIP_CPP=1")
    monkeypatch.setenv("INRUN_BACKEND", backend)
    A, B, V, vb, L = make(4, 7, 13, 11, dtype=torch.float32, lengths=True)
    V, vb = V.float(), vb.float()
    W, gb, out = torch.ops.inrun.split_dot(A, B, V, vb, L, 0.5, True)
    check((W, gb, out), oracle(A, B, V, vb, L, 0.5, bias=True), 1e-5)
    W, gb, out = torch.ops.inrun.split_norms(A, B, L, 2.0, False)
    assert gb.shape == (0,)
    check((W, None, out), oracle(A, B, None, None, L, 2.0), 1e-5)
    torch.library.opcheck(torch.ops.inrun.split_dot.default, (A, B, V, vb, L, 0.5, True))
    torch.library.opcheck(torch.ops.inrun.split_dot.default, (A, B, V), {"bias": False})
    torch.library.opcheck(torch.ops.inrun.split_norms.default, (A, B, L, 1.0, True))
    V3, vb3 = torch.stack([V, 2 * V]), torch.stack([vb, -vb])   # K vectors: dots [N, K]
    W, gb, out = torch.ops.inrun.split_dot(A, B, V3, vb3, L, 0.5, True)
    check((W, gb, out), oracle(A, B, V3, vb3, L, 0.5, bias=True), 1e-5)
    torch.library.opcheck(torch.ops.inrun.split_dot.default, (A, B, V3, vb3, L, 0.5, True))
