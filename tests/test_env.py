"""The environment variables of README "Backends" and "Ghost products", each read where it says:

- INRUN_TEMP_MB (default 256 MiB) bounds every temporary of the reference primitives (a
  TorchDispatchMode records the size of every tensor they create);
- INRUN_BACKEND=auto|torch|triton|cpp picks the implementation (Triton launches counted);
- INRUN_ROUTE=auto|gram|dense forces the route (the reference primitives that ran are counted);
- bad values of each are errors naming the variable, and the numbers never depend on them."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import inrun_kernels as ik
from inrun_kernels import ops
from inrun_kernels.ops import budget
from tests.models import TokenMixer, ce_loss, make_data
from tests.oracle import Oracle, rel_err


class LargestTemp(TorchDispatchMode):
    """The largest tensor (elements) any op creates inside the block, views excluded."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func._schema.is_mutable and func not in _VIEWS:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
        return out


_VIEWS = {torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default, torch.ops.aten.t.default,
          torch.ops.aten.transpose.int, torch.ops.aten.slice.Tensor, torch.ops.aten.select.int,
          torch.ops.aten.expand.default, torch.ops.aten.permute.default, torch.ops.aten.alias.default,
          torch.ops.aten.unsqueeze.default, torch.ops.aten.squeeze.dim, torch.ops.aten.reshape.default}


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    N, T, M, S, d, p = 16, 16, 4, 16, 24, 40
    return r(N, T, d), r(N, T, p), r(M, S, d), r(M, S, p)


PRIMITIVES = {
    "dot_gram": lambda A, B, Av, Bv: ops.ghost_dot(A, B, Av, Bv, bias=True, per_val=True, route="gram"),
    "dot_dense": lambda A, B, Av, Bv: ops.ghost_dot(A, B, Av, Bv, bias=True, route="dense"),
    "gram": lambda A, B, Av, Bv: ops.ghost_gram(A, B, bias=True, route="gram"),
    "norms": lambda A, B, Av, Bv: ops.ghost_norms_sq(A, B, bias=True, route="gram"),
}


@pytest.mark.parametrize("prim", list(PRIMITIVES))
def test_inrun_temp_mb_bounds_every_temporary(prim, monkeypatch):
    A, B, Av, Bv = _inputs()
    monkeypatch.delenv("INRUN_TEMP_MB", raising=False)
    with LargestTemp() as free:
        want = PRIMITIVES[prim](A, B, Av, Bv)
    assert budget.temp_budget_mb() == 256.0
    small = 2 ** 10   # elements (fp32): 4 KiB, far below the unchunked temporaries
    assert free.largest > 2 * small, "the shapes must need chunking under the small budget"
    # (the budget cannot go below one sample's Grams, [T, S], nor the dense route's [p, d]: < small)
    monkeypatch.setenv("INRUN_TEMP_MB", str(small * 4 / 2 ** 20))
    assert budget.temp_budget_elems() == small
    with LargestTemp() as bounded:
        got = PRIMITIVES[prim](A, B, Av, Bv)
    assert bounded.largest <= small, (bounded.largest, small)
    assert rel_err(got, want) < 1e-6
    with ik.temp_budget(256), LargestTemp() as override:   # temp_budget() overrides the variable
        PRIMITIVES[prim](A, B, Av, Bv)
    assert override.largest == free.largest


def test_inrun_temp_mb_end_to_end_and_bad_values(monkeypatch):
    model = TokenMixer().double()
    train, val = make_data(5, (13, 17), 4, seed=1), make_data(3, (13, 17), 4, seed=2)
    want = Oracle(model, ce_loss, train, val).dot(per_val=True)
    monkeypatch.setenv("INRUN_TEMP_MB", "0.0005")
    assert rel_err(ik.grad_dot(model, ce_loss, train, val, per_val=True), want) < 1e-12
    for bad, match in (("lots", "must be a number"), ("0", "must be positive"), ("-3", "must be positive")):
        monkeypatch.setenv("INRUN_TEMP_MB", bad)
        with pytest.raises(ValueError, match="INRUN_TEMP_MB"):
            ik.grad_dot(model, ce_loss, train, val)
        with pytest.raises(ValueError, match=match):
            budget.temp_budget_mb()


def test_inrun_route_forces_the_route(monkeypatch, primitives_run):
    monkeypatch.setenv("INRUN_BACKEND", "torch")
    model = TokenMixer().double()
    train, val = make_data(5, (13, 17), 4, seed=1), make_data(3, (13, 17), 4, seed=2)
    orc = Oracle(model, ce_loss, train, val)
    seen = {}
    for route in ("gram", "dense", "auto"):
        monkeypatch.setenv("INRUN_ROUTE", route)
        primitives_run.clear()
        assert rel_err(ik.grad_dot(model, ce_loss, train, val), orc.dot()) < 1e-12
        assert rel_err(ik.grad_gram(model, ce_loss, train), orc.gram()) < 1e-12
        seen[route] = dict(primitives_run)
    assert set(seen["gram"]) == {"dot_gram", "gram"}, seen["gram"]
    assert set(seen["dense"]) == {"dot_dense", "gram_materialised"}, seen["dense"]
    monkeypatch.setenv("INRUN_ROUTE", "sideways")
    with pytest.raises(ValueError, match="INRUN_ROUTE='sideways'"):
        ik.grad_dot(model, ce_loss, train, val)


def test_inrun_backend_picks_the_implementation(monkeypatch, triton_launches, primitives_run):
    model = TokenMixer()
    train, val = make_data(4, (5, 17), 4, torch.float32, seed=1), make_data(2, (5, 17), 4, torch.float32, seed=2)
    monkeypatch.setenv("INRUN_ROUTE", "gram")
    got = {}
    for backend in ("torch", "auto", "triton"):      # TRITON_INTERPRET=1 (conftest): CPU tensors
        monkeypatch.setenv("INRUN_BACKEND", backend)
        triton_launches.clear()
        primitives_run.clear()
        got[backend] = ik.grad_dot(model, ce_loss, train, val)
        ran = "triton" if triton_launches else "torch"
        assert ran == ("triton" if backend == "triton" else "torch"), (backend, triton_launches)
        assert bool(primitives_run) == (ran == "torch")
    assert rel_err(got["triton"], got["torch"]) < 1e-5 and torch.equal(got["auto"], got["torch"])
    monkeypatch.setenv("INRUN_BACKEND", "cpp")       # no C++ kernel for these products: the reference
    primitives_run.clear()
    assert torch.equal(ik.grad_dot(model, ce_loss, train, val), got["torch"]) and primitives_run
    monkeypatch.setenv("INRUN_BACKEND", "fastest")
    with pytest.raises(ValueError, match="INRUN_BACKEND='fastest' is not a backend"):
        ik.grad_dot(model, ce_loss, train, val)
    monkeypatch.setenv("INRUN_BACKEND", "triton")    # no interpreter, CPU tensors: says why
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="INRUN_BACKEND=triton .* need CUDA tensors"):
        ik.grad_dot(model, ce_loss, train, val)
