"""The Triton kernel of the split route (kernels/ghost_split.py): weight gradient, bias gradient
and per-sample dots (one V [p, d] or K vectors V [K, p, d]) / norms against the float64 reference
ops/split.py AND an independent float64 oracle of explicit per-sample gradients g_i = B_i^T A_i;
dispatch reaches the kernel.

Runs on CPU under TRITON_INTERPRET=1 (conftest.py sets it before the package is imported); on a
CUDA machine benchmarks/gpu_check.sh runs the same tests on the compiled kernels (pytest -m
"triton or gpu"), plus the `gpu`-marked one (bf16 tensor cores, autotuning on).

As in test_kernels.py: kernel output buffers (configs.empty) start NaN-filled, so an entry the
kernel forgets to write fails; padded tokens (t >= length) are NaN in the kernel's inputs, so
reading one instead of masking it fails too (the reference and oracle get zeros there).
"""
from __future__ import annotations

import pytest
import torch

import inrun_kernels.ops as ops
from inrun_kernels.ops import split as sp

from tests.triton_setup import C, DEVICE, INTERPRET, needs_gpu, poison_outputs  # noqa: E402,F401  (skips without triton)
from inrun_kernels.kernels import ghost_split as gs  # noqa: E402
from tests.test_split import oracle  # noqa: E402  (explicit float64 per-sample gradients)

pytestmark = pytest.mark.triton

KERNEL = "_ghost_split_kernel"
# Relative tolerance per input dtype, applied to the same quantity computed from |inputs| (so
# cancellation cannot make a check vacuous). Low-precision products are exact in the fp32
# accumulator and the oracle gets the same rounded inputs: only fp32 accumulation error remains.
TOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}

# (N, T or None for 2-D inputs, d, p): odd (no size a multiple of a block), powers of 2, 2-D,
# and several (p, d) tiles per output (blocks are capped at 64 under the interpreter).
SHAPES = {"odd": (3, 5, 7, 9), "pow2": (4, 16, 32, 64), "2d": (5, None, 17, 33), "tiles": (6, 5, 100, 70)}
# bias flag, v_bias given: no bias; bias gradient only (no bias product); both; v_bias given
# but bias=False (the reference then ignores v_bias)
BIAS_MODES = {"nobias": (False, False), "gradonly": (True, False), "full": (True, True),
              "vb_ignored": (False, True)}

NO_LAUNCH = {"test_configs_and_prune", "test_fp64_and_empty_use_the_reference", "test_shape_errors"}


@pytest.fixture(autouse=True)
def _kernel_ran(request, triton_launches):
    yield
    name = request.node.originalname
    if name not in NO_LAUNCH:
        assert triton_launches.get(KERNEL, 0) > 0, f"{name}: the split kernel was not launched ({triton_launches})"


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    poison_outputs(monkeypatch)


# ---- inputs, oracle, checks -----------------------------------------------------------------
def _lengths(n: int, t: int) -> torch.Tensor:
    """Full, empty (length 0), half, one token, all but one, longer than T (= full)."""
    pattern = [t, 0, max(1, t // 2), 1, max(0, t - 1), t + 3]
    return torch.tensor([pattern[i % len(pattern)] for i in range(n)], dtype=torch.int64, device=DEVICE)


def _pad(X: torch.Tensor, L: torch.Tensor | None, value: float) -> torch.Tensor:
    if L is None:
        return X
    X3 = X[:, None] if X.dim() == 2 else X
    pad = torch.arange(X3.shape[1], device=X.device)[None, :] >= L[:, None]
    return X3.masked_fill(pad[..., None], value).reshape(X.shape)


def _inputs(shape, dtype=torch.float32, padded=False, seed=0):
    N, T, d, p = shape
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    lead = (N,) if T is None else (N, T)
    A = torch.randn(*lead, d, generator=g, dtype=torch.float64, device=DEVICE).to(dtype)
    B = torch.randn(*lead, p, generator=g, dtype=torch.float64, device=DEVICE).to(dtype)
    V = torch.randn(p, d, generator=g, dtype=torch.float64, device=DEVICE).float()
    vb = torch.randn(p, generator=g, dtype=torch.float64, device=DEVICE).float()
    L = _lengths(N, 1 if T is None else T) if padded else None
    return A, B, V, vb, L


def _abs(*ts):
    return [None if t is None else t.abs() for t in ts]


def _check(got, want, bound, tol, what, dtype=torch.float32):
    assert len(got) == 3, what
    for name, x, y, b in zip(("W", "bias grad", "products"), got, want, bound):
        if y is None:
            assert x is None, f"{what} {name}: expected None"
            continue
        assert x.shape == y.shape, f"{what} {name}: shape {tuple(x.shape)} != {tuple(y.shape)}"
        assert x.dtype == dtype, f"{what} {name}: dtype {x.dtype}, expected {dtype}"
        assert torch.isfinite(x).all(), f"{what} {name}: non-finite (unwritten entry or padding read)\n{x}"
        err = (x.double() - y).abs()
        lim = tol * b.abs() + 1e-12
        assert (err <= lim).all(), \
            f"{what} {name}: max err {err.max().item():.3e}, worst ratio {(err / lim).max().item():.2f}"


def _dot_vs(orc, A, B, V, vb, L, scale, bias, vb_given, dtype, what):
    """split_dot on NaN-padded inputs against oracle `orc` and the float64 reference; returns
    the padded inputs (NaN, 0)."""
    An, Bn = _pad(A, L, float("nan")), _pad(B, L, float("nan"))
    A0, B0 = _pad(A, L, 0.0).double(), _pad(B, L, 0.0).double()
    v = vb if vb_given else None
    got = gs.split_dot(An, Bn, V, v, L, scale, bias=bias)
    want = orc(A0, B0, V, v, L, scale, bias)
    ref = sp.split_dot(A0, B0, V.double(), None if v is None else v.double(), L, scale, bias=bias)
    bound = orc(*_abs(A0, B0, V, v), L, abs(scale), bias)
    assert got[2].shape == want[2].shape, f"{what}: dots shape {tuple(got[2].shape)}"
    _check(ref, want, bound, 1e-12, f"{what} reference vs oracle", torch.float64)
    _check(got, want, bound, TOL[dtype], f"{what} split_dot vs oracle")
    _check(got, ref, bound, TOL[dtype], f"{what} split_dot vs reference")
    return An, Bn, A0, B0


def _run_both(A, B, V, vb, L, scale, bias, vb_given, dtype, what):
    """split_dot and split_norms on NaN-padded inputs against the reference and the oracle."""
    An, Bn, A0, B0 = _dot_vs(oracle, A, B, V, vb, L, scale, bias, vb_given, dtype, what)

    got = gs.split_norms(An, Bn, L, scale, bias=bias)
    want = oracle(A0, B0, None, None, L, scale, bias)
    ref = sp.split_norms(A0, B0, L, scale, bias=bias)
    bound = oracle(*_abs(A0, B0), None, None, L, abs(scale), bias)
    _check(got, want, bound, TOL[dtype], f"{what} split_norms vs oracle")
    _check(got, ref, bound, TOL[dtype], f"{what} split_norms vs reference")


# ---- fp32 -------------------------------------------------------------------------------------
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("mode", BIAS_MODES.values(), ids=BIAS_MODES.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_split_fp32(shape, mode, padded):
    bias, vb_given = mode
    A, B, V, vb, L = _inputs(shape, torch.float32, padded)
    _run_both(A, B, V, vb, L, 0.375, bias, vb_given, torch.float32, f"{shape}")


def test_default_bias_follows_v_bias_and_scale_one():
    A, B, V, vb, L = _inputs(SHAPES["odd"], torch.float32, True)
    An, Bn = _pad(A, L, float("nan")), _pad(B, L, float("nan"))
    A0, B0 = _pad(A, L, 0.0), _pad(B, L, 0.0)
    bound = oracle(*_abs(A0, B0, V, vb), L, 1.0, True)
    _check(gs.split_dot(An, Bn, V, vb, L), oracle(A0, B0, V, vb, L, 1.0, True), bound, 1e-5, "bias=None, vb")
    bound = oracle(*_abs(A0, B0, V), None, L, 1.0, False)
    _check(gs.split_dot(An, Bn, V, None, L), oracle(A0, B0, V, None, L, 1.0, False), bound, 1e-5, "bias=None")


# ---- fp16 / bf16 --------------------------------------------------------------------------
@pytest.mark.parametrize("v_dtype", ["fp32", "same"])
@pytest.mark.parametrize("shape", [SHAPES["odd"], SHAPES["pow2"]], ids=["odd", "pow2"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_split_low_precision(dtype, shape, v_dtype):
    """Low-precision inputs accumulate in fp32 (under the interpreter bf16 tl.dot operands are
    upcast to fp32, STYLE.md; on a GPU this runs the bf16/fp16 tensor cores)."""
    A, B, V, vb, L = _inputs(shape, dtype, True)
    if v_dtype == "same":
        V, vb = V.to(dtype), vb.to(dtype)
    _run_both(A, B, V, vb, L, 2.0, True, True, dtype, f"{dtype} {shape} V {V.dtype}")


# ---- K vectors: V [K, p, d] -> dots [N, K] ----------------------------------------------------
def _loop_oracle(A, B, V, vb, L, scale, bias):
    """Per-sample gradients formed one sample at a time in float64 (valid tokens sliced out):
    (W, bias grad or None, dots [N, K]) with dots[i, k] = <g_i, V[k]> (+ <B_i^T 1, vb[k]>)."""
    A, B, V = A.double(), B.double(), V.double()
    if A.dim() == 2:
        A, B = A[:, None], B[:, None]
    N, T, d = A.shape
    W = torch.zeros(B.shape[-1], d, dtype=torch.float64, device=A.device)
    gb = torch.zeros(B.shape[-1], dtype=torch.float64, device=A.device)
    out = torch.zeros(N, V.shape[0], dtype=torch.float64, device=A.device)
    for i in range(N):
        n = T if L is None else min(T, int(L[i]))
        g = B[i, :n].T @ A[i, :n]
        W += g
        gb += B[i, :n].sum(0)
        for k in range(V.shape[0]):
            out[i, k] = (g * V[k]).sum()
            if bias and vb is not None:
                out[i, k] += B[i, :n].sum(0) @ vb[k].double()
    return W * scale, (gb * scale if bias else None), out


def _inputs_k(shape, K, dtype=torch.float32, v_dtype=torch.float32, strided=False, seed=1):
    """_inputs' A, B, lengths (padded) with K vectors V [K, p, d] and v_bias [K, p]; `strided`:
    V and v_bias are non-contiguous views (k is not the outer stride)."""
    A, B, _, _, L = _inputs(shape, dtype, True, seed)
    p, d = shape[3], shape[2]
    g = torch.Generator(device=DEVICE).manual_seed(seed + 1)
    if strided:
        V = torch.randn(p, d, K, generator=g, dtype=torch.float64, device=DEVICE).permute(2, 0, 1)
        vb = torch.randn(p, K, generator=g, dtype=torch.float64, device=DEVICE).T
    else:
        V = torch.randn(K, p, d, generator=g, dtype=torch.float64, device=DEVICE)
        vb = torch.randn(K, p, generator=g, dtype=torch.float64, device=DEVICE)
    return A, B, V.to(v_dtype), vb.to(v_dtype), L


def _run_k(A, B, V, vb, L, scale, bias, vb_given, dtype, what):
    """split_dot with V [K, p, d] against the loop oracle and the float64 reference: dots [N, K] fp32."""
    _dot_vs(_loop_oracle, A, B, V, vb, L, scale, bias, vb_given, dtype, what)


@pytest.mark.parametrize("mode", [BIAS_MODES["nobias"], BIAS_MODES["full"]], ids=["nobias", "full"])
@pytest.mark.parametrize("shape", [SHAPES["odd"], SHAPES["2d"], SHAPES["tiles"]], ids=["odd", "2d", "tiles"])
@pytest.mark.parametrize("K", [1, 2, 3])
def test_split_dot_k_vectors(K, shape, mode):
    """K = 1 given as [1, p, d] takes the one-vector path but keeps dots [N, 1]; K > 1 loops over
    k in the epilogue. Padded (incl. length-0 samples; 2-D: lengths 0 and 1), several tiles."""
    bias, vb_given = mode
    A, B, V, vb, L = _inputs_k(shape, K)
    _run_k(A, B, V, vb, L, 0.375, bias, vb_given, torch.float32, f"K={K} {shape}")


@pytest.mark.parametrize("mode", [BIAS_MODES["gradonly"], BIAS_MODES["vb_ignored"]], ids=["gradonly", "vb_ignored"])
def test_split_dot_k_vectors_bias_modes(mode):
    bias, vb_given = mode
    A, B, V, vb, L = _inputs_k(SHAPES["pow2"], 2)
    _run_k(A, B, V, vb, L, 2.0, bias, vb_given, torch.float32, f"K=2 {mode}")


def test_split_dot_k_vectors_strided_unpadded_default_bias():
    """Non-contiguous V / v_bias (k the innermost stride), no lengths, bias defaulting to
    whether v_bias is given."""
    shape = SHAPES["tiles"]
    A, B, V, vb, _ = _inputs_k(shape, 3, strided=True)
    assert not V.is_contiguous() and V.stride(0) == 1
    _run_k(A, B, V, vb, None, 0.5, True, True, torch.float32, "strided V")
    got = gs.split_dot(A, B, V, vb)
    want = _loop_oracle(A, B, V, vb, None, 1.0, True)
    _check(got, want, _loop_oracle(*_abs(A, B, V, vb), None, 1.0, True), 1e-5, "bias=None, vb [K, p]")


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_split_dot_k_vectors_low_precision(dtype, K):
    """Low-precision A, B, V and v_bias: fp32 accumulation, fp32 dots [N, K]."""
    A, B, V, vb, L = _inputs_k(SHAPES["odd"], K, dtype, dtype)
    _run_k(A, B, V, vb, L, 2.0, True, True, dtype, f"{dtype} K={K}")


@pytest.mark.parametrize("sms", [2, 10_000], ids=["uneven", "one_per_sample"])
def test_split_dot_k_vectors_sample_splits(monkeypatch, sms):
    """Sample splits with K vectors: each split writes its samples' rows of PART[tile, i, k]."""
    monkeypatch.setattr(gs, "_sm_target", lambda device: sms)
    A, B, V, vb, L = _inputs_k((5, 6, 20, 24), 3)
    assert gs.plan_sample_splits(5, 1, DEVICE)[0] > 1
    _run_k(A, B, V, vb, L, 0.5, True, True, torch.float32, f"K=3 sms={sms}")


# ---- sample splits, strides, edge cases ------------------------------------------------------
@pytest.mark.parametrize("sms", [2, 10_000], ids=["uneven", "one_per_sample"])
def test_sample_splits(monkeypatch, sms):
    """Splitting the samples (what fills a GPU when [p, d] has few tiles): the weight gradient is
    summed over splits, every sample's product is written by exactly one split."""
    monkeypatch.setattr(gs, "_sm_target", lambda device: sms)
    shape = (5, 6, 20, 24)          # one (p, d) tile: 2 -> splits of 3 + 2 samples, 10_000 -> 5 x 1
    splits, spl = gs.plan_sample_splits(shape[0], 1, DEVICE)
    assert splits > 1 and (splits, spl) == ((2, 3) if sms == 2 else (5, 1))
    A, B, V, vb, L = _inputs(shape, torch.float32, True)
    _run_both(A, B, V, vb, L, 0.5, True, True, torch.float32, f"splits={splits}")


def test_non_contiguous_and_all_padding():
    N, T, d, p = 4, 6, 12, 10
    A, B, V, vb, _ = _inputs((N, T, d, p))
    At = A.transpose(1, 2).contiguous().transpose(1, 2)       # token stride 1
    Bs = torch.randn(N, T, 2 * p, device=DEVICE)[..., ::2]      # feature stride 2
    Vt = V.T.contiguous().T
    bound = oracle(*_abs(A, Bs, V, vb), None, 0.5, True)
    _check(gs.split_dot(At, Bs, Vt, vb, None, 0.5), oracle(A, Bs, V, vb, None, 0.5, True), bound, 1e-5, "strided")
    L = torch.zeros(N, dtype=torch.int64, device=DEVICE)        # no valid token anywhere
    W, gb, out = gs.split_dot(_pad(A, L, float("nan")), _pad(B, L, float("nan")), V, vb, L, bias=True)
    assert W.shape == (p, d) and not W.any() and not gb.any() and not out.any()
    W, gb, out = gs.split_norms(_pad(A, L, float("nan")), _pad(B, L, float("nan")), L, bias=True)
    assert not W.any() and not gb.any() and not out.any()


def test_fp64_and_empty_use_the_reference(triton_launches):
    """fp64 inputs (any of A, B, V) run the exact reference, as the other launchers do; so do
    problems without samples, tokens or features."""
    A, B, V, vb, L = _inputs(SHAPES["odd"], torch.float32, True)
    A64, B64, V64, vb64 = A.double(), B.double(), V.double(), vb.double()
    got = gs.split_dot(A64, B64, V64, vb64, L, 0.5)
    want = sp.split_dot(A64, B64, V64, vb64, L, 0.5)
    assert all(torch.equal(x, y) for x, y in zip(got, want)) and got[0].dtype == torch.float64
    got = gs.split_dot(A, B, V64, None, L)                   # fp64 V alone: fp64 accumulation
    assert got[0].dtype == got[2].dtype == torch.float64
    got = gs.split_norms(A64, B64, L, bias=True)
    assert all(torch.equal(x, y) for x, y in zip(got, sp.split_norms(A64, B64, L, bias=True)))
    W, gb, out = gs.split_dot(A[:0], B[:0], V, vb)            # no samples
    assert W.shape == V.shape and not W.any() and out.shape == (0,) and W.dtype == torch.float32
    W, _, out = gs.split_norms(A[:, :0], B[:, :0])            # no tokens
    assert not W.any() and not out.any() and out.shape == (A.shape[0],)
    assert triton_launches == {}, triton_launches


def test_shape_errors():
    A, B, V, vb, _ = _inputs((3, 4, 5, 6))
    with pytest.raises(ValueError, match="V"):
        gs.split_dot(A, B, V.T)
    with pytest.raises(ValueError, match="v_bias"):
        gs.split_dot(A, B, V, vb[:2])
    VK, vbK = torch.stack([V, V]), torch.stack([vb, vb])       # K = 2 vectors
    for bad in (vb, vbK[:, :2], vbK[:1], vbK[None]):            # [p], [K, p'], [K', p], [1, K, p]
        with pytest.raises(ValueError, match="v_bias"):
            gs.split_dot(A, B, VK, bad)
    with pytest.raises(ValueError, match="v_bias"):
        gs.split_dot(A, B, V, vbK)                              # [K, p] with one V [p, d]
    for bad in (VK[None], VK.transpose(1, 2)):                  # [1, K, p, d], [K, d, p]
        with pytest.raises(ValueError, match="V"):
            gs.split_dot(A, B, bad)
    with pytest.raises(ValueError, match="lengths"):
        gs.split_norms(A, B, torch.tensor([1], device=DEVICE))
    with pytest.raises(ValueError, match="same rank"):
        gs.split_dot(A[:, 0], B, V)


# ---- configs ----------------------------------------------------------------------------------
def test_configs_and_prune(monkeypatch):
    monkeypatch.setenv("INRUN_AUTOTUNE", "0")
    (cfg,) = gs.configs(5, 7, 9)
    assert cfg.kwargs == {"BP": 16, "BD": 16, "BK": 16}
    monkeypatch.setattr(C, "interpreting", lambda: True)
    monkeypatch.setenv("INRUN_AUTOTUNE", "1")
    assert len(gs.configs(1024, 4096, 4096)) == 1, "the interpreter must get exactly one config"
    monkeypatch.setattr(C, "interpreting", lambda: False)
    full = gs.configs(1024, 4096, 4096)
    assert len(full) == len(gs._TILES) > 1
    assert all(c.num_warps in (4, 8) and 2 <= c.num_stages <= 4 for c in full)
    small = gs.configs(5, 40, 40)
    assert 1 <= len(small) < len(full) and all(c.kwargs["BK"] <= 16 and c.kwargs["BP"] <= 64 for c in small)
    hook = gs._prune(full, {"T": 5, "d": 40, "p": 40})
    assert [c.kwargs for c in hook] == [c.kwargs for c in small]


# ---- dispatch -----------------------------------------------------------------------------
def test_dispatch_reaches_the_kernel(monkeypatch):
    """INRUN_BACKEND=triton (with TRITON_INTERPRET=1 on CPU): ops.ghost_split_dot / _norms and the
    torch.ops.inrun.split_* custom ops run this kernel; INRUN_BACKEND=torch never does."""
    calls = {}

    def counting(name):
        real = getattr(gs, name)

        def wrapper(*a, **k):
            calls[name] = calls.get(name, 0) + 1
            return real(*a, **k)
        monkeypatch.setattr(gs, name, wrapper)

    counting("split_dot")
    counting("split_norms")
    A, B, V, vb, L = _inputs(SHAPES["odd"], torch.float32, True)

    def run_all():
        return [*ops.ghost_split_dot(A, B, V, vb, L, 0.5), *ops.ghost_split_norms(A, B, L, 2.0, bias=True),
                *torch.ops.inrun.split_dot(A, B, V, vb, L, 0.5, True)]

    monkeypatch.setenv("INRUN_BACKEND", "torch")
    want = run_all()
    assert calls == {}
    monkeypatch.setenv("INRUN_BACKEND", "triton")
    assert ops.resolve_backend(A, B, primitive="split_dot") == "triton"
    got = run_all()
    assert calls == {"split_dot": 2, "split_norms": 1}
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * w.abs().max().item())


# ---- large shapes / autotuning on a GPU ----------------------------------------------------
@pytest.mark.gpu
@needs_gpu
def test_large_autotuned_bf16(monkeypatch):
    """bf16 tensor cores, autotuning on (PART is reset between the timed configs), padding."""
    monkeypatch.setenv("INRUN_AUTOTUNE", "1")
    A, B, V, vb, L = _inputs((4, 300, 768, 1000), torch.bfloat16, True)
    An, Bn = _pad(A, L, float("nan")), _pad(B, L, float("nan"))
    A0, B0 = _pad(A, L, 0.0).double(), _pad(B, L, 0.0).double()
    for _ in range(2):      # the autotuning call, then the cached config
        got = gs.split_dot(An, Bn, V, vb, L, 0.5)
        _check(got, oracle(A0, B0, V, vb, L, 0.5, True), oracle(*_abs(A0, B0, V, vb), L, 0.5, True),
               TOL[torch.bfloat16], "large bf16 autotuned")
