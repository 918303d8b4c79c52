"""The ghost primitives (reference and dispatcher) against per-sample gradients formed
explicitly with einsum, in float64, including the chunked paths under a tiny memory budget."""
import pytest
import torch

from inrun_kernels import ops
from inrun_kernels.ops import reference as ref
from tests.oracle import rel_err

SHAPES = [  # N, M, T, S, d, p
    (5, 3, 13, 13, 17, 33),
    (4, 2, 1, 1, 16, 8),     # 2-D inputs (T = 1)
    (6, 2, 8, 5, 32, 16),    # powers of two, different val length
]


def per_sample(A, B, bias, lengths=None):
    if lengths is not None:
        keep = torch.arange(B.shape[1])[None, :] < lengths[:, None]
        B = B * keep[..., None]
    g = torch.einsum("ntp,ntd->npd", B, A).flatten(1)
    return torch.cat([g, B.sum(1)], 1) if bias else g


def data(N, M, T, S, d, p, dtype=torch.float64):
    return (torch.randn(N, T, d, dtype=dtype), torch.randn(N, T, p, dtype=dtype),
            torch.randn(M, S, d, dtype=dtype), torch.randn(M, S, p, dtype=dtype))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("route", ["gram", "dense"])
@pytest.mark.parametrize("budget", [None, 0.001])
def test_ghost_dot(shape, bias, route, budget):
    A, B, Av, Bv = data(*shape)
    gt, gv = per_sample(A, B, bias), per_sample(Av, Bv, bias)
    with ops.temp_budget(budget or 256):
        pv = ops.ghost_dot(A, B, Av, Bv, bias=bias, per_val=True, route=route)
        s = ops.ghost_dot(A, B, Av, Bv, bias=bias, per_val=False, route=route)
    assert pv.shape == (shape[0], shape[1]) and pv.dtype == torch.float64
    assert rel_err(pv, gt @ gv.T) < 1e-12
    assert rel_err(s, gt @ gv.sum(0)) < 1e-12


@pytest.mark.parametrize("bias", [False, True])
def test_ghost_dot_lengths(bias):
    N, M, T, S, d, p = 5, 3, 13, 11, 17, 33
    A, B, Av, Bv = data(N, M, T, S, d, p)
    lengths, val_lengths = torch.tensor([13, 1, 7, 12, 5]), torch.tensor([11, 4, 9])
    want = per_sample(A, B, bias, lengths) @ per_sample(Av, Bv, bias, val_lengths).T
    for route in ("gram", "dense"):
        got = ops.ghost_dot(A, B, Av, Bv, bias=bias, per_val=True, route=route,
                            lengths=lengths, val_lengths=val_lengths)
        assert rel_err(got, want) < 1e-12


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("route", ["gram", "dense"])
@pytest.mark.parametrize("budget", [None, 0.001])
def test_gram_and_norms(shape, bias, route, budget):
    N, _, T, _, d, p = shape
    A, B, _, _ = data(*shape)
    g = per_sample(A, B, bias)
    with ops.temp_budget(budget or 256):
        G = ops.ghost_gram(A, B, bias=bias, route=route)
        n2 = ops.ghost_norms_sq(A, B, bias=bias, route=route)
    assert rel_err(G, g @ g.T) < 1e-12
    assert torch.equal(G, G.T)
    assert rel_err(n2, g.square().sum(1)) < 1e-12


@pytest.mark.parametrize("K", [None, 3])
def test_dot_dense(K):
    N, T, d, p = 5, 13, 17, 33
    A, B = torch.randn(N, T, d, dtype=torch.float64), torch.randn(N, T, p, dtype=torch.float64)
    V = torch.randn(*(() if K is None else (K,)), p, d, dtype=torch.float64)
    vb = torch.randn(*(() if K is None else (K,)), p, dtype=torch.float64)
    g = per_sample(A, B, True)
    Vflat = torch.cat([V.reshape(-1, p * d), vb.reshape(-1, p)], 1)
    want = g @ Vflat.T
    got = ops.ghost_dot_dense(A, B, V, vb)
    assert rel_err(got, want if K else want[:, 0]) < 1e-12


def test_float32_inputs_give_float32():
    A, B, Av, Bv = data(4, 2, 5, 5, 8, 6, dtype=torch.float32)
    out = ops.ghost_dot(A, B, Av, Bv, bias=True)
    assert out.dtype == torch.float32
    want = per_sample(A.double(), B.double(), True) @ per_sample(Av.double(), Bv.double(), True).sum(0)
    assert rel_err(out, want) < 5e-7   # measured 6e-8


def test_cost_model_prefers_dense_for_long_sequences():
    costs = ops.dispatch.dot_route_costs(N=16, T=1024, M=4, S=1024, d=768, p=768, per_val=False)
    assert costs["dense"][0] < costs["gram"][0]
    costs = ops.dispatch.dot_route_costs(N=16, T=1, M=4, S=1, d=768, p=768, per_val=False)
    assert costs["gram"][0] < costs["dense"][0]


def test_backend_errors(monkeypatch):
    A, B, Av, Bv = data(2, 2, 3, 3, 4, 5)
    monkeypatch.setenv("INRUN_BACKEND", "nope")
    with pytest.raises(ValueError, match="INRUN_BACKEND"):
        ops.ghost_dot(A, B, Av, Bv, bias=False)
    monkeypatch.setenv("INRUN_BACKEND", "cpp")
    if "cpp" not in ops.dispatch._BACKEND_TABLE:
        with pytest.raises(RuntimeError, match="INRUN_BACKEND=cpp"):
            ops.ghost_dot(A, B, Av, Bv, bias=False)
    monkeypatch.setenv("INRUN_BACKEND", "torch")
    monkeypatch.setenv("INRUN_ROUTE", "sideways")
    with pytest.raises(ValueError, match="INRUN_ROUTE"):
        ops.ghost_dot(A, B, Av, Bv, bias=False)


def test_shape_errors():
    A, B, Av, Bv = data(2, 2, 3, 3, 4, 5)
    with pytest.raises(ValueError, match="inconsistent shapes"):
        ops.ghost_dot(A, B, Av, Bv[..., :4], bias=False)
    with pytest.raises(ValueError, match="3-D"):
        ops.ghost_gram(A[0], B[0], bias=False)
    with pytest.raises(ValueError):
        ops.temp_budget(0).__enter__()
