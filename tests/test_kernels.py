"""Triton ghost kernels against the float64 PyTorch reference.

Runs on CPU under TRITON_INTERPRET=1 (set by conftest.py before the package is imported); on a
CUDA machine run it with TRITON_INTERPRET=0 (benchmarks/gpu_check.sh) and the same tests run the
compiled kernels on the GPU, plus the `gpu`-marked ones (bf16, large shapes, autotuning).

Every kernel output buffer comes from configs.empty, which an autouse fixture patches to a
NaN-filled tensor: an entry a kernel forgets to write poisons the result. Padded tokens
(t >= length) are filled with NaN in the kernel's inputs, so reading one instead of skipping it
poisons the result too (the reference gets the same inputs with zeros there).
"""
from __future__ import annotations

import os

import pytest
import torch

import inrun_kernels.ops as ops
from inrun_kernels.ops import reference as ref

from tests.triton_setup import C, DEVICE, INTERPRET, needs_gpu, poison_outputs  # noqa: E402,F401  (skips without triton)
from inrun_kernels.kernels import ghost_dot, ghost_gram  # noqa: E402
from inrun_kernels.ops import custom  # noqa: E402,F401

pytestmark = pytest.mark.triton

# Relative tolerance per input dtype, applied to the sum of |terms| (the reference run on |inputs|),
# so cancellation in the signed sum cannot make the check vacuous or flaky. Measured here (the
# interpreter): fp32 1.4e-7, fp16 9.4e-8 (fp16 products are exact in the fp32 accumulator; the
# reference gets the same rounded inputs). The GPU's fp32 dots use tf32x3 (about fp32
# accuracy); bf16 is checked on a GPU only (the interpreter upcasts it), at its old bound.
TOL = {torch.float32: 2e-6, torch.float16: 1e-5, torch.bfloat16: 2e-2}

# (N, T, d, p, M, S): odd sizes (not multiples of any block), powers of 2, 2-D layers (T=S=1),
# and S >= 64 (per-sample column groups also when summing over validation samples).
SHAPES = {
    "odd": (5, 13, 17, 33, 3, 11),
    "pow2": (4, 16, 32, 64, 2, 16),
    "2d": (6, 1, 17, 33, 4, 1),
    "longS": (2, 9, 8, 16, 2, 70),
}


# tests that call no kernel on purpose; every other test must launch at least one (a launcher
# that quietly fell back to the PyTorch reference would otherwise pass every comparison)
NO_LAUNCH = {"test_configs_collapse_and_prune", "test_opcheck", "test_custom_ops_match_reference",
             "test_compile_fullgraph", "test_eligibility_without_interpreter"}


@pytest.fixture(autouse=True)
def _kernels_ran(request, triton_launches, monkeypatch):
    name = request.node.originalname
    if name in NO_LAUNCH:   # custom-op registration on CPU tensors: whatever INRUN_BACKEND says
        monkeypatch.setenv("INRUN_BACKEND", "auto")   # (gpu_check.sh runs with triton)
    yield
    if name == "test_fp64_falls_back_to_reference":
        assert triton_launches == {}, triton_launches
    elif name not in NO_LAUNCH:
        assert sum(triton_launches.values()) > 0, f"{name}: no Triton kernel was launched"


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    poison_outputs(monkeypatch)


def _lengths(n: int, t: int) -> torch.Tensor:
    pattern = [t, 0, max(1, t // 2), 1, max(0, t - 1), t]
    return torch.tensor([pattern[i % len(pattern)] for i in range(n)], dtype=torch.int64)


def _pad_nan(X: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """X with every padded token set to NaN (kernels must never read those)."""
    if lengths is None:
        return X
    pad = torch.arange(X.shape[1], device=X.device)[None, :] >= lengths.to(X.device)[:, None]
    return X.masked_fill(pad[..., None], float("nan"))


def _pad_zero(X: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    if lengths is None:
        return X
    pad = torch.arange(X.shape[1], device=X.device)[None, :] >= lengths.to(X.device)[:, None]
    return X.masked_fill(pad[..., None], 0.0)


def _rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=torch.float64, device=DEVICE).to(dtype)


def _close(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor, dtype: torch.dtype, what: str):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == torch.float32, f"{what}: dtype {got.dtype}"
    assert torch.isfinite(got).all(), f"{what}: non-finite entries (unwritten or padded data read)\n{got}"
    err = (got.double() - want).abs()
    lim = TOL[dtype] * bound.abs() + 1e-12
    assert (err <= lim).all(), f"{what}: max err {err.max().item():.3e}, worst ratio {(err / lim).max().item():.2f}"


def _inputs(shape, dtype, padded):
    N, T, d, p, M, S = shape
    A, B = _rand(N, T, d, dtype=dtype), _rand(N, T, p, dtype=dtype)
    Av, Bv = _rand(M, S, d, dtype=dtype), _rand(M, S, p, dtype=dtype)
    L = _lengths(N, T).to(DEVICE) if padded else None
    VL = _lengths(M, S).flip(0).to(DEVICE) if padded else None
    return A, B, Av, Bv, L, VL


def _f64(*ts):
    return [None if t is None else t.double() for t in ts]


# ---- dot_gram ------------------------------------------------------------------------------
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("per_val", [False, True], ids=["sum", "perval"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_dot_gram(shape, bias, per_val, padded):
    A, B, Av, Bv, L, VL = _inputs(shape, torch.float32, padded)
    want = ref.dot_gram(*_f64(_pad_zero(A, L), _pad_zero(B, L), _pad_zero(Av, VL), _pad_zero(Bv, VL)),
                        bias=bias, per_val=per_val, lengths=L, val_lengths=VL)
    bound = ref.dot_gram(*_f64(A.abs(), B.abs(), Av.abs(), Bv.abs()), bias=bias, per_val=per_val,
                         lengths=L, val_lengths=VL)
    got = ghost_dot.dot_gram(_pad_nan(A, L), _pad_nan(B, L), _pad_nan(Av, VL), _pad_nan(Bv, VL),
                             bias=bias, per_val=per_val, lengths=L, val_lengths=VL)
    _close(got, want, bound, torch.float32, "dot_gram")


# ---- dot_dense -----------------------------------------------------------------------------
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("vdim", [2, 3], ids=["V2d", "V3d"])
@pytest.mark.parametrize("vbias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_dot_dense(shape, vbias, vdim, padded):
    N, T, d, p, M, S = shape
    A, B, _, _, L, _ = _inputs(shape, torch.float32, padded)
    V = _rand(M, p, d) if vdim == 3 else _rand(p, d)
    vb = (_rand(M, p) if vdim == 3 else _rand(p)) if vbias else None
    want = ref.dot_dense(*_f64(_pad_zero(A, L), _pad_zero(B, L), V, vb), lengths=L)
    bound = ref.dot_dense(*_f64(A.abs(), B.abs(), V.abs(), None if vb is None else vb.abs()), lengths=L)
    got = ghost_dot.dot_dense(_pad_nan(A, L), _pad_nan(B, L), V, vb, lengths=L)
    _close(got, want, bound, torch.float32, "dot_dense")


# ---- gram / norms_sq -----------------------------------------------------------------------
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_gram_and_norms(shape, bias, padded):
    A, B, _, _, L, _ = _inputs(shape, torch.float32, padded)
    A0, B0 = _f64(_pad_zero(A, L), _pad_zero(B, L))
    Aa, Ba = _f64(A.abs(), B.abs())
    An, Bn = _pad_nan(A, L), _pad_nan(B, L)
    got = ghost_gram.gram(An, Bn, bias=bias, lengths=L)
    _close(got, ref.gram(A0, B0, bias=bias, lengths=L), ref.gram(Aa, Ba, bias=bias, lengths=L),
           torch.float32, "gram")
    assert torch.equal(got, got.T), "gram must be exactly symmetric (mirrored)"
    got = ghost_gram.norms_sq(An, Bn, bias=bias, lengths=L)
    _close(got, ref.norms_sq(A0, B0, bias=bias, lengths=L), ref.norms_sq(Aa, Ba, bias=bias, lengths=L),
           torch.float32, "norms_sq")


# ---- splits of the column / feature axis (what fills a GPU at small N) --------------------
def test_split_columns(monkeypatch):
    monkeypatch.setattr(C, "target_programs", lambda device: 10_000)
    N, T, d, p, M, S = 3, 7, 5, 300, 2, 150
    A, B = _rand(N, T, d), _rand(N, T, p)
    Av, Bv = _rand(M, S, d), _rand(M, S, p)
    L, VL = torch.tensor([7, 3, 0], device=DEVICE), torch.tensor([150, 77], device=DEVICE)
    splits, _ = ghost_gram.plan_splits(1, S, C.configs("gram", {"rows": N * T, "cols": S, "red": p})[0].kwargs["BS"], DEVICE)
    assert splits > 1, "the test must exercise more than one column split"
    for per_val in (False, True):
        want = ref.dot_gram(*_f64(_pad_zero(A, L), _pad_zero(B, L), Av, Bv), bias=True,
                            per_val=per_val, lengths=L, val_lengths=VL)
        bound = ref.dot_gram(*_f64(A.abs(), B.abs(), Av.abs(), Bv.abs()), bias=True, per_val=per_val,
                             lengths=L, val_lengths=VL)
        got = ghost_dot.dot_gram(_pad_nan(A, L), _pad_nan(B, L), _pad_nan(Av, VL), _pad_nan(Bv, VL),
                                 bias=True, per_val=per_val, lengths=L, val_lengths=VL)
        _close(got, want, bound, torch.float32, "dot_gram split")
    V, vb = _rand(2, p, d), _rand(2, p)
    _close(ghost_dot.dot_dense(A, B, V, vb), ref.dot_dense(*_f64(A, B, V, vb)),
           ref.dot_dense(*_f64(A.abs(), B.abs(), V.abs(), vb.abs())), torch.float32, "dot_dense split")
    A2, B2 = _rand(2, 150, 6), _rand(2, 150, 9)
    _close(ghost_gram.gram(A2, B2, bias=True), ref.gram(*_f64(A2, B2), bias=True),
           ref.gram(*_f64(A2.abs(), B2.abs()), bias=True), torch.float32, "gram split")
    _close(ghost_gram.norms_sq(A2, B2, bias=False), ref.norms_sq(*_f64(A2, B2), bias=False),
           ref.norms_sq(*_f64(A2.abs(), B2.abs()), bias=False), torch.float32, "norms split")


def test_gram_column_chunks():
    """gram chunks the column samples to bound its partial buffer by the temp budget."""
    A, B = _rand(5, 13, 17), _rand(5, 13, 33)
    with ops.temp_budget(5 * 13 * 2 * 4 / 2**20):     # room for two column samples per launch
        got = ghost_gram.gram(A, B, bias=True)
    _close(got, ref.gram(*_f64(A, B), bias=True), ref.gram(*_f64(A.abs(), B.abs()), bias=True),
           torch.float32, "gram chunked")


def test_poisoning_is_real():
    """A launch whose grid misses column groups leaves NaN behind (so the fixture would catch it)."""
    A, B, Av, Bv, _, _ = _inputs(SHAPES["odd"], torch.float32, False)
    M, S = Av.shape[:2]
    part = ghost_gram.launch_rows(A, B, Av, Bv, None, None, bias=False, mode=0, groups=M, s_grp=S,
                                  group_is_sample=True, grid_groups=1)
    assert torch.isfinite(part[:, :, 0]).all() and torch.isnan(part[:, :, 1:]).all()


# ---- low precision -------------------------------------------------------------------------
def _low_precision(dtype):
    shape = SHAPES["odd"]
    A, B, Av, Bv, L, VL = _inputs(shape, dtype, True)
    A64, B64, Av64, Bv64 = _f64(A, B, Av, Bv)   # same rounded inputs, exact arithmetic
    Aa, Ba, Ava, Bva = _f64(A.abs(), B.abs(), Av.abs(), Bv.abs())
    got = ghost_dot.dot_gram(A, B, Av, Bv, bias=True, per_val=True, lengths=L, val_lengths=VL)
    _close(got, ref.dot_gram(A64, B64, Av64, Bv64, bias=True, per_val=True, lengths=L, val_lengths=VL),
           ref.dot_gram(Aa, Ba, Ava, Bva, bias=True, per_val=True, lengths=L, val_lengths=VL), dtype, "dot_gram")
    V = _rand(2, shape[3], shape[2], dtype=dtype)
    got = ghost_dot.dot_dense(A, B, V, None, lengths=L)
    _close(got, ref.dot_dense(A64, B64, V.double(), lengths=L),
           ref.dot_dense(Aa, Ba, V.double().abs(), lengths=L), dtype, "dot_dense")
    V32 = V.float()   # fp32 V (as val_grad returns) with low-precision activations
    got = ghost_dot.dot_dense(A, B, V32, None, lengths=L)
    _close(got, ref.dot_dense(A64, B64, V32.double(), lengths=L),
           ref.dot_dense(Aa, Ba, V32.double().abs(), lengths=L), dtype, "dot_dense mixed")
    _close(ghost_gram.gram(A, B, bias=False, lengths=L), ref.gram(A64, B64, bias=False, lengths=L),
           ref.gram(Aa, Ba, bias=False, lengths=L), dtype, "gram")
    _close(ghost_gram.norms_sq(A, B, bias=True, lengths=L), ref.norms_sq(A64, B64, bias=True, lengths=L),
           ref.norms_sq(Aa, Ba, bias=True, lengths=L), dtype, "norms_sq")


def test_fp16():
    _low_precision(torch.float16)


@pytest.mark.gpu
@needs_gpu
def test_bf16():
    """bf16 tl.dot is wrong under the interpreter (operands are upcast there), so the real bf16
    tensor-core path is only checked on a GPU."""
    _low_precision(torch.bfloat16)


def test_fp64_falls_back_to_reference():
    A, B, Av, Bv, L, VL = _f64(*_inputs(SHAPES["odd"], torch.float32, True)[:4]) + [None, None]
    got = ghost_dot.dot_gram(A, B, Av, Bv, bias=True, per_val=True)
    assert got.dtype == torch.float64
    assert torch.equal(got, ref.dot_gram(A, B, Av, Bv, bias=True, per_val=True))
    assert ghost_gram.gram(A, B, bias=True).dtype == torch.float64
    assert ghost_gram.norms_sq(A, B, bias=True).dtype == torch.float64
    assert ghost_dot.dot_dense(A, B, Bv[0].T @ Av[0]).dtype == torch.float64


# ---- large shapes / autotuning on a GPU ----------------------------------------------------
@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_large_autotuned(monkeypatch, dtype):
    monkeypatch.setenv("INRUN_AUTOTUNE", "1")
    N, T, d, p, M, S = 4, 1000, 768, 2304, 2, 515
    A, B, Av, Bv, L, VL = _inputs((N, T, d, p, M, S), dtype, True)
    A64, B64, Av64, Bv64 = _f64(A, B, Av, Bv)
    Aa, Ba, Ava, Bva = _f64(A.abs(), B.abs(), Av.abs(), Bv.abs())
    kw = dict(bias=True, per_val=True, lengths=L, val_lengths=VL)
    _close(ghost_dot.dot_gram(A, B, Av, Bv, **kw), ref.dot_gram(A64, B64, Av64, Bv64, **kw),
           ref.dot_gram(Aa, Ba, Ava, Bva, **kw), dtype, "dot_gram large")
    V = _rand(M, p, d, dtype=torch.float32)
    _close(ghost_dot.dot_dense(A, B, V, lengths=L), ref.dot_dense(A64, B64, V.double(), lengths=L),
           ref.dot_dense(Aa, Ba, V.double().abs(), lengths=L), dtype, "dot_dense large")
    _close(ghost_gram.gram(A, B, bias=True, lengths=L), ref.gram(A64, B64, bias=True, lengths=L),
           ref.gram(Aa, Ba, bias=True, lengths=L), dtype, "gram large")
    _close(ghost_gram.norms_sq(A, B, bias=True, lengths=L), ref.norms_sq(A64, B64, bias=True, lengths=L),
           ref.norms_sq(Aa, Ba, bias=True, lengths=L), dtype, "norms large")


# ---- configs -------------------------------------------------------------------------------
def test_configs_collapse_and_prune(monkeypatch):
    tiny = {"rows": 5, "cols": 3, "red": 17}
    monkeypatch.setenv("INRUN_AUTOTUNE", "0")
    for kind in ("gram", "dense"):
        (cfg,) = C.configs(kind, tiny)
        assert all(v >= C.MIN_BLOCK and v & (v - 1) == 0 for v in cfg.kwargs.values())
    monkeypatch.setenv("INRUN_AUTOTUNE", "1")
    monkeypatch.setattr(C, "interpreting", lambda: False)
    for kind in ("gram", "dense"):
        full = C.configs(kind)
        assert len(full) > 1
        assert all(c.num_warps in (4, 8) and 2 <= c.num_stages <= 4 for c in full)
        big = C.configs(kind, {"rows": 16384, "cols": 4096, "red": 3072})
        assert len(big) == len(full)
        small = C.configs(kind, tiny)
        assert 1 <= len(small) < len(full)
        hook = C.prune(kind)(full, {"ROWS": 5, "COLS_HINT": 3, "RED_HINT": 17})
        assert 1 <= len(hook) < len(full)    # the autotuner's early_config_prune hook
    monkeypatch.setattr(C, "interpreting", lambda: True)
    assert len(C.configs("gram")) == 1, "the interpreter must get exactly one config"
    with pytest.raises(ValueError):
        C.block(10, 48)


# ---- custom ops ----------------------------------------------------------------------------
def _op_cases(dtype):
    A, B = torch.randn(3, 5, 4, dtype=dtype), torch.randn(3, 5, 6, dtype=dtype)
    Av, Bv = torch.randn(2, 4, 4, dtype=dtype), torch.randn(2, 4, 6, dtype=dtype)
    L, VL = torch.tensor([5, 2, 0]), torch.tensor([1, 4])
    V, vb = torch.randn(2, 6, 4, dtype=dtype), torch.randn(2, 6, dtype=dtype)
    return [
        (torch.ops.inrun.dot_gram.default, (A, B, Av, Bv, True, True, L, VL)),
        (torch.ops.inrun.dot_gram.default, (A, B, Av, Bv, False, False, None, None)),
        (torch.ops.inrun.dot_dense.default, (A, B, V, vb, L)),
        (torch.ops.inrun.dot_dense.default, (A, B, V[0], None, None)),
        (torch.ops.inrun.gram.default, (A, B, True, L)),
        (torch.ops.inrun.norms_sq.default, (A, B, False, None)),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_opcheck(dtype):
    for op, args in _op_cases(dtype):
        torch.library.opcheck(op, args)


def test_custom_ops_match_reference():
    for op, args in _op_cases(torch.float64):
        name = op.name().split("::")[1].split(".")[0]
        fn = getattr(ref, name)
        if name == "dot_gram":
            want = fn(*args[:4], bias=args[4], per_val=args[5], lengths=args[6], val_lengths=args[7])
        elif name == "dot_dense":
            want = fn(*args[:4], lengths=args[4])
        else:
            want = fn(*args[:2], bias=args[2], lengths=args[3])
        torch.testing.assert_close(op(*args), want)


def test_compile_fullgraph():
    def f(A, B, Av, Bv, V, L):
        s = torch.ops.inrun.dot_gram(A, B, Av, Bv, True, True, L, None)
        s = s.sum(1) + torch.ops.inrun.dot_dense(A, B, V, None, L)
        return s + torch.ops.inrun.norms_sq(A, B, False, L) + torch.ops.inrun.gram(A, B, True, L).sum(0)
    A, B = torch.randn(3, 5, 4), torch.randn(3, 5, 6)
    Av, Bv, V = torch.randn(2, 4, 4), torch.randn(2, 4, 6), torch.randn(6, 4)
    L = torch.tensor([5, 2, 0])
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(A, B, Av, Bv, V, L), f(A, B, Av, Bv, V, L))


# ---- dispatcher ----------------------------------------------------------------------------
def test_dispatch_uses_triton(monkeypatch):
    calls = {}

    def counting(mod, name):
        real = getattr(mod, name)

        def wrapper(*a, **k):
            calls[name] = calls.get(name, 0) + 1
            return real(*a, **k)
        monkeypatch.setattr(mod, name, wrapper)

    for mod, name in ((ghost_dot, "dot_gram"), (ghost_dot, "dot_dense"), (ghost_gram, "gram"),
                      (ghost_gram, "norms_sq")):
        counting(mod, name)
    A, B, Av, Bv, L, VL = _inputs(SHAPES["odd"], torch.float32, True)
    V = _rand(B.shape[-1], A.shape[-1])

    def run_all():
        return [ops.ghost_dot(A, B, Av, Bv, bias=True, per_val=True, route="gram", lengths=L, val_lengths=VL),
                ops.ghost_dot(A, B, Av, Bv, bias=False, route="dense", lengths=L, val_lengths=VL),
                ops.ghost_dot_dense(A, B, V, lengths=L),
                ops.ghost_gram(A, B, bias=True, route="gram", lengths=L),
                ops.ghost_norms_sq(A, B, bias=True, route="gram", lengths=L)]

    monkeypatch.setenv("INRUN_BACKEND", "torch")
    want = run_all()
    assert calls == {}
    monkeypatch.setenv("INRUN_BACKEND", "triton")
    assert ops.resolve_backend(A, B) == "triton"
    got = run_all()
    assert calls == {"dot_gram": 1, "dot_dense": 2, "gram": 1, "norms_sq": 1}
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4 * w.abs().max().item())


def test_eligibility_without_interpreter(monkeypatch):
    from inrun_kernels.ops import triton_backend
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    why = triton_backend.eligible((torch.zeros(1),))
    assert isinstance(why, str) and "CUDA" in why
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("INRUN_BACKEND", "auto")   # the interpreter only on request
    assert "INRUN_BACKEND=triton" in triton_backend.eligible((torch.zeros(1),))
    monkeypatch.setenv("INRUN_BACKEND", "triton")
    assert triton_backend.eligible((torch.zeros(1),)) is None
